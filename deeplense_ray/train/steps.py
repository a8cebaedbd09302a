"""The step of a training pass and of a prediction pass, shared by the loop and the benchmarks.

:func:`train_one_epoch` (one pass of this rank over its batches: forward, loss, backward, optimizer step,
with its timings), :func:`predict_batches` (head outputs and truths of a split, in order) and
:func:`probabilities` (softmax in float64). The Ray Train loop (train/loop.py), the bare-PyTorch benchmark
loops (benchmarks/), the checkpoint evaluations (train/evaluation.py, train/online.py,
train/regression.py) and the served model (infer/model.py) all go through them, so they time and predict
the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from deeplense_ray.train.optim import autocast_context

if TYPE_CHECKING:
    from deeplense_ray.train.batchnorm import RecentBatches


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
        with autocast_context(device, amp_dtype):
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
        with autocast_context(device, amp_dtype):
            logits = model(x)
        logits_out.append(logits.float().cpu().numpy())
        truth_out.append(np.asarray(batch[truth].cpu().numpy(), dtype=dtype))
    if not logits_out:
        return np.zeros((0, 0), np.float32), np.zeros((0,) if truth == "label" else (0, 0), dtype)
    return np.concatenate(logits_out), np.concatenate(truth_out)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax in float64 (rows sum to 1 to ~1e-16)."""
    return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64)), dim=1).numpy()
