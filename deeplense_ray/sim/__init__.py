"""Batched torch strong-lensing simulator: kernels, renderer, presets and ``simulate``."""

from __future__ import annotations

from .presets import PRESETS, Preset, get_preset, list_presets, resolve_preset
from .simulate import SimResult, simulate

__all__ = ["PRESETS", "Preset", "SimResult", "get_preset", "list_presets", "resolve_preset", "simulate"]
