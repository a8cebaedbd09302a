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

Where it runs is a :class:`LoopSession`: a Ray Train worker (:class:`RayTrainSession`, the default: rank and
device from Ray Train, checkpoints through ``ray.train.report``) or, for a one-worker run, the process that
already holds the run's resources (``deeplense_ray.train.local.LocalRunSession``: a search trial's reused Tune
actor, a study run's task), with the same checkpoints and reports.

Layout: :func:`train_loop_per_worker` is the recipe, a few lines over the steps that follow it
(:class:`LoopSession`, :class:`WorkerContext`, :func:`restore_state`, :class:`FaultInjection`,
:func:`build_training`, :class:`TrainBatches`, :class:`Validator`, :func:`train_epoch`,
:func:`validate_epoch`, :func:`epoch_metrics`, :func:`report_epoch`); above them the pieces the benchmarks
share (:func:`train_one_epoch`, :func:`predict_batches`, the schedule and optimizer builders, precise
BatchNorm).
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deeplense_ray.config import TrainConfig
from deeplense_ray.train.checkpoint import load_training_state, save_checkpoint
from deeplense_ray.train.ingest import (
    deal_shards,
    device_batches,
    load_split,
    memory_batches,
    memory_epoch_rows,
    rank_shards,
    shard_batches,
)
from deeplense_ray.train.metrics import classification_metrics, flatten_metrics
from deeplense_ray.train.modules import build_classifier, compile_model, unwrap

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
EVAL_BATCH_SIZE = 256
#: Largest share of the val split [MiB of float32 images] a rank keeps in host memory after the first epoch.
VAL_CACHE_MB = 512
#: Where ``_fail_at_epoch`` raises (fault injection for tests): as the epoch starts, after its checkpoint is
#: written but before it is reported, or after the report but before the epoch is logged to MLflow.
FAIL_POINTS = ("start", "before_report", "after_report")
#: Loop config key (tests): a directory where every rank records what it trained and validated on each epoch
#: (:func:`record_inputs`), so a test can check the inputs against ones it recomputes itself.
RECORD_INPUTS_KEY = "_record_inputs"


