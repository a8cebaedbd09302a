"""Surface-brightness profiles as batched torch functions (lenstronomy ``LightModel`` conventions).

Coordinates in arcsec; parameters broadcast against the coordinates (see ``lens.py``). Surface brightness
is in flux per arcsec^2 (the renderer multiplies by the pixel area).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_SMOOTHING = 1e-4  # lenstronomy SersicUtil smoothing [arcsec]
_MAX_R_FRAC = 1000.0  # lenstronomy max_R_frac


def sersic_b_n(n_sersic: Tensor) -> Tensor:
    """lenstronomy's b_n approximation: b_n = 1.9992 n - 0.3271, floored at 1e-5."""
    return (1.9992 * n_sersic - 0.3271).clamp_min(1e-5)


def sersic_radius(x: Tensor, y: Tensor, e1, e2, center_x, center_y) -> Tensor:
    """Elliptical radius R = sqrt(q x'^2 + y'^2/q) in lenstronomy's product-average form.

    Uses lenstronomy ``transform_e1e2_product_average`` (no trigonometry):
    x_ = ((1-e1) dx - e2 dy)/norm, y_ = (-e2 dx + (1+e1) dy)/norm, norm = sqrt(max(|1-e1^2-e2^2|, 1e-6)).
    """
    dx = x - center_x
    dy = y - center_y
    norm = torch.sqrt(torch.clamp((1.0 - e1 * e1 - e2 * e2).abs(), min=1e-6))
    xs = ((1.0 - e1) * dx - e2 * dy) / norm
    ys = (-e2 * dx + (1.0 + e1) * dy) / norm
    return torch.sqrt(xs * xs + ys * ys)


def sersic_profile(R: Tensor, amp, R_sersic, n_sersic) -> Tensor:
    """I(R) = amp exp(-b_n [(R/R_sersic)^(1/n) - 1]); R floored at 1e-4, zero beyond 1000 R_sersic."""
    R_ = R.clamp_min(_SMOOTHING)
    Rs_ = R_sersic.clamp_min(_SMOOTHING) if isinstance(R_sersic, Tensor) else max(R_sersic, _SMOOTHING)
    frac = R_ / Rs_
    bn = sersic_b_n(n_sersic) if isinstance(n_sersic, Tensor) else max(1.9992 * n_sersic - 0.3271, 1e-5)
    val = amp * torch.exp(-bn * (torch.exp(torch.log(frac) / n_sersic) - 1.0))
    return torch.where(frac <= _MAX_R_FRAC, val, torch.zeros_like(val))


def sersic_elliptical(
    x: Tensor, y: Tensor, amp, R_sersic, n_sersic, e1, e2, center_x=0.0, center_y=0.0
) -> Tensor:
    """lenstronomy ``SERSIC_ELLIPSE``: amp is the surface brightness at R_sersic (product-average radius)."""
    return sersic_profile(sersic_radius(x, y, e1, e2, center_x, center_y), amp, R_sersic, n_sersic)


def sersic_spherical(x: Tensor, y: Tensor, amp, R_sersic, n_sersic, center_x=0.0, center_y=0.0) -> Tensor:
    """lenstronomy ``SERSIC`` (round)."""
    dx = x - center_x
    dy = y - center_y
    return sersic_profile(torch.sqrt(dx * dx + dy * dy), amp, R_sersic, n_sersic)


def sersic_total_flux(amp: Tensor, R_sersic: Tensor, n_sersic: Tensor) -> Tensor:
    """Total flux of a Sersic profile (lenstronomy ``_total_flux``, product-average radius):
    F = amp R^2 2 pi n e^{b_n} Gamma(2n) / b_n^{2n}."""
    bn = sersic_b_n(n_sersic)
    log_f = (
        torch.log(amp)
        + 2.0 * torch.log(R_sersic)
        + torch.log(2.0 * torch.pi * n_sersic)
        + bn
        + torch.lgamma(2.0 * n_sersic)
        - 2.0 * n_sersic * torch.log(bn)
    )
    return torch.exp(log_f)


def sersic_amp_from_flux(flux: Tensor, R_sersic: Tensor, n_sersic: Tensor) -> Tensor:
    """amp (surface brightness at R_sersic) that gives total ``flux``."""
    return flux / sersic_total_flux(torch.ones_like(flux), R_sersic, n_sersic)


def pixelated_source(
    x: Tensor,
    y: Tensor,
    stamps: Tensor,
    flux: Tensor,
    size: Tensor,
    angle: Tensor,
    center_x: Tensor,
    center_y: Tensor,
) -> Tensor:
    """Bilinear surface brightness of pixelated sources (real galaxies) at source-plane positions.

    x, y: [B, P] positions [arcsec]; stamps: [B, 1, S, S] images normalised to unit sum (row index = +y,
    column index = +x); flux: [B] total flux; size: [B] full width of a stamp on the sky [arcsec];
    angle: [B] rotation of the stamp [rad]; center_x/y: [B] stamp centre [arcsec]. Zero outside the stamp.
    Returns [B, P] surface brightness = flux * stamp / (pixel area of the stamp).
    """
    S = stamps.shape[-1]
    half = (0.5 * size)[:, None]
    cos_a, sin_a = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    dx = x - center_x[:, None]
    dy = y - center_y[:, None]
    u = (cos_a * dx + sin_a * dy) / half
    v = (-sin_a * dx + cos_a * dy) / half
    grid = torch.stack([u, v], dim=-1).unsqueeze(1).to(stamps.dtype)  # [B, 1, P, 2]
    val = F.grid_sample(stamps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    pix_area = (size / S) ** 2
    return val[:, 0, 0, :].to(x.dtype) * (flux / pix_area)[:, None]
