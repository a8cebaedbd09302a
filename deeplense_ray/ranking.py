"""One rule for "which is best": checkpoints of a run, trials of a search, epochs of a trial's curve.

A metric value ranks under a mode, 'max' (larger is better) or 'min' (smaller is better); any other mode is
a ValueError. Only a finite number ranks by its value: NaN, None, +-inf, non-numbers (bool included) and a
diverged epoch's finite stand-in (``|v| >= DIVERGED_VALUE``, what a diverged trial reports to Tune, see
:func:`deeplense_ray.tune.trial.diverged_value`) are *NaN-like*: they never beat a finite value and tie with
each other, so the tie-break keys decide among them. Everything NaN-like ranks last.

The tie-breaks, compared in this order:

* checkpoints of one run (:func:`checkpoint_key`; Ray Train's kept checkpoints in
  :func:`deeplense_ray.train.trainer.best_checkpoint`, a run trained in this process in
  :func:`deeplense_ray.train.checkpoint.ranked_checkpoints`, a trial's checkpoint in
  :func:`deeplense_ray.tune.best.best_checkpoint_of`): the metric, then the lower ``val_loss`` (missing or
  NaN-like: worst), then the earlier epoch;
* trials of one search (:func:`trial_key`; summary table, parent run, live console): the trial's best-epoch
  metric, then the smaller trial id;
* the best epoch of a trial's curve (:func:`epoch_key`): the metric, then the earlier epoch.

:func:`rank_key` builds any such sort key (smaller is better), :func:`best` picks the best item (the first
of equal keys) and :func:`is_better` compares two values. This module imports nothing from the package.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

#: Magnitude of the finite stand-in a diverged epoch reports for its metric (what a diverged trial reports to
#: Tune; logged to MLflow as NaN); ranked as NaN.
DIVERGED_VALUE = 1e30
#: The modes a metric ranks under.
MODES: tuple[str, ...] = ("max", "min")
#: The tie-break metric of checkpoints of one run (lower is better).
TIE_LOSS = "val_loss"
#: The metric and mode that pick a run's best checkpoint, per training task: classification by the validation
#: macro AUC, parameter inference (per-lens Gaussian posteriors) by the validation negative log-likelihood,
#: which rewards both accuracy and calibrated uncertainties. A search on a task defaults to the same.
TASK_SCORES: dict[str, tuple[str, str]] = {
    "classification": ("val_auc_macro", "max"),
    "inference": ("val_nll", "min"),
}


def task_score(task: str | None) -> tuple[str, str]:
    """(metric, mode) of :data:`TASK_SCORES` for ``task`` (None: classification); ValueError if unknown."""
    key = task or "classification"
    if key not in TASK_SCORES:
        raise ValueError(f"task must be one of {list(TASK_SCORES)}, got {task!r}")
    return TASK_SCORES[key]


T = TypeVar("T")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")


def as_metric(value: Any) -> float:
    """``value`` as a float, or NaN if NaN-like (NaN, None, +-inf, a non-number, a diverged stand-in)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return math.nan
    v = float(value)
    return v if math.isfinite(v) and abs(v) < DIVERGED_VALUE else math.nan


def rank(value: Any, mode: str) -> float:
    """Where ``value`` ranks under ``mode``, smaller is better: -v for 'max', v for 'min', +inf if
    NaN-like."""
    _check_mode(mode)
    v = as_metric(value)
    if math.isnan(v):
        return math.inf
    return -v if mode == "max" else v


def rank_key(value: Any, mode: str, *tie: Any) -> tuple[Any, ...]:
    """Sort key of a metric value, smaller is better: its :func:`rank`, then the caller's tie-break keys
    ``tie`` (compared ascending)."""
    return (rank(value, mode), *tie)


def is_better(a: Any, b: Any, mode: str) -> bool:
    """True if metric value ``a`` strictly beats ``b`` under ``mode`` (a NaN-like value beats nothing)."""
    return rank(a, mode) < rank(b, mode)


def worst_value(mode: str) -> float:
    """The value every finite metric value beats under ``mode`` (-inf for 'max', +inf for 'min')."""
    _check_mode(mode)
    return -math.inf if mode == "max" else math.inf


def best(
    items: Iterable[T],
    value_of: Callable[[T], Any],
    mode: str,
    tie_of: Callable[[T], Any] = lambda item: (),
) -> T | None:
    """The best of ``items`` by :func:`rank_key` of ``value_of(item)`` and the tie-break keys
    ``tie_of(item)`` (a tuple, or one key); the first of equal keys; None for no items."""
    _check_mode(mode)

    def key(item: T) -> tuple[Any, ...]:
        tie = tie_of(item)
        return rank_key(value_of(item), mode, *(tie if isinstance(tie, tuple) else (tie,)))

    return min(items, key=key, default=None)


def checkpoint_key(metrics: Mapping[str, Any], metric: str, mode: str) -> tuple[float, float, int]:
    """Sort key of a checkpoint of one run from its epoch's ``metrics``, smaller is better: ``metric``,
    then the lower ``val_loss`` (missing: worst), then the earlier ``epoch`` (missing: 0)."""
    epoch = metrics.get("epoch")
    epoch = int(epoch) if isinstance(epoch, numbers.Real) and math.isfinite(epoch) else 0
    return rank_key(metrics.get(metric), mode, rank(metrics.get(TIE_LOSS), "min"), epoch)


def trial_key(value: Any, trial_id: Any, mode: str) -> tuple[float, str]:
    """Sort key of a trial of one search, smaller is better: its best-epoch metric, then the smaller id."""
    return rank_key(value, mode, str(trial_id))


def epoch_key(value: Any, epoch: int, mode: str) -> tuple[float, int]:
    """Sort key of an epoch of one trial's curve, smaller is better: the metric, then the earlier epoch."""
    return rank_key(value, mode, int(epoch))
