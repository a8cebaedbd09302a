"""The ONE per-worker training loop (Ray Train V2 ``TorchTrainer``), reused by the tune module.

Per epoch every rank: trains on its share of the ``train`` stream (``get_dataset_shard("train")``, split by
Ray Data, or with ``ingest="per_rank"`` its own Ray Data execution over its shards; augmented on the worker
device; with ``simulate`` it renders its own images instead, seeded by (seed, epoch, rank, chunk), see
train/online.py), recalibrates BatchNorm statistics on its last training inputs (precise BatchNorm, averaged
over the ranks; models with BatchNorm only), evaluates the *whole* ``val`` split (the val shards are
dealt to the ranks by :func:`~deeplense_ray.train.ingest.deal_shards`, a pure function of the shard sizes, so
every row is evaluated by exactly one rank; each rank reads its shards from HDF5 in row order, and the
predictions are gathered with ``all_gather_object`` and put back in shard order, so every rank holds the
whole-split metrics a single process would compute, whatever the number of workers), then calls
``ray.train.report`` (a barrier; only rank 0 attaches a checkpoint), and only then does rank 0 log the epoch
to MLflow: an epoch is logged once its checkpoint is persisted, and on a restore the epochs of the
checkpoint's history that MLflow lacks (a crash between the report and the log) are logged from the history,
so every epoch is logged once.

Randomness: model initialisation is seeded with ``seed``; at the start of every epoch the dropout RNG and the
augmentation generator are re-seeded from ``(seed, epoch, rank)`` and the shuffle buffer from
``(seed, epoch, rank)``, so the RNG state at an epoch boundary is a pure function of the epoch: restoring the
epoch counter from a checkpoint restores the random streams exactly.

Where it runs is a :class:`~deeplense_ray.train.session.LoopSession` (train/session.py): a Ray Train worker
(:class:`~deeplense_ray.train.session.RayTrainSession`, the default: rank and device from Ray Train,
checkpoints through ``ray.train.report``) or, for a one-worker run, the process that already holds the run's
resources (``deeplense_ray.train.local.LocalRunSession``: a search trial's reused Tune actor, a study run's
task), with the same checkpoints and reports.

Layout: :func:`train_loop_per_worker` is the recipe, a few lines over the steps that follow it. Its config
and the tests' hooks are typed in train/worker_config.py. A rank is set up by train/worker.py
(:class:`~deeplense_ray.train.worker.WorkerContext`, :func:`~deeplense_ray.train.worker.restore_state`,
:func:`~deeplense_ray.train.worker.build_training`), gets its input from train/batches.py and its val share
from train/validation.py; per epoch this module trains (:func:`train_epoch`, over the step of
train/steps.py), validates (:func:`~deeplense_ray.train.validation.validate_epoch`), builds the report
(:func:`epoch_metrics`) and reports it (:func:`report_epoch`). Seeds: train/seeding.py; optimizer and
schedule: train/optim.py; precise BatchNorm: train/batchnorm.py; collectives: train/distributed.py; where it
runs: train/session.py.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from deeplense_ray.train.batches import TrainBatches
from deeplense_ray.train.checkpoint import save_checkpoint
from deeplense_ray.train.distributed import all_reduce_max, all_reduce_sums
from deeplense_ray.train.metrics import flatten_metrics
from deeplense_ray.train.modules import unwrap
from deeplense_ray.train.seeding import derive_seed, record_inputs
from deeplense_ray.train.session import LoopSession, RayTrainSession
from deeplense_ray.train.steps import train_one_epoch
from deeplense_ray.train.validation import Validator, validate_epoch
from deeplense_ray.train.worker import Training, WorkerContext, build_training, restore_state
from deeplense_ray.train.worker_config import LoopConfig, LoopHooks

#: Keys every per-epoch report carries (the tune module and the checkpoint config rely on them).
REPORT_KEYS: tuple[str, ...] = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_auc_macro",
    "val_auc_micro",
    "images_per_s",
    "lr",
    "diverged",
)


def train_loop_per_worker(
    config: Mapping[str, Any], session: LoopSession | None = None, hooks: LoopHooks | None = None
) -> None:
    """Ray Train worker function. ``config``: ``LoopConfig.to_dict()`` (train/worker_config.py), the plain
    dict Ray passes, converted here once (an unknown key is a ValueError). ``hooks``: the tests'
    :class:`~deeplense_ray.train.worker_config.LoopHooks` (a Ray Train run binds them, train/trainer.py).

    The recipe: set up (this rank, the checkpoint to resume from, model and optimizer, training input, val
    set); then per epoch train, validate, report (checkpoint, ``ray.train.report``, then MLflow).

    ``session``: where the loop runs (default :class:`RayTrainSession`, a Ray Train worker); a search's trial
    run in its own actor passes ``deeplense_ray.tune.actor_trial.ActorTrialSession``."""
    loop = LoopConfig.from_dict(config)
    session = session if session is not None else RayTrainSession(loop.run_dir)
    # rank, world, device, seed, precision; start time
    ctx = WorkerContext.from_config(loop, session, hooks or LoopHooks())
    resumed = restore_state(ctx)  # the latest checkpoint, if any (epochs MLflow missed are logged)
    training = build_training(ctx, resumed.state)  # model (seeded), compile, DDP, optimizer, schedule
    batches = TrainBatches(ctx)  # this rank's training input of each epoch
    validator = Validator(ctx)  # this rank's share of the val split
    history = resumed.history
    for epoch in range(resumed.start_epoch, ctx.epochs + 1):
        ctx.hooks.check("start", epoch, resumed.start_epoch)
        train = train_epoch(ctx, training, batches, epoch)
        val, val_times = validate_epoch(ctx, training, validator)
        metrics = epoch_metrics(
            ctx, epoch, train, val, val_times,
            start_epoch=resumed.start_epoch, compiled=training.compiled, history=history,
        )  # fmt: skip
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        report_epoch(
            ctx, training, epoch, metrics, history,
            confusion=val.get("confusion_matrix"), start_epoch=resumed.start_epoch,
        )  # fmt: skip
    if resumed.start_epoch > ctx.epochs and history:
        # restored after its last epoch was checkpointed but before the run was recorded as finished (a search
        # killed at that moment): report that epoch again, so the run ends with its metrics (a Tune trial
        # ending without a report of the search metric fails the whole search)
        ctx.session.report(dict(history[-1]), None)


def train_epoch(ctx: WorkerContext, training: Training, batches: TrainBatches, epoch: int) -> dict[str, Any]:
    """One training pass of this rank (:func:`train_one_epoch`) and the LR schedule's step. The dropout RNG
    and the augmentation generator are seeded from (seed, epoch, rank) first. Returns the pass's sums over
    the ranks (loss_sum, correct, images), the slowest rank's times (seconds, data_wait_s, first_batch_s,
    first_step_s), the epoch's ``lr`` and its start ``t_epoch_start`` (Unix seconds)."""
    t_epoch = time.time()
    torch.manual_seed(derive_seed(ctx.seed, epoch, ctx.rank))
    gen = torch.Generator(device=ctx.device).manual_seed(derive_seed(ctx.seed, epoch, ctx.rank, 1))
    lr = training.optimizer.param_groups[0]["lr"]
    inputs = batches.epoch(epoch)
    if record := ctx.hooks.record_inputs:
        inputs = record_inputs(inputs, Path(record) / f"train_e{epoch}_r{ctx.rank}.json")
    sums = train_one_epoch(
        training.model,
        inputs,
        training.optimizer,
        device=ctx.device,
        amp_dtype=ctx.amp_dtype,
        scaler=training.scaler,
        augment=ctx.augment,
        generator=gen,
        label_smoothing=ctx.config.train.label_smoothing,
        keep=training.keep,
        regression=ctx.inference,
    )
    totals = all_reduce_sums([sums[k] for k in ("loss_sum", "correct", "images")], ctx.device)
    loss_sum, correct, images = totals
    out = {"loss_sum": loss_sum, "correct": correct, "images": images, "lr": lr, "t_epoch_start": t_epoch}
    for key in ("seconds", "data_wait_s", "first_batch_s", "first_step_s"):  # the slowest rank sets the pace
        out[key] = all_reduce_max(sums[key], ctx.device)
    training.scheduler.step()
    return out


