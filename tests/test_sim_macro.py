"""The realistic macro model of the physical presets, against lenstronomy and closed forms: EPL deflections,
multipoles, images, the slope prior, class independence, subhalo depths, lens-light subtraction, source
magnitudes, model_iii's PSF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lenstronomy.LensModel.lens_model import LensModel
from scipy import stats

from deeplense_ray.sim import simulate
from deeplense_ray.sim.lens import alpha_epl, alpha_multipole, alpha_sie, epl_series_terms
from deeplense_ray.sim.presets import get_preset, resolve_preset
from deeplense_ray.sim.simulate import Renderer, macro_kind, simulate_with_backend
from deeplense_ray.sim.substructure import host_profile_kpc, kpc_per_arcsec

F64 = torch.float64


def _t(v):
    return torch.tensor(v, dtype=F64)


def _hidden_epl_draws(rng, n):
    """Random EPL parameters: q in [0.5, 1], gamma in [1.6, 2.4], theta_E, centre."""
    for _ in range(n):
        q, ph = rng.uniform(0.5, 1.0), rng.uniform(0, math.pi)
        c = (1 - q) / (1 + q)
        yield {
            "theta_E": rng.uniform(0.6, 2.0),
            "gamma": rng.uniform(1.6, 2.4),
            "e1": c * math.cos(2 * ph),
            "e2": c * math.sin(2 * ph),
            "center_x": rng.uniform(-0.2, 0.2),
            "center_y": rng.uniform(-0.2, 0.2),
        }


def test_epl_deflection_matches_lenstronomy_float64():
    rng = np.random.default_rng(20260)
    x = np.concatenate([rng.uniform(-4, 4, 3000), rng.normal(0, 0.05, 200)])
    y = np.concatenate([rng.uniform(-4, 4, 3000), rng.normal(0, 0.05, 200)])
    lm = LensModel(["EPL"])
    terms = epl_series_terms(0.5, 2.4)
    assert terms <= 12  # short series at the presets' q >= 0.6: 8 terms
    for kw in _hidden_epl_draws(rng, 40):
        ax, ay = lm.alpha(x, y, [kw])
        bx, by = alpha_epl(_t(x), _t(y), *(_t(kw[k]) for k in lenstronomy_order()), n_terms=terms)
        rel = np.hypot(bx.numpy() - ax, by.numpy() - ay) / np.hypot(ax, ay)
        assert rel.max() < 1e-5, kw


def lenstronomy_order():
    return ("theta_E", "gamma", "e1", "e2", "center_x", "center_y")


def test_epl_series_terms_meet_their_bound_and_gamma_2_is_the_sie():
    rng = np.random.default_rng(3)
    x, y = _t(rng.uniform(-3, 3, 2000)), _t(rng.uniform(-3, 3, 2000))
    lm = LensModel(["EPL"])
    for q_min, g_max in ((0.6, 2.3), (0.3, 2.5), (0.9, 2.1)):
        n = epl_series_terms(q_min, g_max, rtol=1e-6)
        c = (1 - q_min) / (1 + q_min)
        kw = {"theta_E": 1.2, "gamma": g_max, "e1": c, "e2": 0.0, "center_x": 0.0, "center_y": 0.0}
        ax, ay = lm.alpha(x.numpy(), y.numpy(), [kw])
        for terms, ok in ((n, True), (n // 2, False)):
            bx, by = alpha_epl(x, y, *(_t(kw[k]) for k in lenstronomy_order()), n_terms=terms)
            rel = float(np.max(np.hypot(bx.numpy() - ax, by.numpy() - ay) / np.hypot(ax, ay)))
            assert (rel < 1.5e-6) == ok, (q_min, g_max, terms, rel)
    sx, sy = alpha_sie(x, y, _t(1.3), _t(0.15), _t(-0.1), _t(0.05), _t(0.0))
    ex, ey = alpha_epl(x, y, _t(1.3), _t(2.0), _t(0.15), _t(-0.1), _t(0.05), _t(0.0), n_terms=12)
    assert float(torch.max(torch.hypot(ex - sx, ey - sy) / torch.hypot(sx, sy))) < 1e-7


@pytest.mark.parametrize("m", [1, 3, 4])
def test_multipoles_match_lenstronomy(m):
    rng = np.random.default_rng(m)
    x, y = rng.uniform(-3, 3, 3000), rng.uniform(-3, 3, 3000)
    lm = LensModel(["MULTIPOLE"])
    for _ in range(5):
        kw = {
            "m": m,
            "a_m": rng.uniform(0.001, 0.03),
            "phi_m": rng.uniform(-math.pi, math.pi),
            "center_x": rng.uniform(-0.1, 0.1),
            "center_y": rng.uniform(-0.1, 0.1),
            "r_E": rng.uniform(0.8, 2),
        }
        ax, ay = lm.alpha(x, y, [kw])
        bx, by = alpha_multipole(
            _t(x), _t(y), m, *(_t(kw[k]) for k in ("a_m", "phi_m", "center_x", "center_y", "r_E"))
        )
        assert np.max(np.hypot(bx.numpy() - ax, by.numpy() - ay)) < 1e-12 * max(1.0, np.abs(ax).max())


def test_physical_presets_render_epl_with_multipoles_like_lenstronomy():
    """model_ii's no_sub images (EPL + m = 1, 3, 4 + shear + Sersic, PSF on the supersampled grid) against
    lenstronomy's ImageModel, float32 renderer vs float64 reference."""
    from tests.test_sim_compat import _kwargs_from_params, _rel_l2, lenstronomy_reference

    over = {
        "num_pix": 40,
        "noise": "none",
        "source_amp": [5.0, 10.0],
        "lens_multipole_a3": [0.02, 0.04],
        "lens_multipole_a4": [0.02, 0.04],
    }
    res = simulate("model_ii", 3, seed=11, device="cpu", classes=["no_sub"], overrides=over)
    pre = res.preset
    assert macro_kind(pre) == (8, (1, 3, 4))
    assert not torch.all(res.params["gamma"] == 2.0)
    for i in range(3):
        cfg = _kwargs_from_params(res.params, i, pre.max_subhalos)
        assert cfg[0][0] == "EPL" and cfg[0].count("MULTIPOLE") == 3
        ref = lenstronomy_reference(
            *cfg, pre.num_pix, pre.delta_pix, pre.supersampling, pre.psf_fwhm, ss_conv=True
        )
        assert _rel_l2(res.images[i, 0].numpy(), ref) <= 1e-3, i
        # the multipoles matter at this level: the same image without them is far off
        no_mp = [c for c in zip(cfg[0], cfg[1]) if c[0] != "MULTIPOLE"]
        ref0 = lenstronomy_reference(
            [c[0] for c in no_mp],
            [c[1] for c in no_mp],
            *cfg[2:],
            pre.num_pix,
            pre.delta_pix,
            pre.supersampling,
            pre.psf_fwhm,
            ss_conv=True,
        )
        assert _rel_l2(ref0, ref) > 1e-2


