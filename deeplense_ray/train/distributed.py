"""Collectives over the ranks of a run (``torch.distributed``), each a no-op when the run has one process.

Sums and maxima of per-rank numbers (:func:`all_reduce_sums`, :func:`all_reduce_max`), rank 0's buffers to
every rank (:func:`sync_buffers`), BatchNorm running statistics averaged over the ranks
(:func:`average_batch_norm_stats`) and any picklable object gathered from every rank (:func:`gather`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deeplense_ray.train.batchnorm import batch_norm_layers


def _dist() -> tuple[Any, bool]:
    import torch.distributed as dist

    return dist, dist.is_available() and dist.is_initialized()


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    dist, on = _dist()
    if not on:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    dist, on = _dist()
    if not on:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def sync_buffers(model: nn.Module) -> None:
    """Broadcast rank 0's buffers (e.g. BatchNorm running statistics, updated locally by each rank's last
    batch) so that every rank evaluates exactly the weights rank 0 checkpoints."""
    dist, on = _dist()
    if not on:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def average_batch_norm_stats(model: nn.Module) -> None:
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


def gather(obj: Any, world_size: int) -> list[Any]:
    dist, on = _dist()
    if not on or world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
