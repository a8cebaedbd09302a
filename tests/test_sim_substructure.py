"""The normalised subhalo population (sim/substructure.py): counts, masses, tNFW, c(M), errors; the PSF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deeplense_ray.sim import get_preset, resolve_preset, simulate
from deeplense_ray.sim.substructure import (
    concentration_dg19,
    draw_subhalos,
    kpc_per_arcsec,
    tnfw_mass_factor,
)

F64 = torch.float64


def _population(preset, n: int, seed: int, theta_e: float = 1.3):
    te = torch.full((n,), theta_e, dtype=F64)
    zero = torch.zeros(n, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    return draw_subhalos(preset, te, zero, zero, torch.ones(n, dtype=torch.bool), g)


def _fixed(sigma: float, **kw):
    return resolve_preset("model_ii", {"sigma_sub": [sigma, sigma], **kw})


def test_counts_linear_in_sigma_sub_and_poisson():
    import astropy.cosmology as astropy

    pre = _fixed(2e-3)
    cosmo = astropy.FlatLambdaCDM(H0=pre.H0, Om0=pre.Om0)
    kpa = cosmo.angular_diameter_distance(pre.z_lens).to("kpc").value * math.pi / 180 / 3600
    assert abs(kpc_per_arcsec(pre.z_lens, h0=pre.H0, om0=pre.Om0) / kpa - 1) < 1e-6
    m = np.geomspace(*pre.subhalo_mass, 200001)
    dndm = (m / pre.subhalo_m_pivot) ** (-pre.subhalo_mass_slope) / pre.subhalo_m_pivot
    integral = float(np.sum(0.5 * (dndm[1:] + dndm[:-1]) * np.diff(m)))  # trapezoid, independent of ours
    area = math.pi * (3.0 * 1.3 * kpa) ** 2
    n = 3000
    for sigma in (1e-3, 2e-3, 4e-3):
        c = _population(_fixed(sigma), n, seed=1)["subhalo_count"].double()
        mu = sigma * area * integral
        assert abs(float(c.mean()) - mu) < 4.5 * math.sqrt(mu / n), (sigma, float(c.mean()), mu)
        # Poisson: variance / mean = 1 (sd of the sample ratio ~ sqrt(2 / n))
        assert abs(float(c.var()) / float(c.mean()) - 1.0) < 5 * math.sqrt(2.0 / n)


def test_masses_follow_the_slope_ks():
    from scipy import stats

    pre = _fixed(2e-3, subhalo_mass=[1e7, 1e10])
    pop = _population(pre, 60, seed=2)
    masses = pop["subhalo_mass"][pop["subhalo_mass"] > 0].double().numpy()
    lo, hi, a = 1e7, 1e10, 1.0 - pre.subhalo_mass_slope

    def cdf(m):
        return (np.asarray(m) ** a - lo**a) / (hi**a - lo**a)

    assert masses.size > 5000
    assert stats.kstest(masses, cdf).pvalue > 1e-3
    wrong = lambda m: (np.asarray(m) ** -0.8 - lo**-0.8) / (hi**-0.8 - lo**-0.8)  # noqa: E731 - slope 1.8
    assert stats.kstest(masses, wrong).pvalue < 1e-6  # the test can tell a 0.1 change of slope


def test_positions_uniform_in_the_disk_and_diagnostics():
    pre = _fixed(2e-3)
    pop = _population(pre, 200, seed=3)
    k = pop["subhalo_mass"] > 0
    r = torch.hypot(pop["subhalo_x"], pop["subhalo_y"])[k].double()
    assert float(r.max()) <= 3 * 1.3 + 1e-5
    # uniform in area: (r / R)^2 is U(0, 1): mean 1/2
    u = (r / 3.9) ** 2
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / u.numel())
    i = int(torch.argmax(pop["subhalo_count"]))
    row = pop["subhalo_mass"][i].double()
    j = int(torch.argmax(row))
    assert math.isclose(float(pop["subhalo_max_mass"][i]), float(row[j]), rel_tol=1e-6)
    ring = abs(math.hypot(float(pop["subhalo_x"][i, j]), float(pop["subhalo_y"][i, j])) - 1.3)
    assert math.isclose(float(pop["subhalo_max_ring_distance"][i]), ring, abs_tol=1e-5)
    # f_sub recomputed from the stored subhalos: their mass in the annulus 0.5-1.5 theta_E over the isothermal
    # macro lens's mass there, pi Sigma_crit theta_E^2, with Sigma_crit from astropy's distances
    from astropy import constants, units
    from astropy.cosmology import FlatLambdaCDM

    cosmo = FlatLambdaCDM(H0=pre.H0, Om0=pre.Om0)
    d_l = cosmo.angular_diameter_distance(pre.z_lens)
    d_s, d_ls = cosmo.angular_diameter_distance(pre.z_source), cosmo.angular_diameter_distance_z1z2(
        pre.z_lens, pre.z_source
    )
    sigma_crit = constants.c**2 * d_s / (4 * math.pi * constants.G * d_l * d_ls) * (d_l / units.rad) ** 2
    sigma_crit = sigma_crit.to(units.Msun / units.arcsec**2).value
    # a tNFW subhalo counts its truncated total mass (Baltz, Marshall & Oguri 2009, tau = r_t / r_s):
    # M200 F(tau) / m(c), F = tau^2 / (tau^2 + 1)^2 [(tau^2 - 1) ln tau + pi tau - (tau^2 + 1)]
    assert pre.subhalo_profile == "tnfw"
    c = pop["subhalo_concentration"].double().clamp(min=1e-9)
    tau = (pop["subhalo_r_trunc"].double() / pop["subhalo_Rs"].double().clamp(min=1e-30)).clamp(min=1e-9)
    f_tau = tau**2 / (tau**2 + 1) ** 2 * ((tau**2 - 1) * torch.log(tau) + math.pi * tau - (tau**2 + 1))
    mass = pop["subhalo_mass"].double() * f_tau / (torch.log1p(c) - c / (1 + c))
    rad = torch.hypot(pop["subhalo_x"], pop["subhalo_y"]).double()
    in_annulus = (rad > 0.5 * 1.3) & (rad < 1.5 * 1.3) & (pop["subhalo_mass"] > 0)
    expect = (mass * in_annulus).sum(1) / (math.pi * sigma_crit * 1.3**2)
    f = pop["subhalo_mass_fraction_arc"]
    assert float(expect.max()) > 0
    torch.testing.assert_close(f.double(), expect, rtol=1e-4, atol=0.0)


def test_tnfw_population_against_lenstronomy():
    from astropy.cosmology import FlatLambdaCDM
    from lenstronomy.Cosmo.lens_cosmo import LensCosmo
    from lenstronomy.LensModel.lens_model import LensModel

    pre = _fixed(2e-3)
    pop = _population(pre, 2, seed=4)
    n = int(pop["subhalo_count"][0])
    assert n > 20
    lc = LensCosmo(pre.z_lens, pre.z_source, cosmo=FlatLambdaCDM(H0=pre.H0, Om0=pre.Om0))
    kwargs = []
    for j in range(n):
        m, c = float(pop["subhalo_mass"][0, j]), float(pop["subhalo_concentration"][0, j])
        rs, alpha_rs = lc.nfw_physical2angle(m, c)
        # 1e-3: lenstronomy's physical constants and astropy's distances (as the fixed-c test)
        assert abs(float(pop["subhalo_Rs"][0, j]) / rs - 1) < 1e-3
        assert abs(float(pop["subhalo_alpha_Rs"][0, j]) / alpha_rs - 1) < 1e-3
        kwargs.append(
            {"Rs": rs, "alpha_Rs": alpha_rs, "r_trunc": float(pop["subhalo_r_trunc"][0, j]),
             "center_x": float(pop["subhalo_x"][0, j]), "center_y": float(pop["subhalo_y"][0, j])}
        )  # fmt: skip
    # the summed deflection the renderer computes for this image equals lenstronomy's
    from deeplense_ray.sim.simulate import _subhalo_alpha

    rng = np.random.default_rng(0)
    x, y = rng.uniform(-3, 3, 300), rng.uniform(-3, 3, 300)
    sub = {k: pop[k][:1, :n].double() for k in ("subhalo_Rs", "subhalo_alpha_Rs", "subhalo_r_trunc")}
    sub.update(subhalo_x=pop["subhalo_x"][:1, :n].double(), subhalo_y=pop["subhalo_y"][:1, :n].double())
    for k, kw in zip(("subhalo_Rs", "subhalo_alpha_Rs"), ("Rs", "alpha_Rs")):
        sub[k] = torch.tensor([[d[kw] for d in kwargs]], dtype=F64)
    ax, ay = _subhalo_alpha(torch.tensor(x)[None], torch.tensor(y)[None], sub, "tnfw")
    rx, ry = LensModel(["TNFW"] * n).alpha(x, y, kwargs)
    err = np.hypot(ax[0].numpy() - rx, ay[0].numpy() - ry).max() / np.hypot(rx, ry).max()
    assert err < 1e-6
    # truncated total mass: far away a tNFW deflects like a point mass of M200 tnfw_mass_factor / m(c)
    kw = kwargs[0]
    tau = torch.tensor(kw["r_trunc"] / kw["Rs"], dtype=F64)
    far = 3000.0 * kw["r_trunc"]
    a_far = LensModel(["TNFW"]).alpha(far + kw["center_x"], kw["center_y"], [kw])[0]
    theta2 = kw["alpha_Rs"] * kw["Rs"] * float(tnfw_mass_factor(tau)) / (1 + math.log(0.5))
    assert abs(a_far * far / theta2 - 1) < 1e-3


def test_concentration_relation_against_colossus():
    """paltas' DG19 c(M, z) = c0 (1+z)^zeta (nu(M, z) / nu(m_ref, 0))^-beta with colossus peak heights."""
    import colossus.cosmology.cosmology as colossus
    from colossus.lss import peaks

    cosmo = colossus.setCosmology(
        "deeplense_test", params=dict(flat=True, H0=70, Om0=0.3, Ob0=0.05, sigma8=0.81, ns=0.96)
    )
    h = cosmo.h
    masses = np.array([10**7.2, 1e8, 10**8.7, 1e9, 10**9.6, 1e10])
    for z in (0.3, 0.5):
        nu_ratio = peaks.peakHeight(masses * h, z) / peaks.peakHeight(1e8 * h, 0)
        ref = 17.0 * (1 + z) ** -0.25 * nu_ratio**-0.7
        ours = concentration_dg19(
            torch.tensor(masses, dtype=F64), z, c0=17.0, zeta=-0.25, beta=0.7, m_ref=1e8, om0=0.3
        ).numpy()
        np.testing.assert_allclose(ours, ref, rtol=3e-3)


