"""simulate(draws="device"): parameters drawn on the render device (here the CPU, with a torch generator of
its own stream): reproducible bytes, independent of batch_size, every preset, the same distributions as the
CPU draws (two-sample KS tests that reject a wrong distribution), the same image statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deeplense_ray.sim import list_presets, resolve_preset, simulate
from deeplense_ray.sim.sampling import draw_parameters
from deeplense_ray.sim.simulate import (
    device_draw_seed,
    draw_generator,
    resolve_labels,
    simulate_with_backend,
    triton_supported,
)
from deeplense_ray.sim.sources import load_source_library

CPU = torch.device("cpu")
#: 16 x 16 pixels over model_ii's field of view (6.5"), no supersampling: fast eager renders on CPU
SMALL = {"num_pix": 16, "delta_pix": 0.404, "supersampling": 1}
#: the earlier 25 point-mass population (benchmarks/simulate_kernel.py --population legacy25)
LEGACY25 = {"sigma_sub": None, "subhalo_count": [25, 25], "subhalo_profile": "point_mass"}


def ks_2samp(a, b) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and its asymptotic p-value (numpy only)."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    both = np.concatenate([a, b])
    d = float(
        np.max(
            np.abs(np.searchsorted(a, both, "right") / a.size - np.searchsorted(b, both, "right") / b.size)
        )
    )
    ne = a.size * b.size / (a.size + b.size)
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    p = 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return d, float(min(1.0, max(0.0, p)))


def _draw(pre, n: int, gen: torch.Generator, classes=None) -> dict[str, torch.Tensor]:
    return draw_parameters(pre, resolve_labels(pre, n, classes, None), gen, paired=False)


def _cpu_and_device_draws(pre, n: int, seed: int, classes=None):
    return _draw(pre, n, draw_generator(seed, CPU, "cpu"), classes), _draw(
        pre, n, draw_generator(seed, CPU, "device"), classes
    )


def test_same_seed_same_bytes_independent_of_batch_size():
    over = {**SMALL, "sigma_sub": [0.0, 1e-3]}  # fewer subhalos: a faster eager render on CPU
    a = simulate("model_ii", 192, seed=11, device="cpu", overrides=over, draws="device", batch_size=64)
    b = simulate("model_ii", 192, seed=11, device="cpu", overrides=over, draws="device", batch_size=128)
    c = simulate("model_ii", 192, seed=11, device="cpu", overrides=over, draws="device")
    for r in (b, c):
        assert torch.equal(a.images, r.images)
        assert a.params.keys() == r.params.keys()
        assert all(torch.equal(a.params[k], r.params[k]) for k in a.params)
    assert int((a.params["subhalo_count"] > 0).sum()) > 40  # cdm images hold subhalos
    d = simulate("model_ii", 192, seed=12, device="cpu", overrides=over, draws="device")
    assert not torch.equal(a.images, d.images)
    assert not torch.equal(a.params["theta_E"], d.params["theta_E"])
    # another stream than the CPU draws of the same seed: other parameters, other images
    e = simulate("model_ii", 192, seed=11, device="cpu", overrides=over)
    assert not torch.equal(a.images, e.images)
    assert not torch.equal(a.params["theta_E"], e.params["theta_E"])
    # the documented stream: draw_parameters from a generator on the device seeded by device_draw_seed(seed)
    g = torch.Generator().manual_seed(device_draw_seed(11))
    p = draw_parameters(a.preset, a.labels, g, paired=False)
    assert all(torch.equal(a.params[k], p[k].float() if p[k].is_floating_point() else p[k]) for k in p)
    assert device_draw_seed(11) != 11 and device_draw_seed(11) != device_draw_seed(12)


def test_device_draws_leave_the_default_draws_alone():
    a = simulate("model_ii", 64, seed=3, device="cpu", overrides=SMALL)
    b = simulate("model_ii", 64, seed=3, device="cpu", overrides=SMALL, draws="cpu")
    p = _draw(a.preset, 64, torch.Generator().manual_seed(3))
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.params["theta_E"], p["theta_E"].float())
    with pytest.raises(ValueError, match="draws"):
        simulate("model_ii", 4, seed=0, device="cpu", draws="gpu")
    with pytest.raises(ValueError, match="draws"):
        draw_generator(0, CPU, "gpu")


@pytest.mark.parametrize("name", [*list_presets(), "legacy25"])
def test_every_preset_draws_on_the_device(name):
    """Every preset (and the legacy25 population) with device draws: the CPU draws' names, shapes, dtypes."""
    over = {**SMALL, **LEGACY25} if name == "legacy25" else dict(SMALL)
    base = "model_ii" if name == "legacy25" else name
    for paired in (False, True):
        a = simulate(base, 24, seed=5, device="cpu", overrides=over, draws="device", paired=paired)
        c = simulate(base, 24, seed=5, device="cpu", overrides=over, paired=paired)
        assert a.params.keys() == c.params.keys()
        for k in c.params:
            assert (a.params[k].shape, a.params[k].dtype) == (c.params[k].shape, c.params[k].dtype), k
        assert torch.isfinite(a.images).all() and a.images.shape == c.images.shape
        assert torch.equal(a.labels, c.labels)


