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


class NormalizedRegressor(NormalizedClassifier):
    """Task 'inference': the same module, whose network has the Gaussian head's ``T + T(T+1)/2`` outputs
    (train/gaussian.py: mean and precision Cholesky factor, standardised units) instead of class logits; it
    keeps the targets and their standardisation so that a loaded model de-standardises its predictions."""

    def __init__(
        self,
        *,
        net: nn.Module,
        normalize: str = "none",
        class_names: tuple[str, ...] = (),
        targets: tuple[str, ...] = (),
        target_loc: tuple[float, ...] = (),
        target_scale: tuple[float, ...] = (),
        target_prior: tuple[Any, ...] = (),
    ):
        super().__init__(net=net, normalize=normalize, class_names=class_names)
        self.targets = tuple(targets)
        self.target_loc = tuple(float(v) for v in target_loc)
        self.target_scale = tuple(float(v) for v in target_scale)
        self.target_prior = tuple(tuple(p) for p in target_prior)


def arch_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture dict of a loop config (:data:`ARCH_KEYS`; task 'inference' adds its targets,
    standardisation and training prior, train/targets.py)."""
    from deeplense_ray.train.targets import INFERENCE_ARCH_KEYS

    arch = {k: config.get(k) for k in ARCH_KEYS}
    if config.get("task") == "inference":
        arch.update({k: config.get(k) for k in INFERENCE_ARCH_KEYS})
    return arch


def build_classifier(config: Mapping[str, Any]) -> NormalizedClassifier:
    """Build the module from an architecture dict (``LoopConfig.arch``, a checkpoint's meta; keys
    :data:`ARCH_KEYS`); task 'inference':
    a :class:`NormalizedRegressor` with the Gaussian head's outputs."""
    from deeplense_ray.models import build_model

    c, h, _ = (int(v) for v in config["image_shape"])
    inference = config.get("task") == "inference"
    if inference:
        from deeplense_ray.train.gaussian import num_outputs

        outputs = num_outputs(len(config["targets"]))
    else:
        outputs = len(config["class_names"])
    net = build_model(
        config["model"],
        h,
        c,
        outputs,
        pixel_scale=config.get("pixel_scale"),
        size=config.get("model_size", "default"),
        **dict(config.get("model_overrides") or {}),
    )
    if inference:
        return NormalizedRegressor(
            net=net,
            normalize=config.get("normalize", "none"),
            class_names=tuple(config["class_names"]),
            targets=tuple(config["targets"]),
            target_loc=tuple(config["target_loc"]),
            target_scale=tuple(config["target_scale"]),
            target_prior=tuple(config["target_prior"]),
        )
    return NormalizedClassifier(
        net=net, normalize=config.get("normalize", "none"), class_names=tuple(config["class_names"])
    )


#: Environment variable naming the torch.compile backend of ``compile=True`` runs (default "inductor"; "eager"
#: or "aot_eager" check the compile path where no C compiler is available).
COMPILE_BACKEND_ENV = "DEEPLENSE_COMPILE_BACKEND"


def compile_model(model: nn.Module, backend: str | None = None) -> nn.Module:
    """``torch.compile`` ``model``'s forward in place (``nn.Module.compile``) and return it.

    In place, unlike ``torch.compile(model)``, which wraps it in an ``OptimizedModule`` whose state_dict keys
    start with ``_orig_mod.``: the module keeps its class and parameter names, so checkpoints, the test
    evaluation and the model logged to MLflow are the same as without compilation. Compilation itself
    happens at the first call (and again for eval mode and new input shapes). ``backend``: default
    $DEEPLENSE_COMPILE_BACKEND, else "inductor".
    """
    import os

    model.compile(backend=backend or os.environ.get(COMPILE_BACKEND_ENV) or "inductor")
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel and/or a ``torch.compile`` wrapper (or the module itself)."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module):
            inner = model.__dict__.get("_modules", {}).get("module")  # DistributedDataParallel
        if not isinstance(inner, nn.Module):
            return model
        model = inner