# ---------------------------------------------------------------------------------------------- pure helpers
def input_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of a batch's float32 image bytes and int64 label bytes (what :func:`record_inputs` writes)."""
    import hashlib

    h = hashlib.sha256(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(labels.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def row_digests(batches: Iterable[Mapping[str, torch.Tensor]]) -> list[str]:
    """The :func:`input_digest` of every row (image and label) of ``batches``, in order."""
    return [input_digest(x[None], y[None]) for b in batches for x, y in zip(b["image"], b["label"])]


def record_inputs(
    batches: Iterable[Mapping[str, torch.Tensor]], path: Path
) -> Iterator[Mapping[str, torch.Tensor]]:
    """``batches`` passed through; once they are all drawn, the :func:`input_digest` of each is written to
    ``path`` (a JSON list, in order)."""
    from deeplense_ray.io import atomic_write_json

    digests = []
    for batch in batches:
        digests.append(input_digest(batch["image"], batch["label"]))
        yield batch
    atomic_write_json(path, digests)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (``numpy.random.SeedSequence``; independent streams per tuple)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(
    epoch: int,
    *,
    epochs: int,
    warmup_epochs: int = 0,
    scheduler: str = "cosine",
    step_size: int | None = None,
    step_gamma: float = 0.1,
) -> float:
    """Learning-rate multiplier for 0-based ``epoch``.

    Linear warm-up ``(epoch + 1) / (warmup_epochs + 1)`` for the first ``warmup_epochs`` epochs, then
    'cosine': ``0.5 (1 + cos(pi t / T))`` with t the epochs since warm-up and T the epochs after it;
    'step': ``step_gamma ** (t // step_size)`` (step_size default max(1, T // 3)); 'none': 1.
    """
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    t = epoch - warmup_epochs
    total = max(1, epochs - warmup_epochs)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    if scheduler == "step":
        size = step_size or max(1, total // 3)
        return float(step_gamma ** (t // size))
    if scheduler == "none":
        return 1.0
    raise ValueError(f"scheduler must be one of ['cosine', 'step', 'none'], got {scheduler!r}")


def build_optimizer(params: Iterable[nn.Parameter], config: Mapping[str, Any]) -> torch.optim.Optimizer:
    """adamw | adam | sgd (Nesterov momentum) from the loop config."""
    name, lr, wd = config["optimizer"], float(config["lr"]), float(config["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, weight_decay=wd, momentum=float(config["momentum"]), nesterov=True
        )
    raise ValueError(f"optimizer must be one of ['adamw', 'adam', 'sgd'], got {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, config: Mapping[str, Any]):
    """Per-epoch ``LambdaLR`` over :func:`lr_factor`."""

    def factor(epoch: int) -> float:
        return lr_factor(
            epoch,
            epochs=int(config["epochs"]),
            warmup_epochs=int(config["warmup_epochs"]),
            scheduler=str(config["scheduler"]),
            step_size=config.get("step_size"),
            step_gamma=float(config.get("step_gamma", 0.1)),
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 / fp16 on CUDA; None (fp32) for 'fp32' or any non-CUDA device."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


# ---------------------------------------------------------------------------------------------- precise BN
class RecentBatches:
    """The last ``max_images`` training inputs of an epoch (on the device, augmented: as the model saw them),
    kept by reference (no copy) for :func:`recalibrate_batch_norm`; at most one batch more than needed."""

    def __init__(self, max_images: int) -> None:
        self.max_images = int(max_images)
        self._batches: deque[torch.Tensor] = deque()
        self.images = 0

    def add(self, x: torch.Tensor) -> None:
        if self.max_images <= 0:
            return
        self._batches.append(x)
        self.images += int(x.shape[0])
        while self.images - int(self._batches[0].shape[0]) >= self.max_images:
            self.images -= int(self._batches.popleft().shape[0])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def clear(self) -> None:
        self._batches.clear()
        self.images = 0


def batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module,
    inputs: Iterable[torch.Tensor],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> int:
    """Precise BatchNorm (Wu & Johnson 2021): recompute every BatchNorm layer's running mean and variance
    as the plain average of its batch statistics over ``inputs`` (image tensors [B,1,H,W]), with the current
    weights; returns the number of BatchNorm layers (0: nothing done). Everything else in train mode stays
    off (BatchNorm alone is put in train mode) and the model is left in eval mode.

    Why: running statistics are exponential averages over the epoch's batches, taken while the weights
    moved. On images of one fixed macro lens, whose pixels differ little from image to image, a feature's
    batch variance is tiny, so the lag shifts eval-mode activations by many of its standard deviations: the
    published-recipe benchmark measured test accuracy at chance (33 %) with stale statistics against 89-98 %
    after recalibration. A ``torch.compile``-d module is run eagerly here (its compiled graph is left as
    it is: no recompilation for this train-mode, momentum-None variant)."""
    bns = batch_norm_layers(model)
    if not bns:
        return 0
    model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the plain mean over the batches
        m.train()
    forward = model._call_impl if getattr(model, "_compiled_call_impl", None) is not None else model
    try:
        with _autocast(device, amp_dtype):
            for x in inputs:
                forward(x.to(device, non_blocking=True))
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.eval()
    return len(bns)


# ---------------------------------------------------------------------------------------------- one epoch
def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    augment: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    label_smoothing: float = 0.0,
    keep: RecentBatches | None = None,
    regression: bool = False,
) -> dict[str, float]:
    """One pass over ``batches`` ({"image": [B,1,H,W], "label": [B]}); returns this rank's sums.
    ``keep``: collects the last (augmented) inputs, for :func:`recalibrate_batch_norm`. ``regression`` (task
    'inference'): the batches carry standardised targets "target" [B, T] and the loss is the Gaussian
    negative log-likelihood of the head's outputs (train/gaussian.py); ``correct`` is then 0.

    Shared by the Ray Train loop and the bare-PyTorch benchmark loop, so both time the same step.
    Returns {"loss_sum", "correct", "images", "seconds", "data_wait_s", "first_batch_s", "first_step_s"}
    (sums over this rank's batches; seconds is the wall time of the pass including waiting for data,
    synchronised with the device at the end; data_wait_s is the part spent in ``next(batches)``: the host
    time the input path took from the step, high when training is input-bound; first_batch_s: until the
    first batch arrived, the input's start-up; first_step_s: the first step's seconds from its batch's
    arrival, synchronised with the device: with a compiled model in its first epoch, mostly compilation).
    """
    from deeplense_ray.data.augment import augment_batch

    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if regression:
        from deeplense_ray.train.gaussian import gaussian_nll_loss
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    images = 0
    data_wait, first_batch, first_step = 0.0, None, None
    t0 = time.perf_counter()
    stream = iter(batches)
    while True:
        t_wait = time.perf_counter()
        batch = next(stream, None)
        data_wait += time.perf_counter() - t_wait
        if first_batch is None:
            first_batch = time.perf_counter() - t0
        if batch is None:
            break
        x = batch["image"].to(device, non_blocking=True)
        if regression:
            y = batch["target"].to(device, non_blocking=True)
        else:
            y = batch["label"].to(device, non_blocking=True).long()
        if augment is not None:
            x = augment_batch(x, generator, **augment)
        if keep is not None:
            keep.add(x)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp_dtype):
            logits = model(x)
            loss = gaussian_nll_loss(logits, y) if regression else criterion(logits.float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if first_step is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_step = time.perf_counter() - t0 - first_batch
        n = int(y.shape[0])
        loss_sum += loss.detach().double() * n
        if not regression:
            correct += (logits.detach().argmax(dim=1) == y).sum()
        images += n
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "loss_sum": float(loss_sum.item()),
        "correct": float(correct.item()),
        "images": float(images),
        "seconds": time.perf_counter() - t0,
        "data_wait_s": data_wait,
        "first_batch_s": float(first_batch or 0.0),
        "first_step_s": float(first_step or 0.0),
    }


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    truth: str = "label",
) -> tuple[np.ndarray, np.ndarray]:
    """Head outputs (float32 [N, C]) and each batch's ``truth``, in order: ``"label"`` (int64 [N]) or
    ``"target"`` (the standardised regression targets, float32 [N, T])."""
    model.eval()
    dtype = np.int64 if truth == "label" else np.float32
    logits_out: list[np.ndarray] = []
    truth_out: list[np.ndarray] = []
    for batch in batches:
        x = batch["image"].to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(x)
        logits_out.append(logits.float().cpu().numpy())
        truth_out.append(np.asarray(batch[truth].cpu().numpy(), dtype=dtype))
    if not logits_out:
        return np.zeros((0, 0), np.float32), np.zeros((0,) if truth == "label" else (0, 0), dtype)
    return np.concatenate(logits_out), np.concatenate(truth_out)


def merge_shard_predictions(
    parts: Iterable[Mapping[int, tuple[np.ndarray, np.ndarray]]], shard_rows: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The ranks' predictions ({shard position: (logits, labels)} each) as one split in shard order.

    RuntimeError if a shard was evaluated by two ranks, by none, or not for all of its rows: every row must
    count exactly once.
    """
    merged: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for part in parts:
        for pos, pred in part.items():
            if pos in merged:
                raise RuntimeError(f"val shard {pos} was evaluated by two ranks")
            merged[pos] = pred
    missing = [i for i in range(len(shard_rows)) if i not in merged]
    short = [i for i, (_, y) in merged.items() if i < len(shard_rows) and len(y) != int(shard_rows[i])]
    if missing or short or len(merged) != len(shard_rows):
        raise RuntimeError(
            f"val predictions do not cover the split once: shards {missing} missing, shards {short} with "
            f"fewer or more rows than the manifest's {list(shard_rows)}"
        )
    order = [merged[i] for i in range(len(shard_rows)) if len(merged[i][1])]
    return np.concatenate([p[0] for p in order]), np.concatenate([p[1] for p in order])


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax in float64 (rows sum to 1 to ~1e-16)."""
    return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64)), dim=1).numpy()


# ---------------------------------------------------------------------------------------------- distributed
def _dist() -> tuple[Any, bool]:
    import torch.distributed as dist

    return dist, dist.is_available() and dist.is_initialized()


def _all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    dist, on = _dist()
    if not on:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _all_reduce_max(value: float, device: torch.device) -> float:
    dist, on = _dist()
    if not on:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _sync_buffers(model: nn.Module) -> None:
    """Broadcast rank 0's buffers (e.g. BatchNorm running statistics, updated locally by each rank's last
    batch) so that every rank evaluates exactly the weights rank 0 checkpoints."""
    dist, on = _dist()
    if not on:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def _average_batch_norm_stats(model: nn.Module) -> None:
    """Average the BatchNorm running statistics over the ranks (each recalibrated on its own inputs)."""
    dist, on = _dist()
    if not on:
        return
    world = dist.get_world_size()
    for m in batch_norm_layers(model):
        for buf in (m.running_mean, m.running_var):
            if buf is not None:
                dist.all_reduce(buf)
                buf.div_(world)


def _gather(obj: Any, world_size: int) -> list[Any]:
    dist, on = _dist()
    if not on or world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


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


# ---------------------------------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict[str, Any], session: LoopSession | None = None) -> None:
    """Ray Train worker function. ``config``: ``TrainConfig.to_dict()`` plus ``image_shape``, ``class_names``,
    ``pixel_scale`` (from the dataset manifest; with ``simulate`` from the preset, plus ``sim_preset``, the
    resolved preset), optional ``mlflow`` = {"tracking_uri", "run_id"} (rank 0 logs per-epoch metrics to that
    run) and optional ``_fail_at_epoch`` / ``_fail_point`` (tests' fault injection: :class:`FaultInjection`).

    The recipe: set up (this rank, the checkpoint to resume from, model and optimizer, training input, val
    set); then per epoch train, validate, report (checkpoint, ``ray.train.report``, then MLflow).

    ``session``: where the loop runs (default :class:`RayTrainSession`, a Ray Train worker); a search's trial
    run in its own actor passes ``deeplense_ray.tune.actor_trial.ActorTrialSession``."""
    session = session if session is not None else RayTrainSession()
    ctx = WorkerContext.from_config(config, session)  # rank, world, device, seed, precision; start time
    resumed = restore_state(ctx)  # the latest checkpoint, if any (epochs MLflow missed are logged)
    faults = FaultInjection.from_config(config, resumed.start_epoch)
    training = build_training(ctx, resumed.state)  # model (seeded), compile, DDP, optimizer, schedule
    batches = TrainBatches(ctx)  # this rank's training input of each epoch
    validator = Validator(ctx)  # this rank's share of the val split
    history = resumed.history
    for epoch in range(resumed.start_epoch, ctx.epochs + 1):
        faults.check("start", epoch)
        train = train_epoch(ctx, training, batches, epoch)
        val, val_times = validate_epoch(ctx, training, validator)
        metrics = epoch_metrics(
            ctx, epoch, train, val, val_times,
            start_epoch=resumed.start_epoch, compiled=training.compiled, history=history,
        )  # fmt: skip
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        report_epoch(
            ctx, training, epoch, metrics, history, confusion=val.get("confusion_matrix"), faults=faults
        )
    if resumed.start_epoch > ctx.epochs and history:
        # restored after its last epoch was checkpointed but before the run was recorded as finished (a search
        # killed at that moment): report that epoch again, so the run ends with its metrics (a Tune trial
        # ending without a report of the search metric fails the whole search)
        ctx.session.report(dict(history[-1]), None)


# ---------------------------------------------------------------------------------------------- its steps
class LoopSession:
    """Where the loop runs: its rank, world size and device, the checkpoint it resumes from, how its model is
    wrapped, its share of a Ray Data ``train`` split, and where an epoch's report and checkpoint go."""

    def placement(self) -> tuple[int, int, torch.device]:
        """(rank, world size, device)."""
        raise NotImplementedError

    def checkpoint_dir(self):
        """A context manager giving the directory of the checkpoint to resume from, or None."""
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def dataset_shard(self, name: str):
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Report an epoch (every rank; only rank 0 passes its checkpoint, written to ``checkpoint_dir``, a
        temporary directory that is deleted afterwards; none when a restored run reports its last, already
        checkpointed epoch again)."""
        raise NotImplementedError


class RayTrainSession(LoopSession):
    """A Ray Train (V2) worker: Ray Train places it, restores its run's latest checkpoint, wraps the model
    (DDP over the workers), splits the ``train`` dataset and persists the reported checkpoints."""

    def placement(self) -> tuple[int, int, torch.device]:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()

    def checkpoint_dir(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return nullcontext(None)
        return _as_path(checkpoint.as_directory())

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def dataset_shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train
        from ray.train import Checkpoint

        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=ckpt)


class _as_path:
    """A checkpoint's ``as_directory()`` context manager, giving a Path."""

    def __init__(self, cm) -> None:
        self.cm = cm

    def __enter__(self) -> Path:
        return Path(self.cm.__enter__())

    def __exit__(self, *exc) -> Any:
        return self.cm.__exit__(*exc)


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


class TrainBatches:
    """This rank's training batches of each epoch on its device, from one of four inputs: ``split`` (its
    share of the ``train`` stream that Ray Data splits across the ranks), ``per_rank`` (its own Ray Data
    execution over the shards dealt to it this epoch, :func:`~deeplense_ray.train.ingest.rank_shards`),
    ``memory`` (the whole split read into its device memory once, its rows of a global permutation per
    epoch; what ``ingest="auto"`` picks for small splits) or ``simulate`` (images it renders itself, seeded
    by (seed, epoch, rank, chunk), train/online.py).

    A Ray Data stream is pulled on a background thread from its creation on. When an epoch's input is all
    drawn (its last rows still in the shuffle buffer and prefetch queue), the next epoch's stream is started:
    the Ray Data execution's start-up, which is most of a second, then overlaps the end of this epoch,
    validation and the checkpoint instead of stalling the next training pass. (With ``ingest="split"`` the
    next epoch of ``streaming_split`` can only begin once every rank has drawn all of this one, which is this
    point.)"""

    def __init__(self, ctx: WorkerContext) -> None:
        config = ctx.config
        self.ctx = ctx
        self.mode = config["ingest_mode"]  # split | per_rank | memory | simulate (TrainConfig.ingest_mode)
        self.per_rank = self.mode == "per_rank"
        self.shard = ctx.session.dataset_shard("train") if self.mode == "split" else None
        self._memory: tuple[torch.Tensor, ...] | None = None  # ingest="memory": loaded once
        self.shard_rows = [int(r) for r in config.get("train_shard_rows", [])]
        rows_per_rank = int(config.get("train_rows", 0)) // ctx.world
        # no 1-row last batch (BatchNorm); less than one batch lost per epoch
        self.drop_last = rows_per_rank >= ctx.batch_size
        self.shuffle = int(config.get("shuffle_buffer", 0))
        self._started: dict[int, Iterator[dict[str, torch.Tensor]]] = {}  # epoch -> its batches, streaming

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``epoch`` ({"image", "label"} on the device): the stream started ahead, if any."""
        return self._started.pop(epoch, None) or self._stream(epoch)

    def _stream(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        ctx, config = self.ctx, self.ctx.config
        if ctx.simulate:
            from deeplense_ray.train.online import online_batches, steps_per_epoch

            return online_batches(
                config["sim_preset"],
                seed=ctx.seed,
                epoch=epoch,
                rank=ctx.rank,
                num_batches=steps_per_epoch(int(config["images_per_epoch"]), int(config["batch_size"])),
                batch_size=ctx.batch_size,
                device=ctx.device,
                chunk_batches=int(config["sim_chunk_batches"]),
                prefetch=bool(config.get("sim_prefetch", True)),
                targets=config if ctx.inference else None,
            )

        if self.mode == "memory":
            return self._memory_epoch(epoch)

        def start_next() -> None:
            if epoch < ctx.epochs:
                self._started[epoch + 1] = self._stream(epoch + 1)

        stream, max_rows, drop = self.shard, None, self.drop_last
        if self.per_rank:  # this rank's own Ray Data execution over the shards dealt to it this epoch
            from deeplense_ray.data import read_split

            order_seed = derive_seed(ctx.seed, epoch, 3)
            mine, max_rows = rank_shards(self.shard_rows, ctx.rank, ctx.world, order_seed)
            drop = max_rows >= ctx.batch_size  # this epoch's rows per rank (equal on every rank)
            stream = read_split(
                config["data_dir"],
                "train",
                image_dtype="stored",
                block_rows=int(config["train_block_rows"]),
                shards=mine,
            ).iterator()
        shuffle_gen = torch.Generator(device=ctx.device).manual_seed(
            derive_seed(ctx.seed, epoch, ctx.rank, 2)
        )
        return device_batches(
            stream,
            max_rows=max_rows,
            batch_size=ctx.batch_size,
            device=ctx.device,
            shuffle_rows=self.shuffle,
            generator=shuffle_gen,
            drop_last=drop,
            start_now=True,
            on_input_end=start_next,
        )

    def _memory_epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """``ingest="memory"``: this rank's rows of the epoch's global permutation, from the split it read
        into device memory at its first epoch (train/ingest.py)."""
        ctx = self.ctx
        if self._memory is None:
            if ctx.inference:  # the task's classes only, with their standardised targets
                from deeplense_ray.train.regression import load_memory_split

                self._memory = load_memory_split(ctx.config["data_dir"], "train", ctx.device, ctx.config)
                self.drop_last = len(self._memory[1]) // ctx.world >= ctx.batch_size
            else:
                self._memory = load_split(ctx.config["data_dir"], "train", ctx.device)
        images, labels = self._memory[:2]
        rows = memory_epoch_rows(
            len(labels), ctx.rank, ctx.world, ctx.batch_size, derive_seed(ctx.seed, epoch, 5), self.drop_last
        )
        if ctx.inference:
            return memory_batches(images, labels, rows, ctx.batch_size, targets=self._memory[2])
        return memory_batches(images, labels, rows, ctx.batch_size)


class Validator:
    """The whole val split, evaluated every epoch with each row counted once whatever the number of ranks.

    The val shards are dealt to the ranks (:func:`~deeplense_ray.train.ingest.deal_shards`); a rank reads its
    shards from HDF5 in row order and keeps them in host memory after the first epoch if its share is small
    (``val_cache_mb``, default :data:`VAL_CACHE_MB`). Online (``simulate``) without a dataset, the fixed val
    set's chunks are the shards, each rendered once on this rank's device and kept. The predictions are
    gathered and put back in shard order, so every rank computes the whole-split metrics."""

    def __init__(self, ctx: WorkerContext) -> None:
        config = ctx.config
        self.ctx = ctx
        self.batch_size = int(config.get("eval_batch_size") or EVAL_BATCH_SIZE)
        self._cache: dict[int, list[dict[str, torch.Tensor]]] | None = None
        self.paths: list[str] = []
        if ctx.simulate and not config.get("data_dir"):
            from deeplense_ray.train.online import eval_batches, eval_chunks

            self.rows = eval_chunks(int(config["val_size"]))
            self.mine = deal_shards(self.rows, ctx.rank, ctx.world)
            self._cache = eval_batches(
                config["sim_preset"], "val", seed=ctx.seed, size=int(config["val_size"]), positions=self.mine,
                device=ctx.device, batch_size=self.batch_size, targets=config if ctx.inference else None,
            )  # fmt: skip
        else:
            from deeplense_ray.data.manifest import load_manifest, shard_paths

            manifest = load_manifest(config["data_dir"])
            self.rows = [int(sh["rows"]) for sh in manifest["splits"]["val"]["shards"]]
            self.paths = [str(p) for p in shard_paths(config["data_dir"], "val", manifest)]
            self.mine = deal_shards(self.rows, ctx.rank, ctx.world)
        c, h, w = (int(v) for v in config["image_shape"])
        val_bytes = sum(self.rows[i] for i in self.mine) * 4 * c * h * w
        self.keep_in_memory = 0 < val_bytes <= float(config.get("val_cache_mb", VAL_CACHE_MB)) * 2**20

    def batches(self) -> Mapping[int, Iterable[dict[str, torch.Tensor]]]:
        """{shard position: its batches} of this rank's shards (kept in memory if ``keep_in_memory``)."""
        if self._cache is not None:
            return self._cache
        if self.ctx.inference:  # the task's rows, with their targets
            from deeplense_ray.train.regression import shard_target_batches

            batches = {
                i: shard_target_batches(self.paths[i], self.rows[i], self.batch_size, self.ctx.config)
                for i in self.mine
            }
        else:
            batches = {i: shard_batches(self.paths[i], self.rows[i], self.batch_size) for i in self.mine}
        if self.keep_in_memory:
            self._cache = {i: list(b) for i, b in batches.items()}
            return self._cache
        return batches

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """:func:`classification_metrics` of ``model`` (unwrapped) on the whole split (equal on all ranks);
        task 'inference': train/regression.py's metrics (NLL, RMSE, bias, coverage) instead."""
        ctx = self.ctx
        record = ctx.config.get(RECORD_INPUTS_KEY)
        batches = self.batches()
        if ctx.inference:
            from deeplense_ray.train.regression import merge_outputs, metrics_of, predict_outputs

            mine = {
                i: predict_outputs(model, b, device=ctx.device, amp_dtype=ctx.amp_dtype)
                for i, b in batches.items()
            }
            outputs, truth = merge_outputs(_gather(mine, ctx.world), len(self.rows))
            return metrics_of(outputs, truth, ctx.config)
        if record:  # per shard, one digest per row: what this rank evaluated
            from deeplense_ray.io import atomic_write_json

            batches = {i: list(b) for i, b in batches.items()}
            rows = {str(i): row_digests(b) for i, b in batches.items()}
            atomic_write_json(Path(record) / f"val_r{ctx.rank}.json", rows)
        mine = {
            i: predict_batches(model, b, device=ctx.device, amp_dtype=ctx.amp_dtype)
            for i, b in batches.items()
        }
        logits, labels = merge_shard_predictions(_gather(mine, ctx.world), self.rows)
        return classification_metrics(labels, probabilities(logits), list(ctx.config["class_names"]))


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
    if record := ctx.config.get(RECORD_INPUTS_KEY):
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
        label_smoothing=float(ctx.config.get("label_smoothing", 0.0)),
        keep=training.keep,
        regression=ctx.inference,
    )
    totals = _all_reduce_sums([sums[k] for k in ("loss_sum", "correct", "images")], ctx.device)
    loss_sum, correct, images = totals
    out = {"loss_sum": loss_sum, "correct": correct, "images": images, "lr": lr, "t_epoch_start": t_epoch}
    for key in ("seconds", "data_wait_s", "first_batch_s", "first_step_s"):  # the slowest rank sets the pace
        out[key] = _all_reduce_max(sums[key], ctx.device)
    training.scheduler.step()
    return out


def validate_epoch(
    ctx: WorkerContext, training: Training, validator: Validator
) -> tuple[dict[str, Any], dict[str, float]]:
    """Precise BatchNorm (each rank on its recent inputs, averaged over the ranks), rank 0's buffers to every
    rank (so every rank evaluates exactly the weights rank 0 checkpoints), then the whole val split. Returns
    its metrics and {"val_seconds", "bn_recal_layers" (0: none recalibrated), "bn_recal_s"}."""
    t_val = time.perf_counter()
    model = unwrap(training.model)
    bn_layers = 0
    if training.keep is not None and len(training.keep):
        bn_layers = recalibrate_batch_norm(model, training.keep, device=ctx.device, amp_dtype=ctx.amp_dtype)
        _average_batch_norm_stats(model)
        training.keep.clear()
    bn_seconds = time.perf_counter() - t_val
    _sync_buffers(model)
    val = validator.evaluate(model)
    times = {
        "val_seconds": time.perf_counter() - t_val,
        "bn_recal_layers": bn_layers,
        "bn_recal_s": bn_seconds,
    }
    return val, times


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
    faults: FaultInjection,
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
                config=ctx.config,
                metrics=metrics,
                history=history,
                confusion=confusion,
            )
            ckpt = Path(tmp)
        faults.check("before_report", epoch)
        ctx.session.report(metrics, ckpt)
    faults.check("after_report", epoch)
    if ctx.rank == 0 and ctx.mlflow:
        from deeplense_ray.tracking import log_metrics

        log_metrics(ctx.mlflow["tracking_uri"], ctx.mlflow["run_id"], metrics, step=epoch)
