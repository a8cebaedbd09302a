"""Per-image priors of the dark-matter parameters: uniform on a preset range, or a normal truncated to it.

A preset range field (``sigma_sub``, ``axion_log10_mass``) is the support of its parameter. With the
matching ``<field>_normal = [mean, std]`` set, the parameter is drawn from ``N(mean, std^2)`` truncated to
that support instead of uniformly on it. paltas draws Sigma_sub from a normal (Wagner-Carena et al. 2022,
arXiv:2203.00690: N(2e-3, 1.1e-3^2) kpc^-2, at >= 0); a population inference needs such a prior to tell a
lens that says nothing (its posterior is the prior) from a measurement (docs/population.md).

Both priors map one uniform draw ``u`` to one value (the uniform by ``low + (high - low) u``, the truncated
normal by its inverse CDF), so a preset with and one without ``_normal`` consume the same random stream.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Range fields that take a ``<field>_normal`` companion.
NORMAL_PRIOR_FIELDS: tuple[str, ...] = ("sigma_sub", "axion_log10_mass")
#: Least probability mass of the normal inside its range (a range in the far tail is a configuration error).
MIN_MASS = 1e-6


def normal_field(range_field: str) -> str:
    """The name of the ``[mean, std]`` companion of a range field."""
    return f"{range_field}_normal"


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def truncated_normal(u: Tensor, mean: float, sd: float, lo: float, hi: float) -> Tensor:
    """Inverse CDF of N(mean, sd) truncated to [lo, hi], applied to uniforms u (one uniform per value)."""
    a = torch.special.ndtr(torch.tensor((lo - mean) / sd, dtype=torch.float64, device=u.device))
    b = torch.special.ndtr(torch.tensor((hi - mean) / sd, dtype=torch.float64, device=u.device))
    return (mean + sd * torch.special.ndtri(a + u.to(torch.float64) * (b - a))).clamp(lo, hi)


def normal_mass(mean: float, std: float, low: float, high: float) -> float:
    """Probability mass of ``N(mean, std^2)`` inside ``[low, high]``."""
    a, b = (low - mean) / std, (high - mean) / std
    return _phi(-a) - _phi(-b) if a > 0 else _phi(b) - _phi(a)


def draw_in_range(u: Tensor, rng: tuple[float, float], normal: tuple[float, float] | None) -> Tensor:
    """Map uniform draws ``u`` in [0, 1) (float64) onto ``rng``: uniformly, or with ``normal = (mean, std)``
    by the inverse CDF of the normal truncated to ``rng`` (:func:`truncated_normal`)."""
    lo, hi = float(rng[0]), float(rng[1])
    if normal is None:
        return lo + (hi - lo) * u
    return truncated_normal(u, float(normal[0]), float(normal[1]), lo, hi)


__all__ = [
    "MIN_MASS",
    "NORMAL_PRIOR_FIELDS",
    "draw_in_range",
    "normal_field",
    "normal_mass",
    "truncated_normal",
]
