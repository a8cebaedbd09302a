"""Classification metrics over a whole split, in one place (sklearn where it has them).

Every number here is computed from the predictions of the *whole* split at once (never averaged per batch),
and AUCs are computed from softmax *probabilities* (never raw logits). A class whose one-vs-rest AUC is
undefined in a split (no positive or no negative example) gets ``nan`` and is left out of the macro mean.

A diverged model (non-finite probabilities or loss) is a result, not an error: the metrics come back with
``diverged`` = 1, every AUC ``nan``, the loss ``nan`` (or the caller's non-finite value), and accuracy, F1 and
the confusion matrix computed with each non-finite row counted as a wrong prediction (no predicted class), so
a hyperparameter search can rank the trial as the worst instead of crashing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Largest tolerated deviation of a probability row sum from 1 (float32 softmax rounding is ~1e-7).
PROB_SUM_ATOL = 1e-3


def _check_inputs(
    y_true: Any, probs: Any, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (int64), probabilities (float64) and the mask of rows whose probabilities are all finite.

    Shapes, labels and (on the finite rows) the probability range and row sums are checked; non-finite rows
    are allowed (a diverged model), see :func:`classification_metrics`."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    c = len(class_names)
    if c < 2:
        raise ValueError(f"need at least 2 classes, got class_names={list(class_names)!r}")
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D (one label per example), got shape {y.shape}")
    if p.ndim != 2 or p.shape[1] != c:
        raise ValueError(f"probs must have shape [N, {c}] for classes {list(class_names)}, got {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} labels but probs has {p.shape[0]} rows")
    if y.shape[0] == 0:
        raise ValueError("cannot compute metrics of an empty split (0 examples)")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"y_true holds labels outside [0, {c - 1}]: min {y.min()}, max {y.max()}")
    finite = np.all(np.isfinite(p), axis=1)
    if finite.any():
        pf = p[finite]
        if pf.min() < 0.0 or pf.max() > 1.0 + PROB_SUM_ATOL:
            raise ValueError(
                f"probs must be probabilities in [0, 1] (apply softmax to logits first); got range "
                f"[{pf.min():.4g}, {pf.max():.4g}]"
            )
        sums = np.where(finite, p.sum(axis=1), 1.0)
        worst = int(np.argmax(np.abs(sums - 1.0)))
        if abs(sums[worst] - 1.0) > PROB_SUM_ATOL:
            raise ValueError(
                f"probs rows must sum to 1 (softmax probabilities, not logits); row {worst} sums to "
                f"{sums[worst]:.6g}"
            )
    return y.astype(np.int64), p, finite


def softmax(logits: Any) -> np.ndarray:
    """Numerically stable softmax over the last axis (float64)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def one_vs_rest_auc(y_true: np.ndarray, scores: np.ndarray, positive: int) -> float:
    """ROC AUC of class ``positive`` against the rest from its probability column; nan if undefined."""
    from sklearn.metrics import roc_auc_score

    target = (y_true == positive).astype(np.int64)
    if target.min() == target.max():
        return math.nan
    return float(roc_auc_score(target, scores))


