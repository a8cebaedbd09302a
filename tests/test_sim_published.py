"""The as-published DeepLense presets against independent references: lenstronomy ImageModel (Model I) and
SimAPI (Model II/III) on the same drawn parameters, astropy for the luminosity-distance Einstein radii, the
closed-form statistics of Model I's noise recipe, and KS tests of the recipe's draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.constants import G, M_sun, c
from astropy.cosmology import FlatLambdaCDM
from lenstronomy.Data.imaging_data import ImageData
from lenstronomy.Data.psf import PSF
from lenstronomy.ImSim.image_model import ImageModel
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.LightModel.light_model import LightModel
from lenstronomy.SimulationAPI.sim_api import SimAPI
from lenstronomy.Util import util
from scipy import stats

from deeplense_ray.sim import get_preset, simulate
from deeplense_ray.sim.sampling import draw_parameters
from deeplense_ray.sim.simulate import Renderer

PUBLISHED = ("deeplense_model_i", "deeplense_model_ii", "deeplense_model_iii")
# the instrument numbers lenstronomy's Euclid(band='VIS', psf_type='GAUSSIAN') and HST(band='WFC3_F160W',
# psf_type='GAUSSIAN') had in 2022, passed explicitly (today's lenstronomy defaults may differ)
KWARGS_BAND = {
    "deeplense_model_ii": dict(
        pixel_scale=0.101, seeing=0.16, magnitude_zero_point=24.0, sky_brightness=22.35, exposure_time=565.0,
        num_exposures=4, read_noise=4.2, ccd_gain=3.1, psf_type="GAUSSIAN",
    ),
    "deeplense_model_iii": dict(
        pixel_scale=0.08, seeing=0.08, magnitude_zero_point=25.96, sky_brightness=22.3, exposure_time=5400.0,
        num_exposures=1, read_noise=4.0, ccd_gain=2.5, psf_type="GAUSSIAN",
    ),
}  # fmt: skip


def recipe_theta_e(mass_msun):
    """DeepLenseSim's ``mass_to_radius`` (astropy luminosity distances, astropy constants, 206265)."""
    cosmo = FlatLambdaCDM(H0=70, Om0=0.3, Ob0=0.05)
    d_l = cosmo.luminosity_distance(0.5).to(u.m)
    d_s = cosmo.luminosity_distance(1.0).to(u.m)
    theta = np.sqrt(4 * G * np.asarray(mass_msun) * M_sun / c**2 * (d_s - d_l) / (d_l * d_s))
    return (theta * 206265).value


def lenstronomy_lens(params, i):
    """The recipe's lens model list and kwargs for image i: SIE + SHEAR, then its 25 subhalos or its vortex
    of 100 point masses (positions rebuilt with numpy as DeepLenseSim's make_vortex does)."""
    g = lambda k: float(params[k][i])  # noqa: E731
    names = ["SIE", "SHEAR"]
    kw = [
        {"theta_E": g("theta_E"), "e1": g("e1"), "e2": g("e2"), "center_x": g("center_x"),
         "center_y": g("center_y")},
        {"gamma1": g("gamma1"), "gamma2": g("gamma2")},
    ]  # fmt: skip
    for k in range(int(params["subhalo_count"][i])):
        names.append("POINT_MASS")
        kw.append(
            {"theta_E": float(params["subhalo_theta_E"][i, k]), "center_x": float(params["subhalo_x"][i, k]),
             "center_y": float(params["subhalo_y"][i, k])}
        )  # fmt: skip
    if g("axion_mass") > 0:
        length = 0.06 / (2 * g("axion_mass") / 1e-22)  # DeepLenseSim axion_mass_to_length
        coords = np.linspace(-length, length, 100)
        te = recipe_theta_e(3e10 / 100)
        ang = g("vortex_angle")
        for t in coords:
            names.append("POINT_MASS")
            kw.append({"theta_E": float(te), "center_x": t * math.cos(ang), "center_y": t * math.sin(ang)})
    return names, kw


def source_kwargs(params, i, amp_key):
    g = lambda k: float(params[k][i])  # noqa: E731
    return [
        {amp_key: g("source_amp") if amp_key == "amp" else g("source_mag"), "R_sersic": g("source_R_sersic"),
         "n_sersic": g("source_n_sersic"), "e1": g("source_e1"), "e2": g("source_e2"),
         "center_x": g("source_center_x"), "center_y": g("source_center_y")}
    ]  # fmt: skip


def rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_recipe_constants_and_einstein_radii_from_luminosity_distances():
    res = simulate("deeplense_model_i", 6, seed=4, device="cpu", dtype=torch.float64)
    p = res.params
    assert recipe_theta_e(1e12) == pytest.approx(1.2815, abs=5e-5)
    np.testing.assert_allclose(p["theta_E"].numpy(), recipe_theta_e(1e12), rtol=1e-5)
    for key, value in (("e1", 0.1), ("e2", 0.0), ("center_x", 0.0), ("center_y", 0.0), ("gamma1", 0.05),
                       ("gamma2", 0.0), ("source_e1", -0.1), ("source_e2", 0.1), ("source_R_sersic", 0.25),
                       ("source_n_sersic", 1.0), ("source_amp", 20.0)):  # fmt: skip
        np.testing.assert_allclose(p[key].numpy(), value, atol=1e-12, err_msg=key)
    cdm = res.labels == res.class_names.index("cdm")
    axion = res.labels == res.class_names.index("axion")
    assert (p["subhalo_count"][cdm] == 25).all() and (p["subhalo_count"][~cdm] == 0).all()
    m = p["subhalo_mass"][cdm].numpy()
    np.testing.assert_allclose(p["subhalo_theta_E"][cdm].numpy(), recipe_theta_e(m), rtol=1e-5)
    np.testing.assert_allclose(p["vortex_theta_E"][axion].numpy(), recipe_theta_e(3e10), rtol=1e-5)
    np.testing.assert_allclose(
        p["vortex_half_length"][axion].numpy(),
        0.06 / (2 * p["axion_mass"][axion].numpy() / 1e-22),
        rtol=1e-12,
    )
    assert (p["exposure_time"] >= 10**3).all() and (p["exposure_time"] <= 10**3.5).all()
    # integer counts, the same bytes again
    assert torch.equal(res.images, res.images.round())
    again = simulate("deeplense_model_i", 6, seed=4, device="cpu", dtype=torch.float64)
    assert torch.equal(again.images, res.images)


def test_model_i_noise_free_part_matches_lenstronomy_image_model():
    pre = get_preset("deeplense_model_i")
    lab = torch.tensor([0, 1, 2])
    params = draw_parameters(pre, lab, torch.Generator().manual_seed(7), paired=False)
    ours = Renderer(preset=pre, device=torch.device("cpu"), dtype=torch.float32)(
        {k: (v.float() if v.dtype.is_floating_point else v) for k, v in params.items()}
    )[:, 0].numpy()
    # DeepLenseSim simple_sim's ImageModel: 150 x 150, 0.05", GAUSSIAN PSF FWHM 0.087 truncated at 3 sigma
    _, _, ra0, dec0, _, _, m_pix2coord, _ = util.make_grid_with_coordtransform(
        150, 0.05, center_ra=0, center_dec=0, subgrid_res=1, inverse=False
    )
    data = ImageData(image_data=np.zeros((150, 150)), ra_at_xy_0=ra0, dec_at_xy_0=dec0,
                     transform_pix2angle=m_pix2coord, background_rms=0.01, exposure_time=1000.0)  # fmt: skip
    psf = PSF(psf_type="GAUSSIAN", fwhm=0.087, pixel_size=0.05, truncation=3)
    for i in range(3):
        names, kw = lenstronomy_lens(params, i)
        model = ImageModel(
            data,
            psf,
            lens_model_class=LensModel(names),
            source_model_class=LightModel(["SERSIC_ELLIPSE"]),
            kwargs_numerics={"supersampling_factor": 1, "supersampling_convolution": False},
        )
        ref = model.image(kw, source_kwargs(params, i, "amp"))
        assert rel_l2(ours[i], ref) <= 1e-3, (i, rel_l2(ours[i], ref))
    # the classes differ (the test would catch a vortex or subhalos left out)
    assert rel_l2(ours[1], ours[0]) > 1e-3 and rel_l2(ours[2], ours[0]) > 1e-3


@pytest.mark.parametrize("name", ["deeplense_model_ii", "deeplense_model_iii"])
def test_model_ii_iii_equal_twice_the_simapi_image(name):
    res = simulate(name, 3, seed=5, device="cpu", labels=torch.tensor([0, 1, 2]))
    p = res.params
    for i in range(3):
        names, kw = lenstronomy_lens(p, i)
        # single plane, as lenstronomy was in 2022 (since 2024 a z_source_convention != z_source rescales)
        sim = SimAPI(
            64,
            kwargs_single_band=KWARGS_BAND[name],
            kwargs_model={"lens_model_list": names, "source_light_model_list": ["SERSIC_ELLIPSE"]},
        )
        im_sim = sim.image_model_class({"point_source_supersampling_factor": 1})
        _, kwargs_source, _ = sim.magnitude2amplitude(None, source_kwargs(p, i, "magnitude"))
        model = im_sim.image(kw, kwargs_source, None)
        stored = model + model
        assert rel_l2(res.images[i, 0].numpy(), stored) <= 1e-3, (name, i)
    assert float(p["source_amp"][0]) == pytest.approx(kwargs_source[0]["amp"], rel=1e-6)


