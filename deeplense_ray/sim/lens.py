"""Deflection angles alpha(theta) of lens mass profiles, as batched torch functions.

Conventions follow lenstronomy (``LensModel/Profiles``): angles in arcsec, ellipticity (e1, e2) with
phi = atan2(e2, e1)/2 and q = (1-c)/(1+c), c = min(|e|, 0.9999). Every function broadcasts its
parameters against the coordinates: typically ``x, y`` are ``[P]`` or ``[B, P]`` and parameters ``[B, 1]``
(or ``[B, K, 1]`` with coordinates ``[B, 1, P]`` for K components). Each returns ``(alpha_x, alpha_y)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_F_FLOOR = 1e-15  # floor of sqrt(1-q^2) in the SIE: arctan(f t)/f -> t without 0/0 at q = 1


def ellipticity_to_phi_q(e1: Tensor, e2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(phi [rad], q, c) from lenstronomy ellipticities; c = min(sqrt(e1^2+e2^2), 0.9999)."""
    phi = 0.5 * torch.atan2(e2, e1)
    c = torch.clamp(torch.sqrt(e1 * e1 + e2 * e2), max=0.9999)
    q = (1.0 - c) / (1.0 + c)
    return phi, q, c


def phi_q_to_ellipticity(phi: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """lenstronomy ``phi_q2_ellipticity``: e1 = (1-q)/(1+q) cos 2phi, e2 = (1-q)/(1+q) sin 2phi."""
    c = (1.0 - q) / (1.0 + q)
    return c * torch.cos(2.0 * phi), c * torch.sin(2.0 * phi)


def alpha_sis(x: Tensor, y: Tensor, theta_E: Tensor, center_x=0.0, center_y=0.0) -> tuple[Tensor, Tensor]:
    """Singular isothermal sphere: alpha = theta_E d/|d| [arcsec]; zero at the centre."""
    dx = x - center_x
    dy = y - center_y
    r = torch.sqrt(dx * dx + dy * dy).clamp_min(1e-6)
    a = theta_E / r
    return a * dx, a * dy


def _atan_over_f(t: Tensor, f: Tensor) -> Tensor:
    """arctan(f t) / f, continuous at f -> 0 (= t): f is floored at 1e-15, where arctan(z) = z exactly."""
    f = f.clamp_min(_F_FLOOR)
    return torch.atan(f * t) / f


def _atanh_over_f(t: Tensor, f: Tensor) -> Tensor:
    """artanh(f t) / f, continuous at f -> 0 (= t): f is floored at 1e-15, where artanh(z) = z exactly."""
    f = f.clamp_min(_F_FLOOR)
    return torch.atanh(f * t) / f


def alpha_sie(
    x: Tensor, y: Tensor, theta_E: Tensor, e1: Tensor, e2: Tensor, center_x=0.0, center_y=0.0
) -> tuple[Tensor, Tensor]:
    """Singular isothermal ellipsoid (lenstronomy ``SIE`` = ``NIE`` with vanishing core).

    With q, phi from (e1, e2), in the frame rotated by phi: b = theta_E sqrt(q), f = sqrt(1-q^2),
    psi = sqrt(q^2 x'^2 + y'^2), alpha_x' = b/f arctan(f x'/psi), alpha_y' = b/f artanh(f y'/psi).
    Reduces to the SIS continuously as q -> 1 (f floored at 1e-15, where arctan(z)/z = artanh(z)/z = 1 in
    floating point) and is 0 at the centre.
    theta_E [arcsec] is lenstronomy's (product-average) Einstein radius.
    """
    phi, q, c = ellipticity_to_phi_q(e1, e2)
    cos_p, sin_p = torch.cos(phi), torch.sin(phi)
    dx = x - center_x
    dy = y - center_y
    xr = cos_p * dx + sin_p * dy
    yr = -sin_p * dx + cos_p * dy
    # 1 - q^2 = (1-q)(1+q) with 1-q = 2c/(1+c): no cancellation near q = 1
    f = torch.sqrt((2.0 * c / (1.0 + c)) * (1.0 + q))
    psi = torch.sqrt(q * q * xr * xr + yr * yr).clamp_min(1e-30 if x.dtype == torch.float64 else 1e-18)
    b = theta_E * torch.sqrt(q)
    ax_r = b * _atan_over_f(xr / psi, f)
    ay_r = b * _atanh_over_f(yr / psi, f)
    return cos_p * ax_r - sin_p * ay_r, sin_p * ax_r + cos_p * ay_r


def alpha_shear(
    x: Tensor, y: Tensor, gamma1: Tensor, gamma2: Tensor, ra_0=0.0, dec_0=0.0
) -> tuple[Tensor, Tensor]:
    """External shear (lenstronomy ``SHEAR``): alpha = (g1 x + g2 y, g2 x - g1 y) about (ra_0, dec_0)."""
    dx = x - ra_0
    dy = y - dec_0
    return gamma1 * dx + gamma2 * dy, gamma2 * dx - gamma1 * dy


def alpha_point_mass(
    x: Tensor, y: Tensor, theta_E: Tensor, center_x=0.0, center_y=0.0, *, r_min: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Point mass (lenstronomy ``POINT_MASS``): alpha = theta_E^2 d / |d|^2, |d| floored at r_min [arcsec]."""
    dx = x - center_x
    dy = y - center_y
    r2 = (dx * dx + dy * dy).clamp_min(r_min * r_min)
    a = theta_E * theta_E / r2
    return a * dx, a * dy


def alpha_point_masses_sum(
    x: Tensor, y: Tensor, theta_E: Tensor, center_x: Tensor, center_y: Tensor, *, r_min: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Sum of K point masses per image. x, y: [P] or [B, P]; theta_E, center_x, center_y: [B, K].

    Zero-padded components (theta_E = 0) contribute nothing. Returns [B, P] each.
    """
    xs = x.unsqueeze(-2)  # [..., 1, P]
    ys = y.unsqueeze(-2)
    dx = xs - center_x.unsqueeze(-1)  # [B, K, P]
    dy = ys - center_y.unsqueeze(-1)
    w = (theta_E * theta_E).unsqueeze(-1) / (dx * dx + dy * dy).clamp_min(r_min * r_min)
    return (w * dx).sum(-2), (w * dy).sum(-2)


def alpha_line_segment(
    x: Tensor,
    y: Tensor,
    theta_E_tot: Tensor,
    half_length: Tensor,
    angle: Tensor,
    center_x=0.0,
    center_y=0.0,
    *,
    r_min: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """Uniform line segment (an axion vortex) of total Einstein radius theta_E_tot [arcsec].

    The mass theta_E_tot^2 is spread uniformly over a segment of length L = 2 half_length [arcsec] through
    (center_x, center_y) at position angle ``angle`` [rad]. In the segment frame (u along, v across), with
    mu = theta_E_tot^2 / L (exact integral of point masses along the line):
    alpha_u = mu/2 ln[((u+L/2)^2+v^2)/((u-L/2)^2+v^2)], alpha_v = mu [atan2(v, u-L/2) - atan2(v, u+L/2)].
    Far from the segment it tends to a point mass of the same total.
    """
    cos_a, sin_a = torch.cos(angle), torch.sin(angle)
    dx = x - center_x
    dy = y - center_y
    u = cos_a * dx + sin_a * dy
    v = -sin_a * dx + cos_a * dy
    h = half_length.clamp_min(1e-12) if isinstance(half_length, Tensor) else max(half_length, 1e-12)
    mu = theta_E_tot * theta_E_tot / (2.0 * h)
    up = u + h
    um = u - h
    v2 = v * v
    rp2 = (up * up + v2).clamp_min(r_min * r_min)
    rm2 = (um * um + v2).clamp_min(r_min * r_min)
    a_u = 0.5 * mu * torch.log(rp2 / rm2)
    a_v = mu * (torch.atan2(v, um) - torch.atan2(v, up))
    return cos_a * a_u - sin_a * a_v, sin_a * a_u + cos_a * a_v


def point_chain(
    theta_E_tot: Tensor, half_length: Tensor, angle: Tensor, center_x: Tensor, center_y: Tensor, n: int
) -> tuple[Tensor, Tensor, Tensor]:
    """A vortex as the published DeepLense sets drew it: ``n`` equal point masses at positions
    linspace(-half_length, half_length, n) [arcsec] along position angle ``angle`` [rad] through
    (center_x, center_y). Parameters [B] (or [B, 1]); returns (theta_E, x, y) each [B, n], with
    theta_E = theta_E_tot / sqrt(n) [arcsec] (theta_E^2 is proportional to the mass)."""
    col = lambda t: t.reshape(-1, 1)  # noqa: E731
    t = torch.linspace(-1.0, 1.0, int(n), dtype=theta_E_tot.dtype, device=theta_E_tot.device)
    s = col(half_length) * t
    a = col(angle)
    te = (col(theta_E_tot) / math.sqrt(n)).expand(-1, int(n))
    return te, col(center_x) + s * torch.cos(a), col(center_y) + s * torch.sin(a)


def alpha_point_chain(
    x: Tensor,
    y: Tensor,
    theta_E_tot: Tensor,
    half_length: Tensor,
    angle: Tensor,
    center_x: Tensor,
    center_y: Tensor,
    n: int,
) -> tuple[Tensor, Tensor]:
    """Deflection [B, P] of ``point_chain`` (n equal point masses of total theta_E_tot^2 on a segment)."""
    return alpha_point_masses_sum(x, y, *point_chain(theta_E_tot, half_length, angle, center_x, center_y, n))


# ----------------------------------------------------------------------------- NFW / truncated NFW


def _nfw_F(X: Tensor) -> Tensor:
    """F(X) = artanh(sqrt(1-X^2))/sqrt(1-X^2) (X<1), arctan(sqrt(X^2-1))/sqrt(X^2-1) (X>1), 1 at X=1."""
    d = X * X - 1.0
    s = torch.sqrt(d.abs())
    near = s < 1e-4
    s_safe = torch.where(near, torch.ones_like(s), s)
    # X < 1: artanh(s) = ln((1+s)/X) since (1-s)(1+s) = X^2 (stable for X -> 0 in float32 too)
    far = torch.where(d > 0, torch.atan(s_safe), torch.log((1.0 + s_safe) / X)) / s_safe
    series = 1.0 - d / 3.0 + d * d / 5.0  # both branches: F = 1 - d/3 + d^2/5 - ...
    return torch.where(near, series, far)


def alpha_nfw(
    x: Tensor, y: Tensor, Rs: Tensor, alpha_Rs: Tensor, center_x=0.0, center_y=0.0
) -> tuple[Tensor, Tensor]:
    """lenstronomy ``NFW`` deflection with scale radius Rs [arcsec] and deflection alpha_Rs at Rs [arcsec].

    alpha(R) = 4 rho0 Rs g(X)/X^2 * d, X = R/Rs, g(X) = ln(X/2) + F(X),
    rho0 = alpha_Rs / (4 Rs^2 (1 + ln 1/2)); R floored at 1e-8, X at 1e-6 (as lenstronomy).
    """
    dx = x - center_x
    dy = y - center_y
    R = torch.sqrt(dx * dx + dy * dy).clamp_min(1e-8)
    rho0 = alpha_Rs / (4.0 * Rs * Rs * (1.0 + math.log(0.5)))
    X = (R / Rs).clamp_min(1e-6)
    g = torch.log(X / 2.0) + _nfw_F(X)
    a = 4.0 * rho0 * Rs * g / (X * X)
    return a * dx, a * dy


def alpha_tnfw(
    x: Tensor, y: Tensor, Rs: Tensor, alpha_Rs: Tensor, r_trunc: Tensor, center_x=0.0, center_y=0.0
) -> tuple[Tensor, Tensor]:
    """lenstronomy ``TNFW`` (Baltz, Marshall & Oguri 2009, n=1 truncation) deflection.

    Rs, r_trunc [arcsec], alpha_Rs [arcsec] is the deflection of the untruncated NFW at Rs.
    tau = r_trunc / Rs; X floored at 1e-3 as in lenstronomy.
    """
    s = 1e-3
    dx = x - center_x
    dy = y - center_y
    R = torch.sqrt(dx * dx + dy * dy)
    R = torch.maximum(R, s * Rs)
    rho0 = alpha_Rs / (4.0 * Rs * Rs * (1.0 + math.log(0.5)))
    X = (R / Rs).clamp_min(s)
    tau = r_trunc / Rs
    t2 = tau * tau
    sq = torch.sqrt(t2 + X * X)
    L = torch.log(X / (tau + sq))
    g = (
        t2
        / (t2 + 1.0) ** 2
        * (
            (t2 + 1.0 + 2.0 * (X * X - 1.0)) * _nfw_F(X)
            + tau * math.pi
            + (t2 - 1.0) * torch.log(tau)
            + sq * (-math.pi + L * (t2 - 1.0) / tau)
        )
    )
    a = 4.0 * rho0 * Rs * g / (X * X)
    return a * dx, a * dy


# ----------------------------------------------------------------------------- EPL and multipoles


def epl_series_terms(
    q_min: float, gamma_max: float = 2.5, *, rtol: float = 1e-6, max_terms: int = 1000
) -> int:
    """Terms n = 1..N of the EPL angular series (``alpha_epl``) after the first that bound its truncation
    error by ``rtol`` (relative to |Omega|) for every axis ratio q >= ``q_min`` and slope
    gamma <= ``gamma_max``.

    With f = (1-q)/(1+q) and t = gamma - 1 in (0, 2) the terms are a_n f^n, a_0 = 1,
    a_n = a_{n-1} (2n-2+t)/(2n+2-t) (decreasing in n, increasing in t): the tail after N terms is at most
    a_{N+1} f^(N+1) / (1-f), and |Omega| >= 1 - a_1 f / (1-f). At most ``max_terms``.
    """
    c = min(max((1.0 - q_min) / (1.0 + q_min), 0.0), 0.9999)
    if c == 0.0:
        return 0
    t = min(max(gamma_max - 1.0, 1e-6), 2.0 - 1e-6)
    floor = max(1.0 - (t / (4.0 - t)) * c / (1.0 - c), 1e-3)
    a, fn = 1.0, 1.0
    for n in range(1, max_terms + 1):
        a *= (2 * n - 2 + t) / (2 * n + 2 - t)
        fn *= c
        if a * fn / (1.0 - c) <= rtol * floor:
            return n - 1
    return max_terms


def alpha_epl(
    x: Tensor,
    y: Tensor,
    theta_E: Tensor,
    gamma: Tensor,
    e1: Tensor,
    e2: Tensor,
    center_x=0.0,
    center_y=0.0,
    *,
    n_terms: int,
) -> tuple[Tensor, Tensor]:
    """Elliptical power-law mass (lenstronomy ``EPL``; Tessore & Metcalf 2015, arXiv:1507.01819).

    kappa = (3-gamma)/2 (theta_E / sqrt(q x'^2 + y'^2/q))^(gamma-1) in the frame rotated by phi. With
    b = theta_E sqrt(q) [arcsec], t = gamma - 1, f = (1-q)/(1+q), R = sqrt(q^2 x'^2 + y'^2) (floored at 1e-9
    arcsec, as lenstronomy) and the elliptical angle varphi (cos = q x'/R, sin = y'/R):
    alpha' = 2 b / (1+q) (b/R)^(t-1) Omega, Omega = sum_n a_n (-f)^n e^{i(2n+1) varphi}
    (the hypergeometric series 2F1(1, t/2; 2-t/2; -f e^{2 i varphi}) of T&M eq. 22-29), a_0 = 1,
    a_n = a_{n-1} (2n-2+t)/(2n+2-t), summed to n = ``n_terms`` (``epl_series_terms`` picks it), in real
    arithmetic (each term is the previous one rotated by 2 varphi). gamma = 2 is the SIE (``alpha_sie``).
    theta_E [arcsec] is lenstronomy's circularised Einstein radius; gamma the 3D slope (1 < gamma < 3).
    Returns (alpha_x, alpha_y) [arcsec].
    """
    phi, q, c = ellipticity_to_phi_q(e1, e2)
    cos_p, sin_p = torch.cos(phi), torch.sin(phi)
    dx = x - center_x
    dy = y - center_y
    xr = cos_p * dx + sin_p * dy
    yr = -sin_p * dx + cos_p * dy
    t = gamma - 1.0
    b = theta_E * torch.sqrt(q)
    R = torch.sqrt(q * q * xr * xr + yr * yr).clamp_min(1e-9)
    cf = q * xr / R
    sf = yr / R
    c2 = cf * cf - sf * sf  # cos, sin of 2 varphi
    s2 = 2.0 * sf * cf
    ox, oy = cf, sf
    wx, wy = cf, sf
    for n in range(1, int(n_terms) + 1):
        k = -c * (2.0 * n - 2.0 + t) / (2.0 * n + 2.0 - t)  # c = (1-q)/(1+q)
        ox, oy = k * (ox * c2 - oy * s2), k * (oy * c2 + ox * s2)
        wx = wx + ox
        wy = wy + oy
    amp = 2.0 * b / (1.0 + q) * torch.exp((t - 1.0) * torch.log(b / R))
    ax_r, ay_r = amp * wx, amp * wy
    return cos_p * ax_r - sin_p * ay_r, sin_p * ax_r + cos_p * ay_r


def alpha_multipole(
    x: Tensor, y: Tensor, m: int, a_m: Tensor, phi_m: Tensor, center_x=0.0, center_y=0.0, r_E=1.0
) -> tuple[Tensor, Tensor]:
    """Circular multipole of order m (lenstronomy ``MULTIPOLE``, Xu et al. 2013 eq. B12; isothermal).

    Polar (r, phi) about the centre, a_m [arcsec], phi_m [rad], r_E [arcsec] (m = 1 only):
    m >= 2: kappa = a_m / (2r) cos(m(phi - phi_m)),
    alpha = a_m/(1-m^2) [cos(m(phi-phi_m)) (cos phi, sin phi) + m sin(m(phi-phi_m)) (sin phi, -cos phi)];
    m = 1: alpha = a_m/2 [ln(r/r_E) (cos phi_m, sin phi_m) + cos(phi - phi_m) (cos phi, sin phi)],
    r floored at 1e-6 arcsec (as lenstronomy). Returns (alpha_x, alpha_y) [arcsec].
    """
    dx = x - center_x
    dy = y - center_y
    r = torch.sqrt(dx * dx + dy * dy).clamp_min(1e-6)
    cp, sp = dx / r, dy / r
    if m == 1:
        ln = torch.log(r / r_E)
        cpm, spm = torch.cos(phi_m), torch.sin(phi_m)
        proj = cp * cpm + sp * spm  # cos(phi - phi_m)
        return 0.5 * a_m * (cpm * ln + proj * cp), 0.5 * a_m * (spm * ln + proj * sp)
    ang = torch.atan2(dy, dx) - phi_m
    cm = a_m / (1.0 - m * m) * torch.cos(m * ang)
    sm = m * a_m / (1.0 - m * m) * torch.sin(m * ang)
    return cp * cm + sp * sm, sp * cm - cp * sm