def test_slope_prior_is_the_truncated_normal_and_macro_draws_are_class_independent():
    pre = get_preset("model_ii")
    assert pre.lens_profile == "epl" and pre.lens_gamma == (1.7, 2.3) and pre.lens_gamma_sd == 0.1
    over = {"num_pix": 8, "supersampling": 1, "noise": "none"}
    n = 3000
    a = simulate(
        "model_ii", n, seed=5, device="cpu", overrides=over, labels=torch.zeros(n, dtype=torch.int64)
    )
    g = a.params["gamma"].double().numpy()
    ref = stats.truncnorm(-3, 3, loc=2.0, scale=0.1)
    assert stats.kstest(g, ref.cdf).pvalue > 1e-3
    assert stats.kstest(g, stats.uniform(1.7, 0.6).cdf).pvalue < 1e-6  # not the uniform U(1.7, 2.3)
    for m, hi in ((1, 0.005), (3, 0.01), (4, 0.01)):
        rel = (a.params[f"multipole_a{m}"] / a.params["theta_E"]).double().numpy()
        assert stats.kstest(rel, stats.uniform(0, hi).cdf).pvalue > 1e-3
        phi = a.params[f"multipole_phi{m}"].double().numpy()
        assert phi.min() >= 0 and phi.max() < 2 * math.pi / m
    # class independence (the cdm images' theta_E and gamma are set by the mass compensation, not drawn anew)
    n = 200
    a, b = (
        simulate(
            "model_ii", n, seed=5, device="cpu", overrides=over, labels=torch.full((n,), c, dtype=torch.int64)
        )
        for c in (0, 2)
    )
    keys = ["e1", "source_amp"] + [f"multipole_{k}{m}" for m in (1, 3, 4) for k in ("a", "phi")]
    for k in keys:
        assert torch.equal(a.params[k], b.params[k]), k
    drawn = b.params["gamma"].double() + b.params["gamma_compensation"].double()
    assert torch.allclose(a.params["gamma"].double(), drawn, rtol=0, atol=1e-6)
    # the published presets keep the SIE and draw nothing new (their bytes are pinned elsewhere)
    p = simulate("deeplense_model_ii", 4, seed=1, device="cpu")
    assert torch.all(p.params["gamma"] == 2.0) and "multipole_a1" not in p.params