def epoch_metrics(
    ctx: WorkerContext,
    epoch: int,
    train: Mapping[str, float],
    val: Mapping[str, Any],
    val_times: Mapping[str, float],
    *,
    start_epoch: int,
    compiled: bool,
    history: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The epoch's report (:data:`REPORT_KEYS` and more), from :func:`train_epoch`'s and
    :func:`validate_epoch`'s results; ``history``: the earlier epochs (for ``images_seen``)."""
    images, seconds = train["images"], train["seconds"]
    train_loss = train["loss_sum"] / max(images, 1.0)
    first = epoch == start_epoch  # this attempt's first epoch
    seen_before = history[-1].get("images_seen", 0) if history else 0
    if ctx.inference:  # Gaussian NLL, RMSE, bias, coverage per target (train/gaussian.py); no accuracy
        from deeplense_ray.train.gaussian import flatten_regression

        task_metrics = flatten_regression(val, "val")
    else:
        task_metrics = {"train_acc": train["correct"] / max(images, 1.0), **flatten_metrics(val, "val")}
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        **task_metrics,
        "val_n": val["n"],
        "images_per_s": images / max(seconds, 1e-9),
        "train_images": images,
        "train_seconds": seconds,
        "data_wait_frac": train["data_wait_s"] / max(seconds, 1e-9),
        "first_batch_s": train["first_batch_s"],
        "first_step_s": train["first_step_s"],
        # torch.compile compiles at the first step of each worker process (= this attempt's first epoch)
        "compile_s": train["first_step_s"] if compiled and first else 0.0,
        "t_epoch_start": train["t_epoch_start"],  # Unix seconds (rank 0's clock), for the job's timeline
        "setup_s": train["t_epoch_start"] - ctx.t_start if first else 0.0,  # worker start -> first epoch
        "val_seconds": val_times["val_seconds"],
        "bn_recal_layers": val_times["bn_recal_layers"],  # BatchNorm layers recalibrated before validation
        "bn_recal_s": val_times["bn_recal_s"],  # its seconds (part of val_seconds)
        "lr": train["lr"],
        "resumed_from_epoch": start_epoch - 1,
        **({"images_seen": seen_before + images} if ctx.simulate else {}),
        # a diverged epoch (non-finite train loss or val outputs) is reported, never raised: Tune ranks it
        "diverged": int(bool(val["diverged"]) or not math.isfinite(train_loss)),
    }


