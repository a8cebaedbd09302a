"""Optimizer, learning-rate schedule and mixed precision of the training step, from the loop config.

:func:`build_optimizer` (adamw | adam | sgd), :func:`build_scheduler` (a per-epoch ``LambdaLR`` over
:func:`lr_factor`: linear warm-up, then cosine, step or constant), :func:`autocast_dtype` (bf16 / fp16 on
CUDA, else fp32) and :func:`autocast_context` (the autocast region of a forward pass). Shared by the Ray
Train loop and the bare-PyTorch benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn


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


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``device`` and ``dtype``; a no-op context for None (fp32)."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()