def classification_metrics(
    y_true: Any,
    probs: Any,
    class_names: Sequence[str],
    *,
    loss: float | None = None,
) -> dict[str, Any]:
    """All classification metrics of one split from its labels and softmax probabilities.

    Args:
        y_true: int labels [N] (class indices into ``class_names``).
        probs: softmax probabilities [N, C] (rows sum to 1; logits are refused with a ValueError). Rows with
            non-finite values (a diverged model) are accepted and flag the result as diverged.
        class_names: the C class names, in label order.
        loss: mean loss over the split if the caller computed it (e.g. with label smoothing); default the mean
            cross-entropy ``-mean(log p[y])`` computed here from ``probs`` (probabilities clipped at 1e-15;
            nan if any row is non-finite). A non-finite ``loss`` flags the result as diverged.

    Returns:
        dict with ``n`` (examples), ``accuracy``, ``loss``, ``auc`` {class: one-vs-rest ROC AUC or nan},
        ``auc_macro`` (mean of the defined per-class AUCs; nan if none), ``auc_micro`` (ROC AUC of all
        one-hot targets against all probabilities flattened; nan if undefined), ``f1`` {class: F1},
        ``f1_macro``, ``confusion_matrix`` (C x C list of ints, rows = true class, columns = predicted),
        ``class_names`` (list), ``diverged`` (1 if any probability or the loss is non-finite, else 0),
        ``n_nonfinite`` (rows with non-finite probabilities). On such rows no class is predicted: they count
        as wrong in accuracy and as false negatives of their true class in F1, and are absent from the
        confusion matrix (its rows then sum to less than the class counts); every AUC is nan.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    y, p, finite = _check_inputs(y_true, probs, class_names)
    c = len(class_names)
    labels = list(range(c))
    n_nonfinite = int(len(y) - finite.sum())
    # no predicted class (-1, never a label) for a non-finite row: it counts as a wrong prediction
    pred = np.where(finite, np.nan_to_num(p, nan=-1.0, posinf=-1.0, neginf=-1.0).argmax(axis=1), -1)

    if n_nonfinite:
        auc = {name: math.nan for name in class_names}
        auc_macro = auc_micro = math.nan
    else:
        auc = {name: one_vs_rest_auc(y, p[:, k], k) for k, name in enumerate(class_names)}
        defined = [v for v in auc.values() if not math.isnan(v)]
        auc_macro = float(np.mean(defined)) if defined else math.nan
        flat = np.eye(c, dtype=np.int64)[y].ravel()
        auc_micro = float(roc_auc_score(flat, p.ravel())) if flat.min() != flat.max() else math.nan

    f1 = f1_score(y, pred, labels=labels, average=None, zero_division=0.0)
    if loss is None:
        if n_nonfinite:
            loss = math.nan
        else:
            loss = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1.0))))
    diverged = int(n_nonfinite > 0 or not math.isfinite(float(loss)))
    return {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "loss": float(loss),
        "auc": auc,
        "auc_macro": auc_macro,
        "auc_micro": auc_micro,
        "f1": {name: float(v) for name, v in zip(class_names, f1)},
        "f1_macro": float(np.mean(f1)),
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).astype(int).tolist(),
        "class_names": list(class_names),
        "diverged": diverged,
        "n_nonfinite": n_nonfinite,
    }


class _WeightedOvrAuc:
    """One-vs-rest ROC AUC of each class under integer example weights (a bootstrap resample's counts), by
    the Mann-Whitney statistic with ties counted half: equal to sklearn's ``roc_auc_score`` on the resampled
    examples, without resampling the arrays or sklearn's per-call checks (~1 ms each: 3,000 calls made a
    test evaluation's interval take ~4 s). The scores are sorted once per class."""

    def __init__(self, y: np.ndarray, p: np.ndarray) -> None:
        self.cols = []
        for k in range(p.shape[1]):
            order = np.argsort(p[:, k], kind="mergesort")
            s = p[order, k]
            group = np.concatenate([[0], np.cumsum(s[1:] != s[:-1])]) if len(s) else np.zeros(0, np.int64)
            self.cols.append((order, group, int(group[-1]) + 1 if len(s) else 0, y[order] == k))

    def macro(self, w: np.ndarray) -> float:
        """Mean over the classes whose AUC is defined under weights ``w`` (nan if none is)."""
        aucs = []
        for order, group, n_groups, is_pos in self.cols:
            wk = w[order]
            pos = np.bincount(group, weights=wk * is_pos, minlength=n_groups)
            neg = np.bincount(group, weights=wk * ~is_pos, minlength=n_groups)
            w_pos, w_neg = pos.sum(), neg.sum()
            if w_pos > 0 and w_neg > 0:
                aucs.append(float((pos * (np.cumsum(neg) - 0.5 * neg)).sum() / (w_pos * w_neg)))
        return float(np.mean(aucs)) if aucs else math.nan


def bootstrap_auc_ci(
    y_true: Any, probs: Any, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the macro one-vs-rest AUC (resampling the examples, seeded).

    Resamples in which a class has no positive or no negative example leave that class out of their macro
    mean, as :func:`classification_metrics` does; (nan, nan) if the AUC is undefined (a diverged model,
    one class only).
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if len(y) < 2 or p.ndim != 2 or not np.isfinite(p).all():
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    auc = _WeightedOvrAuc(y, p)
    values = []
    for _ in range(int(n_boot)):
        idx = rng.integers(0, len(y), len(y))
        v = auc.macro(np.bincount(idx, minlength=len(y)).astype(np.float64))
        if not math.isnan(v):
            values.append(v)
    if not values:
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def flatten_metrics(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Scalar view of :func:`classification_metrics` for reports and MLflow.

    ``prefix`` 'val' gives val_loss, val_acc, val_auc_macro, val_auc_micro, val_f1_macro, val_diverged (0/1),
    val_auc_<class>, val_f1_<class>. The confusion matrix is left out (it is logged as an image and in the
    metrics JSON).
    """
    out = {
        f"{prefix}_loss": float(metrics["loss"]),
        f"{prefix}_acc": float(metrics["accuracy"]),
        f"{prefix}_auc_macro": float(metrics["auc_macro"]),
        f"{prefix}_auc_micro": float(metrics["auc_micro"]),
        f"{prefix}_f1_macro": float(metrics["f1_macro"]),
        f"{prefix}_diverged": float(metrics.get("diverged", 0)),
    }
    if metrics.get("auc_macro_ci") is not None:  # (low, high) from bootstrap_auc_ci (test evaluations)
        low, high = metrics["auc_macro_ci"]
        out[f"{prefix}_auc_macro_ci_low"], out[f"{prefix}_auc_macro_ci_high"] = float(low), float(high)
    for name, value in metrics["auc"].items():
        out[f"{prefix}_auc_{name}"] = float(value)
    for name, value in metrics["f1"].items():
        out[f"{prefix}_f1_{name}"] = float(value)
    return out