def report_epoch(
    ctx: WorkerContext,
    training: Training,
    epoch: int,
    metrics: dict[str, Any],
    history: Sequence[Mapping[str, Any]],
    *,
    confusion: Any,
    start_epoch: int,
) -> None:
    """Rank 0 writes the epoch's checkpoint; every rank calls ``ray.train.report`` (a barrier; only rank 0
    attaches the checkpoint); then rank 0 logs the epoch to MLflow, so a logged epoch has its checkpoint.
    The fault-injection points "before_report" and "after_report" sit around the report."""
    with tempfile.TemporaryDirectory(prefix="dlr-ckpt-") as tmp:
        ckpt = None
        if ctx.rank == 0:
            save_checkpoint(
                Path(tmp),
                model=unwrap(training.model),
                optimizer=training.optimizer,
                scheduler=training.scheduler,
                scaler=training.scaler,
                epoch=epoch,
                config=ctx.config.to_dict(),
                metrics=metrics,
                history=history,
                confusion=confusion,
            )
            ckpt = Path(tmp)
        ctx.hooks.check("before_report", epoch, start_epoch)
        ctx.session.report(metrics, ckpt)
    ctx.hooks.check("after_report", epoch, start_epoch)
    if ctx.rank == 0 and ctx.mlflow:
        from deeplense_ray.tracking import log_metrics

        log_metrics(ctx.mlflow.tracking_uri, ctx.mlflow.run_id, metrics, step=epoch)
