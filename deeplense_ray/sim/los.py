"""Line-of-sight (LOS) halos between observer and source (paltas ``LOSDG19``, Gilman et al. 2020), rendered by
exact multi-plane ray tracing.

Population (DG19: Gilman et al. 2020, arXiv:1909.02573, as paltas draws it,
``paltas/Substructure/los_dg19.py``; prior of Wagner-Carena et al. 2022, arXiv:2203.00690):

- redshift slices [z, z + dz) for z = z_min, z_min + dz, ... < z_source - dz (paltas ``np.arange(z_min,
  z_source - dz, dz)``), each slice's halos at its midpoint z + dz/2 (paltas puts them there too);
- per slice the Sheth & Tormen (2001) mass function dn/dm = -(1/3) nu f(nu) rho_m(z) / m^2 d ln sigma / d ln R
  [physical kpc^-3 Msun^-1], nu f(nu) = 2 A (1 + (a nu^2)^-q) sqrt(a nu^2 / (2 pi)) exp(-a nu^2 / 2), A =
  0.32218, q = 0.3, a = 0.707 (paltas ``nu_f_nu``), nu = delta_c(z) / sigma(M, z), delta_c = 1.68647
  Omega_m(z)^0.0055 (colossus ``collapseOverdensity(corrections=True)``), sigma(M, z) = sigma(M, 0) D(z) with
  sigma(M, 0) and d ln sigma / d ln R tabulated below from colossus; fitted per slice by a power law on
  [m_min, m_max] (paltas ``power_law_dn_dm``: least squares in log-log on 100 log-spaced masses), scaled by
  ``delta_los`` (drawn per image) and by the slice's physical volume: thickness (comoving distance across
  the slice) / (1 + z), times pi r_los^2, r_los = (cone_angle / 2) x kpc per arcsec at the midpoint, shrunk
  behind the lens by 1 - 0.8 chi_s chi(z_l, z) / (chi(z_l, z_s) chi(z)) (paltas ``cone_angle_to_radius``, the
  DG19 double cone); Poisson counts; positions uniform in that disk (angles about the optical axis, as
  seen from the observer); masses by the power law's inverse CDF;
- profiles: NFW with the DG19 concentration c = c0 (1+z)^zeta (nu(M, z) / nu(m_ref, 0))^-beta 10^N(0,
  scatter) (the subhalos' relation and parameters, as paltas shares them between subhalos and LOS), r200
  from rho_crit(z), truncated (lenstronomy ``TNFW``, BMO09) at r_t = r200 (paltas renders untruncated NFW,
  whose mass diverges logarithmically; with r_t = r200 the total mass is ~1.1 M200 for c ~ 10);
  lenstronomy kwargs (Rs, alpha_Rs, r_trunc) in the z_source convention (alpha_Rs reduced for a source at
  z_source, Sigma_crit(z, z_source)).

Left out (documented in docs/simulator.md): the two-halo term of the host (paltas ``two_halo_boost``: a boost
of the slices within 10 Mpc of the lens) and paltas' subtraction of the mean LOS deflection per slice (a
negative convergence sheet, ``calculate_average_alpha``); both are class independent.

Rendering: exact multi-plane ray tracing (Blandford & Narayan 1986; lenstronomy ``MultiPlane``), each halo
on its own plane, the main lens (with its subhalos, vortex, compensation table and shear) on the plane of
z_lens. With w_i = chi(z_i) / chi(z_s) (comoving distances, flat universe) and X the transverse comoving
position over chi(z_s) [arcsec]: X = 0, A = theta; for each plane in redshift order X += A (w_i - w_prev),
A -= alpha_i(X / w_i) / (1 - w_i) (alpha_i the reduced deflection, z_source convention: D_s / D_is =
1 / (1 - w_i)); the source-plane position is beta = X + A (1 - w_last). Without LOS halos this is beta =
theta - alpha(theta).

Units: angles arcsec, masses Msun, lengths kpc where named so.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from . import cosmology
from .substructure import log10_sigma_z0

_F64 = torch.float64

#: log10 M [Msun] of the tables below: 5.0, 5.25, ..., 13.5
_LOG10_M = np.arange(5.0, 13.51, 0.25)
#: d ln sigma / d ln R at z = 0 (colossus 1.3 ``sigma(lagrangianR(M h), 0, derivative=True)``, flat LCDM
#: H0 70, Om0 0.3, Ob0 0.05, sigma8 0.81, ns 0.96, no relativistic species, Eisenstein & Hu 1998 transfer
#: function: the cosmology of ``substructure._LOG10_SIGMA_TABLE``, whose values at 0.5 dex these tables share)
_DLNSIGMA_DLNR = np.array(
    [-0.169027, -0.173268, -0.177738, -0.182439, -0.187368, -0.192528, -0.197916, -0.203535, -0.209382,
     -0.21546, -0.221796, -0.228546, -0.235734, -0.243361, -0.251425, -0.259927, -0.268866, -0.278244,
     -0.28806, -0.29832, -0.309253, -0.320969, -0.333467, -0.346746, -0.360808, -0.375652, -0.391278,
     -0.407699, -0.425329, -0.444362, -0.464796, -0.486632, -0.509871, -0.534511, -0.560646]
)  # fmt: skip
#: log10 sigma(M, z = 0) on the same grid (same source)
_LOG10_SIGMA = np.array(
    [0.96063, 0.94637, 0.931746, 0.91674, 0.901333, 0.885506, 0.869239, 0.852513, 0.83531, 0.81761,
     0.799393, 0.780632, 0.76129, 0.741331, 0.720718, 0.699415, 0.677385, 0.654591, 0.630998, 0.606569,
     0.581259, 0.555005, 0.527742, 0.499406, 0.46993, 0.439249, 0.407299, 0.374015, 0.339315, 0.303087,
     0.265216, 0.225582, 0.184071, 0.140565, 0.094946]
)  # fmt: skip
#: colossus' constants.DELTA_COLLAPSE (spherical collapse, EdS)
DELTA_COLLAPSE = 1.68647
#: Sheth & Tormen (2001) as paltas: A, q, a
_ST_A, _ST_Q, _ST_a = 0.32218, 0.3, 0.707
#: DG19 double cone: how far the cone closes towards the source (paltas ``angle_buffer``)
_ANGLE_BUFFER = 0.8
#: tNFW truncation of LOS halos: r_t = this x r200
LOS_TRUNCATION_R200 = 1.0


@functools.lru_cache(maxsize=1)
def _leggauss200() -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(200)


def growth(z, *, om0: float) -> np.ndarray:
    """Linear growth factor D(z) / D(0) of flat LCDM, vectorised over z (``substructure.growth_factor``'s
    formula and quadrature: D(a) ~ H(a) int_0^a da' / (a' H(a'))^3)."""
    x, w = _leggauss200()
    a = np.atleast_1d(1.0 / (1.0 + np.asarray(z, dtype=np.float64)))[:, None]
    ap = np.concatenate([a, np.ones_like(a)], 1)[..., None] * 0.5 * (x + 1.0)  # [Z, 2, 200]
    h = np.sqrt(om0 / ap**3 + 1.0 - om0)
    end = np.concatenate([a, np.ones_like(a)], 1)
    d = np.sqrt(om0 / end**3 + 1.0 - om0) * np.sum(0.5 * end[..., None] * w / (ap * h) ** 3, -1)
    return d[:, 0] / d[:, 1]


def los_enabled(preset) -> bool:
    """Whether the preset draws LOS halos (``delta_los`` set with an upper end > 0)."""
    return preset.delta_los is not None and preset.delta_los[1] > 0


def sheth_tormen_dn_dm(mass, z: float, *, h0: float = 70.0, om0: float = 0.3) -> np.ndarray:
    """Sheth-Tormen halo mass function dn/dm [physical kpc^-3 Msun^-1] at masses [Msun] and redshift z (the
    formula of paltas ``LOSDG19.dn_dm``; sigma from the colossus tables above, linear in log10 M)."""
    lm = np.log10(np.asarray(mass, dtype=np.float64))
    if np.any(lm < _LOG10_M[0]) or np.any(lm > _LOG10_M[-1]):
        raise ValueError(f"masses must lie in [1e5, 10^13.5] Msun, got {mass!r}")
    sigma = 10.0 ** np.interp(lm, _LOG10_M, _LOG10_SIGMA) * float(growth(z, om0=om0)[0])
    dlns = np.interp(lm, _LOG10_M, _DLNSIGMA_DLNR)
    om_z = om0 * (1 + z) ** 3 / (om0 * (1 + z) ** 3 + 1 - om0)
    nu = DELTA_COLLAPSE * om_z**0.0055 / sigma
    n2 = _ST_a * nu * nu
    nfn = 2 * _ST_A * (1 + n2 ** (-_ST_Q)) * np.sqrt(n2 / (2 * np.pi)) * np.exp(-n2 / 2)
    rho_m = om0 * cosmology.critical_density_msun_per_mpc3(0.0, h0=h0, om0=om0) * 1e-9 * (1 + z) ** 3
    return -1.0 / 3.0 * nfn * rho_m / (np.asarray(mass, dtype=np.float64) ** 2) * dlns


def power_law_fit(z: float, m_min: float, m_max: float, *, h0: float, om0: float, n_dm: int = 100):
    """(slope, norm) of dn/dm ~ norm m^slope fitted on [m_min, m_max] (paltas ``power_law_dn_dm``)."""
    m = np.logspace(np.log10(m_min), np.log10(m_max), n_dm)
    lm, ly = np.log(m), np.log(sheth_tormen_dn_dm(m, z, h0=h0, om0=om0))
    slope, icpt = np.polyfit(lm, ly, 1)
    return float(slope), float(np.exp(icpt))


def _power_law_integral(m_min: float, m_max: float, slope: float) -> float:
    a = slope + 1.0
    return math.log(m_max / m_min) if abs(a) < 1e-12 else (m_max**a - m_min**a) / a


@functools.lru_cache(maxsize=32)
def _slices(z_lens, z_source, h0, om0, z_min, dz, cone_angle, m_min, m_max) -> dict[str, np.ndarray]:
    chi = lambda z, z0=0.0: cosmology.comoving_distance(z, h0=h0, om0=om0, z0=z0)  # noqa: E731
    chi_s, chi_l = chi(z_source), chi(z_lens)
    starts = np.round(np.arange(z_min, z_source - dz, dz), 6)
    rows = []
    for z0 in starts:
        zh = float(z0 + dz / 2)
        kpa = cosmology.angular_diameter_distance(zh, h0=h0, om0=om0) * 1e3 * cosmology.ARCSEC
        r_ang = 0.5 * cone_angle
        if zh > z_lens:
            r_ang *= 1.0 - _ANGLE_BUFFER * chi_s * chi(zh, z_lens) / (chi(z_source, z_lens) * chi(zh))
        thick_kpc = chi(float(z0 + dz), float(z0)) / (1.0 + z0) * 1e3
        vol = thick_kpc * math.pi * (r_ang * kpa) ** 2
        slope, norm = power_law_fit(zh, m_min, m_max, h0=h0, om0=om0)
        mu = norm * vol * _power_law_integral(m_min, m_max, slope)
        mass_mean = _power_law_integral(m_min, m_max, slope + 1.0) / _power_law_integral(m_min, m_max, slope)
        d_a = cosmology.angular_diameter_distance(zh, h0=h0, om0=om0)
        rows.append(
            dict(
                z=zh, mu=mu, slope=slope, r_ang=r_ang, kpa=kpa, w=chi(zh) / chi_s, mass_mean=mass_mean,
                sigma_crit=cosmology.sigma_crit_msun_per_arcsec2(zh, z_source, h0=h0, om0=om0),
                rho_c=cosmology.critical_density_msun_per_mpc3(zh, h0=h0, om0=om0), d_a=d_a,
                growth=float(growth(zh, om0=om0)[0]),
            )
        )  # fmt: skip
    out = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in (rows[0] if rows else ())}
    out["w_lens"] = np.float64(chi_l / chi_s)
    return out


def los_slices(preset) -> dict[str, np.ndarray]:
    """Per-slice constants [S] (numpy float64): halo redshift ``z``, expected count per unit delta_los ``mu``,
    power-law ``slope``, cone radius ``r_ang`` [arcsec], ``kpa`` [kpc/arcsec], ``w`` = chi(z)/chi(z_s),
    ``sigma_crit`` [Msun/arcsec^2 at z, source z_source], ``rho_c`` [Msun/Mpc^3], ``d_a`` [Mpc], ``growth``;
    and ``w_lens`` = chi(z_lens)/chi(z_source)."""
    p = preset
    return _slices(
        float(p.z_lens), float(p.z_source), float(p.H0), float(p.Om0), float(p.los_z_min), float(p.los_dz),
        float(p.los_cone_angle), float(p.los_mass[0]), float(p.los_mass[1]),
    )  # fmt: skip


def expected_los_count(preset, delta_los: float = 1.0) -> float:
    """Mean number of rendered LOS halos per image at ``delta_los``."""
    return float(delta_los * los_slices(preset)["mu"].sum())


def los_capacity(preset) -> int:
    """Per-image LOS slots: the mean count at the top of the delta_los range plus 8 sigma of Poisson."""
    if not los_enabled(preset):
        return 0
    mu = expected_los_count(preset, preset.delta_los[1])
    return int(math.ceil(mu + 8.0 * math.sqrt(mu) + 8.0))


def lens_plane_w(preset) -> float:
    """chi(z_lens) / chi(z_source) (flat universe)."""
    return float(los_slices(preset)["w_lens"])


def draw_los(preset, generator: torch.Generator, m: int, n: int, group: int | None) -> dict[str, Tensor]:
    """LOS halos of ``m`` independent environments (one per image, or per paired group of ``group`` images,
    expanded to ``n`` images: every class of a group gets the same halos). One draw of ``generator`` seeds
    the LOS generator (on its device); draw order there: delta_los [m], counts [m, S], then per halo mass,
    radius, angle, concentration scatter.

    Returns per image ``delta_los``, ``los_count``, ``los_count_fore`` (halos in front of the lens: the
    first ones, halos sorted by redshift), ``los_mass_total`` (sum of M200 [Msun]) and [n, K] zero-padded
    (K = ``los_capacity``) float32 ``los_mass`` (M200), ``los_z``, ``los_w`` (chi(z)/chi(z_s)), ``los_x``,
    ``los_y`` [arcsec, unlensed angles], ``los_concentration``, ``los_Rs``, ``los_alpha_Rs``,
    ``los_r_trunc`` (lenstronomy TNFW kwargs, z_source convention)."""
    pre = preset
    dev = generator.device
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=dev))
    g = torch.Generator(device=dev).manual_seed(seed)
    sl = los_slices(pre)
    K = los_capacity(pre)
    S = int(sl["z"].shape[0])
    t = lambda k: torch.as_tensor(sl[k], dtype=_F64, device=dev)  # noqa: E731
    lo, hi = pre.delta_los
    delta = lo + (hi - lo) * torch.rand(m, generator=g, dtype=_F64, device=dev)
    mu = delta[:, None] * t("mu")[None, :]
    counts = torch.poisson(mu, generator=g).to(torch.int64)  # [m, S]
    count = counts.sum(1)
    largest, total = torch.stack([count.max(), count.sum()]).tolist() if m and S else (0, 0)
    if largest > K:
        raise RuntimeError(f"a LOS halo count {largest} exceeds the capacity {K} of preset {pre.name!r}")
    flat_counts = counts.reshape(-1)
    cell = torch.repeat_interleave(torch.arange(m * S, device=dev), flat_counts, output_size=total)
    owner, sidx = cell // S, cell % S  # image-major, then slice: sorted by redshift within each image
    slot = torch.arange(total, device=dev) - torch.repeat_interleave(
        torch.cumsum(count, 0) - count, count, output_size=total
    )
    u = torch.rand((3, total), generator=g, dtype=_F64, device=dev)
    z_scatter = torch.randn(total, generator=g, dtype=_F64, device=dev)
    # masses: inverse CDF of m^slope on [m_min, m_max], slope per slice
    m_lo, m_hi = pre.los_mass
    a = t("slope")[sidx] + 1.0
    mass = (m_lo**a + u[0] * (m_hi**a - m_lo**a)) ** (1.0 / a)
    rad = t("r_ang")[sidx] * torch.sqrt(u[1])
    ang = 2.0 * math.pi * u[2]
    zh = t("z")[sidx]
    # DG19 concentration at the halo's redshift (substructure.concentration_dg19 with z per halo)
    ref = float(log10_sigma_z0(torch.tensor([pre.subhalo_conc_m_ref], dtype=_F64))[0])
    nu_ratio = 10.0 ** (ref - log10_sigma_z0(mass)) / t("growth")[sidx]
    conc = pre.subhalo_c0 * (1.0 + zh) ** pre.subhalo_conc_zeta * nu_ratio ** (-pre.subhalo_conc_beta)
    conc = conc * 10.0 ** (pre.subhalo_conc_scatter * z_scatter)
    # NFW: r200 from rho_crit(z); lenstronomy (Rs, alpha_Rs) as substructure.tnfw_lens_parameters at z
    r200_mpc = (3.0 * mass / (4.0 * math.pi * 200.0 * t("rho_c")[sidx])) ** (1.0 / 3.0)
    r200 = r200_mpc / t("d_a")[sidx] / cosmology.ARCSEC  # arcsec
    rs = r200 / conc
    mc = torch.log1p(conc) - conc / (1.0 + conc)
    rho0 = mass / (4.0 * math.pi * rs**3 * mc) / t("sigma_crit")[sidx]
    alpha_rs = 4.0 * rho0 * rs**2 * (1.0 + math.log(0.5))
    fields = {
        "los_mass": mass, "los_z": zh, "los_w": t("w")[sidx], "los_x": rad * torch.cos(ang),
        "los_y": rad * torch.sin(ang), "los_concentration": conc, "los_Rs": rs, "los_alpha_Rs": alpha_rs,
        "los_r_trunc": LOS_TRUNCATION_R200 * r200,
    }  # fmt: skip
    flat = owner * K + slot
    out: dict[str, Tensor] = {}
    for k, v in fields.items():
        full = torch.zeros(m * K, dtype=torch.float32, device=dev)
        full[flat] = v.to(torch.float32)
        out[k] = full.view(m, K)
    fore = torch.zeros(m, dtype=torch.int64, device=dev).index_add_(
        0, owner, (zh < pre.z_lens).to(torch.int64)
    )
    out["los_count"] = count
    out["los_count_fore"] = fore
    out["delta_los"] = delta
    out["los_mass_total"] = torch.zeros(m, dtype=_F64, device=dev).index_add_(0, owner, mass)
    if group is not None:
        idx = torch.arange(n, device=dev) // group
        out = {k: v[idx] for k, v in out.items()}
    return out


