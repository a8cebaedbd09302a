"""Model zoo: vision transformers, ResNets and physics-informed models for lens images.

Public API: :func:`build_model`, :func:`list_models`, :func:`count_parameters`, :func:`model_hparams`,
:func:`parameter_report`; the differentiable SIS inverse lens layer lives in :mod:`.lensing`.
"""

from __future__ import annotations

from .lensing import DEFAULT_PIXEL_SCALE, InverseLensLayer
from .registry import (
    MODEL_SPECS,
    SIZES,
    ModelSpec,
    build_model,
    count_parameters,
    get_spec,
    list_models,
    model_hparams,
    parameter_report,
    resolve_hparams,
)

__all__ = [
    "DEFAULT_PIXEL_SCALE",
    "InverseLensLayer",
    "MODEL_SPECS",
    "SIZES",
    "ModelSpec",
    "build_model",
    "count_parameters",
    "get_spec",
    "list_models",
    "model_hparams",
    "parameter_report",
    "resolve_hparams",
]
