"""A normalised subhalo population (paltas / DG19), drawn per image from a seeded generator on its device.

The model is DG19 (Gilman et al., arXiv:1909.02573) as paltas renders it
(``paltas/Substructure/subhalos_dg19.py``; prior of Wagner-Carena et al. 2022, arXiv:2203.00690):

- mass function per unit projected area: d^2N / (dm dA) = (Sigma_sub / m_pivot) (m / m_pivot)^(-slope)
  [kpc^-2 Msun^-1], Sigma_sub [kpc^-2] drawn per image, for m in [m_min, m_max] (M200 masses, Msun);
- area: the disk of radius ``area_radius`` x theta_E [arcsec -> kpc at z_lens] around the lens centre
  (paltas: 3 theta_E); counts Poisson with mean Sigma_sub A int (m/m_pivot)^(-slope) dm / m_pivot;
  masses by inverse CDF; positions uniform in the disk;
- profile tNFW (lenstronomy ``TNFW``, Baltz, Marshall & Oguri 2009) with the DG19 concentration-mass relation
  c = c_0 (1 + z)^zeta (nu(M, z) / nu(m_ref, 0))^(-beta) x 10^N(0, scatter) (paltas ``mass_concentration``;
  nu = delta_c / sigma(M, z) the peak height: here sigma(M, 0) is tabulated from colossus for flat LCDM with
  H0 70, Om0 0.3, Ob0 0.05, sigma8 0.81, ns 0.96, and sigma(M, z) = sigma(M, 0) D(z), D the linear growth
  factor of flat LCDM) and the DG19 truncation radius r_t = 1.4 kpc (m / 1e7)^(1/3) (r / 50 kpc)^(2/3)
  (paltas ``get_truncation_radius``), r the subhalo's 3D distance from the host centre. The line-of-sight
  coordinate z follows paltas' 3D density (``sample_cored_nfw``): a cored NFW of the host (M200
  ``subhalo_host_m200``, the mean DG19 concentration), uniform inside r200 / 2 (DG19's tidal radius), NFW
  outside, within |z| < r200 (``subhalo_depth_kpc``).

Units: angles arcsec, lengths kpc where named so, masses Msun.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from . import cosmology
from .priors import draw_in_range

_F64 = torch.float64

#: log10 sigma(M, z=0) at log10 M [Msun] = 5.0, 5.5, ..., 13.5 (colossus 1.3 ``sigma(lagrangianR(M h), 0)``,
#: flat LCDM H0 70, Om0 0.3, Ob0 0.05, sigma8 0.81, ns 0.96, Eisenstein & Hu 1998 transfer function).
_LOG10_M_TABLE = np.arange(5.0, 13.51, 0.5)
_LOG10_SIGMA_TABLE = np.array(
    [0.96063, 0.93175, 0.90133, 0.86924, 0.83531, 0.79939, 0.76129, 0.72072,
     0.67738, 0.631, 0.58126, 0.52774, 0.46993, 0.4073, 0.33931, 0.26522, 0.18407, 0.09495]
)  # fmt: skip

#: DG19 truncation: r_t = _RT_NORM_KPC (m / _RT_M_PIVOT)^(1/3) (r / _RT_R_PIVOT_KPC)^(2/3)
_RT_NORM_KPC, _RT_M_PIVOT, _RT_R_PIVOT_KPC = 1.4, 1e7, 50.0


def power_law_masses(u: Tensor, m_min: float, m_max: float, slope: float) -> Tensor:
    """Inverse CDF of dN/dm ~ m^-slope on [m_min, m_max] applied to uniforms u [Msun]."""
    if m_min == m_max:
        return torch.full_like(u, m_min)
    a = 1.0 - slope
    if abs(a) < 1e-12:
        return m_min * (m_max / m_min) ** u
    lo, hi = m_min**a, m_max**a
    return (lo + u * (hi - lo)) ** (1.0 / a)


@functools.lru_cache(maxsize=64)
def growth_factor(z: float, *, om0: float) -> float:
    """Linear growth factor D(z) / D(0) of flat LCDM (no radiation):
    D(a) ~ H(a) int_0^a da' / (a' H(a'))^3 (Heath 1977), by Gauss-Legendre quadrature."""
    if not z >= 0:
        raise ValueError(f"growth_factor needs z >= 0, got {z!r}")

    def d(a: float) -> float:
        x, w = np.polynomial.legendre.leggauss(200)
        ap = 0.5 * a * (x + 1.0)
        h = np.sqrt(om0 / ap**3 + 1.0 - om0)
        return float(math.sqrt(om0 / a**3 + 1.0 - om0) * np.sum(0.5 * a * w / (ap * h) ** 3))

    return d(1.0 / (1.0 + z)) / d(1.0)


def log10_sigma_z0(mass: Tensor) -> Tensor:
    """log10 sigma(M, z=0) [dimensionless] at masses [Msun] (linear interpolation in log-log of the table;
    valid for 1e5 <= M <= 10^13.5)."""
    lm = torch.log10(mass.clamp_min(1.0))
    ys = torch.as_tensor(_LOG10_SIGMA_TABLE, dtype=mass.dtype, device=mass.device)
    step = float(_LOG10_M_TABLE[1] - _LOG10_M_TABLE[0])  # uniform grid: the cell by arithmetic
    f = (lm - float(_LOG10_M_TABLE[0])) / step
    i = f.floor().clamp(0, ys.numel() - 2)
    t = f - i
    i = i.long()
    return ys[i] + t * (ys[i + 1] - ys[i])


def concentration_dg19(
    mass: Tensor, z: float, *, c0: float, zeta: float, beta: float, m_ref: float, om0: float
) -> Tensor:
    """Mean DG19 concentration c200 = c0 (1+z)^zeta (nu(M, z) / nu(m_ref, 0))^(-beta) of halos of M200
    ``mass`` [Msun] at redshift z, with nu = delta_c / (sigma(M, 0) D(z)) (paltas ``mass_concentration``
    without the scatter)."""
    ref = float(log10_sigma_z0(torch.tensor([m_ref], dtype=_F64, device="cpu"))[0])
    ratio = 10.0 ** (ref - log10_sigma_z0(mass))
    nu_ratio = ratio / growth_factor(z, om0=om0)
    return c0 * (1.0 + z) ** zeta * nu_ratio ** (-beta)


def truncation_radius_kpc(mass: Tensor, r3d_kpc: Tensor) -> Tensor:
    """DG19 / paltas tNFW truncation radius [kpc] of a subhalo of M200 ``mass`` [Msun] at 3D distance
    ``r3d_kpc`` [kpc] from the host centre: 1.4 (m / 1e7)^(1/3) (r / 50)^(2/3)."""
    return _RT_NORM_KPC * (mass / _RT_M_PIVOT) ** (1.0 / 3.0) * (r3d_kpc / _RT_R_PIVOT_KPC) ** (2.0 / 3.0)


def expected_count(
    sigma_sub: Tensor, area_kpc2: Tensor, *, m_min: float, m_max: float, slope: float, m_pivot: float
) -> Tensor:
    """Mean number of subhalos: Sigma_sub [kpc^-2] x area [kpc^2] x int_{m_min}^{m_max} (m/m_pivot)^(-slope)
    dm / m_pivot (the paltas ``power_law_integrate`` of the normalised mass function)."""
    a = 1.0 - slope
    lo, hi = m_min / m_pivot, m_max / m_pivot
    integral = math.log(hi / lo) if abs(a) < 1e-12 else (hi**a - lo**a) / a
    return sigma_sub * area_kpc2 * integral


def kpc_per_arcsec(z: float, *, h0: float, om0: float) -> float:
    """Proper transverse kpc per arcsec at redshift z (angular-diameter distance)."""
    return cosmology.angular_diameter_distance(z, h0=h0, om0=om0) * 1e3 * cosmology.ARCSEC


def host_r200_kpc(m200: float, z: float, *, h0: float, om0: float) -> float:
    """r200 [kpc] of a halo of M200 [Msun]: M200 = 200 rho_crit(z) 4/3 pi r200^3."""
    rho_c = cosmology.critical_density_msun_per_mpc3(z, h0=h0, om0=om0)
    return (3.0 * m200 / (4.0 * math.pi * 200.0 * rho_c)) ** (1.0 / 3.0) * 1e3


def subhalo_capacity(preset) -> int:
    """Per-image slots [n, K] of a normalised population: the mean count at the top of the Sigma_sub and
    theta_E ranges plus 8 sigma of Poisson (a draw above it raises, probability < 1e-14)."""
    kpa = kpc_per_arcsec(preset.z_lens, h0=preset.H0, om0=preset.Om0)
    r_kpc = preset.subhalo_area_radius * preset.theta_E[1] * kpa
    mu = float(
        expected_count(
            torch.tensor(preset.sigma_sub[1], dtype=_F64, device="cpu"),
            torch.tensor(math.pi * r_kpc**2, dtype=_F64, device="cpu"),
            m_min=preset.subhalo_mass[0], m_max=preset.subhalo_mass[1],
            slope=preset.subhalo_mass_slope, m_pivot=preset.subhalo_m_pivot,
        )
    )  # fmt: skip
    return int(math.ceil(mu + 8.0 * math.sqrt(mu) + 8.0))


def tnfw_mass_factor(tau: Tensor) -> Tensor:
    """Total mass of a BMO09 (n=1) truncated NFW over 4 pi rho_s Rs^3, for tau = r_t / Rs:
    tau^2 / (tau^2+1)^2 [(tau^2-1) ln tau + pi tau - (tau^2+1)]."""
    t2 = tau * tau
    return t2 / (t2 + 1.0) ** 2 * ((t2 - 1.0) * torch.log(tau) + math.pi * tau - (t2 + 1.0))


def tnfw_lens_parameters(mass: Tensor, concentration: Tensor, preset) -> tuple[Tensor, Tensor, Tensor]:
    """lenstronomy TNFW (Rs [arcsec], alpha_Rs [arcsec], total truncated-mass-to-M200 ratio) of subhalos with
    M200 ``mass`` [Msun] and c200 ``concentration``, given r_trunc through ``tnfw_mass_factor`` elsewhere.

    r200 from M200 = 200 rho_crit(z_lens) 4/3 pi r200^3; Rs = r200 / c; rho0 = M200 / (4 pi Rs^3 m(c)),
    m(c) = ln(1+c) - c/(1+c); alpha_Rs = 4 rho0 Rs^2 (1 + ln 1/2) / Sigma_crit (angular units). Zero masses
    give alpha_Rs = 0 (no deflection)."""
    zl, zs = preset.z_lens, preset.z_source
    rho_c = cosmology.critical_density_msun_per_mpc3(zl, h0=preset.H0, om0=preset.Om0)
    d_l = cosmology.angular_diameter_distance(zl, h0=preset.H0, om0=preset.Om0)
    sigma_crit = cosmology.sigma_crit_msun_per_arcsec2(zl, zs, h0=preset.H0, om0=preset.Om0)
    m_safe = mass.clamp_min(1.0)
    c = concentration.clamp_min(1e-3)
    r200_mpc = (3.0 * m_safe / (4.0 * math.pi * 200.0 * rho_c)) ** (1.0 / 3.0)
    rs = r200_mpc / c / d_l / cosmology.ARCSEC
    mc = torch.log1p(c) - c / (1.0 + c)
    rho0 = m_safe / (4.0 * math.pi * rs**3 * mc) / sigma_crit
    alpha_rs = torch.where(mass > 0, 4.0 * rho0 * rs**2 * (1.0 + math.log(0.5)), torch.zeros_like(rs))
    return rs, alpha_rs, 1.0 / mc


def host_profile_kpc(preset) -> tuple[float, float]:
    """(r200, Rs) [kpc] of the host halo: M200 ``subhalo_host_m200`` at z_lens, the mean DG19 concentration
    (paltas ``sample_cored_nfw`` uses the relation with its scatter)."""
    pre = preset
    r200 = host_r200_kpc(pre.subhalo_host_m200, pre.z_lens, h0=pre.H0, om0=pre.Om0)
    c = concentration_dg19(
        torch.tensor([pre.subhalo_host_m200], dtype=_F64, device="cpu"), pre.z_lens, c0=pre.subhalo_c0,
        zeta=pre.subhalo_conc_zeta, beta=pre.subhalo_conc_beta, m_ref=pre.subhalo_conc_m_ref, om0=pre.Om0,
    )  # fmt: skip
    return r200, r200 / float(c[0])


def cored_nfw_density(r: Tensor, r_core: float, rs: float) -> Tensor:
    """paltas' cored NFW 3D density up to a constant: 1 / (x (1+x)^2), x = max(r, r_core) / rs."""
    x = r.clamp_min(r_core) / rs
    return 1.0 / (x * (1.0 + x) ** 2)


def _depth_from_r0_profile(u: Tensor, r200: float, rs: float, *, n_table: int = 4097) -> Tensor:
    """|z| [kpc] with density cored_nfw_density(|z|) on [0, r200] (the profile along the line of sight
    through the host centre) from uniforms u: the core r < r200/2 analytically, the NFW tail by its inverse
    CDF, int dx / (x (1+x)^2) = ln(x / (1+x)) + 1 / (1+x), tabulated at ``n_table`` points and interpolated
    linearly (float64; paltas tabulates 1000)."""
    rc = 0.5 * r200
    dev = u.device
    xc, x2 = rc / rs, r200 / rs
    xs = torch.linspace(xc, x2, n_table, dtype=_F64, device=dev)
    G0 = math.log(xc / (1.0 + xc)) + 1.0 / (1.0 + xc)
    G = torch.log(xs / (1.0 + xs)) + 1.0 / (1.0 + xs) - G0
    tail_mass = math.log(x2 / (1.0 + x2)) + 1.0 / (1.0 + x2) - G0
    core = 1.0 / (1.0 + xc) ** 2  # x_c rho(x_c) in units of rs: the core's share of the CDF
    target = u.to(_F64) * (core + tail_mass)
    z = target * (rc / core)
    tail = torch.nonzero(target > core).squeeze(1)  # ~30 %: the inverse CDF only there
    want = target[tail] - core
    i = torch.searchsorted(G, want).clamp(1, n_table - 1)
    g0, g1 = G[i - 1], G[i]
    x = xs[i - 1] + (want - g0) / (g1 - g0) * (xs[i] - xs[i - 1])
    return z.index_put_((tail,), x * rs)


def subhalo_depth_kpc(
    R_kpc: Tensor, u: Tensor, generator: torch.Generator, preset, *, rounds: int = 6
) -> Tensor:
    """Line-of-sight coordinate z [kpc] (signed) of subhalos at projected radius ``R_kpc`` from the host
    centre, as paltas places them (``sample_cored_nfw``): 3D density cored_nfw_density(sqrt(R^2 + z^2))
    (host ``host_profile_kpc``, core radius r200 / 2), |z| < r200.

    ``u`` [N] (uniforms) gives each subhalo a sign and a proposal from the R = 0 profile
    (``_depth_from_r0_profile`` of |2u - 1|); a proposal with R^2 + z^2 beyond the core is accepted with
    probability density(sqrt(R^2 + z^2)) / density(|z|) <= 1 (exact rejection sampling; ~99.9 % accepted at
    R <= 3 theta_E). Rejected ones draw a new proposal and acceptance uniform from ``generator`` (at most
    ``rounds`` rounds; the rare last rejects keep their proposal)."""
    r200, rs = host_profile_kpc(preset)
    rc = 0.5 * r200
    R2 = R_kpc.to(_F64) ** 2
    dev = R2.device
    v = 2.0 * u.to(_F64) - 1.0
    z = _depth_from_r0_profile(v.abs(), r200, rs)
    todo = torch.nonzero(R2 + z * z > rc * rc).squeeze(1)  # inside the core the ratio is 1
    for k in range(rounds):
        if todo.numel() == 0:
            break
        acc_u = torch.rand(todo.numel(), generator=generator, dtype=_F64, device=dev)
        zt = z[todo]
        ratio = cored_nfw_density(torch.sqrt(R2[todo] + zt * zt), rc, rs) / cored_nfw_density(zt, rc, rs)
        todo = todo[acc_u > ratio]
        if k < rounds - 1 and todo.numel():
            z[todo] = _depth_from_r0_profile(
                torch.rand(todo.numel(), generator=generator, dtype=_F64, device=dev), r200, rs
            )
            todo = todo[R2[todo] + z[todo] ** 2 > rc * rc]
    return torch.where(v < 0, -z, z)


def draw_subhalos(
    preset,
    theta_E: Tensor,
    center_x: Tensor,
    center_y: Tensor,
    is_cdm: Tensor,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """The normalised population of every cdm image (others get none). Returns float32 [n, K] fields
    (K = ``subhalo_capacity``, zero padded after each image's ``subhalo_count``) and per-image diagnostics.

    Fields: subhalo_sigma_sub [n] (kpc^-2), subhalo_count [n], subhalo_mass [n, K] (M200, Msun),
    subhalo_x, subhalo_y [n, K] (arcsec), for point masses subhalo_theta_E [n, K] (Einstein radius of
    M200), for tNFW subhalo_concentration, subhalo_Rs, subhalo_alpha_Rs,
    subhalo_r_trunc [n, K] (arcsec); diagnostics subhalo_mass_fraction_arc (projected subhalo mass in the
    annulus 0.5-1.5 theta_E around the lens centre over the macro lens's mass there, pi Sigma_crit theta_E
    x theta_E for an isothermal lens; tNFW count their truncated total mass), subhalo_max_mass [n] and
    subhalo_max_ring_distance [n] (| |position - centre| - theta_E | of the heaviest, arcsec; 0 without
    subhalos). Draw order (``generator``, cdm images only, in image order): Sigma_sub, counts; then per
    subhalo: mass, radius, angle, line-of-sight depth, concentration scatter. Everything is drawn and
    computed on the generator's device (the inputs are moved there).
    """
    pre = preset
    n = int(theta_E.shape[0])
    K = subhalo_capacity(pre)
    g = generator
    dev = g.device
    theta_E, center_x, center_y = theta_E.to(dev), center_x.to(dev), center_y.to(dev)
    idx = torch.nonzero(is_cdm.to(dev)).squeeze(1)
    m = int(idx.numel())
    kpa = kpc_per_arcsec(pre.z_lens, h0=pre.H0, om0=pre.Om0)
    u_sig = torch.rand(m, generator=g, dtype=_F64, device=dev)
    sig = draw_in_range(u_sig, pre.sigma_sub, pre.sigma_sub_normal)  # uniform, or the truncated normal
    r_max = pre.subhalo_area_radius * theta_E[idx]  # arcsec
    mu = expected_count(
        sig, math.pi * (r_max * kpa) ** 2, m_min=pre.subhalo_mass[0], m_max=pre.subhalo_mass[1],
        slope=pre.subhalo_mass_slope, m_pivot=pre.subhalo_m_pivot,
    )  # fmt: skip
    count = torch.poisson(mu, generator=g).to(torch.int64)
    largest, total = torch.stack([count.max(), count.sum()]).tolist() if m else (0, 0)  # one host sync
    if largest > K:
        raise RuntimeError(f"a subhalo count {largest} exceeds the capacity {K} of preset {pre.name!r}")
    # flat per-subhalo draws, then scattered into [n, K]
    owner = torch.repeat_interleave(torch.arange(m, device=dev), count, output_size=total)
    slot = torch.arange(total, device=dev) - torch.repeat_interleave(
        torch.cumsum(count, 0) - count, count, output_size=total
    )
    # per-subhalo draws and arithmetic in float32 (what is stored; twice the CPU speed of float64)
    u = torch.rand((4, total), generator=g, dtype=torch.float32, device=dev)
    z_scatter = torch.randn(total, generator=g, dtype=torch.float32, device=dev)
    mass = power_law_masses(u[0], *pre.subhalo_mass, pre.subhalo_mass_slope)
    f32 = torch.float32
    rad = r_max.to(f32)[owner] * torch.sqrt(u[1])
    ang = 2.0 * math.pi * u[2]
    xs = center_x[idx].to(f32)[owner] + rad * torch.cos(ang)
    ys = center_y[idx].to(f32)[owner] + rad * torch.sin(ang)
    coef = cosmology.point_mass_theta_e_coefficient(pre.z_lens, pre.z_source, h0=pre.H0, om0=pre.Om0)
    fields = {"subhalo_mass": mass, "subhalo_x": xs, "subhalo_y": ys}
    if pre.subhalo_profile == "point_mass":
        fields["subhalo_theta_E"] = coef * torch.sqrt(mass)
    mass_eff = mass
    if pre.subhalo_profile == "tnfw":
        if pre.subhalo_concentration_model == "dg19":
            c = concentration_dg19(
                mass, pre.z_lens, c0=pre.subhalo_c0, zeta=pre.subhalo_conc_zeta, beta=pre.subhalo_conc_beta,
                m_ref=pre.subhalo_conc_m_ref, om0=pre.Om0,
            ) * 10.0 ** (pre.subhalo_conc_scatter * z_scatter)  # fmt: skip
        else:
            c = torch.full_like(mass, pre.subhalo_concentration)
        rs, alpha_rs, inv_mc = tnfw_lens_parameters(mass, c, pre)
        if pre.subhalo_concentration_model == "dg19":
            los = subhalo_depth_kpc(rad.to(_F64) * kpa, u[3], g, pre)
            r3d = torch.sqrt((rad * kpa) ** 2 + los.to(torch.float32) ** 2)
            r_trunc = truncation_radius_kpc(mass, r3d) / kpa
        else:
            r_trunc = pre.subhalo_truncation * rs
        fields.update(
            subhalo_concentration=c, subhalo_Rs=rs, subhalo_alpha_Rs=alpha_rs, subhalo_r_trunc=r_trunc
        )
        # total truncated mass = M200 tnfw_mass_factor(tau) / m(c)
        mass_eff = mass * tnfw_mass_factor(r_trunc / rs) * inv_mc
    out: dict[str, Tensor] = {}
    flat = idx[owner] * K + slot  # position of each subhalo in the [n, K] tables
    for k, v in fields.items():
        full = torch.zeros(n * K, dtype=torch.float32, device=dev)
        full[flat] = v.to(torch.float32)
        out[k] = full.view(n, K)
    out["subhalo_count"] = torch.zeros(n, dtype=torch.int64, device=dev).index_put_((idx,), count)
    out["subhalo_sigma_sub"] = torch.zeros(n, dtype=_F64, device=dev).index_put_((idx,), sig)
    out.update(_diagnostics(n, idx, owner, mass, mass_eff, rad, theta_E, pre))
    return out


def _diagnostics(n, idx, owner, mass, mass_eff, rad, theta_E, pre) -> dict[str, Tensor]:
    """Per-image f_sub in the arc annulus, heaviest mass and its distance to the Einstein ring (see above)."""
    mass, mass_eff, rad = mass.to(_F64), mass_eff.to(_F64), rad.to(_F64)
    m = int(idx.numel())
    te = theta_E[idx]
    in_ann = (rad > 0.5 * te[owner]) & (rad < 1.5 * te[owner])
    dev = mass.device
    sub_mass = torch.zeros(m, dtype=_F64, device=dev).index_add_(0, owner, torch.where(in_ann, mass_eff, 0.0))
    sigma_crit = cosmology.sigma_crit_msun_per_arcsec2(pre.z_lens, pre.z_source, h0=pre.H0, om0=pre.Om0)
    macro = math.pi * sigma_crit * te * te  # isothermal: M(<R) = pi Sigma_crit theta_E R
    heaviest = torch.zeros(m, dtype=_F64, device=dev).scatter_reduce_(0, owner, mass, reduce="amax")
    is_max = mass == heaviest[owner]
    ring = torch.zeros(m, dtype=_F64, device=dev).index_put_(
        (owner[is_max],), (rad[is_max] - te[owner[is_max]]).abs()
    )
    put = lambda v: torch.zeros(n, dtype=_F64, device=dev).index_put_((idx,), v)  # noqa: E731
    return {
        "subhalo_mass_fraction_arc": put(sub_mass / macro),
        "subhalo_max_mass": put(heaviest),
        "subhalo_max_ring_distance": put(ring),
    }