# ---------------------------------------------------------------------------------------------- rendering

#: per-halo fields the renderer reads
LOS_KEYS = ("los_x", "los_y", "los_w", "los_Rs", "los_alpha_Rs", "los_r_trunc")


def ray_shoot(x: Tensor, y: Tensor, p, w_lens: float, main_alpha) -> tuple[Tensor, Tensor]:
    """Source-plane positions [B, P] of image-plane positions ``x``, ``y`` ([P] or [B, P]) through each
    image's LOS halos and its main lens plane (module docstring). ``p``: batch parameters with ``los_count``,
    ``los_count_fore`` [B] and ``LOS_KEYS`` [B, K] (halos sorted by redshift); ``main_alpha(xl, yl)``: the
    reduced deflection [B, P] of everything on the lens plane at positions xl, yl [B, P]."""
    from .lens import alpha_tnfw

    count, fore = p["los_count"], p["los_count_fore"]
    B = count.shape[0]
    P = x.shape[-1]
    Ax = x.expand(B, P).clone()
    Ay = y.expand(B, P).clone()
    Xx = torch.zeros_like(Ax)
    Xy = torch.zeros_like(Ay)
    w_prev = torch.zeros(B, dtype=Ax.dtype, device=Ax.device)
    cnt = count.tolist()
    nf = fore.tolist()

    def halo(k: int, ii: list[int]) -> None:
        # every image of the batch (no gathers), or the subset ii
        sel = slice(None) if len(ii) == B else torch.tensor(ii, dtype=torch.int64, device=Ax.device)
        wk = p["los_w"][sel, k].to(Ax.dtype)
        dw = (wk - w_prev[sel])[:, None]
        ax_, ay_ = Ax[sel], Ay[sel]
        xx, xy = Xx[sel] + ax_ * dw, Xy[sel] + ay_ * dw
        w_prev[sel] = wk
        inv_w = (1.0 / wk)[:, None]
        c = lambda name: p[name][sel, k : k + 1].to(Ax.dtype)  # noqa: E731
        dx, dy = alpha_tnfw(
            xx * inv_w, xy * inv_w, c("los_Rs").clamp_min(1e-6), c("los_alpha_Rs"),
            c("los_r_trunc").clamp_min(1e-6), c("los_x"), c("los_y"),
        )  # fmt: skip
        scale = (1.0 / (1.0 - wk))[:, None]
        Xx[sel], Xy[sel] = xx, xy
        Ax[sel], Ay[sel] = ax_ - dx * scale, ay_ - dy * scale

    for k in range(max(nf, default=0)):
        halo(k, [i for i in range(B) if k < nf[i]])
    dw = (w_lens - w_prev)[:, None]
    Xx, Xy = Xx + Ax * dw, Xy + Ay * dw
    ax, ay = main_alpha(Xx / w_lens, Xy / w_lens)
    s = 1.0 / (1.0 - w_lens)
    Ax, Ay = Ax - ax * s, Ay - ay * s
    w_prev = torch.full_like(w_prev, w_lens)
    for k in range(min(nf, default=0), max(cnt, default=0)):
        ii = [i for i in range(B) if nf[i] <= k < cnt[i]]
        if ii:
            halo(k, ii)
    last = (1.0 - w_prev)[:, None]
    return Xx + Ax * last, Xy + Ay * last