def _truncated_normal_moments(mu, sd):
    """E[max(X, 0)] and E[max(X, 0)^2] for X ~ N(mu, sd^2)."""
    a = mu / sd
    cdf, pdf = stats.norm.cdf(a), stats.norm.pdf(a)
    return mu * cdf + sd * pdf, (mu * mu + sd * sd) * cdf + mu * sd * pdf


def test_model_i_noise_has_the_recipe_statistics():
    # one image (fixed source position and exposure), 2048 noise draws through simulate()
    t = 10**3.2
    over = {"num_pix": 40, "source_offset": [0.1, 0.1], "log10_exposure_time": [3.2, 3.2]}
    n = 1024
    res = simulate("deeplense_model_i", n, seed=3, device="cpu", dtype=torch.float64, classes=["no_sub"],
                   overrides=over)  # fmt: skip
    x = res.images[:, 0].numpy()
    assert np.array_equal(x, np.round(x)) and x.min() >= 0
    pre = get_preset("deeplense_model_i").replace(**over)
    params = {k: v[:1] for k, v in res.params.items()}
    img = Renderer(preset=pre, device=torch.device("cpu"), dtype=torch.float64)(params)[0, 0].numpy()
    # counts = Poisson(max(X, 0)), X = t (I + sqrt(|I|/t) z1 + 0.01 z2) ~ N(t I, t |I| + (0.01 t)^2)
    mu, sd = t * img, np.sqrt(t * np.abs(img) + (0.01 * t) ** 2)
    m1, m2 = _truncated_normal_moments(mu, sd)
    mean_th, var_th = m1, m1 + (m2 - m1 * m1)
    mean, var = x.mean(0), x.var(0, ddof=1)
    z = (mean - mean_th) / np.sqrt(var_th / n)
    assert abs(z.mean()) < 0.1 and 0.85 < z.std() < 1.15, (z.mean(), z.std())
    bright = mu > 50
    assert bright.sum() > 100
    ratio = var[bright] / var_th[bright]
    assert abs(ratio.mean() - 1) < 0.02, ratio.mean()
    # a plain Poisson draw plus the background (shot noise counted once) has less variance there
    plain = var[bright] / (mu[bright] + (0.01 * t) ** 2)
    assert plain.mean() > 1.15, plain.mean()


def test_recipe_draws_follow_the_recipe_distributions():
    pre = get_preset("deeplense_model_ii")
    n = 400
    p = draw_parameters(pre, torch.full((n,), 2), torch.Generator().manual_seed(11), paired=False)
    m = p["subhalo_mass"].flatten().numpy()
    assert m.size == 25 * n
    beta, lo, hi = -0.9, 1e6 ** (-0.9 + 1), 1e10 ** (-0.9 + 1)
    cdf = lambda mm: (np.asarray(mm) ** (beta + 1) - lo) / (hi - lo)  # noqa: E731
    assert stats.kstest(m, cdf).pvalue > 1e-3
    wrong = lambda mm: (np.asarray(mm) ** -0.9 - 1e6**-0.9) / (1e10**-0.9 - 1e6**-0.9)  # noqa: E731  slope -1.9
    assert stats.kstest(m, wrong).pvalue < 1e-6
    r = torch.hypot(p["subhalo_x"], p["subhalo_y"]).flatten().numpy()
    assert stats.kstest(r, stats.uniform(0.25, 1.75).cdf).pvalue > 1e-3
    ax = draw_parameters(pre, torch.full((n,), 1), torch.Generator().manual_seed(12), paired=False)
    assert stats.kstest(np.log10(ax["axion_mass"].numpy()), stats.uniform(-24, 2).cdf).pvalue > 1e-3
    sx = p["source_center_x"].numpy()
    assert stats.kstest(sx, stats.uniform(-0.35, 0.7).cdf).pvalue > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", PUBLISHED)
def test_triton_path_renders_the_published_presets_like_torch(name):
    from deeplense_ray.sim.simulate import simulate_with_backend, triton_supported

    pre = get_preset(name)
    if not triton_supported(pre, torch.device("cuda"), torch.float32):
        pytest.skip("triton not installed")
    over = {"noise": "none"} if name == "deeplense_model_i" else None
    a = simulate_with_backend(name, 3072, seed=2, device="cuda", backend="triton", overrides=over)
    b = simulate_with_backend(name, 3072, seed=2, device="cuda", backend="eager", overrides=over)
    d = (a.images - b.images).flatten(1).norm(dim=1) / b.images.flatten(1).norm(dim=1)
    assert float(d.max()) < 1e-5, float(d.max())