def test_subhalo_depths_follow_paltas_cored_nfw_not_the_uniform_slab():
    """3D radii of drawn subhalos (from their DG19 truncation radii) against paltas' rejection sampling of a
    cored NFW within the cylinder R < 3 theta_E, |z| < r200 (numpy, independent of the sampler)."""
    over = {
        "theta_E": [1.3, 1.3],
        "sigma_sub": [0.02, 0.02],
        "num_pix": 8,
        "supersampling": 1,
        "noise": "none",
    }
    res = simulate("model_ii", 40, seed=2, device="cpu", classes=["cdm"], overrides=over)
    pre, p = res.preset, res.params
    kpa = kpc_per_arcsec(pre.z_lens, h0=pre.H0, om0=pre.Om0)
    present = p["subhalo_mass"] > 0
    rt_kpc = p["subhalo_r_trunc"][present].double().numpy() * kpa
    m = p["subhalo_mass"][present].double().numpy()
    r3d = 50.0 * (rt_kpc / (1.4 * (m / 1e7) ** (1 / 3))) ** 1.5
    R = (
        np.hypot(
            p["subhalo_x"][present].double().numpy()
            - p["center_x"][:, None].expand_as(present)[present].double().numpy(),
            p["subhalo_y"][present].double().numpy()
            - p["center_y"][:, None].expand_as(present)[present].double().numpy(),
        )
        * kpa
    )
    assert r3d.size > 3000 and np.all(r3d >= R - 1e-2)
    r200, rs = host_profile_kpc(pre)
    rng = np.random.default_rng(0)
    rc, xc = r200 / 2, r200 / 2 / rs
    r_max = math.hypot(3 * 1.3 * kpa, r200)
    grid = np.linspace(0, r_max, 4000)
    x = grid / rs
    cdf = np.minimum(grid, rc) ** 3 / (3 * rs**3 * xc * (1 + xc) ** 2) + np.where(
        grid > rc, (1 / (x + 1) + np.log(x + 1)) - (1 / (xc + 1) + np.log(xc + 1)), 0.0
    )
    ref = []
    while sum(map(len, ref)) < 20000:
        r = np.interp(rng.random(2_000_000), cdf / cdf[-1], grid)
        cos_t = 1 - 2 * rng.random(r.size)
        Rp, zp = r * np.sqrt(1 - cos_t**2), r * cos_t
        ref.append(r[(Rp < 3 * 1.3 * kpa) & (np.abs(zp) < r200)])
    ref = np.concatenate(ref)
    assert stats.ks_2samp(r3d, ref).pvalue > 1e-3
    uniform_slab = np.hypot(R, rc * (2 * rng.random(R.size) - 1))  # |z| uniform in r200 / 2
    assert stats.ks_2samp(uniform_slab, ref).pvalue < 1e-6
    assert 0.2 < np.mean(r3d > rc) < 0.4  # the NFW tail beyond r200 / 2 (paltas: ~30 %)


