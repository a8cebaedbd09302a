"""Class-independent lens mass (ring compensation), the effective Einstein radius and the smooth-substructure
control ``cdm_smooth``: all from Gauss's theorem in the lens plane.

For any projected mass distribution the deflection obeys div alpha = 2 kappa, so the azimuthal mean of the
radial deflection on a circle of radius r about a point c is

    <alpha_r>(r) = M(<r) / (pi Sigma_crit r)        [arcsec; M / Sigma_crit in arcsec^2],

M(<r) the projected mass inside the circle, whatever the distribution looks like (clumps, segments, an
ellipsoid). Its uses:

- **ring compensation** (``Preset.mass_compensation = "ring"``): per image, a_sub = <alpha_r> of the
  substructure (subhalos, vortex) on the circle r = theta_E about the lens centre, and the main deflector
  gives that mass up: its own mean is theta_E^(gamma-1) r^(2-gamma) h(q, gamma) (``macro_mean_factor``), so
  theta_E' = theta_E (1 - a_sub / (theta_E h))^(1 / (gamma - 1)) keeps M(<theta_E) of the whole lens equal
  to the substructure-free lens's (SIE: theta_E' = theta_E - a_sub / h). External shear and multipoles
  (m >= 1) carry no monopole: their mean radial deflection on any circle about the centre is 0.
- **ring and slope compensation** (``"ring_slope"``, the default): strong lensing measures the mass inside the
  Einstein ring and the local radial slope of the mass there (the convergence at the ring; Sonnenfeld 2018,
  "On the choice of lens density profile in time delay cosmography"; Kochanek 2020, "Overconstrained
  gravitational lens models and the Hubble constant"; Kochanek 2021, "What do gravitational lens time delays
  measure?"), so a smooth macro model absorbs the smooth part of the substructure into its theta_E and gamma.
  Per image the EPL's (theta_E, gamma) are set so that the whole lens keeps both the ring mass and the mean
  convergence of the annulus (1 -+ ``SLOPE_HALF_WIDTH``) theta_E (from the mean deflections at its edges,
  EFF_NODES: no extra integral; ``annulus_convergence``, ``compensated_theta_E_gamma``). gamma' is clipped to
  the preset's ``lens_gamma`` range (``gamma_clipped``). An SIE (gamma fixed at 2) has no slope to move:
  theta_E alone, as "ring". Without it, substructure spread over ~3 theta_E acts on the ring like a mass
  sheet: the same ring, radially stretched arcs (a mass-sheet-like transform).
- **monopole compensation** (``"monopole"``, the default of the physical presets): the substructure's
  monopole about the lens centre is subtracted at every radius, so cdm = macro + (subhalos - their azimuthal
  average) and the whole lens's enclosed mass M(<r) equals the substructure-free lens's at every r, not only
  at the ring. Subhalos are part of the host halo's mass, not mass on top of it: the host's smooth profile
  is what a lens model fits, and it absorbs every circularly symmetric part of the substructure (a free
  radial profile absorbs more than the two numbers of "ring_slope"). What stays is the clumps: the m >= 1
  angular structure of the population about the centre. Each image's own monopole is subtracted, not the
  population's expected profile (the negative convergence sheet of pyHalo, Gilman et al. 2020), so no image
  keeps a Poisson fluctuation of its enclosed mass that scales with Sigma_sub; the macro lens keeps its drawn
  theta_E and gamma. The subtracted deflection is the cdm_smooth table below with the opposite sign (a
  cdm_smooth image is then identical to its no_sub partner: smoothed substructure carries no signal by
  construction, and cdm vs no_sub measures clumps alone); the vortex's monopole likewise (exact, Gauss).
- **effective Einstein radius** ``theta_E_eff``: the radius where the mean convergence inside the circle is
  1, i.e. <alpha_r>(r) = r for macro + substructure (tabulated at ``EFF_NODES`` x theta_E, linear
  interpolation; outside that range the end segment is extrapolated).
- **cdm_smooth** (and the "monopole" table): the azimuthal average of a subhalo population about the lens
  centre is a circularly symmetric mass whose deflection is radial with magnitude <alpha_r>(r) of the
  population: tabulated per image at r_j = j theta_E / ``SMOOTH_NODES_PER_THETA_E`` (j = 0..R-1, the last
  node beyond every pixel) and interpolated linearly at each pixel's radius; beyond the last node the
  enclosed mass is held (1/r).

The vortex and cdm_smooth images take the same step (cdm_smooth in paired mode: its cdm partner's means, so
the same theta_E' and gamma'). Subhalo means integrate the subhalo deflection the renderer uses
(``alpha_tnfw`` with its floors) over each circle: per subhalo and radius ``GAUSS_NODES`` Gauss-Legendre nodes
on the half circle facing the subhalo (the mean is symmetric about its direction), graded towards the
subhalo's nearest point by a sinh map scaled to its distance from the circle and its core (exact to ~1e-6
of the subhalo's m_tot / r in float64, ~1e-5 in float32, for subhalos on, near, inside or outside the
circle; ``subhalo_mean_radial``). The former ``RING_ANGLES`` equally spaced angles (``method="ring"``) are
kept for comparisons: they miss compact subhalos near large circles (point spacing 2 pi r / 64 > r_trunc).
Point masses use Gauss exactly (theta_E^2 / r inside the circle, half of it on it). The vortex segment and
point chain are exact too (their mass inside r).
Units: arcsec.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .lens import alpha_tnfw, ellipticity_to_phi_q

_F64 = torch.float64

#: Gauss-Legendre nodes per subhalo and circle of the subhalo mean radial deflection (``method="gauss"``)
GAUSS_NODES = 12
#: inner angular scale of the graded nodes: GAUSS_INNER min(Rs, r_trunc) (the subhalo's core)
GAUSS_INNER = 0.05
#: angles per circle of the former equally spaced method (``method="ring"``)
RING_ANGLES = 64
#: radii / theta_E where every image's mean radial deflection is tabulated (theta_E_eff); 1.0: the ring
EFF_NODES = (0.8, 0.9, 1.0, 1.1, 1.2)
#: nodes of the cdm_smooth table per theta_E (so the EFF_NODES and the ring are nodes of it)
SMOOTH_NODES_PER_THETA_E = 10
#: half width / theta_E of the annulus about the ring whose mean convergence ``"ring_slope"`` keeps (its
#: edges, 0.9 and 1.1 theta_E, are EFF_NODES: no extra subhalo integral)
SLOPE_HALF_WIDTH = 0.1


def macro_mean_factor(e1: Tensor, e2: Tensor, gamma: Tensor | None = None, *, n: int = 256) -> Tensor:
    """h(q, gamma) = (1/2pi) int (q cos^2 phi + sin^2 phi / q)^((1-gamma)/2) dphi: the main deflector's
    azimuthal-mean radial deflection is theta_E^(gamma-1) r^(2-gamma) h at every r (lenstronomy SIE / EPL,
    kappa = (3-gamma)/2 (theta_E / sqrt(q x'^2 + y'^2/q))^(gamma-1); gamma = 2 if None). h = 1 for q = 1;
    for the SIE h = sqrt(q) / AGM(1, q) (0.984 at q = 0.6). Midpoint rule on a quarter period (the
    integrand is smooth, even and pi-periodic: spectral accuracy)."""
    _, q, _ = ellipticity_to_phi_q(e1.to(_F64), e2.to(_F64))
    g = torch.full_like(q, 2.0) if gamma is None else gamma.to(_F64)
    phi = (torch.arange(n, dtype=_F64, device=q.device) + 0.5) * (0.5 * math.pi / n)
    c2, s2 = torch.cos(phi) ** 2, torch.sin(phi) ** 2
    w = (q[:, None] * c2 + s2 / q[:, None]) ** (0.5 * (1.0 - g[:, None]))
    return w.mean(-1)


def macro_mean_radial(r: Tensor, theta_E: Tensor, h: Tensor, gamma: Tensor | None = None) -> Tensor:
    """Mean radial deflection [B, R] of the main deflector at radii r [B, R]: theta_E^(g-1) r^(2-g) h."""
    if gamma is None:
        return (theta_E * h)[:, None].expand_as(r)
    g = gamma[:, None]
    return theta_E[:, None] ** (g - 1.0) * r ** (2.0 - g) * h[:, None]


def compensated_theta_E(
    theta_E: Tensor, a_sub: Tensor, h: Tensor, gamma: Tensor | None = None, *, floor: float = 0.01
) -> Tensor:
    """The main deflector's Einstein radius that keeps the mass inside r = theta_E when substructure of mean
    radial deflection ``a_sub`` [arcsec] on that circle is added: theta_E (1 - a_sub / (theta_E h))^(1/(g-1))
    (SIE: theta_E - a_sub / h). If the substructure alone holds more than the ring mass the factor is
    floored at ``floor`` (not reached by the presets' priors: a_sub / theta_E ~ 1 % at 1x Sigma_sub)."""
    frac = (1.0 - a_sub / (theta_E * h)).clamp_min(floor)
    if gamma is None:
        return theta_E * frac
    return theta_E * frac ** (1.0 / (gamma - 1.0))


def annulus_convergence(r_lo: Tensor, a_lo: Tensor, r_hi: Tensor, a_hi: Tensor) -> Tensor:
    """Mean convergence in the annulus r_lo < r < r_hi of a mass with mean radial deflections a_lo, a_hi on
    its edges (Gauss: M(<r) / (pi Sigma_crit) = r <alpha_r>(r)): (r_hi a_hi - r_lo a_lo) / (r_hi^2 - r_lo^2);
    the ring-mean convergence (1 / 2r) d(r <alpha_r>) / dr as the annulus shrinks."""
    return (r_hi * a_hi - r_lo * a_lo) / (r_hi * r_hi - r_lo * r_lo)


def slope_factor(gamma: Tensor, d: float = SLOPE_HALF_WIDTH) -> Tensor:
    """D(gamma) = ((1+d)^(3-gamma) - (1-d)^(3-gamma)) / (4d): an EPL of mean radial deflection B at r =
    theta_0 has mean convergence (B / theta_0) D(gamma) in (1-d) theta_0 < r < (1+d) theta_0 (its mean
    deflection is B (r / theta_0)^(2-gamma) at every r); (3 - gamma) / 2 as d -> 0, decreasing in gamma."""
    return ((1.0 + d) ** (3.0 - gamma) - (1.0 - d) ** (3.0 - gamma)) / (4.0 * d)


def compensated_theta_E_gamma(
    e1: Tensor,
    e2: Tensor,
    theta_E: Tensor,
    gamma: Tensor,
    h: Tensor,
    a_sub: Tensor,
    kappa_sub: Tensor,
    gamma_range: tuple[float, float],
    *,
    d: float = SLOPE_HALF_WIDTH,
    floor: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """(theta_E', gamma', h(q, gamma')) [B] of the main EPL that, with substructure of mean radial deflection
    ``a_sub`` on the circle r = theta_E and mean convergence ``kappa_sub`` in the annulus (1 -+ d) theta_E,
    keeps two numbers of the substructure-free lens (theta_E, gamma; ``h`` = h(q, gamma)):

    (i) the mass inside the ring: theta_E'^(g'-1) theta_E^(2-g') h(q, g') = theta_E h - a_sub =: B';
    (ii) the mean convergence of the annulus (the local slope of the enclosed mass, which sets the radial
         stretch of the arcs): (B' / theta_E) D(g') = h D(gamma) - kappa_sub (``slope_factor``).

    (ii) fixes g' alone, D(g') = (h D(gamma) - kappa_sub) / (B' / theta_E), solved by Newton steps from the
    d -> 0 root 3 - 2 D; g' is clipped to ``gamma_range`` (then (ii) holds only approximately, (i) still
    exactly); theta_E' follows from (i). Elliptical lenses need no other factor: the EPL's ring-mean
    deflection and convergence carry the same h(q, g) at every r (``macro_mean_factor``)."""
    rest = (h - a_sub / theta_E).clamp_min(floor * h)  # B' / theta_E
    target = (h * slope_factor(gamma, d) - kappa_sub) / rest
    g = 3.0 - 2.0 * target
    lp, lm = math.log1p(d), math.log1p(-d)
    for _ in range(4):  # D is smooth, monotonic and nearly linear in gamma: 4 steps reach float64 precision
        dD = -((1.0 + d) ** (3.0 - g) * lp - (1.0 - d) ** (3.0 - g) * lm) / (4.0 * d)
        g = g - (slope_factor(g, d) - target) / dD
    g = g.clamp(gamma_range[0], gamma_range[1])
    h_new = macro_mean_factor(e1, e2, g)
    return theta_E * ((rest / h_new).clamp_min(floor)) ** (1.0 / (g - 1.0)), g, h_new


def effective_einstein_radius(radii: Tensor, mean_alpha: Tensor) -> Tensor:
    """Radius [B] where mean_alpha(r) = r (mean convergence inside = 1), from a table at increasing radii
    [B, R]: the first crossing from above, linear in each cell; without a crossing the end cell nearest to it
    is extrapolated linearly."""
    g = mean_alpha - radii
    cross = (g[:, :-1] >= 0) & (g[:, 1:] < 0)
    first = torch.argmax(cross.to(torch.int8), dim=1)
    above = (g >= 0).all(dim=1)  # root beyond the last node
    j = torch.where(cross.any(dim=1), first, torch.where(above, g.shape[1] - 2, 0))[:, None]
    r0, r1 = radii.gather(1, j), radii.gather(1, j + 1)
    g0, g1 = g.gather(1, j), g.gather(1, j + 1)
    den = torch.where(g0 == g1, torch.ones_like(g0), g0 - g1)
    return (r0 + g0 * (r1 - r0) / den)[:, 0]


def vortex_mean_radial(
    r: Tensor, theta_E_tot: Tensor, half_length: Tensor, profile: str, points: int
) -> Tensor:
    """Mean radial deflection [B, R] of a vortex through the lens centre (Gauss, exact): theta_E_tot^2 times
    its mass fraction inside r, over r. ``segment``: min(1, r / half_length); ``point_chain``: the share of
    its ``points`` equal masses at |s| < r (half for one on the circle)."""
    te2 = (theta_E_tot * theta_E_tot)[:, None]
    h = half_length[:, None].clamp_min(1e-12)
    if profile == "point_chain":
        t = torch.linspace(-1.0, 1.0, int(points), dtype=r.dtype, device=r.device).abs()
        s = h[..., None] * t  # [B, 1, N]
        rr = r[..., None]
        frac = ((s < rr).to(r.dtype) + 0.5 * (s == rr).to(r.dtype)).mean(-1)
    else:
        frac = (r / h).clamp(max=1.0)
    return te2 * frac / r


def subhalo_mean_radial(
    p: dict[str, Tensor],
    rows: Tensor,
    radii: Tensor,
    profile: str,
    *,
    device: torch.device,
    method: str = "gauss",
    nodes: int = GAUSS_NODES,
    n_phi: int = RING_ANGLES,
    dtype: torch.dtype = torch.float32,
    budget: int | None = None,
) -> Tensor:
    """Mean radial deflection [len(rows), R] (float64, on ``radii``'s device) of the subhalos of images
    ``rows`` on circles of radii [len(rows), R] about their lens centres.

    ``p`` holds the [n, K] subhalo tables (zero padded after ``subhalo_count``) and ``center_x/y`` [n].
    Point masses: Gauss exactly. tNFW: the renderer's ``alpha_tnfw`` (its floors included) integrated over the
    circle on ``device``, the nodes in ``dtype`` (per-pair geometry in float64). ``method="gauss"``
    (default): per subhalo and radius ``nodes`` Gauss-Legendre nodes on the half circle facing the subhalo,
    graded towards it (``_gauss_half_circle``): against lenstronomy's TNFW within ~1e-6 of the subhalo's
    m_tot / r in float64 and ~1e-5 in float32 (the float32 profile's own rounding), for subhalos on the
    circle too. ``method="ring"``: ``n_phi`` equally spaced angles in float32 (the former method, kept for
    comparisons: exact only where the subhalo is wider than the point spacing 2 pi r / n_phi). Images run in
    chunks of similar subhalo counts (each chunk cut to its largest count; ``budget``: elements of the
    largest [chunk, K, R x nodes] temporary); "gauss" sums in a fixed order that zero padding does not
    change, from elementwise ops whose results do not depend on a tensor's layout, so its result does not
    depend on the chunking, the images' order or the other images of the call (no atomics)."""
    if method not in ("gauss", "ring"):
        raise ValueError(f"method must be 'gauss' or 'ring', got {method!r}")
    out_dev = radii.device
    m, R = radii.shape
    out = torch.zeros((m, R), dtype=_F64, device=out_dev)
    if m == 0:
        return out
    count = p["subhalo_count"][rows]
    order = torch.argsort(count, stable=True)
    cs = count[order].tolist()  # one host sync
    ring = method == "ring"
    if profile == "point_mass":
        keys = ("subhalo_theta_E", "subhalo_x", "subhalo_y")
        P = R
    else:
        keys = ("subhalo_Rs", "subhalo_alpha_Rs", "subhalo_r_trunc", "subhalo_x", "subhalo_y")
        P = R * (n_phi if ring else int(nodes))
        if ring:
            phi = 2.0 * math.pi * torch.arange(n_phi, dtype=torch.float32, device=device) / n_phi
            cos, sin = torch.cos(phi).repeat(R), torch.sin(phi).repeat(R)  # [P], radius-major
        else:
            t, w = _gauss_legendre_unit(int(nodes), device, dtype)
    if budget is None:  # elements of one [chunk, K, P] temporary (CPU: the in-place node tensors of "gauss"
        # stay in cache; much smaller ones pay the thread-pool hand-off per op)
        budget = 2**25 if device.type == "cuda" else (2**22 if ring else 2**19)
    i = next((k for k, c in enumerate(cs) if c > 0), m)  # images without subhalos keep 0
    while i < m:
        c = max(1, budget // (P * cs[i]))
        j = min(m, i + c)
        kb = cs[j - 1]
        if kb * P * (j - i) > 2 * budget:
            j = min(m, i + max(1, budget // (P * kb)))
            kb = cs[j - 1]
        sel = rows[order[i:j]]
        if profile != "point_mass" and not ring:
            f = {k: p[k][sel, :kb].to(device=device, dtype=_F64) for k in keys}
            cx = p["center_x"][sel].to(device=device, dtype=_F64)[:, None]
            cy = p["center_y"][sel].to(device=device, dtype=_F64)[:, None]
            rad = radii[order[i:j]].to(device=device, dtype=_F64)
            val = _gauss_half_circle(f, cx, cy, rad, t, w)
            out[order[i:j]] = val.to(device=out_dev, dtype=_F64)
            i = j
            continue
        f = {k: p[k][sel, :kb].to(device=device, dtype=torch.float32) for k in keys}
        cx = p["center_x"][sel].to(device=device, dtype=torch.float32)[:, None, None]
        cy = p["center_y"][sel].to(device=device, dtype=torch.float32)[:, None, None]
        rad = radii[order[i:j]].to(device=device, dtype=torch.float32)  # [c, R]
        if profile == "point_mass":
            s = torch.hypot(f["subhalo_x"] - cx[..., 0], f["subhalo_y"] - cy[..., 0])[..., None]  # [c, kb, 1]
            rr = rad[:, None, :]
            inside = (s < rr).to(torch.float32) + 0.5 * (s == rr).to(torch.float32)
            val = _fold_sum((f["subhalo_theta_E"] ** 2)[..., None] * inside, 1) / rad  # [c, R]
            val = torch.where(rad > 0, val, torch.zeros_like(val))  # r = 0: no mass inside (not 0 / 0)
        else:
            rp = rad.repeat_interleave(n_phi, dim=1)[:, None, :]  # [c, 1, P]
            x, y = cx + rp * cos, cy + rp * sin
            e = {k: v[..., None] for k, v in f.items()}  # [c, kb, 1]
            ax, ay = alpha_tnfw(
                x, y, e["subhalo_Rs"].clamp_min(1e-6), e["subhalo_alpha_Rs"],
                e["subhalo_r_trunc"].clamp_min(1e-6), e["subhalo_x"], e["subhalo_y"],
            )  # fmt: skip
            val = (ax * cos + ay * sin).sum(1).view(j - i, R, n_phi).mean(-1)
        out[order[i:j]] = val.to(device=out_dev, dtype=_F64)
        i = j
    return out


def _gauss_legendre_unit(n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and weights [n] on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(n)
    t = torch.tensor(0.5 * (x + 1.0), dtype=dtype, device=device)
    return t, torch.tensor(0.5 * w, dtype=dtype, device=device)


def _gauss_half_circle(
    f: dict[str, Tensor], cx: Tensor, cy: Tensor, rad: Tensor, t: Tensor, w: Tensor
) -> Tensor:
    """Mean radial deflection [c, R] of tNFW subhalos (``f``: [c, kb] float64, zero padded) on circles of
    radii ``rad`` [c, R] (float64) about (cx, cy) [c, 1]; nodes ``t`` and weights ``w`` [N] on [0, 1] (their
    dtype is the precision of the node evaluations).

    With the subhalo at distance s from the centre and psi the angle on the circle from its direction, the
    point's offset from the subhalo is x = r - s cos psi = d + 2 s sin^2(psi/2) (d = r - s) along the
    circle's radial direction and s sin psi across it, rho^2 = d^2 + 4 r s sin^2(psi/2), and the mean radial
    deflection is (1/pi) int_0^pi a(rho) x dpsi (alpha = a(rho) times the offset; ``_tnfw_radial``). It is
    Gauss's M_disk(r) / (pi r): the disk-mass integral over rho with the arc-fraction kernel, integrated by
    parts and written in the angle psi, which removes the kernel's inverse square roots at rho = |r - s| and
    r + s. The integrand peaks at psi = 0 over an angle ~ sqrt(d^2 + h^2) / sqrt(r s) (h = GAUSS_INNER
    min(Rs, r_trunc)), and the subhalo's mass spreads out to ~r_trunc: psi = pi sinh(u w_m) / sinh(w_m),
    u in [0, 1], w_m = asinh(pi sqrt(r s) / sqrt(d^2 + h^2)), is linear in u below that angle and
    exponential beyond it (as many nodes per e-fold of the profile), Gauss-Legendre in u. Where sqrt(r s)
    << sqrt(d^2 + h^2) (a subhalo near the centre, a small circle) it tends to psi = pi u. Per-pair geometry
    in float64; the node tensors [N, c, kb, R] are updated in place (memory passes and allocations are the
    cost on a CPU), the nodes summed in order, then the subhalos by ``_fold_sum``."""
    dx, dy = f["subhalo_x"] - cx, f["subhalo_y"] - cy
    s = torch.sqrt(dx * dx + dy * dy)[..., None]  # [c, kb, 1]; not hypot (its CPU vector and scalar paths
    r = rad[:, None, :]  # [c, 1, R]                  differ in the last bit: results would depend on layout)
    d = r - s  # [c, kb, R]
    Rs = f["subhalo_Rs"].clamp_min(1e-6)[..., None]
    rt = f["subhalo_r_trunc"].clamp_min(1e-6)[..., None]
    h = GAUSS_INNER * torch.minimum(Rs, rt)
    wm = torch.asinh(math.pi * torch.sqrt(r * s) / torch.sqrt(d * d + h * h)).clamp_min(1e-6)
    ew = torch.expm1(wm)  # sinh(w) = ew (2 + ew) / (2 (1 + ew)), exact for small w (torch.sinh: see s)
    scale = 2.0 * math.pi * (1.0 + ew) / (ew * (2.0 + ew))  # pi / sinh(wm): psi = scale sinh(u wm)
    dt = t.dtype
    col = lambda v: v.to(dt)[None]  # noqa: E731  nodes lead: [1, c, kb, R or 1] in the nodes' precision
    t, w = t[:, None, None, None], w[:, None, None, None]
    A = torch.mul(col(wm), t)  # [N, c, kb, R]: u wm
    A.expm1_()  # e = expm1(u wm)
    B = torch.add(A, 1.0)
    C = torch.add(A, 2.0).mul_(A).div_(B).mul_(col(0.25 * scale)).sin_()  # sin(psi / 2)
    A.square_().div_(B).mul_(0.5).add_(1.0)  # cosh(u wm)
    A.mul_(col(scale * wm / math.pi)).mul_(w)  # dpsi / pi times the weight
    C.square_()  # sin^2(psi / 2)
    torch.mul(C, col(2.0 * s), out=B).add_(col(d))  # x = r - s cos psi, without cancellation
    A.mul_(B)
    C.mul_(col(4.0 * r * s)).add_(col(d * d))  # rho^2
    A.mul_(_tnfw_radial(C, B, f["subhalo_alpha_Rs"][..., None], Rs, rt, col))
    val = A[0].clone()
    for n in range(1, A.shape[0]):  # nodes in order
        val += A[n]
    val = _fold_sum(val, 1)  # [c, R]: subhalos, independent of the chunk's zero padding
    return torch.where(rad > 0, val.to(_F64), torch.zeros_like(rad))


def _tnfw_radial(rho2: Tensor, buf: Tensor, alpha_Rs: Tensor, Rs: Tensor, r_trunc: Tensor, col) -> Tensor:
    """``alpha_tnfw``'s a(rho) = |alpha| / rho (lenstronomy TNFW, its floors: X = rho / Rs >= 1e-3) at rho^2
    (overwritten; ``buf`` the same shape, overwritten; returned: rho2's storage). alpha_Rs, Rs, r_trunc
    [c, kb, 1] float64 (Rs, r_trunc floored); ``col`` casts them to the node precision and shape. The same
    formula as ``alpha_tnfw``, in place, the subhalo constants hoisted (tests compare the two)."""
    tau = r_trunc / Rs
    t2 = tau * tau
    k = t2 / (t2 + 1.0) ** 2 * alpha_Rs / (Rs * (1.0 + math.log(0.5)))  # t2/(t2+1)^2 4 rho0 Rs
    X = rho2.sqrt_().div_(col(Rs)).clamp_min_(1e-3)  # the renderer's order of operations (float32: the
    X2 = torch.mul(X, X, out=buf)  #                  terms of g cancel as X -> 0, so rounding matters there)
    sq = torch.add(X2, col(t2)).sqrt_()
    inner = torch.add(sq, col(tau))
    inner = torch.div(X, inner, out=inner).log_()  # L = log(X / (tau + sq))
    inner.mul_(col((t2 - 1.0) / tau)).sub_(math.pi).mul_(sq)  # sq (-pi + L (t2 - 1) / tau)
    F = _nfw_F_inplace(X, X2, sq)  # sq's storage
    g = X2.mul_(2.0).add_(col(t2 - 1.0)).mul_(F).add_(col(tau * math.pi + (t2 - 1.0) * torch.log(tau)))
    g.add_(inner)
    return g.mul_(col(k)).div_(X).div_(X)


def _nfw_F_inplace(X: Tensor, X2: Tensor, out: Tensor) -> Tensor:
    """``lens._nfw_F``: artanh(s) / s (X < 1), arctan(s) / s (X >= 1), s = sqrt|X^2 - 1| (X, X^2 kept; the
    result in ``out``). At X^2 = 1 exactly s is floored (arctan(s) / s = 1); the renderer's series where
    s < 1e-4 is that value to float32 precision (float64: the branches' own, to ~1e-12)."""
    d = torch.sub(X2, 1.0)
    s = torch.abs(d).sqrt_().clamp_min_(1e-30)
    lg = torch.add(s, 1.0).div_(X).log_()  # artanh(s) = log((1 + s) / X) for X < 1
    return torch.where(d >= 0, torch.atan(s, out=out), lg, out=out).div_(s)


def _fold_sum(t: Tensor, dim: int) -> Tensor:
    """Sum over ``dim`` by folding halves (zero padded to a power of 2): appending zeros to ``dim`` leaves
    every bit of the result unchanged (a chunk cut to a larger subhalo count sums the same), unlike
    ``Tensor.sum`` whose order depends on the shape; elementwise ops only, the same on CPU and CUDA."""
    n = t.shape[dim]
    size = 1 << max(0, (n - 1).bit_length())
    if size > n:
        shape = list(t.shape)
        shape[dim] = size - n
        t = torch.cat([t, t.new_zeros(shape)], dim=dim)
    while size > 1:
        size //= 2
        t = t.narrow(dim, 0, size) + t.narrow(dim, size, size)
    return t.squeeze(dim)


def smooth_table_size(preset) -> int:
    """Nodes R of the radial tables (spacing theta_E / SMOOTH_NODES_PER_THETA_E): node R-1 lies beyond every
    sub-pixel of the preset's grid for any lens centre and theta_E of its priors, and beyond the EFF_NODES."""
    half = 0.5 * preset.num_pix * preset.delta_pix
    cmax = max(abs(preset.lens_center[0]), abs(preset.lens_center[1]))
    r_cover = math.sqrt(2.0) * (half + cmax)
    theta_min = preset.theta_E[0] if preset.lens_mass is None else 0.5  # a fixed lens mass: theta_E >~ 1"
    cover = int(math.ceil(r_cover / theta_min * SMOOTH_NODES_PER_THETA_E)) + 2
    return max(cover, round(max(EFF_NODES) * SMOOTH_NODES_PER_THETA_E) + 2)  # the EFF_NODES are nodes of it


def radial_table_needed(preset) -> bool:
    """Whether the preset's images carry a radial deflection table (``radial_alpha``): the cdm_smooth
    control, or "monopole" compensation with substructure in the classes."""
    sub = any(c in preset.class_names for c in ("cdm", "cdm_smooth", "axion"))
    return "cdm_smooth" in preset.class_names or (preset.mass_compensation == "monopole" and sub)


def alpha_radial_table(
    x: Tensor, y: Tensor, center_x: Tensor, center_y: Tensor, dr: Tensor, table: Tensor
) -> tuple[Tensor, Tensor]:
    """Deflection of a circularly symmetric mass with mean radial deflection ``table`` [B, R] at radii
    j dr (dr [B, 1], centre [B, 1]) at x, y [B, P] or [P]: linear interpolation; beyond node R-1 the enclosed
    mass is held (alpha ~ 1/r)."""
    dx, dy = x - center_x, y - center_y
    r = torch.sqrt(dx * dx + dy * dy).clamp_min(1e-12)
    R = table.shape[1]
    u = r / dr.clamp_min(1e-12)
    i = u.floor().clamp(0, R - 2)
    t = (u - i).clamp(max=1.0)
    i = i.long()
    if i.shape[0] != table.shape[0]:
        i, t = i.expand(table.shape[0], -1), t.expand(table.shape[0], -1)
    a = table.gather(1, i) * (1.0 - t) + table.gather(1, i + 1) * t
    r_last = dr * (R - 1)
    a = torch.where(u > R - 1, table[:, -1:] * r_last / r, a)
    return a * dx / r, a * dy / r


def _node(x: float) -> int:
    """Index of the EFF_NODES node at x."""
    return min(range(len(EFF_NODES)), key=lambda k: abs(EFF_NODES[k] - x))


def lens_mass_model(
    preset, p: dict[str, Tensor], *, clumps: Tensor, smooth: Tensor, partner: Tensor, device: torch.device
) -> dict[str, Tensor]:
    """The lens-mass step after the draws: the compensated main-deflector ``theta_E`` and ``gamma`` (if drawn)
    and the per-image diagnostics ``theta_E_compensation`` and ``gamma_compensation`` (drawn minus rendered; 0
    without substructure, with ``mass_compensation = "none"``, and for gamma with "ring" or an SIE),
    ``gamma_clipped`` (int64 1 where the slope solve left the preset's lens_gamma range) and ``theta_E_eff``
    (effective Einstein radius of the whole lens [arcsec]); with compensation ``substructure_ring_alpha``
    (the substructure's mean radial deflection on the ring, before compensation [arcsec]); where
    ``radial_table_needed``: ``radial_alpha`` [n, R] (a circularly symmetric deflection added to the image,
    its mean radial value at radii j ``radial_dr``: a cdm_smooth image's smoothed population, or with
    "monopole" minus a cdm or axion image's own substructure monopole; zeros elsewhere), ``radial_dr`` [n]
    (> 0 where the table is rendered) and ``subhalo_smoothed`` [n] (int64 1: a cdm_smooth image, whose
    subhalos are not rendered as clumps).

    ``p``: the drawn parameters (float64 on one device; ``gamma`` [n] if the main deflector is an EPL);
    ``clumps`` / ``smooth``: bool [n] images with clumpy / smoothed subhalos; ``partner`` [n]: for a smooth
    image, the image whose population it shares (-1: none), whose ring mean (so compensation) it takes.
    The subhalo integrals run on ``device`` (the render device); results come back to ``p``'s device."""
    te = p["theta_E"]
    n = te.shape[0]
    dev = te.device
    gamma = p.get("gamma")
    h = macro_mean_factor(p["e1"], p["e2"], gamma)
    nodes = torch.tensor(EFF_NODES, dtype=_F64, device=dev)
    radii = te[:, None] * nodes  # [n, E]
    a_sub = torch.zeros_like(radii)
    out: dict[str, Tensor] = {}
    ring = EFF_NODES.index(1.0)
    profile = preset.subhalo_profile
    monopole = preset.mass_compensation == "monopole"
    vortex = "vortex_theta_E" in p
    rows = torch.nonzero(clumps).squeeze(1)
    if not monopole:
        a_sub[rows] = subhalo_mean_radial(p, rows, radii[rows], profile, device=device)
    if radial_table_needed(preset):
        J = SMOOTH_NODES_PER_THETA_E
        R = smooth_table_size(preset)
        steps = torch.arange(R, dtype=_F64, device=dev) / J
        idx = torch.tensor([round(t * J) for t in EFF_NODES], device=dev)
        full = torch.zeros((n, R), dtype=_F64, device=dev)
        # the subhalo populations' mean radial deflections at r_j: cdm_smooth images always, cdm images
        # under "monopole" (their own monopole is subtracted); the ring means follow at the EFF_NODES
        tab = (smooth | clumps) if monopole else smooth
        rows_t = torch.nonzero(tab).squeeze(1)
        table = subhalo_mean_radial(p, rows_t, te[rows_t, None] * steps, profile, device=device)
        if monopole:
            full[rows_t] = -table * clumps[rows_t, None]  # cdm: minus its own monopole; cdm_smooth: 0
        else:
            full[rows_t] = table  # cdm_smooth: the population's azimuthal average, no clumps
        a_sub[rows_t] = table[:, idx]
        if monopole and vortex:
            rv = torch.nonzero(p["vortex_theta_E"] > 0).squeeze(1)
            rad_v = (te[rv, None] * steps).clamp_min(1e-6 * te[rv, None])  # node 0: the limit r -> 0
            full[rv] = full[rv] - vortex_mean_radial(
                rad_v, p["vortex_theta_E"][rv], p["vortex_half_length"][rv], preset.vortex_profile,
                preset.vortex_points,
            )  # fmt: skip
        # a partnered cdm_smooth image takes its partner's ring means (the same population, so the same
        # compensation)
        has = smooth & (partner >= 0)
        a_sub[has] = a_sub[partner[has]]
        nonzero = (full != 0).any(dim=1)
        out["radial_alpha"] = full
        out["radial_dr"] = torch.where(nonzero, te / J, torch.zeros_like(te))
        out["subhalo_smoothed"] = smooth.to(torch.int64)
    if "vortex_theta_E" in p:
        prof, pts = preset.vortex_profile, preset.vortex_points
        a_sub = a_sub + vortex_mean_radial(radii, p["vortex_theta_E"], p["vortex_half_length"], prof, pts)
    if preset.mass_compensation != "none":
        out["substructure_ring_alpha"] = a_sub[:, ring].clone()
    if monopole:  # the substructure's monopole is subtracted at every radius: the macro lens stays as drawn
        a_sub = torch.zeros_like(a_sub)
    g_new = gamma
    sub = a_sub[:, ring] != 0
    clipped = torch.zeros_like(sub)
    if preset.mass_compensation == "ring_slope" and preset.lens_profile == "epl":
        lo, hi = (_node(1.0 + s * SLOPE_HALF_WIDTH) for s in (-1, 1))
        kappa = annulus_convergence(radii[:, lo], a_sub[:, lo], radii[:, hi], a_sub[:, hi])
        te_c, g_c, h_c = compensated_theta_E_gamma(
            p["e1"], p["e2"], te, gamma, h, a_sub[:, ring], kappa, preset.lens_gamma
        )
        te_new, g_new, h = torch.where(sub, te_c, te), torch.where(sub, g_c, gamma), torch.where(sub, h_c, h)
        clipped = sub & ((g_new <= preset.lens_gamma[0]) | (g_new >= preset.lens_gamma[1]))
    elif preset.mass_compensation in ("ring", "ring_slope"):  # an SIE keeps gamma = 2: theta_E alone
        te_new = torch.where(sub, compensated_theta_E(te, a_sub[:, ring], h, gamma), te)
    else:
        te_new = te
    alpha = macro_mean_radial(radii, te_new, h, g_new) + a_sub
    out["theta_E"] = te_new
    out["theta_E_compensation"] = te - te_new
    if gamma is not None:
        out["gamma"] = g_new
        out["gamma_compensation"] = gamma - g_new
        out["gamma_clipped"] = clipped.to(torch.int64)
    out["theta_E_eff"] = effective_einstein_radius(radii, alpha)
    return out
