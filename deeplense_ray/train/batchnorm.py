"""Precise BatchNorm: BatchNorm running statistics recomputed with the final weights before each validation.

The loop keeps the epoch's last training inputs (:class:`RecentBatches`, by reference) and, before it
validates, :func:`recalibrate_batch_norm` replaces every BatchNorm layer's running mean and variance by the
plain average of its batch statistics over them (the ranks' results are then averaged,
train/distributed.py). Models without BatchNorm (:func:`batch_norm_layers` empty) skip all of it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from deeplense_ray.train.optim import autocast_context


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
        with autocast_context(device, amp_dtype):
            for x in inputs:
                forward(x.to(device, non_blocking=True))
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.eval()
    return len(bns)
