"""lenstronomy-compatible entry point: the same inputs as lenstronomy's ``ImageModel.image``, our kernels.

    from deeplense_ray.sim.compat import lenstronomy_image
    img = lenstronomy_image(["SIE", "SHEAR"], [{"theta_E": 1.2, "e1": 0.1, "e2": 0.0, "center_x": 0,
                            "center_y": 0}, {"gamma1": 0.02, "gamma2": -0.01}],
                            ["SERSIC_ELLIPSE"], [{"amp": 10, "R_sersic": 0.25, "n_sersic": 1, "e1": 0.1,
                            "e2": 0, "center_x": 0.05, "center_y": 0}], num_pix=64, delta_pix=0.1,
                            supersampling_factor=2, psf_fwhm=0.16)

equals (noise free) lenstronomy's ``ImageModel(data_class=ImageData(**data_configure_simple(num_pix,
delta_pix, inverse=False)), psf_class=PSF("GAUSSIAN", fwhm=psf_fwhm, truncation=5), lens_model_class=
LensModel(lens_model_list), source_model_class=LightModel(source_model_list), kwargs_numerics=
{"supersampling_factor": s, "supersampling_convolution": False}).image(kwargs_lens, kwargs_source)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .lens import (
    alpha_epl,
    alpha_multipole,
    alpha_nfw,
    alpha_point_mass,
    alpha_shear,
    alpha_sie,
    alpha_sis,
    alpha_tnfw,
    ellipticity_to_phi_q,
    epl_series_terms,
)
from .light import sersic_elliptical, sersic_spherical
from .render import bin_supersampled, convolve_gaussian, gaussian_kernel_1d, pixel_grid

_LENS_KEYS: dict[str, tuple[tuple[str, ...], dict[str, float]]] = {
    "SIS": (("theta_E",), {"center_x": 0.0, "center_y": 0.0}),
    "SIE": (("theta_E", "e1", "e2"), {"center_x": 0.0, "center_y": 0.0}),
    "SHEAR": (("gamma1", "gamma2"), {"ra_0": 0.0, "dec_0": 0.0}),
    "POINT_MASS": (("theta_E",), {"center_x": 0.0, "center_y": 0.0}),
    "NFW": (("Rs", "alpha_Rs"), {"center_x": 0.0, "center_y": 0.0}),
    "TNFW": (("Rs", "alpha_Rs", "r_trunc"), {"center_x": 0.0, "center_y": 0.0}),
    "EPL": (("theta_E", "gamma", "e1", "e2"), {"center_x": 0.0, "center_y": 0.0}),
    "MULTIPOLE": (("m", "a_m", "phi_m"), {"center_x": 0.0, "center_y": 0.0, "r_E": 1.0}),
}
_LIGHT_KEYS: dict[str, tuple[tuple[str, ...], dict[str, float]]] = {
    "SERSIC": (("amp", "R_sersic", "n_sersic"), {"center_x": 0.0, "center_y": 0.0}),
    "SERSIC_ELLIPSE": (("amp", "R_sersic", "n_sersic", "e1", "e2"), {"center_x": 0.0, "center_y": 0.0}),
}


def _epl(x, y, theta_E, gamma, e1, e2, center_x, center_y):
    """``alpha_epl`` with series terms for this q and gamma (relative error <= 1e-9)."""
    q = float(ellipticity_to_phi_q(e1, e2)[1])
    n = epl_series_terms(q, float(gamma), rtol=1e-9)
    return alpha_epl(x, y, theta_E, gamma, e1, e2, center_x, center_y, n_terms=n)


def _multipole(x, y, m, a_m, phi_m, center_x, center_y, r_E):
    if float(m) not in (1.0, 3.0, 4.0) and not (float(m).is_integer() and m >= 2):
        raise ValueError(f"lens model 'MULTIPOLE': m = {float(m)!r} must be an integer >= 1")
    return alpha_multipole(x, y, int(m), a_m, phi_m, center_x, center_y, r_E)


_LENS_FN = {
    "SIS": alpha_sis,
    "SIE": alpha_sie,
    "SHEAR": alpha_shear,
    "POINT_MASS": alpha_point_mass,
    "NFW": alpha_nfw,
    "TNFW": alpha_tnfw,
    "EPL": _epl,
    "MULTIPOLE": _multipole,
}
_LIGHT_FN = {"SERSIC": sersic_spherical, "SERSIC_ELLIPSE": sersic_elliptical}


def _kwargs(kind: str, name: str, kw: Mapping[str, Any], table, i: int) -> list[float]:
    if name not in table:
        raise ValueError(f"{kind} model #{i} {name!r} is not supported; supported: {sorted(table)}")
    required, optional = table[name]
    missing = [k for k in required if k not in kw]
    if missing:
        raise ValueError(f"{kind} model #{i} {name!r} lacks keyword(s) {missing}")
    unknown = sorted(set(kw) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"{kind} model #{i} {name!r} got unknown keyword(s) {unknown}")
    vals = [kw[k] for k in required] + [kw.get(k, v) for k, v in optional.items()]
    for k, v in zip(list(required) + list(optional), vals):
        if not np.isfinite(v):
            raise ValueError(f"{kind} model #{i} {name!r}: {k} = {v!r} is not finite")
    return [float(v) for v in vals]


def deflection(
    lens_model_list: Sequence[str], kwargs_lens: Sequence[Mapping[str, Any]], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Total deflection (lenstronomy ``LensModel.alpha``) at x, y [arcsec] for a list of models."""
    if len(lens_model_list) != len(kwargs_lens):
        raise ValueError(f"{len(lens_model_list)} lens models but {len(kwargs_lens)} kwargs dicts")
    ax = torch.zeros_like(x)
    ay = torch.zeros_like(y)
    for i, (name, kw) in enumerate(zip(lens_model_list, kwargs_lens)):
        vals = _kwargs("lens", name, kw, _LENS_KEYS, i)
        t = [torch.tensor(v, dtype=x.dtype, device=x.device) for v in vals]
        dx, dy = _LENS_FN[name](x, y, *t)
        ax = ax + dx
        ay = ay + dy
    return ax, ay


