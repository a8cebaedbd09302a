"""Disk kept by a search: each trial keeps only what resume and the final selection need.

While a trial runs, Ray Train keeps its ``num_to_keep`` best checkpoints by the search metric plus the latest
(resume needs it). Once a trial has ended it is never resumed, so :class:`CheckpointPruner` (a driver-side
Tune callback) deletes all its checkpoints but its best by the search metric (the one the search evaluates if
the trial wins). When the search ends, :func:`prune_to_best_trial` removes the checkpoints of every trial but
the best (``keep_checkpoints='best'``, the default; ``'trials'`` keeps each trial's best).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ray.tune import Callback

# the same checkpoint layout for runs of Ray Train and runs in a trial's actor (train/local.py)
from deeplense_ray.train.checkpoint import ranked_checkpoints, run_checkpoints

KEEP_CHOICES: tuple[str, ...] = ("best", "trials")


def best_checkpoint_dir(trial_dir: str | os.PathLike[str], metric: str, mode: str) -> Path | None:
    """The trial's checkpoint with the best ``metric`` (:func:`deeplense_ray.ranking.checkpoint_key`), or
    None."""
    ranked = ranked_checkpoints(trial_dir, metric, mode)
    return ranked[0] if ranked else None


def prune_trial_checkpoints(trial_dir: str | os.PathLike[str], metric: str, mode: str) -> list[Path]:
    """Delete every checkpoint of an ended trial but its best by ``metric``; returns the deleted ones."""
    keep = best_checkpoint_dir(trial_dir, metric, mode)
    gone = [p for p in run_checkpoints(trial_dir) if p != keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def prune_to_best_trial(trainer_storage: str | os.PathLike[str], best_trial_id: str) -> list[Path]:
    """Delete the checkpoints of every trial under ``trainer_storage`` except ``best_trial_id``'s."""
    root = Path(trainer_storage)
    gone = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.is_dir() and d.name != str(best_trial_id):
            gone += run_checkpoints(d)
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


class CheckpointPruner(Callback):
    """Driver-side Tune callback: when a trial ends (completed, stopped or failed), keep its best checkpoint
    only (see the module docstring)."""

    def __init__(self, trainer_storage: str, metric: str, mode: str) -> None:
        self.trainer_storage = trainer_storage
        self.metric = metric
        self.mode = mode

    def _prune(self, trial) -> None:
        trial_dir = os.path.join(self.trainer_storage, str(trial.trial_id))
        prune_trial_checkpoints(trial_dir, self.metric, self.mode)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._prune(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._prune(trial)