# --------------------------------------------------------------------------------------------- validation


def validate_los(p, fail) -> None:
    """Fields of the LOS population (checked whatever delta_los is: overrides fail early); ``fail(name,
    value, allowed)`` raises the preset's ValueError."""
    if p.delta_los is not None:
        lo, hi = p.delta_los
        if not (0.0 <= lo <= hi <= 100.0):
            fail("delta_los", list(p.delta_los), "null (no LOS halos) or a [low, high] range in [0, 100]")
    lo, hi = p.los_mass
    if not (1e5 <= lo < hi <= 10**13.5):
        fail("los_mass", list(p.los_mass), "m_min < m_max in [1e5, 10^13.5] Msun")
    ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not ok(p.los_cone_angle) or not 0 < p.los_cone_angle <= 100:
        fail("los_cone_angle", p.los_cone_angle, "a number in (0, 100] [arcsec, full opening angle]")
    if not ok(p.los_dz) or not 0 < p.los_dz <= 0.5:
        fail("los_dz", p.los_dz, "a redshift step in (0, 0.5]")
    if not ok(p.los_z_min) or not 0 < p.los_z_min:
        fail("los_z_min", p.los_z_min, "a redshift > 0")
    if los_enabled(p):
        if p.los_z_min >= p.z_source - p.los_dz:
            fail("los_z_min", p.los_z_min, f"< z_source - los_dz = {p.z_source - p.los_dz} (no slice)")
        if los_capacity(p) > 100_000:
            fail("delta_los", list(p.delta_los), f"<= 100000 LOS halos per image (got {los_capacity(p)})")


def triton_los_table(p, start: int, stop: int, kl: int, device) -> tuple[Tensor, Tensor]:
    """The Triton kernel's LOS inputs for images [start, stop): [B, kl, 9] float32 rows (the 8 columns of
    ``_triton.tnfw_table`` with the amplitude divided by 1 - w, then w) and [B, 2] int32 (halos in front of
    the lens, all halos)."""
    from ._triton import tnfw_table

    f = {k: p[k][start:stop, :kl].to(device=device, dtype=_F64) for k in LOS_KEYS}
    w = f["los_w"]
    tab = tnfw_table(f["los_x"], f["los_y"], f["los_Rs"], f["los_alpha_Rs"] / (1.0 - w), f["los_r_trunc"])
    tab = torch.cat([tab, w.to(torch.float32)[..., None]], -1).contiguous()
    cnt = torch.stack([p["los_count_fore"][start:stop], p["los_count"][start:stop]], 1)
    return tab, cnt.to(device=device, dtype=torch.int32).contiguous()
