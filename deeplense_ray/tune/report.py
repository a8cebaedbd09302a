"""What a finished search leaves in its directory: the trial table, the validation curves, the best config.

``summary.txt`` (:func:`format_summary`, best trial first), ``val_curves.png`` (:func:`plot_curves`),
``best_config.yaml`` (:func:`best_config_doc`: the best trial, its TrainConfig, checkpoint and test metrics)
and ``best_checkpoint.txt``, written by :func:`write_search_files`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from deeplense_ray.io import atomic_path, atomic_write_text
from deeplense_ray.tune.best import rank_key
from deeplense_ray.tune.results import TrialSummary
from deeplense_ray.tune.settings import TuneSettings

BEST_CONFIG_FILE = "best_config.yaml"
BEST_CHECKPOINT_FILE = "best_checkpoint.txt"
SUMMARY_FILE = "summary.txt"
CURVES_FILE = "val_curves.png"


def format_summary(trials: list[TrialSummary], metric: str, mode: str) -> str:
    """Plain-text table: trial, config, epochs run, best val metric, outcome (best trial first)."""
    order = sorted(trials, key=lambda t: rank_key(t, mode))

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    rows = [
        (
            t.trial_id,
            " ".join(f"{k}={fmt(v)}" for k, v in t.config.items()),
            str(t.epochs_run),
            f"{t.best_metric:.4f}",
            t.outcome,
        )
        for t in order
    ]
    head = ("trial", "config", "epochs", f"best {metric}", "outcome")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *map(line, rows)])


def plot_curves(trials: list[TrialSummary], metric: str, path: str) -> str:
    """PNG of every trial's validation curve (dashed: stopped by ASHA). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in trials:
        if not t.curve:
            continue
        e, v = zip(*t.curve)
        ax.plot(e, v, marker="o", linestyle="-" if t.outcome == "completed" else "--", label=t.trial_id)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"validation {metric} per trial (dashed: stopped early)")
    if trials:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def best_config_doc(
    settings: TuneSettings,
    search: str,
    best: TrialSummary,
    train_config: Mapping[str, Any],
    checkpoint: tuple[str | None, int],
    test_metrics: Mapping[str, Any],
) -> dict[str, Any]:
    """The content of ``best_config.yaml`` (plain data); ``checkpoint``: (path or None, its epoch)."""
    return {
        "search": search,
        "model": settings.model,
        "trial_id": best.trial_id,
        "metric": settings.metric,
        "mode": settings.resolved_mode,
        "best_metric": best.best_metric,
        "best_epoch": best.best_epoch,
        "hparams": plain(best.config),
        "train_config": plain(train_config),
        "best_checkpoint": checkpoint[0],
        "checkpoint_epoch": checkpoint[1],
        "test_metrics": plain(scalar_metrics(test_metrics)),
        "test_auc_macro_ci": plain(test_metrics.get("auc_macro_ci")),
    }


def write_search_files(
    output_dir: str, best_doc: Mapping[str, Any], table: str, trials: list[TrialSummary], metric: str
) -> str:
    """Write ``best_config.yaml``, ``best_checkpoint.txt``, ``summary.txt`` and ``val_curves.png`` into
    ``output_dir``; returns the path of the PNG."""
    import yaml

    for name, text in (
        (BEST_CONFIG_FILE, yaml.safe_dump(dict(best_doc), sort_keys=False)),
        (BEST_CHECKPOINT_FILE, (best_doc["best_checkpoint"] or "") + "\n"),
        (SUMMARY_FILE, table + "\n"),
    ):
        atomic_write_text(os.path.join(output_dir, name), text, fsync=False)
    return plot_curves(trials, metric, os.path.join(output_dir, CURVES_FILE))


def scalar_metrics(m: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``m`` (no bools), as floats."""
    return {
        k: float(v)
        for k, v in m.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def plain(x: Any) -> Any:
    """YAML-safe copy (numpy scalars -> python, tuples -> lists)."""
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        return x.item()
    if dataclasses.is_dataclass(x):
        return plain(dataclasses.asdict(x))
    return x
