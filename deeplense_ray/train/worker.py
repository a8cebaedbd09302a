"""A rank's set-up before its first epoch: its context, the state it resumes from, what it trains.

:class:`WorkerContext` (rank, world size, device, seed, precision, the loop's
:class:`~deeplense_ray.train.worker_config.LoopConfig` and the tests' hooks), :func:`restore_state` (the run's
latest checkpoint, if any; rank 0 logs the epochs of its history that MLflow lacks,
:func:`log_missing_epochs`) and :func:`build_training` (the model seeded from ``seed``, compiled and wrapped,
its optimizer, LR schedule and grad scaler, all restored from the checkpoint when resuming).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deeplense_ray.train.batchnorm import RecentBatches, batch_norm_layers
from deeplense_ray.train.checkpoint import load_training_state
from deeplense_ray.train.modules import build_classifier, compile_model
from deeplense_ray.train.optim import autocast_dtype, build_optimizer, build_scheduler
from deeplense_ray.train.seeding import seed_everything
from deeplense_ray.train.session import LoopSession
from deeplense_ray.train.worker_config import LoopConfig, LoopHooks, MlflowTarget


@dataclass(frozen=True)
class WorkerContext:
    """This rank's place in the run, the settings of the loop config every step reads, the tests' hooks."""

    config: LoopConfig
    session: LoopSession
    rank: int
    world: int
    device: torch.device
    seed: int
    amp_dtype: torch.dtype | None  # autocast dtype (None: fp32)
    t_start: float  # this attempt's worker start, Unix seconds (the job's timeline: train/timeline.py)
    epochs: int
    batch_size: int  # per worker: the global batch size // world
    simulate: bool  # online simulation: each rank renders its images (no training dataset)
    augment: dict[str, bool] | None
    mlflow: MlflowTarget | None  # rank 0 logs every epoch there
    inference: bool  # task 'inference': batches carry "target", Gaussian loss (train/regression.py)
    hooks: LoopHooks

    @classmethod
    def from_config(cls, config: LoopConfig, session: LoopSession, hooks: LoopHooks) -> WorkerContext:
        t_start = time.time()
        rank, world, device = session.placement()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        train = config.train
        augment = None
        if train.augment:
            augment = {"rot90": True, "flip": True, "free_rotation": train.augment_free_rotation}
        return cls(
            config=config,
            session=session,
            rank=rank,
            world=world,
            device=device,
            seed=train.seed,
            amp_dtype=autocast_dtype(train.precision, device),
            t_start=t_start,
            epochs=train.epochs,
            batch_size=train.batch_size // world,
            simulate=train.simulate is not None,
            augment=augment,
            mlflow=config.mlflow,
            inference=train.inference,
            hooks=hooks,
        )


@dataclass
class Resumed:
    """Where this attempt starts: the checkpoint's training state (None on a fresh start), the first epoch to
    run and the per-epoch history so far."""

    state: dict[str, Any] | None = None
    start_epoch: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)


def restore_state(ctx: WorkerContext) -> Resumed:
    """The latest checkpoint of the run (``ray.train.get_checkpoint()`` in a Ray Train worker), if any; rank
    0 then logs the epochs of its history that MLflow lacks (:func:`log_missing_epochs`)."""
    with ctx.session.checkpoint_dir() as ckpt_dir:
        if ckpt_dir is None:
            return Resumed()
        state = load_training_state(ckpt_dir)
    resumed = Resumed(state, int(state["epoch"]) + 1, list(state.get("history", [])))
    if ctx.rank == 0 and ctx.mlflow:
        log_missing_epochs(ctx.mlflow.tracking_uri, ctx.mlflow.run_id, resumed.history)
    return resumed


def log_missing_epochs(tracking_uri: str, run_id: str, history: Sequence[Mapping[str, Any]]) -> list[int]:
    """Log the epochs of a restored checkpoint's ``history`` that the MLflow run lacks (step = epoch).

    An epoch is logged after its checkpoint report; a crash between the two leaves it unlogged, and the
    restored run starts after it. Epochs already logged are left alone, so this is idempotent. Returns the
    epochs it logged.
    """
    from mlflow.tracking import MlflowClient

    from deeplense_ray.tracking import log_metrics

    logged = {m.step for m in MlflowClient(tracking_uri=tracking_uri).get_metric_history(run_id, "epoch")}
    missing = [dict(h) for h in history if int(h["epoch"]) not in logged]
    for h in missing:
        log_metrics(tracking_uri, run_id, h, step=int(h["epoch"]))
    return [int(h["epoch"]) for h in missing]


@dataclass
class Training:
    """What the epochs update: the (DDP-wrapped) model, optimizer, LR schedule, grad scaler (fp16 only) and
    the recent training inputs kept for precise BatchNorm (None: the model has no BatchNorm)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    keep: RecentBatches | None
    compiled: bool


def build_training(ctx: WorkerContext, state: Mapping[str, Any] | None) -> Training:
    """The model (initialised from ``seed``, then the checkpoint's weights if ``state``), compiled in place if
    asked, wrapped by the session's ``prepare_model`` (DDP); optimizer, schedule and scaler, restored from
    ``state``."""
    train = ctx.config.train
    seed_everything(ctx.seed)
    model = build_classifier(ctx.config.arch)
    # precise BatchNorm before each validation (recalibrate_batch_norm); models without BatchNorm skip it
    keep = RecentBatches(train.bn_recal_images) if batch_norm_layers(model) else None
    if state is not None:
        model.load_state_dict(state["model"])
    if train.compile:  # in place, before DDP: checkpoints keep plain parameter names (modules.compile_model)
        compile_model(model)
    model = ctx.session.prepare_model(model)
    options = train.to_dict()  # train/optim.py reads TrainConfig's fields from a mapping (as benchmarks do)
    optimizer = build_optimizer(model.parameters(), options)
    scheduler = build_scheduler(optimizer, options)
    scaler = torch.amp.GradScaler("cuda") if ctx.amp_dtype == torch.float16 else None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    return Training(model, optimizer, scheduler, scaler, keep, train.compile)
