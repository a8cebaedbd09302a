"""Wave dark matter (class ``fdm``, ``sim/fdm.py``): the granule field's statistics, its FFT deflection
against closed forms, direct integration and lenstronomy, reproducibility, pairing, no net mass, the ring
observer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deeplense_ray.sim import resolve_preset, simulate
from deeplense_ray.sim.fdm import (
    FdmGrid,
    cell_deflection_kernel,
    cell_spectrum_1d,
    cell_variance_factor,
    de_broglie_wavelength_kpc,
    monopole_free,
    path_length_factor,
)
from deeplense_ray.sim.observers import auc, ring_radius
from deeplense_ray.sim.render import pixel_grid
from deeplense_ray.sim.simulate import Renderer

F64 = torch.float64
CPU = torch.device("cpu")
#: a small model_ii_fdm for the rendering tests (32 px of 0.101", ss 2)
SMALL = {"num_pix": 32, "supersampling": 2, "noise": "none"}


def _grid(num_pix=64, ss=1, margin=0.0, dtype=F64, delta_pix=0.1):
    pre = resolve_preset("model_ii_fdm", {"num_pix": num_pix, "supersampling": ss, "fdm_margin": margin,
                                          "delta_pix": delta_pix})  # fmt: skip
    return FdmGrid(pre, CPU, dtype)


def test_de_broglie_wavelength_and_path_length():
    """lambda_dB = h / (m v): hbar / (m v) = 1.92 kpc at 1e-22 eV and 10 km/s (Hui et al. 2017; 1.9171 from
    hbar c = 1.97327e-7 eV m), 0.482 kpc lambda_dB at 250 km/s; L_eff = 2 pi R for an isothermal sphere, and
    b(gamma) against quadrature."""
    lam = de_broglie_wavelength_kpc(torch.tensor(-22.0, dtype=F64), torch.tensor(250.0, dtype=F64))
    assert float(lam) / (2 * math.pi) * 25.0 == pytest.approx(1.9171, rel=2e-4)
    assert float(
        de_broglie_wavelength_kpc(torch.tensor(-21.0, dtype=F64), torch.tensor(25.0, dtype=F64))
    ) == (pytest.approx(float(lam), rel=1e-12))
    g = torch.tensor([1.7, 2.0, 2.3], dtype=F64)
    b = path_length_factor(g)
    assert float(b[1]) == pytest.approx(2.0 * math.pi, rel=1e-12)
    from scipy.integrate import quad

    for gi, bi in zip(g.tolist(), b.tolist()):  # rho = (R^2 + z^2)^(-gamma/2) at R = 1
        sigma = 2 * quad(lambda z, g=gi: (1.0 + z * z) ** (-g / 2.0), 0, np.inf)[0]
        rho2 = 2 * quad(lambda z, g=gi: (1.0 + z * z) ** (-g), 0, np.inf)[0]
        assert sigma**2 / rho2 == pytest.approx(bi, rel=1e-6)


@pytest.mark.parametrize("h_over_ell", [0.5, 2.0, 8.0, 40.0])
def test_field_variance_and_power_spectrum(h_over_ell):
    """Unit fields (128 draws on 64 x 64 cells): the cell variance c(h/l)^2 of the closed form (and of the
    discrete spectrum's sum) within 3 %, the periodogram within 6 % of pi l^2 S(k_x) S(k_y) in each of 8
    radial bins."""
    grid = _grid()
    h, M = grid.h, grid.M
    ell = h / h_over_ell
    n = 128
    f = grid.unit_field(torch.arange(1, n + 1), torch.full((n,), ell, dtype=F64))
    c2 = float(cell_variance_factor(h_over_ell))
    spec = math.pi * ell**2 * torch.outer(*(2 * [cell_spectrum_1d(grid.k_full, torch.tensor([ell]), h)[0]]))
    assert float(spec.sum()) / (M * h) ** 2 == pytest.approx(c2, rel=2e-3)  # the spectrum integrates to c^2
    assert float(f.var()) == pytest.approx(c2, rel=0.03)
    per = (torch.fft.fft2(f).abs() ** 2).mean(0) * h * h / M**2
    kk = torch.sqrt(grid.k_full[:, None] ** 2 + grid.k_full[None, :] ** 2)
    edges = torch.linspace(0.0, float(kk.max()) + 1e-9, 9)
    ratios = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (kk >= lo) & (kk < hi) & (kk > 0)
        ratios.append(float(per[sel].mean() / spec[sel].mean()))
    assert max(abs(r - 1.0) for r in ratios) < 0.06, ratios


def test_cell_kernel_is_the_uniform_square():
    """The cell kernel against a 400 x 400 midpoint sum over the square, near and far."""
    h = 0.1
    s = (torch.arange(400, dtype=F64) + 0.5) / 400 * h - h / 2
    sy, sx = torch.meshgrid(s, s, indexing="ij")
    for ox, oy in ((0.17, -0.05), (0.5, 0.31), (-1.3, 2.2)):
        dx, dy = ox - sx, oy - sy
        r2 = dx * dx + dy * dy
        ref = ((dx / r2).mean() * h * h / math.pi, (dy / r2).mean() * h * h / math.pi)
        kx, ky = cell_deflection_kernel(torch.tensor(ox, dtype=F64), torch.tensor(oy, dtype=F64), h)
        assert float(kx) == pytest.approx(float(ref[0]), rel=1e-5)
        assert float(ky) == pytest.approx(float(ref[1]), rel=1e-5)
    kx, ky = cell_deflection_kernel(torch.zeros((), dtype=F64), torch.zeros((), dtype=F64), h)
    assert float(kx) == 0.0 and float(ky) == 0.0


def _blob(grid, s, cx=0.07, cy=-0.12):
    """Cell averages of a circular Gaussian convergence of width s and total mass 1 [arcsec^2]."""
    h = grid.h
    x = grid.coord

    def cell(c):
        a = (x + h / 2 - c) / (math.sqrt(2) * s)
        b = (x - h / 2 - c) / (math.sqrt(2) * s)
        return 0.5 * (torch.special.erf(a) - torch.special.erf(b)) / h

    return (cell(cy)[:, None] * cell(cx)[None, :])[None]


@pytest.mark.parametrize("width", [3, 6])
def test_fft_deflection_against_closed_form_direct_sum_and_lenstronomy(width):
    """Cell averages of a Gaussian convergence blob (width s = 3 and 6 cells) on a 48 x 48 grid: the
    zero-padded FFT deflection equals the direct sum over cells of the uniform-square kernel (1e-10), the
    direct integration (1/pi) sum kappa(x') (x - x') / |x - x'|^2 dA (point kernel, self cell out) and
    lenstronomy's ``deflection_from_kappa_grid`` (6e-4 / 1.5e-4 of max |alpha| measured at 3 / 6 cells), and
    the closed form alpha_r = M (1 - exp(-r^2 / 2 s^2)) / (pi r) to second order in h / s (1.9 % / 0.47 %
    measured, as lenstronomy's: the discretisation of the mass, not the solver)."""
    grid = _grid(num_pix=48, delta_pix=0.05)
    h, M = grid.h, grid.M
    s, cx, cy = width * h, 0.07, -0.12
    kappa = _blob(grid, s, cx, cy)
    ax, ay = grid.deflection(kappa)
    yy, xx = torch.meshgrid(grid.coord, grid.coord, indexing="ij")
    # direct sums at every 7th node (all cells as sources)
    tgt = torch.arange(0, M * M, 7)
    fx, fy, fk = ax[0].reshape(-1)[tgt], ay[0].reshape(-1)[tgt], kappa.reshape(-1)
    dxs = xx.reshape(-1)[tgt, None] - xx.reshape(1, -1)
    dys = yy.reshape(-1)[tgt, None] - yy.reshape(1, -1)
    kx, ky = cell_deflection_kernel(dxs, dys, h)
    scale = float(torch.hypot(ax, ay).max())
    assert float((fx - kx @ fk).abs().max()) < 1e-10 * scale
    assert float((fy - ky @ fk).abs().max()) < 1e-10 * scale
    # closed form
    dx, dy = xx - cx, yy - cy
    r2 = (dx * dx + dy * dy).clamp_min(1e-30)
    a_r = -torch.expm1(-r2 / (2 * s * s)) / (math.pi * r2)
    err = torch.hypot(ax[0] - a_r * dx, ay[0] - a_r * dy).max() / scale
    assert float(err) < 0.2 / width**2, float(err)
    # the point-kernel integration of the brief (self cell excluded)
    r2p = dxs * dxs + dys * dys
    w = torch.where(r2p > 0, h * h / (math.pi * r2p.clamp_min(1e-30)), torch.zeros_like(r2p))
    assert float(torch.hypot(fx - (w * dxs) @ fk, fy - (w * dys) @ fk).max() / scale) < 6e-3 / width**2
    from lenstronomy.LensModel.convergence_integrals import deflection_from_kappa_grid

    lx, ly = deflection_from_kappa_grid(kappa[0].numpy(), h)
    lerr = np.hypot(ax[0].numpy() - lx, ay[0].numpy() - ly).max() / scale
    assert lerr < 6e-3 / width**2, lerr


def _fdm_params(grid, n=4, seed0=3, ell=0.03, sigma=0.05):
    te = torch.full((n,), 1.3, dtype=F64)
    return {
        "fdm_seed": torch.arange(seed0, seed0 + n),
        "fdm_lambda_db": torch.full((n,), 2 * math.pi * ell, dtype=F64),
        "fdm_sigma_kappa": torch.full((n,), sigma, dtype=F64),
        "theta_E": te,
        "gamma": torch.full((n,), 2.0, dtype=F64),
        "e1": torch.linspace(-0.1, 0.1, n, dtype=F64),
        "e2": torch.linspace(0.05, -0.05, n, dtype=F64),
        "center_x": torch.linspace(-0.08, 0.08, n, dtype=F64),
        "center_y": torch.linspace(0.06, -0.06, n, dtype=F64),
    }


def test_no_mass_in_any_ring_and_nodes_on_the_rays():
    """The rendered field has zero mass in every ring of width h about the lens centre (so inside any circle
    at ring edges), and no mean radial deflection on the Einstein ring; the grid's inner nodes are the
    renderer's ray positions, and interpolation there equals them."""
    pre = resolve_preset("model_ii_fdm", SMALL)
    grid = FdmGrid(pre, CPU, F64)
    p = _fdm_params(grid)
    kappa = grid.convergence(p)
    x = grid.coord
    for b in range(kappa.shape[0]):
        r = torch.hypot(x[None, :] - p["center_x"][b], x[:, None] - p["center_y"][b])
        for edge in (5, 13, 26, 40):
            inside = kappa[b][r < edge * grid.h].sum()
            assert abs(float(inside)) < 1e-9 * float(kappa[b].abs().sum())
    ax, ay = grid.ray_deflection(p)
    rx, ry = pixel_grid(pre.num_pix, pre.delta_pix, pre.supersampling, dtype=F64)
    m, n = grid.margin, grid.n_ray
    assert torch.allclose(x[m : m + n], rx[:n], atol=1e-12)
    ix, iy = grid.ray_deflection(p, rx.expand(4, -1), ry.expand(4, -1))
    assert torch.allclose(ix, ax, atol=1e-9) and torch.allclose(iy, ay, atol=1e-9)
    # mean radial deflection on the ring (theta_E = 1.3) vs its rms: bilinear at 720 angles
    phi = torch.linspace(0, 2 * math.pi, 721, dtype=F64)[:-1]
    cx, cy = p["center_x"][:, None], p["center_y"][:, None]
    px, py = cx + 1.3 * torch.cos(phi), cy + 1.3 * torch.sin(phi)
    fx, fy = grid.ray_deflection(p, px, py)
    radial = fx * torch.cos(phi) + fy * torch.sin(phi)
    rms = torch.sqrt((fx * fx + fy * fy).mean(1))
    assert bool((radial.mean(1).abs() < 0.02 * rms).all()), (radial.mean(1) / rms).tolist()


def test_monopole_paths_agree():
    """The CPU (index_add) and device (sorted cumulative sums) ring means give the same field."""
    k = torch.randn(3, 50, 50, dtype=F64, generator=torch.Generator().manual_seed(0))
    r = torch.rand(3, 50, 50, dtype=F64, generator=torch.Generator().manual_seed(1)) * 3.0
    a, b = monopole_free(k, r, 0.05, sort=False), monopole_free(k, r, 0.05, sort=True)
    assert torch.allclose(a, b, rtol=0, atol=1e-13)


def test_simulate_fdm_reproducible_paired_and_params():
    """Same seed, same bytes (also across batch sizes, with noise); an fdm image renders as its paired no_sub
    partner plus the field's deflection alone; per-image parameters stored; Triton is not asked for fdm."""
    over = {"num_pix": 32, "supersampling": 2, "class_names": ["no_sub", "fdm"]}
    a = simulate("model_ii_fdm", 130, seed=4, device="cpu", overrides=over, batch_size=64)
    b = simulate("model_ii_fdm", 130, seed=4, device="cpu", overrides=over, batch_size=128)
    assert torch.equal(a.images, b.images)
    for k in ("fdm_log10_m", "fdm_lambda_db", "fdm_sigma_kappa", "fdm_velocity_dispersion", "fdm_seed"):
        assert torch.equal(a.params[k], b.params[k]), k
    is_fdm = a.labels == a.class_names.index("fdm")
    lm = a.params["fdm_log10_m"]
    assert bool(((lm[is_fdm] >= -23.5) & (lm[is_fdm] <= -21.0)).all()) and bool((lm[~is_fdm] == 0).all())
    assert bool((a.params["fdm_sigma_kappa"][is_fdm] > 0).all())

    r = simulate("model_ii_fdm", 12, seed=2, device="cpu", overrides=SMALL, paired=True, dtype=F64)
    p, C = r.params, 3
    fdm_i = r.class_names.index("fdm")
    nosub_i = r.class_names.index("no_sub")
    for k, v in p.items():
        if not (k.startswith("fdm") or k.startswith("subhalo") or k.startswith("radial")):
            assert torch.equal(v[fdm_i::C], v[nosub_i::C]), k
    rend = Renderer(preset=r.preset, device=CPU, dtype=F64)
    idx = torch.arange(fdm_i, 12, C)
    pb = {k: v[idx] for k, v in p.items()}
    assert torch.equal(rend(pb).float(), r.images[idx])
    off = {**pb, "fdm_sigma_kappa": torch.zeros_like(pb["fdm_sigma_kappa"])}
    assert torch.equal(rend(off).float(), r.images[nosub_i::C])
    diff = (r.images[fdm_i::C] - r.images[nosub_i::C]).abs().amax(dim=(1, 2, 3))
    assert bool((diff > 0).all())

    from deeplense_ray.sim.simulate import triton_supported

    assert not triton_supported(r.preset, torch.device("cuda"), torch.float32)


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="fdm_log10_mass"):
        resolve_preset("model_ii_fdm", {"fdm_log10_mass": [-26.0, -21.0]})
    with pytest.raises(ValueError, match="fdm_amplitude"):
        resolve_preset("model_ii_fdm", {"fdm_amplitude": 0.0})
    with pytest.raises(ValueError, match="fdm_margin"):
        resolve_preset("model_ii_fdm", {"fdm_margin": -1.0})
    pre = resolve_preset("model_ii", {"class_names": ["no_sub", "cdm", "fdm"]})
    assert pre.class_names == ("no_sub", "cdm", "fdm")


@pytest.mark.parametrize("log10_m", [(-22.5, -21.0), (-23.5, -23.0)])
def test_ring_size_observer_fdm_vs_no_sub(log10_m):
    """The ring-size observer (brightness-weighted ring radius of paired noise-free images, 32 px of 0.202")
    cannot tell fdm from no_sub: AUC within 0.05 of 0.5 and a mean paired shift < 0.002" on 150 pairs, at
    the default masses, 10^-22.5 to 1e-21 eV (images change by ~0.2 % of their peak), and with resolved
    granules (log10 m -23.5 to -23, ~0.3" coherence: ~25 %)."""
    over = {"num_pix": 32, "delta_pix": 0.202, "supersampling": 1, "noise": "none",
            "class_names": ["no_sub", "fdm"], "fdm_log10_mass": list(log10_m)}  # fmt: skip
    r = simulate("model_ii_fdm", 300, seed=7, device="cpu", overrides=over, paired=True)
    p = r.params
    rr = ring_radius(r.images, p["center_x"], p["center_y"], 0.202).numpy()
    fdm_m = (r.labels == 1).numpy()
    a = auc(rr[fdm_m], rr[~fdm_m])
    assert abs(a - 0.5) < 0.05, a
    assert abs(float((rr[fdm_m] - rr[~fdm_m]).mean())) < 0.002
    rel = (r.images[1::2] - r.images[0::2]).abs().amax(dim=(1, 2, 3)) / r.images[0::2].amax(dim=(1, 2, 3))
    assert float(rel.median()) > (0.05 if log10_m[0] < -23 else 5e-4)  # the field does change the images
