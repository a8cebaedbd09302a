"""Distributed training with Ray Train V2: the per-worker loop, metrics, checkpoints and the tracked run.

Reading order, top-down: run.py (:func:`run_training`: validate -> open the run, prepare.py -> launch,
runners.py with trainer.py or local.py -> evaluate the test split, runners.py and evaluation.py -> finish,
results.py); loop.py (:func:`train_loop_per_worker`, the per-worker epoch loop) over worker_config.py,
session.py, worker.py, batches.py, validation.py, steps.py, optim.py, batchnorm.py, distributed.py and
seeding.py; the rest are its parts: checkpoint.py, modules.py, metrics.py, ingest.py, online.py, timeline.py,
and task 'inference' in regression.py, gaussian.py and targets.py.
"""

from __future__ import annotations

from deeplense_ray.train.checkpoint import load_model_from_checkpoint
from deeplense_ray.train.evaluation import evaluate_checkpoint
from deeplense_ray.train.loop import REPORT_KEYS, train_loop_per_worker
from deeplense_ray.train.metrics import classification_metrics, flatten_metrics
from deeplense_ray.train.modules import NormalizedClassifier, build_classifier
from deeplense_ray.train.results import TrainResult
from deeplense_ray.train.run import run_training
from deeplense_ray.train.trainer import best_checkpoint, build_trainer, loop_config
from deeplense_ray.train.worker_config import LoopConfig, LoopHooks

__all__ = [
    "REPORT_KEYS",
    "LoopConfig",
    "LoopHooks",
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
