"""Distributed training with Ray Train V2: the per-worker loop, metrics, checkpoints and the tracked run."""

from __future__ import annotations

from deeplense_ray.train.checkpoint import load_model_from_checkpoint
from deeplense_ray.train.loop import REPORT_KEYS, train_loop_per_worker
from deeplense_ray.train.metrics import classification_metrics, flatten_metrics
from deeplense_ray.train.modules import NormalizedClassifier, build_classifier
from deeplense_ray.train.trainer import (
    TrainResult,
    best_checkpoint,
    build_trainer,
    evaluate_checkpoint,
    loop_config,
    run_training,
)

__all__ = [
    "REPORT_KEYS",
    "NormalizedClassifier",
    "TrainResult",
    "best_checkpoint",
    "build_classifier",
    "build_trainer",
    "classification_metrics",
    "evaluate_checkpoint",
    "flatten_metrics",
    "load_model_from_checkpoint",
    "loop_config",
    "run_training",
    "train_loop_per_worker",
]
