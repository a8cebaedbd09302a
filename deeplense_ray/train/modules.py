"""The trained module: a model of the zoo behind per-image normalisation, so that it takes raw images.

Putting the normalisation inside the module makes the checkpoint, the test evaluation and the model logged
to MLflow all take the same raw float32 images [B, C, H, W] as the HDF5 shards hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: Loop-config keys that define the architecture (stored in every checkpoint's meta.json).
ARCH_KEYS: tuple[str, ...] = (
    "model",
    "model_size",
    "model_overrides",
    "image_shape",
    "class_names",
    "pixel_scale",
    "normalize",
)


class NormalizedClassifier(nn.Module):
    """``net(normalize_batch(x, normalize))``: raw images [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(self, *, net: nn.Module, normalize: str = "none", class_names: tuple[str, ...] = ()):
        super().__init__()
        from deeplense_ray.data.augment import NORMALIZE_MODES

        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {list(NORMALIZE_MODES)}, got {normalize!r}")
        self.net = net
        self.normalize = normalize
        self.class_names = tuple(class_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from deeplense_ray.data.augment import normalize_batch

        return self.net(normalize_batch(x, self.normalize))


def build_classifier(config: Mapping[str, Any]) -> NormalizedClassifier:
    """Build the module from a loop config / checkpoint meta (keys :data:`ARCH_KEYS`)."""
    from deeplense_ray.models import build_model

    c, h, _ = (int(v) for v in config["image_shape"])
    net = build_model(
        config["model"],
        h,
        c,
        len(config["class_names"]),
        pixel_scale=config.get("pixel_scale"),
        size=config.get("model_size", "default"),
        **dict(config.get("model_overrides") or {}),
    )
    return NormalizedClassifier(
        net=net, normalize=config.get("normalize", "none"), class_names=tuple(config["class_names"])
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the module itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