def surface_brightness(
    source_model_list: Sequence[str],
    kwargs_source: Sequence[Mapping[str, Any]],
    x: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """Total surface brightness (lenstronomy ``LightModel.surface_brightness``) at x, y [arcsec]."""
    if len(source_model_list) != len(kwargs_source):
        raise ValueError(f"{len(source_model_list)} light models but {len(kwargs_source)} kwargs dicts")
    sb = torch.zeros_like(x)
    for i, (name, kw) in enumerate(zip(source_model_list, kwargs_source)):
        vals = _kwargs("light", name, kw, _LIGHT_KEYS, i)
        t = [torch.tensor(v, dtype=x.dtype, device=x.device) for v in vals]
        sb = sb + _LIGHT_FN[name](x, y, *t)
    return sb


def lenstronomy_image(
    lens_model_list: Sequence[str],
    kwargs_lens: Sequence[Mapping[str, Any]],
    source_model_list: Sequence[str],
    kwargs_source: Sequence[Mapping[str, Any]],
    num_pix: int,
    delta_pix: float,
    supersampling_factor: int = 1,
    psf_fwhm: float | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Noise-free image [num_pix, num_pix] (flux per pixel), as lenstronomy's ``ImageModel.image``.

    Models: lens SIS, SIE, EPL, MULTIPOLE, SHEAR, POINT_MASS, NFW, TNFW; source SERSIC, SERSIC_ELLIPSE, with
    lenstronomy's keyword names. Grid ``data_configure_simple(num_pix, delta_pix, inverse=False)``,
    supersampling without supersampled convolution, GAUSSIAN PSF (truncation 5 sigma) when ``psf_fwhm``
    [arcsec] is given.
    """
    if int(num_pix) != num_pix or num_pix < 1:
        raise ValueError(f"num_pix = {num_pix!r} must be a positive integer")
    if not (np.isfinite(delta_pix) and delta_pix > 0):
        raise ValueError(f"delta_pix = {delta_pix!r} must be a finite number > 0")
    if int(supersampling_factor) != supersampling_factor or supersampling_factor < 1:
        raise ValueError(f"supersampling_factor = {supersampling_factor!r} must be an integer >= 1")
    if psf_fwhm is not None and not (np.isfinite(psf_fwhm) and psf_fwhm > 0):
        raise ValueError(f"psf_fwhm = {psf_fwhm!r} must be None or a finite number > 0")
    num_pix, ss = int(num_pix), int(supersampling_factor)
    x, y = pixel_grid(num_pix, float(delta_pix), ss, device=device, dtype=dtype)
    with torch.no_grad():
        ax, ay = deflection(lens_model_list, kwargs_lens, x, y)
        sb = surface_brightness(source_model_list, kwargs_source, x - ax, y - ay)
        img = bin_supersampled(sb[None], num_pix, ss, float(delta_pix))
        if psf_fwhm is not None:
            img = convolve_gaussian(img, gaussian_kernel_1d(float(psf_fwhm), float(delta_pix), dtype=dtype))
    return img[0].cpu().numpy()
