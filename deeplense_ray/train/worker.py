"""A rank's set-up before its first epoch: its context, the state it resumes from, what it trains.

:class:`WorkerContext` (rank, world size, device, seed, precision and the loop-config settings every step
reads), :func:`restore_state` (the run's latest checkpoint, if any; rank 0 logs the epochs of its history
that MLflow lacks, :func:`log_missing_epochs`), :class:`FaultInjection` (tests' injected failures) and
:func:`build_training` (the model seeded from ``seed``, compiled and wrapped, its optimizer, LR schedule and
grad scaler, all restored from the checkpoint when resuming).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deeplense_ray.config import TrainConfig
from deeplense_ray.train.batchnorm import RecentBatches, batch_norm_layers
from deeplense_ray.train.checkpoint import load_training_state
from deeplense_ray.train.modules import build_classifier, compile_model
from deeplense_ray.train.optim import autocast_dtype, build_optimizer, build_scheduler
from deeplense_ray.train.seeding import seed_everything
from deeplense_ray.train.session import LoopSession

#: Where ``_fail_at_epoch`` raises (fault injection for tests): as the epoch starts, after its checkpoint is
#: written but before it is reported, or after the report but before the epoch is logged to MLflow.
FAIL_POINTS = ("start", "before_report", "after_report")


@dataclass(frozen=True)
class WorkerContext:
    """This rank's place in the run and the settings of the loop config every step reads."""

    config: Mapping[str, Any]
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
    mlflow: Mapping[str, str] | None  # {"tracking_uri", "run_id"}: rank 0 logs every epoch there
    inference: bool = False  # task 'inference': batches carry "target", Gaussian loss (train/regression.py)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], session: LoopSession) -> WorkerContext:
        t_start = time.time()
        rank, world, device = session.placement()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        augment = None
        if config.get("augment", True):
            augment = {
                "rot90": True,
                "flip": True,
                "free_rotation": bool(config.get("augment_free_rotation", False)),
            }
        return cls(
            config=config,
            session=session,
            rank=rank,
            world=world,
            device=device,
            seed=int(config["seed"]),
            amp_dtype=autocast_dtype(str(config["precision"]), device),
            t_start=t_start,
            epochs=int(config["epochs"]),
            batch_size=int(config["batch_size"]) // world,
            simulate=config.get("simulate") is not None,
            augment=augment,
            mlflow=config.get("mlflow") or None,
            inference=config.get("task") == "inference",
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
        log_missing_epochs(ctx.mlflow["tracking_uri"], ctx.mlflow["run_id"], resumed.history)
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


@dataclass(frozen=True)
class FaultInjection:
    """``_fail_at_epoch`` / ``_fail_point`` of the loop config (tests): every rank raises in that epoch at
    that point (one of :data:`FAIL_POINTS`, default "start"); at "start" and "before_report" only if this
    attempt did not start at that epoch, i.e. was not restored from the checkpoint just before it; so each
    injected failure fires once."""

    epoch: Any
    point: str
    start_epoch: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any], start_epoch: int) -> FaultInjection:
        point = str(config.get("_fail_point", "start"))
        if point not in FAIL_POINTS:
            raise ValueError(f"_fail_point must be one of {list(FAIL_POINTS)}, got {point!r}")
        return cls(config.get("_fail_at_epoch"), point, start_epoch)

    def check(self, point: str, epoch: int) -> None:
        here = self.epoch == epoch and self.point == point
        if here and (point == "after_report" or self.start_epoch < epoch):
            raise RuntimeError(f"injected failure at epoch {epoch}, {point} (fault injection for tests)")


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
    config = ctx.config
    seed_everything(ctx.seed)
    model = build_classifier(config)
    # precise BatchNorm before each validation (recalibrate_batch_norm); models without BatchNorm skip it
    keep = None
    if batch_norm_layers(model):
        keep = RecentBatches(int(config.get("bn_recal_images", TrainConfig.bn_recal_images)))
    if state is not None:
        model.load_state_dict(state["model"])
    compiled = bool(config.get("compile", False))
    if compiled:  # in place, before DDP: checkpoints keep plain parameter names (modules.compile_model)
        compile_model(model)
    model = ctx.session.prepare_model(model)
    optimizer = build_optimizer(model.parameters(), config)
    scheduler = build_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler("cuda") if ctx.amp_dtype == torch.float16 else None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    return Training(model, optimizer, scheduler, scaler, keep, compiled)