def test_lens_light_subtraction_keeps_its_noise_and_removes_its_model():
    pre = get_preset("model_ii_lens_light")
    assert pre.lens_light and not pre.lens_light_subtracted and pre.noise == "instrument"
    over = {"num_pix": 24}
    n = 128
    full = simulate(pre, n, seed=9, device="cpu", classes=["no_sub"], overrides=over)
    sub = simulate(
        pre, n, seed=9, device="cpu", classes=["no_sub"], overrides={**over, "lens_light_subtracted": True}
    )
    r = Renderer(preset=full.preset, device=torch.device("cpu"), dtype=torch.float32)
    ll = r.lens_light_image(full.params)
    total = r(full.params)  # noise-free lens light + arcs
    assert torch.allclose(sub.images, full.images - ll, rtol=1e-5, atol=1e-6)
    c = slice(10, 14)  # the centre: lens light dominates
    resid = (sub.images - (total - ll))[:, 0, c, c]
    assert abs(float(resid.mean())) < 3 * float(resid.std()) / math.sqrt(resid.numel())  # unbiased
    t = float(full.params["exposure_time"][0])
    sky = float(full.params["background_rate"][0])
    rn = float(full.params["read_noise_rms"][0])
    expect = torch.sqrt((total[:, 0, c, c] + sky) / t + (rn / t) ** 2)  # Poisson of lens light + arcs + sky
    assert 0.9 < float(resid.std() / expect.pow(2).mean().sqrt()) < 1.1
    assert float(ll[:, 0, c, c].mean()) > 5 * float(expect.mean())  # the lens light is bright there


def test_source_magnitudes_from_galaxy_counts():
    over = {"source_mag": [22.5, 25.5], "source_mag_dist": "counts", "num_pix": 8, "supersampling": 1}
    res = simulate("model_ii", 4000, seed=4, device="cpu", classes=["no_sub"], overrides=over)
    mag = res.params["source_mag"].double().numpy()
    s, lo, hi = 0.3, 22.5, 25.5
    cdf = lambda m: (10 ** (s * (m - lo)) - 1) / (10 ** (s * (hi - lo)) - 1)  # noqa: E731
    assert stats.kstest(mag, cdf).pvalue > 1e-3
    assert stats.kstest(mag, stats.uniform(lo, hi - lo).cdf).pvalue < 1e-6
    assert abs(np.median(mag) - (lo + math.log10(1 + 0.5 * (10 ** (s * 3) - 1)) / s)) < 0.05


def test_model_iii_psf_and_bad_macro_fields():
    assert get_preset("model_iii").psf_fwhm == 0.151
    assert get_preset("deeplense_model_iii").psf_fwhm == 0.08
    for over, match in (
        ({"lens_gamma": [1.8, 2.2], "lens_profile": "sie"}, "lens_profile"),
        ({"lens_gamma": [0.9, 2.2]}, "lens_gamma"),
        ({"lens_gamma_sd": -0.1}, "lens_gamma_sd"),
        ({"lens_profile": "pemd"}, "lens_profile"),
        ({"lens_multipole_a4": [0.0, 0.5]}, "lens_multipole_a4"),
        ({"source_mag_dist": "collett"}, "source_mag_dist"),
        ({"lens_light_subtracted": True, "noise": "deeplense_x2"}, "lens_light_subtracted"),
    ):
        with pytest.raises(ValueError, match=match):
            resolve_preset("model_ii", over)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "over",
    [
        {
            "lens_q": [0.4, 1.0],
            "lens_gamma": [1.6, 2.4],
            "lens_multipole_a1": [0.02, 0.05],
            "lens_multipole_a3": [0.02, 0.05],
            "lens_multipole_a4": [0.02, 0.05],
        },
        {"lens_profile": "sie", "lens_gamma": [2.0, 2.0], "lens_gamma_sd": 0.0},
    ],
)
def test_gpu_triton_epl_multipoles_match_float64_torch(over):
    """The Triton kernel's EPL series and multipoles (strong ones, more terms) against the float64 torch
    renderer, every class."""
    from deeplense_ray.sim.simulate import triton_supported

    pre = resolve_preset("model_ii", {"noise": "none", **over})
    if not triton_supported(pre, torch.device("cuda"), torch.float32):
        pytest.skip("triton not installed")
    a = simulate_with_backend(pre, 96, seed=6, device="cuda", backend="eager", dtype=torch.float64)
    b = simulate_with_backend(pre, 96, seed=6, device="cuda", backend="triton")
    err = (a.images - b.images).flatten(1).norm(dim=1) / a.images.flatten(1).norm(dim=1)
    assert float(err.max()) < 1e-4
