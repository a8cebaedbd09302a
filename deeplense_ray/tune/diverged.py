"""What Tune sees of a diverged trial: the worst finite metric, and a stopper that ends the trial.

Shared by both trial runners (tune/trial.py: a ``TorchTrainer`` per trial; tune/actor_trial.py: the loop in
the trial's actor), so that a search treats a diverged trial the same way whichever ran it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ray.tune import Stopper

from deeplense_ray.tune.mlflow_runs import DIVERGED_KEY, DIVERGED_VALUE


def diverged_value(mode: str) -> float:
    """What a diverged trial reports to Tune instead of a NaN/inf metric: ``-+DIVERGED_VALUE``.

    Finite on purpose: ASHA's rung cutoff interpolates a percentile of the recorded values, and with
    -inf among them the interpolation yields NaN (inf - inf); Optuna marks a NaN trial failed and learns
    nothing from it. Every real value beats it (AUC/accuracy lie in [0, 1]; a loss stays far below 1e30).
    """
    return -DIVERGED_VALUE if mode == "max" else DIVERGED_VALUE


def sanitize_result(metrics: Mapping[str, Any], metric: str, mode: str) -> dict[str, Any]:
    """One epoch's report as Tune should see it: a diverged epoch gets the worst finite ``metric``.

    The train loop reports a diverged epoch (non-finite loss or outputs) with ``diverged`` = 1 and NaN
    losses/AUCs instead of raising. Such a report, or one whose ``metric`` is not a finite number, gets
    ``metric`` = :func:`diverged_value` and ``diverged`` = 1: ASHA and the searcher rank it below every real
    trial, and :class:`DivergedStopper` ends the trial (its weights are NaN; more epochs cannot help).
    """
    out = dict(metrics)
    v = out.get(metric)
    bad_value = metric in out and (not isinstance(v, (int, float)) or not math.isfinite(float(v)))
    if bad_value or out.get(DIVERGED_KEY) == 1:
        out[metric] = diverged_value(mode)
        out[DIVERGED_KEY] = 1
    return out


class DivergedStopper(Stopper):
    """Tune stopper (``RunConfig(stop=...)``): ends a trial at its first diverged report."""

    def __call__(self, trial_id: str, result: dict) -> bool:
        return result.get(DIVERGED_KEY) == 1

    def stop_all(self) -> bool:
        return False
