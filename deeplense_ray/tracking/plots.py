"""Evaluation plots as PNG files (matplotlib, Agg canvas, no pyplot global state), written atomically."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deeplense_ray.io import atomic_path


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | os.PathLike[str]) -> Path:
    """Save ``fig`` as a PNG at ``path`` (temporary name, then renamed)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def plot_roc_curves(
    y_true: Any,
    probs: Any,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "ROC (one-vs-rest)",
) -> Path:
    """One-vs-rest ROC curve of every class (from softmax probabilities) with its AUC in the legend.

    A diverged model (any non-finite probability) has no ROC curve: the figure then says so instead."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    nonfinite = int((~np.all(np.isfinite(p), axis=1)).sum()) if p.ndim == 2 else 0
    if nonfinite:
        ax.text(0.5, 0.5, f"diverged: {nonfinite} of {len(p)} rows non-finite\nno ROC curve", ha="center")
    for k, name in enumerate(class_names if not nonfinite else ()):
        target = (y == k).astype(int)
        if target.min() == target.max():
            continue
        fpr, tpr, _ = roc_curve(target, p[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(target, p[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    return save_png(fig, path)


def plot_confusion_matrix(
    confusion: Any,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "confusion matrix",
) -> Path:
    """Confusion matrix (rows = true class, columns = predicted) with counts and row fractions."""
    cm = np.asarray(confusion, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    c = len(class_names)
    fig = _new_figure(1.6 * c + 2.5, 1.4 * c + 1.8)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    for i in range(c):
        for j in range(c):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{frac[i, j]:.2f}",
                ha="center",
                va="center",
                color="white" if frac[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(c), labels=list(class_names))
    ax.set_yticks(range(c), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return save_png(fig, path)


def plot_curves(
    history: Sequence[Mapping[str, float]],
    path: str | os.PathLike[str],
    *,
    loss_keys: Sequence[str] = ("train_loss", "val_loss"),
    metric_keys: Sequence[str] = ("train_acc", "val_acc", "val_auc_macro", "val_auc_micro"),
    x_key: str = "epoch",
) -> Path:
    """Loss curves (left) and metric curves (right) against epoch from per-epoch report dicts."""
    fig = _new_figure(11.0, 4.2)
    for col, (keys, ylabel) in enumerate(((loss_keys, "loss"), (metric_keys, "metric"))):
        ax = fig.add_subplot(1, 2, col + 1)
        for key in keys:
            pts = [(h[x_key], h[key]) for h in history if key in h and h.get(key) is not None]
            pts = [(x, y) for x, y in pts if math.isfinite(float(y))]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=key)
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return save_png(fig, path)


def plot_calibration(
    curve: Mapping[float, Sequence[float]],
    targets: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "calibration",
    tol: float = 0.05,
) -> Path:
    """Observed against expected coverage of the marginal central intervals, one line per target (from
    ``{level: [coverage per target]}``), with the diagonal (calibrated) and a +-``tol`` band. Below the
    diagonal: over-confident (intervals too narrow); above: under-confident."""
    levels = sorted(float(q) for q in curve)
    obs = np.asarray([list(curve[q]) for q in sorted(curve, key=float)], dtype=np.float64)
    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    grid = np.linspace(0, 1, 11)
    ax.fill_between(grid, grid - tol, grid + tol, color="grey", alpha=0.2, label=f"+-{tol:.0%}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for k, name in enumerate(targets):
        if obs.size:
            ax.plot(levels, obs[:, k], marker="o", markersize=3, label=str(name))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("expected coverage (interval level)")
    ax.set_ylabel("observed coverage")
    ax.set_title(title)
    ax.legend(loc="upper left")
    return save_png(fig, path)


def plot_predicted_vs_true(
    mean: Any,
    cov: Any,
    truth: Any,
    targets: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "predicted vs true",
    max_points: int = 2000,
) -> Path:
    """Posterior mean (with its 1-sigma error bar) against the true value, one panel per target, with the
    diagonal; at most ``max_points`` lenses drawn (the first ones)."""
    m = np.asarray(mean, np.float64)[:max_points]
    y = np.asarray(truth, np.float64)[:max_points]
    sd = np.sqrt(np.diagonal(np.asarray(cov, np.float64), axis1=1, axis2=2))[:max_points]
    t = len(targets)
    fig = _new_figure(4.2 * t, 4.0)
    for k, name in enumerate(targets):
        ax = fig.add_subplot(1, t, k + 1)
        ax.errorbar(y[:, k], m[:, k], yerr=sd[:, k], fmt="o", markersize=2, alpha=0.4, elinewidth=0.5)
        finite = np.isfinite(y[:, k])
        if finite.any():
            lo, hi = float(np.min(y[finite, k])), float(np.max(y[finite, k]))
            ax.plot([lo, hi], [lo, hi], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_png(fig, path)