def test_draws_stay_on_the_generator_device():
    """Nothing is created on torch's default device: with the default device set to 'meta', draws from a CPU
    generator still give CPU tensors (a tensor made without device= would be 'meta' and fail to mix). This is
    what makes the same code run on CUDA with a CUDA generator."""
    for name in [*list_presets(), "legacy25"]:
        pre = resolve_preset("model_ii", LEGACY25) if name == "legacy25" else resolve_preset(name)
        peak = None
        if pre.source_kind == "real_galaxy":
            st = load_source_library(pre.source_library)
            peak = st.amax(dim=(1, 2)).double() * st.shape[-1] ** 2
        lab = resolve_labels(pre, 30, None, None)
        g = torch.Generator().manual_seed(1)
        with torch.device("meta"):
            p = draw_parameters(pre, lab, g, paired=True, library_peak=peak)
        assert all(v.device.type == "cpu" for v in p.values()), name


def _pairs(cpu: dict, dev: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Key parameters of two draws as samples (subhalos: the present ones; axion mass: log10 of axions)."""

    def take(p):
        sub = p["subhalo_mass"] > 0
        ax = p["axion_mass"] > 0
        out = {k: p[k].double().numpy() for k in ("theta_E", "e1", "gamma1", "source_center_x")}
        out.update({k: p[k].double().numpy() for k in p if k.startswith("source_") and p[k].dim() == 1})
        out["subhalo_count"] = p["subhalo_count"][p["subhalo_sigma_sub"] > 0].double().numpy()
        out["log10_subhalo_mass"] = torch.log10(p["subhalo_mass"][sub].double()).numpy()
        out["subhalo_r"] = (
            torch.hypot(
                p["subhalo_x"] - p["center_x"][:, None].float(),
                p["subhalo_y"] - p["center_y"][:, None].float(),
            )[sub]
            .double()
            .numpy()
        )
        out["subhalo_concentration"] = p["subhalo_concentration"][sub].double().numpy()
        out["log10_axion_mass"] = torch.log10(p["axion_mass"][ax]).numpy()
        return out

    a, b = take(cpu), take(dev)
    return {k: (a[k], b[k]) for k in a}


def test_distributions_match_cpu_draws_ks():
    """Device draws (their own stream) against CPU draws of model_ii: KS per key parameter; the same test
    rejects a 2% larger theta_E, a 0.1 steeper mass slope and a 0.25 dex shift of the axion mass."""
    pre = resolve_preset("model_ii")
    cpu, dev = _cpu_and_device_draws(pre, 3000, seed=21)
    pairs = _pairs(cpu, dev)
    assert pairs["log10_subhalo_mass"][1].size > 20000 and pairs["log10_axion_mass"][1].size == 1000
    for k, (a, b) in pairs.items():
        assert a.size > 500 and b.size > 500, k
        d, p = ks_2samp(a, b)
        assert p > 1e-3, (k, d, p)
    # power: the same threshold rejects wrong distributions
    te_c, te_d = pairs["theta_E"]
    assert ks_2samp(te_c, te_d * 1.02)[1] < 1e-3
    lm_c, lm_d = pairs["log10_axion_mass"]
    assert ks_2samp(lm_c, lm_d + 0.25)[1] < 1e-3
    steep = resolve_preset("model_ii", {"subhalo_mass_slope": pre.subhalo_mass_slope + 0.1})
    wrong = _draw(steep, 1000, draw_generator(21, CPU, "device"), ["cdm"])
    mw = torch.log10(wrong["subhalo_mass"][wrong["subhalo_mass"] > 0].double()).numpy()
    assert ks_2samp(pairs["log10_subhalo_mass"][0], mw)[1] < 1e-3


def test_distributions_match_for_the_published_and_legacy_populations():
    """The 25 point masses with dN/dm ~ m^-0.9 (deeplense_model_ii) and legacy25 (m^-1.9): masses, counts,
    source positions, axion masses agree with the CPU draws (KS)."""
    for name, over in (("deeplense_model_ii", {}), ("model_ii", LEGACY25)):
        pre = resolve_preset(name, over)
        cpu, dev = _cpu_and_device_draws(pre, 1500, seed=8)
        for p in (cpu, dev):
            cdm = p["subhalo_count"] > 0
            assert set(p["subhalo_count"][cdm].tolist()) == {25} and int(cdm.sum()) == 500
        for key in ("subhalo_mass", "subhalo_x", "source_center_x", "source_center_y", "axion_mass"):
            a, b = cpu[key], dev[key]
            a, b = a[a != 0].double().numpy(), b[b != 0].double().numpy()
            assert a.size >= 500 and b.size >= 500, (name, key)
            d, p = ks_2samp(
                np.log10(np.abs(a)) if "mass" in key else a, np.log10(np.abs(b)) if "mass" in key else b
            )
            assert p > 1e-3, (name, key, d, p)


def test_image_statistics_agree_with_cpu_draws():
    """Rendered images from device and CPU draws: per-class total flux and peak pixel agree (KS), and a
    0.3 mag fainter source is rejected by the same test."""
    n = 600
    a = simulate("model_ii", n, seed=4, device="cpu", overrides=SMALL, draws="device")
    b = simulate("model_ii", n, seed=4, device="cpu", overrides=SMALL)
    fainter = {**SMALL, "source_mag": [m + 0.3 for m in a.preset.source_mag]}
    f = simulate("model_ii", n, seed=4, device="cpu", overrides=fainter, draws="device")
    for c in range(len(a.class_names)):
        k = a.labels == c
        for stat in (lambda x: x.sum(dim=(1, 2, 3)), lambda x: x.amax(dim=(1, 2, 3))):
            d, p = ks_2samp(stat(a.images[k]).numpy(), stat(b.images[k]).numpy())
            assert p > 1e-3, (a.class_names[c], d, p)
    tot = lambda r: r.images.sum(dim=(1, 2, 3)).numpy()  # noqa: E731
    assert ks_2samp(tot(b), tot(f))[1] < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["model_ii", "legacy25", "deeplense_model_ii", "model_i"])
def test_gpu_device_draws_reproducible_and_match_the_torch_renderer(name):
    """On CUDA: the same bytes for any batch size, params on the device with device_output, the Triton path
    fed by device tables equal to the torch renderer on the same draws."""
    over = LEGACY25 if name == "legacy25" else {}
    base = "model_ii" if name == "legacy25" else name
    pre = resolve_preset(base, over)
    a = simulate(pre, 3000, seed=4, device="cuda", draws="device", batch_size=1024)
    b = simulate(pre, 3000, seed=4, device="cuda", draws="device", device_output=True)
    assert a.images.device.type == "cpu" and b.images.device.type == "cuda"
    assert b.params["theta_E"].device.type == "cuda" and a.params["theta_E"].device.type == "cpu"
    assert torch.equal(a.images, b.images.cpu())
    assert all(torch.equal(a.params[k], b.params[k].cpu()) for k in a.params)
    nf = resolve_preset(base, {**over, "noise": "none"})
    if not triton_supported(nf, torch.device("cuda"), torch.float32):  # the checks above ran; this one cannot
        pytest.skip(f"no Triton comparison for {name}: triton missing here or the preset has no Triton path")
    e = simulate_with_backend(nf, 96, seed=4, device="cuda", backend="eager", draws="device")
    t = simulate_with_backend(nf, 96, seed=4, device="cuda", backend="triton", draws="device")
    assert all(torch.equal(e.params[k], t.params[k]) for k in e.params)
    err = (e.images - t.images).flatten(1).norm(dim=1) / e.images.flatten(1).norm(dim=1)
    assert float(err.max()) < 1e-5