def test_concentration_scatter_in_dex():
    pre = _fixed(2e-3)
    pop = _population(pre, 40, seed=5)
    k = pop["subhalo_mass"] > 0
    m, c = pop["subhalo_mass"][k].double(), pop["subhalo_concentration"][k].double()
    mean = concentration_dg19(m, 0.5, c0=17, zeta=-0.25, beta=0.7, m_ref=1e8, om0=0.3)
    lc = torch.log10(c / mean)
    assert lc.numel() > 2000
    assert abs(float(lc.mean())) < 4 * 0.13 / math.sqrt(lc.numel())
    assert abs(float(lc.std()) / 0.13 - 1) < 0.05


@pytest.mark.parametrize(
    "override, match",
    [
        ({"sigma_sub": [-1e-3, 2e-3]}, r"'sigma_sub' = \[-0.001, 0.002\]"),
        ({"subhalo_mass": [1e9, 1e9]}, r"'subhalo_mass' = \[1000000000.0, 1000000000.0\].*m_min < m_max"),
        ({"subhalo_mass": [1e10, 1e9]}, r"'subhalo_mass'.*low <= high"),
        ({"subhalo_profile": "nfw"}, r"'subhalo_profile' = 'nfw'.*one of \['point_mass', 'tnfw'\]"),
        ({"subhalo_concentration_model": "duffy"}, r"'subhalo_concentration_model' = 'duffy'"),
        ({"subhalo_m_pivot": 0.0}, r"'subhalo_m_pivot' = 0.0"),
        ({"subhalo_conc_scatter": -0.1}, r"'subhalo_conc_scatter' = -0.1"),
        ({"sigma_sub": [0.0, 1.0], "subhalo_mass": [1e7, 1e10]}, r"'sigma_sub'.*<= 100000 subhalos"),
        ({"sigma_sub": [0.0, 5.0]}, r"'sigma_sub' = \[0.0, 5.0\].*\[0.0, 1.0\]"),
    ],
)
def test_bad_population_fields_fail_before_work(override, match):
    with pytest.raises(ValueError, match=match):
        simulate("model_ii", 10**9, seed=0, device="cpu", overrides=override)  # fails before any draw


