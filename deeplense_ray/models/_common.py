"""Shared helpers of the model zoo: input adapters (padding, channel mapping) and size rules.

Size rules are pure functions so that the registry can reject an impossible image size *before* any module is
built, with an error that lists the valid choices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MIN_IMAGE_SIZE = 16
"""Smallest square image side (pixels) any registered model accepts."""


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    return int(math.ceil(n / multiple) * multiple)


def divisors(n: int, lo: int = 1, hi: int | None = None) -> list[int]:
    """Divisors of ``n`` in ``[lo, hi]`` (ascending)."""
    hi = n if hi is None else hi
    return [d for d in range(max(1, lo), min(n, hi) + 1) if n % d == 0]


def auto_patch_size(image_size: int, *, max_grid: int = 15, min_patch: int = 4) -> int | None:
    """Default patch size: the smallest divisor ``p >= min_patch`` of ``image_size`` with ``image_size/p <=
    max_grid`` (64 -> 8, i.e. 8x8 tokens; 150 -> 10, i.e. 15x15 tokens). None if no divisor qualifies."""
    for p in divisors(image_size, lo=min_patch):
        if image_size // p <= max_grid:
            return p
    return None


def patch_plan(image_size: int, patch_size: int | None, *, max_grid: int = 15) -> tuple[int, int]:
    """Return ``(padded_size, patch_size)`` for a patch-embedding model.

    An explicit ``patch_size`` must divide ``image_size`` (ValueError listing the valid ones). Without one, a
    divisor is chosen by :func:`auto_patch_size`; if the size has none (e.g. a prime), the image is
    zero-padded to the next multiple of 8 and the rule is applied again.
    """
    if patch_size is not None:
        if not isinstance(patch_size, int) or patch_size < 1 or image_size % patch_size:
            valid = divisors(image_size, lo=2, hi=image_size // 2)
            raise ValueError(
                f"patch_size={patch_size!r} does not divide image_size={image_size}; "
                f"valid patch sizes: {valid}"
            )
        return image_size, patch_size
    p = auto_patch_size(image_size, max_grid=max_grid)
    if p is not None:
        return image_size, p
    padded = round_up(image_size, 8)
    p = auto_patch_size(padded, max_grid=max_grid) or 8
    return padded, p


class InputAdapter(nn.Module):
    """Centre-zero-pads a square image to ``padded_size`` and maps ``in_channels`` to ``out_channels``.

    Padding (not resizing) keeps the pixel scale [arcsec/pixel] of the data. Channels: identity when equal,
    a fixed repeat when ``in_channels == 1``, a learnable 1x1 convolution otherwise.
    """

    def __init__(self, *, image_size: int, padded_size: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if padded_size < image_size:
            raise ValueError(f"padded_size={padded_size} < image_size={image_size}")
        total = padded_size - image_size
        self.pad = (total // 2, total - total // 2, total // 2, total - total // 2)
        self.image_size = image_size
        self.padded_size = padded_size
        self.repeat = 1
        self.proj: nn.Module | None = None
        if in_channels != out_channels:
            if in_channels == 1:
                self.repeat = out_channels
            else:
                self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        if self.repeat > 1:
            x = x.expand(-1, self.repeat, -1, -1)
        elif self.proj is not None:
            x = self.proj(x)
        return x


class Adapted(nn.Module):
    """A library model behind an :class:`InputAdapter`; ``forward`` returns logits [B, num_classes]."""

    def __init__(self, adapter: InputAdapter, net: nn.Module) -> None:
        super().__init__()
        self.adapter = adapter
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(self.adapter(x))
        if isinstance(out, tuple):  # LeViT with a distillation head returns (logits, distill)
            out = out[0]
        return out
