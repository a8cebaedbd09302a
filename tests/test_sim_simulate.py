"""simulate(): determinism, labels, shapes, class independence, paired mode, noise levels, errors."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from deeplense_ray.sim import PRESETS, get_preset, list_presets, resolve_preset, simulate
from deeplense_ray.sim.sampling import draw_parameters
from deeplense_ray.sim.simulate import Renderer
from deeplense_ray.sim.sources import load_source_library

SMALL = {"num_pix": 24, "supersampling": 1}


def test_presets_listed_and_round_trip_json():
    expected = {"model_i", "model_ii", "model_iii", "real_galaxy_tiny", "deeplense_model_i"}
    assert expected <= set(list_presets())
    for name in list_presets():
        p = get_preset(name)
        d = json.loads(json.dumps(p.to_dict()))
        assert resolve_preset(d) == p
    assert get_preset("model_i").num_pix == 150 and get_preset("model_i").delta_pix == 0.05
    assert get_preset("model_i").psf_fwhm == 0.087
    assert get_preset("model_ii").num_pix == 64 and get_preset("model_ii").delta_pix == 0.101
    assert get_preset("model_iii").delta_pix == 0.08
    assert get_preset("real_galaxy_tiny").class_names == ("no_sub", "cdm")
    assert PRESETS["model_ii"].class_names == ("no_sub", "axion", "cdm")


def test_determinism_independent_of_batch_size():
    a = simulate("model_ii", 100, seed=11, device="cpu", overrides=SMALL, batch_size=64)
    b = simulate("model_ii", 100, seed=11, device="cpu", overrides=SMALL, batch_size=128)
    c = simulate("model_ii", 100, seed=11, device="cpu", overrides=SMALL)
    assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    d = simulate("model_ii", 100, seed=12, device="cpu", overrides=SMALL)
    assert not torch.equal(a.images, d.images)
    # a prefix of the labels gives the same macro lenses (the stream does not depend on the labels)
    e = simulate(
        "model_ii", 100, seed=11, device="cpu", overrides=SMALL, labels=torch.zeros(100, dtype=torch.int64)
    )
    drawn = lambda r: r.params["theta_E"] + r.params["theta_E_compensation"]  # noqa: E731 - before compensation
    assert torch.allclose(drawn(e), drawn(a), rtol=0, atol=1e-6)
    assert torch.equal(e.params["theta_E"], drawn(e))  # no_sub: nothing to compensate


def test_result_layout_labels_and_class_masks():
    r = simulate("model_i", 9, seed=0, device="cpu", overrides=SMALL)
    assert r.images.shape == (9, 1, 24, 24) and r.images.dtype == torch.float32
    assert r.labels.dtype == torch.int64 and r.labels.tolist() == [0, 1, 2] * 3
    assert r.class_names == ("no_sub", "axion", "cdm") and r["images"] is r.images
    assert torch.isfinite(r.images).all()
    K = get_preset("model_i").max_subhalos
    for k, v in r.params.items():
        assert v.shape[0] == 9, k
    assert r.params["subhalo_mass"].shape == (9, K)
    cdm, axion, none = r.labels == 2, r.labels == 1, r.labels == 0
    count = r.params["subhalo_count"]
    assert (count[cdm] > 0).all() and (count[~cdm] == 0).all()  # Poisson, mean ~100 per cdm image here
    m = r.params["subhalo_mass"][cdm]
    filled = torch.arange(K)[None, :] < count[cdm][:, None]
    assert (m[filled] >= 10**8.5 * (1 - 1e-6)).all() and float(m.max()) <= 1e10 * (1 + 1e-6)
    assert (m[~filled] == 0).all() and (r.params["subhalo_mass"][~cdm] == 0).all()
    am = r.params["axion_mass"]
    assert (am[~axion] == 0).all() and ((am[axion] >= 1e-24 * 0.999) & (am[axion] <= 1e-22 * 1.001)).all()
    hl = r.params["vortex_half_length"][axion].double()
    assert torch.allclose(hl, 0.03 * 1e-22 / am[axion].double(), rtol=1e-5)
    # explicit labels and class subsets
    r2 = simulate("model_i", 4, seed=0, device="cpu", overrides=SMALL, labels=torch.tensor([2, 2, 0, 1]))
    assert r2.labels.tolist() == [2, 2, 0, 1]
    r3 = simulate("model_i", 4, seed=0, device="cpu", overrides=SMALL, classes=["cdm", "no_sub"])
    assert r3.labels.tolist() == [2, 0, 2, 0]
    assert not (r.params["vortex_theta_E"][none] != 0).any()


def test_macro_parameters_class_independent():
    """Two-sample KS tests: the macro lens and source do not depend on the class."""
    from scipy import stats

    pre = get_preset("model_ii")
    n = 6000
    labels = torch.arange(n) % 3
    p = draw_parameters(pre, labels, torch.Generator().manual_seed(5), paired=False)
    # the drawn main deflector (the rendered one gives up the substructure's mass inside the ring)
    p["theta_E"] = p["theta_E"] + p["theta_E_compensation"]
    keys = [
        "theta_E",
        "e1",
        "e2",
        "gamma1",
        "gamma2",
        "center_x",
        "source_center_x",
        "source_R_sersic",
        "source_n_sersic",
        "source_amp",
    ]
    pvals = []
    for k in keys:
        for a, b in ((0, 1), (0, 2), (1, 2)):
            pvals.append(stats.ks_2samp(p[k][labels == a].numpy(), p[k][labels == b].numpy()).pvalue)
    # 30 tests: under independence a p-value < 1e-4 anywhere has probability ~3e-3
    assert min(pvals) > 1e-4
    # the substructure does differ (sanity check that the test can fail)
    assert (
        stats.ks_2samp(
            p["subhalo_count"][labels == 0].numpy(), p["subhalo_count"][labels == 2].numpy()
        ).pvalue
        < 1e-6
    )


def test_paired_mode_shares_macro_lens_and_source():
    r = simulate("model_ii", 6, seed=4, device="cpu", overrides=SMALL, paired=True)
    drawn = r.params["theta_E"] + r.params["theta_E_compensation"]  # before compensation (float32 sum)
    assert torch.allclose(drawn, drawn[[0, 0, 0, 3, 3, 3]], rtol=0, atol=1e-6) and drawn[0] != drawn[3]
    for k in ("e1", "gamma2", "source_center_x", "source_amp", "source_mag"):
        v = r.params[k]
        assert torch.equal(v[0:3], v[0:1].expand(3)) and torch.equal(v[3:6], v[3:4].expand(3)), k
        assert v[0] != v[3]
    assert r.labels.tolist() == [0, 1, 2, 0, 1, 2]
    # the no_sub and cdm images of a pair differ only by the substructure (+ noise): noise-free check
    r0 = simulate("model_ii", 3, seed=4, device="cpu", overrides={**SMALL, "noise": "none"}, paired=True)
    diff = (r0.images[2] - r0.images[0]).abs().sum() / r0.images[0].abs().sum()
    assert 0 < float(diff) < 0.5


def test_noise_levels_match_settings():
    # model_i ('snr'): blank-sky rms = sigma_bkg
    over = {
        "num_pix": 60,
        "supersampling": 1,
        "theta_E": [0.3, 0.3],
        "source_R_sersic": [0.05, 0.05],
        "source_offset": [0.0, 0.0],
        "subhalo_radius": [0.1, 0.2],
    }
    r = simulate("model_i", 64, seed=2, device="cpu", overrides=over)
    corner = r.images[:, 0, :15, :15]
    assert abs(float(corner.std()) / 0.01 - 1) < 0.05
    # model_ii ('instrument'): sqrt(sky t + n rn^2) / t per pixel [e-/s]
    pre = get_preset("model_ii")
    t = pre.exposure_time_single * pre.num_exposures
    sky = 10 ** (-0.4 * (pre.sky_brightness - pre.zero_point)) * pre.delta_pix**2
    expect = math.sqrt(sky * t + pre.num_exposures * pre.read_noise**2) / t
    over2 = {**over, "delta_pix": 0.101, "theta_E": [0.5, 0.5], "source_R_sersic": [0.1, 0.1]}
    r2 = simulate("model_ii", 64, seed=2, device="cpu", overrides=over2)
    c2 = r2.images[:, 0, :15, :15]
    assert abs(float(c2.std()) / expect - 1) < 0.05
    assert abs(float(c2.mean())) < 0.05 * expect


@pytest.mark.parametrize("log10_t", [3.0, 5.0])  # Poisson-dominated, background-dominated
def test_snr_noise_rendered_peak_has_target_snr(log10_t):
    # 'snr': a pixel at the source's peak surface brightness has signal-to-noise target_snr, measured on
    # rendered images: the signal is the noise-free image's peak, the noise the rms of (noisy - noise-free)
    # over the pixels within 3 % of that peak. No PSF, a Gaussian source (n = 0.5) much wider than a pixel
    # and centred on the lens: an Einstein ring whose pixels reach the source's peak surface brightness.
    over = {
        "num_pix": 48,
        "supersampling": 2,
        "psf_fwhm": None,
        "theta_E": [0.6, 0.6],
        "source_R_sersic": [0.3, 0.3],
        "source_n_sersic": [0.5, 0.5],
        "source_q": [1.0, 1.0],
        "source_offset": [0.0, 0.0],
        "log10_exposure_time": [log10_t, log10_t],
        "target_snr": [25.0, 25.0],
    }
    r = simulate("model_i", 32, seed=5, device="cpu", overrides=over, classes=["no_sub"])
    clean = Renderer(preset=r.preset, device=torch.device("cpu"), dtype=torch.float32)(r.params)
    peak = clean.amax(dim=(1, 2, 3), keepdim=True)
    # the rendered peak is the Sersic peak amp exp(b_n) x pixel area (b_n = 1.9992 n - 0.3271, lenstronomy)
    p = r.params
    n_s = p["source_n_sersic"].double()
    analytic = r.preset.delta_pix**2 * p["source_amp"].double() * torch.exp(1.9992 * n_s - 0.3271)
    assert torch.allclose(peak.flatten().double(), analytic, rtol=0.01)
    near = clean >= 0.97 * peak
    assert int(near.sum()) > 2000
    noise = (r.images - clean)[near].double()
    assert abs(float(noise.mean() / noise.std())) < 0.06  # unbiased
    snr = float(peak.mean()) / float(noise.std())
    assert abs(snr / float(p["target_snr"].mean()) - 1) < 0.05, snr


def test_float64_renders_and_agrees_with_float32():
    a = simulate("model_iii", 6, seed=9, device="cpu", overrides={**SMALL, "noise": "none"})
    b = simulate(
        "model_iii", 6, seed=9, device="cpu", overrides={**SMALL, "noise": "none"}, dtype=torch.float64
    )
    assert b.images.dtype == torch.float32 and b.params["theta_E"].dtype == torch.float64
    assert float((a.images - b.images).norm() / b.images.norm()) < 1e-4


def test_real_galaxy_sources_packaged_and_galaxy10_file(tmp_path):
    lib = load_source_library()
    assert lib.ndim == 3 and lib.shape[0] >= 50 and lib.shape[1] == lib.shape[2] == 64
    assert torch.allclose(lib.sum(dim=(1, 2)), torch.ones(lib.shape[0]), atol=1e-2)
    r = simulate("real_galaxy_tiny", 4, seed=1, device="cpu", overrides=SMALL)
    assert r.class_names == ("no_sub", "cdm") and torch.isfinite(r.images).all()
    assert {"source_index", "source_size", "source_angle", "source_flux"} <= set(r.params)
    # a user library in the Galaxy10 DECals layout: images uint8 [N, 256, 256, 3]
    stamps = lib[:3].numpy()
    img = np.kron(stamps / stamps.max(axis=(1, 2), keepdims=True), np.ones((4, 4)))  # 256 x 256
    rgb = np.repeat((img * 250).astype(np.uint8)[..., None], 3, axis=-1)
    path = tmp_path / "galaxy10.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=rgb)
        f.create_dataset("ans", data=np.arange(3, dtype=np.uint8))
    r2 = simulate(
        "real_galaxy_tiny", 4, seed=1, device="cpu", overrides={**SMALL, "source_library": str(path)}
    )
    assert torch.isfinite(r2.images).all() and int(r2.params["source_index"].max()) < 3
    assert not torch.equal(r.images, r2.images)
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("pixels", data=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'images' dataset"):
        simulate("real_galaxy_tiny", 2, seed=1, device="cpu", overrides={**SMALL, "source_library": str(bad)})
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        simulate("real_galaxy_tiny", 2, seed=1, overrides={"source_library": str(tmp_path / "missing.h5")})


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"preset": "model_iv"}, KeyError, "valid presets: .*model_i, model_ii"),
        ({"n": 0}, ValueError, "n = 0"),
        ({"n": -3}, ValueError, "n = -3"),
        ({"n": 2.5}, ValueError, "n must be an integer"),
        ({"seed": -1}, ValueError, "seed = -1"),
        ({"overrides": {"theta_E": [0.0, 1.0]}}, ValueError, "'theta_E'"),
        ({"overrides": {"theta_E": [-1.0, 1.0]}}, ValueError, r"theta_E.*\(0.0, inf\]"),
        ({"overrides": {"theta_E": [float("nan"), 1.0]}}, ValueError, "theta_E.*nan"),
        ({"overrides": {"lens_q": [0.5, 1.2]}}, ValueError, r"lens_q.*\(0.0, 1.0\]"),
        ({"overrides": {"lens_q": [0.0, 1.0]}}, ValueError, "lens_q"),
        ({"overrides": {"num_pix": 0}}, ValueError, "num_pix"),
        ({"overrides": {"delta_pix": float("nan")}}, ValueError, "delta_pix"),
        ({"overrides": {"z_source": 0.4}}, ValueError, "z_source"),
        ({"overrides": {"class_names": ["no_sub", "wdm"]}}, ValueError, "class_names"),
        ({"overrides": {"noise": "loud"}}, ValueError, "noise.*'loud'"),
        ({"overrides": {"thetaE": [1, 2]}}, ValueError, r"unknown preset field\(s\) \['thetaE'\]"),
        ({"classes": ["wdm"]}, ValueError, "wdm"),
        ({"labels": torch.tensor([0, 5])}, ValueError, "labels"),
        ({"labels": torch.tensor([0.0, 1.0])}, ValueError, "labels"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs, exc, match):
    args = {"preset": "model_ii", "n": 2, "seed": 0, "device": "cpu", **kwargs}
    with pytest.raises(exc, match=match):
        simulate(**args)


@pytest.mark.gpu
def test_gpu_determinism_and_agreement_with_cpu():
    a = simulate("model_ii", 2500, seed=3, device="cuda", batch_size=1024)
    b = simulate("model_ii", 2500, seed=3, device="cuda", batch_size=2048)
    c = simulate("model_ii", 2500, seed=3, device="cuda")
    assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)
    nf = {"noise": "none"}
    g = simulate("model_ii", 32, seed=3, device="cuda", overrides=nf)
    c = simulate("model_ii", 32, seed=3, device="cpu", overrides=nf)
    assert float((g.images - c.images).norm() / c.images.norm()) < 1e-4


def _renderer_pair(name: str, over: dict):
    from deeplense_ray.sim.simulate import Renderer, resolve_labels

    pre = resolve_preset(name, over)
    lab = resolve_labels(pre, 12, None, None)
    p = draw_parameters(pre, lab, torch.Generator().manual_seed(7), paired=False)
    p = {k: (v.float() if v.dtype.is_floating_point else v) for k, v in p.items()}
    cpu = torch.device("cpu")
    eager = Renderer(preset=pre, device=cpu, dtype=torch.float32)(p)
    dense = Renderer(preset=pre, device=cpu, dtype=torch.float32, dense=True)(p)
    return eager, dense


@pytest.mark.parametrize("profile", ["point_mass", "tnfw"])
def test_dense_hot_path_equals_subset_path(profile):
    """The dense function that torch.compile fuses gives the eager (index-subset) images."""
    eager, dense = _renderer_pair("model_ii", {**SMALL, "subhalo_profile": profile})
    assert float((eager - dense).norm() / eager.norm()) < 1e-6
    assert float((eager[2] - eager[0]).abs().max()) > 0  # the cdm image differs from the no_sub image


def test_tnfw_subhalo_parameters_match_lenstronomy():
    from astropy.cosmology import FlatLambdaCDM
    from lenstronomy.Cosmo.lens_cosmo import LensCosmo

    from deeplense_ray.sim.sampling import tnfw_parameters

    pre = get_preset("model_ii")
    lc = LensCosmo(pre.z_lens, pre.z_source, cosmo=FlatLambdaCDM(H0=pre.H0, Om0=pre.Om0))
    masses = torch.tensor([1e6, 1e8, 1e10], dtype=torch.float64)
    ours = tnfw_parameters(masses, pre)
    for i, m in enumerate(masses.tolist()):
        rs, alpha_rs = lc.nfw_physical2angle(m, pre.subhalo_concentration)
        assert abs(float(ours["subhalo_Rs"][i]) / rs - 1) < 1e-3
        assert abs(float(ours["subhalo_alpha_Rs"][i]) / alpha_rs - 1) < 1e-3


@pytest.mark.gpu
def test_gpu_compiled_path_matches_eager():
    nf = {"noise": "none"}
    a = simulate("model_ii", 256, seed=5, device="cuda", overrides=nf)
    b = simulate("model_ii", 256, seed=5, device="cuda", overrides=nf, compile=True)
    assert float((a.images - b.images).norm() / a.images.norm()) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["model_i", "model_ii", "model_iii"])
def test_gpu_triton_path_matches_torch_renderer(name):
    """The fused Triton kernels (default on CUDA) give the torch renderer's images, every class."""
    from deeplense_ray.sim.simulate import simulate_with_backend, triton_supported

    pre = resolve_preset(name, {"noise": "none"})
    if not triton_supported(pre, torch.device("cuda"), torch.float32):
        pytest.skip("triton not installed")
    a = simulate_with_backend(pre, 96, seed=4, device="cuda", backend="eager")
    b = simulate_with_backend(pre, 96, seed=4, device="cuda", backend="triton")
    err = (a.images - b.images).flatten(1).norm(dim=1) / a.images.flatten(1).norm(dim=1)
    assert float(err.max()) < 1e-5
    c = simulate_with_backend(name, 3000, seed=4, device="cuda", backend="triton", batch_size=1024)
    d = simulate_with_backend(name, 3000, seed=4, device="cuda", backend="triton")
    assert torch.equal(c.images, d.images)