def test_physical_presets_use_the_population_and_current_euclid():
    from lenstronomy.SimulationAPI.ObservationConfig.Euclid import Euclid

    vis = Euclid(band="VIS", psf_type="GAUSSIAN", coadd_years=6).kwargs_single_band()
    p = get_preset("model_ii")
    assert (p.delta_pix, p.psf_fwhm, p.exposure_time_single, p.num_exposures) == (
        vis["pixel_scale"], vis["seeing"], vis["exposure_time"], vis["num_exposures"],
    )  # fmt: skip
    assert (p.sky_brightness, p.zero_point, p.read_noise, p.gain) == (
        vis["sky_brightness"], vis["magnitude_zero_point"], vis["read_noise"], vis["ccd_gain"],
    )  # fmt: skip
    for name in ("model_i", "model_ii", "model_iii", "real_galaxy_tiny"):
        q = get_preset(name)
        assert q.sigma_sub == (0.0, 4e-3) and q.subhalo_profile == "tnfw" and q.supersampling_convolution
    assert get_preset("deeplense_model_ii").sigma_sub is None  # the published recipe keeps 25 point masses


def test_supersampled_psf_converges_to_a_fine_reference():
    """PSF on the supersampled grid (then binned) converges to a finely supersampled render as ss grows;
    binning first (the old default) keeps a ~4% error: 0.16" FWHM on 0.101" pixels is undersampled."""
    base = {"noise": "none", "num_pix": 24, "class_names": ["no_sub"], "source_R_sersic": [0.15, 0.15]}

    def err(ss, conv):
        o = {**base, "supersampling": ss, "supersampling_convolution": conv}
        im = simulate("model_ii", 4, seed=9, device="cpu", overrides=o, dtype=F64).images
        return float((im - ref).norm() / ref.norm())

    o = {**base, "supersampling": 12, "supersampling_convolution": True}
    ref = simulate("model_ii", 4, seed=9, device="cpu", overrides=o, dtype=F64).images
    new2, new4, old2, old4 = err(2, True), err(4, True), err(2, False), err(4, False)
    assert new4 < 0.5 * new2 and new4 < 0.02  # converges
    assert old4 > 0.8 * old2 and old4 > 3 * new4  # plateaus: the error is the PSF's, not the sampling's
