"""The search's winner: its best trial, that trial's best still existing checkpoint, and its test metrics.

One rule names the best everywhere (summary table, parent run, live console), :mod:`deeplense_ray.ranking`'s:
the best of the trials' best-epoch metrics, ties to the smaller trial id (:func:`rank_key`); a trial's
checkpoint as a run's: the metric, then the lower val_loss, then the earlier epoch. What stays on disk
afterwards is :mod:`deeplense_ray.tune.disk`'s business.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from deeplense_ray import ranking
from deeplense_ray.tune.results import TrialSummary

#: Result key holding the path of the checkpoint a report carried.
CHECKPOINT_PATH_KEY = "checkpoint_path"


def rank_key(t: TrialSummary, mode: str) -> tuple[float, str]:
    """Sort key of a trial, best first: its best metric under ``mode`` (NaN last), then its trial id."""
    return ranking.trial_key(t.best_metric, t.trial_id, mode)


def pick_best(trials: list[TrialSummary], mode: str) -> TrialSummary:
    """The search's best trial: the best of the trials' best-epoch metrics; ties go to the smaller trial id
    (the same rule as the live console, so every place names the same trial). ValueError for no trials."""
    found = ranking.best(trials, lambda t: t.best_metric, mode, tie_of=lambda t: str(t.trial_id))
    if found is None:
        raise ValueError("pick_best() of no trials")
    return found


def best_checkpoint_of(result, metric: str, mode: str) -> tuple[str | None, int]:
    """Path of the best *still existing* checkpoint of one trial by ``metric`` (and its epoch), ranked as a
    run's checkpoints (:func:`deeplense_ray.ranking.checkpoint_key`); (None, 0) if none exists."""
    df = result.metrics_dataframe
    if df is None or CHECKPOINT_PATH_KEY not in df:
        return None, 0
    rows = []
    for _, row in df.iterrows():
        p = row.get(CHECKPOINT_PATH_KEY)
        if not isinstance(p, str) or not os.path.isdir(p):
            continue
        epoch = int(row.get("epoch", row.get("training_iteration", 0)))
        rows.append((p, {metric: row.get(metric), "val_loss": row.get("val_loss"), "epoch": epoch}))
    found = min(rows, key=lambda pm: ranking.checkpoint_key(pm[1], metric, mode), default=None)
    return (found[0], found[1]["epoch"]) if found is not None else (None, 0)


def best_train_fields(best: TrialSummary, result, base_train: Mapping[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields that retrain the best trial (``result``: its Tune result), without the
    search's storage path (what ``best_config.yaml`` records)."""
    from deeplense_ray.tune.spaces import trial_train_fields

    fields = trial_train_fields(base_train, best.config, result.config["_search"]["hparams"])
    fields.pop("storage_path", None)
    return fields


def evaluate_best(ckpt: str | None, base_train: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(test metrics, predictions ``y_true``/``probs``) of checkpoint ``ckpt`` on the dataset's test split,
    or an online search's fixed simulated test set; ({}, {}) without a checkpoint."""
    test_metrics: dict[str, Any] = {}
    if ckpt is not None:
        from deeplense_ray.config import TrainConfig
        from deeplense_ray.train.evaluation import evaluate_test

        test_metrics = dict(evaluate_test(ckpt, TrainConfig(**base_train)))
    # per-lens arrays (classification: labels and probabilities; task 'inference': posteriors and ids)
    keys = ("y_true", "probs", "mean", "cov", "truth", "ids")
    predictions = {k: test_metrics.pop(k) for k in keys if k in test_metrics}
    return test_metrics, predictions
