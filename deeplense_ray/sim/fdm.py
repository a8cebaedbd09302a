"""Wave (fuzzy) dark matter: the granule convergence field of the host halo (class ``fdm``).

A halo of ultra-light bosons of mass m is a superposition of waves with the halo's velocity distribution;
their interference fills it with density granules of order-unity contrast, delta rho / rho ~ 1, on the de
Broglie scale (Schive, Chiueh & Broadhurst 2014; Hui, Ostriker, Tremaine & Witten 2017; in lens halos
Chan et al. 2020, arXiv:2002.10473; Laroche et al. 2022, MNRAS 517, 1867, arXiv:2206.11269; Powell et al.
2023, a milliarcsecond VLBI arc). Projected along a line of sight through many granules the fluctuation of the
convergence is a Gaussian random field (central limit theorem). What is used here:

- **Coherence length.** For random phases and a Maxwellian of 1D dispersion sigma_v, psi has correlation
  exp(-m^2 sigma_v^2 r^2 / (2 hbar^2)) and rho = |psi|^2 (Isserlis) the density correlation
  <delta rho(x) delta rho(x + r)> = rho^2 exp(-r^2 / l^2), l = hbar / (m sigma_v) = lambda_dB / (2 pi),
  lambda_dB = h / (m sigma_v) (the random-phase model of Bar-Or, Fouvry & Tremaine 2019, ApJ 871, 28).
  lambda_dB = 0.40 kpc (1e-22 eV / m) (300 km/s / sigma_v). sigma_v is the host's: the singular-isothermal
  value of the drawn Einstein radius, theta_E = 4 pi (sigma_v / c)^2 D_ls / D_s.
- **Amplitude.** Integrating along the line of sight (l much smaller than the halo),
  <delta Sigma(R) delta Sigma(R + s)> = sqrt(pi) l int rho^2 dz exp(-s^2 / l^2), so the convergence field
  has the 2D correlation sigma_kappa^2 exp(-s^2 / l^2) with
  sigma_kappa^2(R) = A^2 sqrt(pi) l kappa(R)^2 / L_eff(R),   L_eff = Sigma^2 / int rho^2 dz,
  i.e. sigma_kappa / kappa = sqrt(sqrt(pi) l / L_eff): the sqrt(lambda_dB / path length) scaling of Chan et
  al. 2020 and Laroche et al. 2022. For the power law rho ~ r^-gamma of the EPL main deflector,
  L_eff = R B(1/2, (gamma-1)/2)^2 / B(1/2, gamma-1/2) (2 pi R for the isothermal gamma = 2), kappa =
  (3-gamma)/2 (theta_E / R)^(gamma-1); with the elliptical radius R = sqrt(q x'^2 + y'^2 / q) (the EPL's)
  sigma_kappa(x) = sigma_kappa_E (theta_E / R)^(gamma - 1/2), sigma_kappa_E = A (3-gamma)/2
  sqrt(sqrt(pi) l / (theta_E b(gamma))) its value on the Einstein ring (stored as ``fdm_sigma_kappa``). R is
  floored at ``R_FLOOR`` theta_E (inside, the soliton core has no granules and the images are demagnified).
  A (``Preset.fdm_amplitude``, 1 by default) scales it: granule models in the literature differ by O(1)
  factors (a granule of diameter lambda_dB / 2 and contrast 1 gives sqrt(pi) times this variance;
  Laroche et al. calibrate the amplitude on simulations).
- **On the grid.** The field lives on a square grid of spacing h = the ray spacing (delta_pix / ss) covering
  the image plus ``fdm_margin`` arcsec, its nodes on the sub-pixel ray positions. Each cell holds the
  cell-averaged convergence: a Gaussian field with spectrum P(k) = pi l^2 sum_n exp(-|k_n|^2 l^2 / 4)
  sinc^2(k_n,x h / 2) sinc^2(k_n,y h / 2) (k_n the aliases k + 2 pi n / h; separable, ``cell_spectrum_1d``),
  variance c(h / l)^2 per unit sigma_kappa^2, c(a) = sqrt(pi) erf(a) / a - (1 - exp(-a^2)) / a^2
  (``cell_variance_factor``): white with variance pi l^2 / h^2 when granules are unresolved (l << h), which
  is the mass fluctuation of a cell. Drawn from white noise filtered in Fourier space, per image from its own
  generator (``fdm_seed``) on the render device, then multiplied by sigma_kappa(x).
- **No net mass.** The field's azimuthal mean about the lens centre is removed (rings of width h), so it
  adds no mass inside any circle about the centre: the ring size does not depend on the class.
- **Deflection.** alpha(x) = (1/pi) int kappa(x') (x - x') / |x - x'|^2 d^2x', the cells taken as uniform
  squares (``cell_deflection_kernel``: the exact deflection of a uniform square), evaluated as a linear
  convolution by FFT on the grid zero-padded to twice its size (free space, no periodic images), read at
  the ray positions (grid nodes) and added to the macro deflection.

Units: angles arcsec, lengths kpc where named so, velocities km/s, masses eV.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from . import cosmology

_F64 = torch.float64
#: hbar [eV s], c [km/s], km per kpc
HBAR_EV_S = 6.582119569e-16
C_KM_S = 299792.458
KM_PER_KPC = 3.0856775814913673e16
#: the amplitude's elliptical radius is floored at this x theta_E
R_FLOOR = 0.1
#: the range a preset's fdm_log10_mass may take [log10 eV]: l << theta_E needs m >~ 1e-24 eV
LOG10_MASS_LIMITS = (-24.0, -18.0)


def de_broglie_wavelength_kpc(log10_m_ev: Tensor, sigma_v_kms: Tensor) -> Tensor:
    """lambda_dB = h / (m sigma_v) [kpc] for particle mass 10^log10_m_ev eV and velocity sigma_v [km/s]."""
    hbar_over_m = HBAR_EV_S * C_KM_S**2 / 10.0**log10_m_ev  # km^2 / s
    return 2.0 * math.pi * hbar_over_m / sigma_v_kms / KM_PER_KPC


def sis_velocity_dispersion_kms(theta_E: Tensor, z_lens: float, z_source: float, *, h0: float, om0: float):
    """sigma_v [km/s] of the singular isothermal sphere of Einstein radius theta_E [arcsec]:
    theta_E = 4 pi (sigma_v / c)^2 D_ls / D_s (angular-diameter distances)."""
    _, d_s, d_ls = cosmology.lensing_distances(z_lens, z_source, h0=h0, om0=om0)
    return C_KM_S * torch.sqrt(theta_E * cosmology.ARCSEC * d_s / (4.0 * math.pi * d_ls))


def path_length_factor(gamma: Tensor) -> Tensor:
    """b(gamma) = B(1/2, (gamma-1)/2)^2 / B(1/2, gamma - 1/2): L_eff = Sigma^2 / int rho^2 dz = b R for
    rho ~ r^-gamma (2 pi at gamma = 2)."""

    def lbeta(a, b):
        return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)

    half = torch.full_like(gamma, 0.5)
    return torch.exp(2.0 * lbeta(half, 0.5 * (gamma - 1.0)) - lbeta(half, gamma - 0.5))


def sigma_kappa_einstein(theta_E: Tensor, gamma: Tensor, ell: Tensor, amplitude: float) -> Tensor:
    """rms granule convergence on the Einstein ring (R = theta_E): A (3-gamma)/2 sqrt(sqrt(pi) l /
    (theta_E b(gamma))); theta_E, l [arcsec]."""
    return (
        amplitude
        * 0.5
        * (3.0 - gamma)
        * torch.sqrt(math.sqrt(math.pi) * ell / (theta_E * path_length_factor(gamma)))
    )


def draw_fdm(preset, p: Mapping[str, Tensor], is_fdm: Tensor, g: torch.Generator) -> dict[str, Tensor]:
    """Per-image fdm parameters, drawn for every image from ``g`` (log10 m, then a seed) and zero except for
    fdm images: ``fdm_log10_m`` [log10 eV] uniform in ``fdm_log10_mass``, ``fdm_velocity_dispersion``
    [km/s], ``fdm_lambda_db`` [arcsec] (h / (m sigma_v) at the lens), ``fdm_sigma_kappa`` (rms convergence on
    the ring), ``fdm_seed`` (int64, the field's generator). ``p``: theta_E, gamma (if an EPL) [n]."""
    dev = g.device
    n = int(is_fdm.shape[0])
    lo, hi = preset.fdm_log10_mass
    log_m = lo + (hi - lo) * torch.rand(n, generator=g, dtype=_F64, device=dev)
    seed = torch.randint(0, 2**62, (n,), generator=g, device=dev)
    te = p["theta_E"].to(_F64)
    gamma = p["gamma"].to(_F64) if "gamma" in p else torch.full_like(te, 2.0)
    sig_v = sis_velocity_dispersion_kms(te, preset.z_lens, preset.z_source, h0=preset.H0, om0=preset.Om0)
    kpa = (
        cosmology.angular_diameter_distance(preset.z_lens, h0=preset.H0, om0=preset.Om0)
        * 1e3
        * cosmology.ARCSEC
    )
    lam = de_broglie_wavelength_kpc(log_m, sig_v) / kpa
    sk = sigma_kappa_einstein(te, gamma, lam / (2.0 * math.pi), preset.fdm_amplitude)
    mask = is_fdm.to(dev)
    zero = torch.zeros_like(te)
    return {
        "fdm_log10_m": torch.where(mask, log_m, zero),
        "fdm_velocity_dispersion": torch.where(mask, sig_v, zero),
        "fdm_lambda_db": torch.where(mask, lam, zero),
        "fdm_sigma_kappa": torch.where(mask, sk, zero),
        "fdm_seed": torch.where(mask, seed, torch.zeros_like(seed)),
    }


# ------------------------------------------------------------------------------------------ the field


def cell_variance_factor(a: Tensor | float) -> Tensor:
    """c(a)^2 with c(a) = sqrt(pi) erf(a) / a - (1 - exp(-a^2)) / a^2, a = h / l: the variance of the
    h x h cell average of a unit-variance field of correlation exp(-r^2 / l^2) (-> 1 as a -> 0, pi / a^2 as
    a -> inf)."""
    a = torch.as_tensor(a, dtype=_F64)
    c = math.sqrt(math.pi) * torch.special.erf(a) / a - (-torch.expm1(-a * a)) / (a * a)
    return torch.where(a < 1e-4, 1.0 - a * a / 6.0, c) ** 2


def cell_spectrum_1d(k: Tensor, ell: Tensor, h: float) -> Tensor:
    """S(k) = sum_n exp(-k_n^2 l^2 / 4) sinc^2(k_n h / 2), k_n = k + 2 pi n / h, at wavenumbers k [K] for
    coherence lengths ell [B] [arcsec]: the cell-averaged, grid-sampled spectrum is
    P(k) = pi l^2 S(k_x) S(k_y) (per unit sigma_kappa^2). Aliases |n| <= N, N covering 4 l-widths of the
    Gaussian; the rest of the sinc^2 sum (whose total is 1) is added with the Gaussian factor of the last
    alias (negligible unless l << h)."""
    ell = ell.to(_F64)[:, None, None]
    n_max = int(min(4096, math.ceil(4.0 * h / (math.pi * float(ell.min())) + 4)))
    n = torch.arange(-n_max, n_max + 1, dtype=_F64, device=k.device)
    kn = k.to(_F64)[None, :, None] + 2.0 * math.pi * n[None, None, :] / h  # [1, K, N]
    x = 0.5 * kn * h
    sinc2 = torch.where(x.abs() < 1e-12, torch.ones_like(x), torch.sin(x) / x) ** 2
    s = (torch.exp(-0.25 * kn * kn * ell * ell) * sinc2).sum(-1)
    tail = (1.0 - sinc2.sum(-1)).clamp_min(0.0) * torch.exp(
        -0.25 * (2.0 * math.pi * n_max / h) ** 2 * ell[..., 0] ** 2
    )
    return s + tail


def cell_deflection_kernel(off_x: Tensor, off_y: Tensor, h: float) -> tuple[Tensor, Tensor]:
    """Deflection [arcsec] at offsets (off_x, off_y) [arcsec] from the centre of a uniform h x h square of
    unit convergence: alpha = (1/pi) [G(u, v)] over u in off_x -+ h/2, v in off_y -+ h/2, with
    G(u, v) = v/2 ln(u^2 + v^2) + u arctan(v / u) for alpha_x (x <-> y for alpha_y). float64."""

    def G(u, v):
        r2 = (u * u + v * v).clamp_min(1e-300)
        at = torch.where(u == 0, torch.zeros_like(u), u * torch.atan(v / torch.where(u == 0, 1.0, u)))
        return 0.5 * v * torch.log(r2) + at

    def corners(f, a, b):
        return (
            f(a + h / 2, b + h / 2)
            - f(a - h / 2, b + h / 2)
            - f(a + h / 2, b - h / 2)
            + f(a - h / 2, b - h / 2)
        )

    ox, oy = off_x.to(_F64), off_y.to(_F64)
    return corners(G, ox, oy) / math.pi, corners(G, oy, ox) / math.pi


def monopole_free(kappa: Tensor, r: Tensor, h: float, *, sort: bool | None = None) -> Tensor:
    """kappa [B, M, M] minus its mean in rings of width h about each image's centre (r [B, M, M] the cells'
    distances [arcsec]): no mass is left in any ring. Sums in float64, deterministic: ``index_add`` on CPU
    (sequential), sorted cumulative sums elsewhere (no atomics; ``sort`` forces one or the other)."""
    B = kappa.shape[0]
    v = kappa.reshape(B, -1).to(_F64)
    ring = torch.floor(r.reshape(B, -1) / h).to(torch.int64)
    if not (v.device.type != "cpu" if sort is None else sort):
        nb = int(ring.max()) + 1
        flat = (ring + nb * torch.arange(B, device=v.device)[:, None]).reshape(-1)
        tot = torch.zeros(B * nb, dtype=_F64).index_add_(0, flat, v.reshape(-1))
        cnt = torch.zeros(B * nb, dtype=_F64).index_add_(0, flat, torch.ones_like(v).reshape(-1))
        mean = (tot / cnt.clamp_min(1.0))[flat].view(B, -1)
        return (v - mean).to(kappa.dtype).reshape(kappa.shape)
    ring_sorted, order = torch.sort(ring, dim=1, stable=True)
    cs = torch.cumsum(torch.gather(v, 1, order), dim=1)
    cs = torch.cat([torch.zeros((B, 1), dtype=_F64, device=v.device), cs], dim=1)
    # each cell's ring occupies [first, last) in the sorted order
    first = torch.searchsorted(ring_sorted, ring_sorted, right=False)
    last = torch.searchsorted(ring_sorted, ring_sorted, right=True)
    mean_sorted = (cs.gather(1, last) - cs.gather(1, first)) / (last - first).to(_F64)
    mean = torch.empty_like(mean_sorted).scatter_(1, order, mean_sorted)
    return (v - mean).to(kappa.dtype).reshape(kappa.shape)


class FdmGrid:
    """The field grid of a preset on a device: spacing h = delta_pix / ss, the image's ray grid plus a margin
    of ``fdm_margin`` arcsec (rounded up to whole cells) on each side, nodes on the ray positions; and the FFT
    of the cell deflection kernel on the zero-padded (2M)^2 grid."""

    def __init__(self, preset, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.device, self.dtype = torch.device(device), dtype
        ss = int(preset.supersampling)
        self.h = h = preset.delta_pix / ss
        self.n_ray = preset.num_pix * ss
        self.margin = int(math.ceil(preset.fdm_margin / h - 1e-9))
        self.M = M = self.n_ray + 2 * self.margin
        j = torch.arange(M, dtype=_F64)
        self.coord = -0.5 * preset.num_pix * preset.delta_pix + (j - self.margin + 0.5) * h  # node x (= y)
        L = 2 * M
        off = torch.arange(L, dtype=_F64)
        off = torch.where(off < M, off, off - L) * h  # wrapped offsets -M..M-1 cells
        oy, ox = torch.meshgrid(off, off, indexing="ij")
        kx, ky = cell_deflection_kernel(ox, oy, h)
        cdt = torch.complex64 if dtype == torch.float32 else torch.complex128
        self.kernel_fx = torch.fft.rfft2(kx).to(device=self.device, dtype=cdt)
        self.kernel_fy = torch.fft.rfft2(ky).to(device=self.device, dtype=cdt)
        freq = 2.0 * math.pi * torch.fft.fftfreq(M, d=h, dtype=_F64)
        self.k_full = freq.to(self.device)  # rows (y)
        self.k_half = (2.0 * math.pi * torch.fft.rfftfreq(M, d=h, dtype=_F64)).to(self.device)  # columns (x)
        self.x = self.coord.to(self.device)

    def unit_field(self, seeds: Tensor, ell: Tensor) -> Tensor:
        """Cell-averaged Gaussian fields [B, M, M] of unit continuum variance and coherence lengths ell [B]
        [arcsec], image b from white noise of a generator on the device seeded with seeds[b]."""
        M, dev = self.M, self.device
        noise = torch.stack(
            [
                torch.randn(
                    (M, M),
                    generator=torch.Generator(device=dev).manual_seed(int(s)),
                    device=dev,
                    dtype=self.dtype,
                )
                for s in seeds.tolist()
            ]
        )
        ell = ell.to(device=dev, dtype=_F64)
        sy = cell_spectrum_1d(self.k_full, ell, self.h)  # [B, M]
        sx = cell_spectrum_1d(self.k_half, ell, self.h)  # [B, M//2+1]
        filt = torch.sqrt(math.pi * ell[:, None, None] ** 2 * sy[:, :, None] * sx[:, None, :]) / self.h
        return torch.fft.irfft2(torch.fft.rfft2(noise) * filt.to(self.dtype), s=(M, M))

    def deflection(self, kappa: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_x, alpha_y [B, M, M] at the nodes of convergence grids kappa [B, M, M] of uniform cells
        (linear convolution with ``cell_deflection_kernel`` by FFT on the zero-padded 2M grid)."""
        M = self.M
        kf = torch.fft.rfft2(kappa, s=(2 * M, 2 * M))
        ax = torch.fft.irfft2(kf * self.kernel_fx, s=(2 * M, 2 * M))[:, :M, :M]
        ay = torch.fft.irfft2(kf * self.kernel_fy, s=(2 * M, 2 * M))[:, :M, :M]
        return ax, ay

    def convergence(self, p: Mapping[str, Tensor]) -> Tensor:
        """The granule convergence fields [B, M, M] of images with parameters p ([B] each: fdm_seed,
        fdm_lambda_db, fdm_sigma_kappa, theta_E, gamma (optional), e1, e2, center_x, center_y): unit field x
        sigma_kappa(x), its ring means about the centre removed."""
        dev, dt = self.device, self.dtype
        f = lambda k: p[k].to(device=dev, dtype=_F64)[:, None, None]  # noqa: E731
        g = self.unit_field(p["fdm_seed"], p["fdm_lambda_db"].to(_F64) / (2.0 * math.pi))
        x, y = self.x[None, None, :], self.x[None, :, None]
        dx, dy = x - f("center_x"), y - f("center_y")
        e1, e2 = f("e1"), f("e2")
        phi = 0.5 * torch.atan2(e2, e1)
        c = torch.clamp(torch.sqrt(e1 * e1 + e2 * e2), max=0.9999)
        q = (1.0 - c) / (1.0 + c)
        xr = torch.cos(phi) * dx + torch.sin(phi) * dy
        yr = -torch.sin(phi) * dx + torch.cos(phi) * dy
        te = f("theta_E")
        gamma = f("gamma") if "gamma" in p else torch.full_like(te, 2.0)
        R = torch.sqrt(q * xr * xr + yr * yr / q).clamp_min(R_FLOOR * te)
        amp = f("fdm_sigma_kappa") * (te / R) ** (gamma - 0.5)
        kappa = (amp * g.to(_F64)).to(dt)
        return monopole_free(kappa, torch.sqrt(dx * dx + dy * dy), self.h)

    def ray_deflection(
        self, p: Mapping[str, Tensor], x: Tensor | None = None, y: Tensor | None = None, chunk: int = 16
    ) -> tuple[Tensor, Tensor]:
        """alpha_x, alpha_y [B, P] of the images' granule fields, images in chunks of ``chunk``. Without
        positions (or 1-D ones: the ray grid) at the ray grid, row-major, y slow: the nodes margin..margin +
        n_ray - 1 of each axis; at positions x, y [B, P] [arcsec] (e.g. a multi-plane lens plane) by bilinear
        interpolation of the nodes."""
        B = int(p["fdm_seed"].shape[0])
        m, n = self.margin, self.n_ray
        per_image = x is not None and x.dim() == 2
        outx, outy = [], []
        for s in range(0, B, chunk):
            sub = {k: v[s : s + chunk] for k, v in p.items()}
            ax, ay = self.deflection(self.convergence(sub))
            if per_image:
                fx, fy = self.interpolate(ax, ay, x[s : s + chunk], y[s : s + chunk])
            else:
                fx = ax[:, m : m + n, m : m + n].reshape(ax.shape[0], -1)
                fy = ay[:, m : m + n, m : m + n].reshape(ay.shape[0], -1)
            outx.append(fx)
            outy.append(fy)
        return torch.cat(outx), torch.cat(outy)

    def interpolate(self, ax: Tensor, ay: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Bilinear interpolation of node values ax, ay [B, M, M] at positions x, y [B, P] [arcsec] (held at
        the grid's edge beyond it)."""
        lo, span = float(self.coord[0]), float(self.coord[-1] - self.coord[0])
        grid = torch.stack([(x - lo) / span * 2.0 - 1.0, (y - lo) / span * 2.0 - 1.0], dim=-1)[:, None]
        out = torch.nn.functional.grid_sample(
            torch.stack([ax, ay], dim=1), grid.to(ax.dtype), mode="bilinear", padding_mode="border",
            align_corners=True,
        )  # fmt: skip
        return out[:, 0, 0], out[:, 1, 0]


#: per-image parameters the renderer passes to ``FdmGrid.ray_deflection``
FDM_RENDER_KEYS = (
    "fdm_seed",
    "fdm_lambda_db",
    "fdm_sigma_kappa",
    "theta_E",
    "e1",
    "e2",
    "center_x",
    "center_y",
)


def add_fdm_deflection(
    grid: FdmGrid,
    ax: Tensor,
    ay: Tensor,
    p: Mapping[str, Tensor],
    x: Tensor | None = None,
    y: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """ax, ay [B, P] plus the granule deflection of the batch's fdm images (``fdm_sigma_kappa`` > 0) at the
    ray grid, or at per-image positions x, y [B, P] (``FdmGrid.ray_deflection``)."""
    if "fdm_sigma_kappa" not in p:
        return ax, ay
    ii = torch.nonzero(p["fdm_sigma_kappa"] > 0).squeeze(1)
    if ii.numel() == 0:
        return ax, ay
    keys = FDM_RENDER_KEYS + (("gamma",) if "gamma" in p else ())
    if x is not None and x.dim() == 2:
        x, y = x[ii], y[ii]
    fx, fy = grid.ray_deflection({k: p[k][ii] for k in keys}, x, y)
    return ax.index_add(0, ii, fx.to(ax.dtype)), ay.index_add(0, ii, fy.to(ay.dtype))
