"""Line-of-sight halos (sim/los.py): mass function, counts, multi-plane ray tracing against lenstronomy,
class independence, the monopole compensation, reproducibility, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from deeplense_ray.sim import resolve_preset, simulate
from deeplense_ray.sim.los import (
    draw_los,
    expected_los_count,
    lens_plane_w,
    los_capacity,
    los_slices,
    sheth_tormen_dn_dm,
)
from deeplense_ray.sim.observers import ring_size_aucs
from deeplense_ray.sim.sampling import draw_parameters
from deeplense_ray.sim.simulate import Renderer, resolve_labels

F64 = torch.float64
LOS = {"delta_los": [0.0, 2.0]}
SMALL = {"num_pix": 24, "delta_pix": 0.27, "supersampling": 1}

#: paltas' ``LOSDG19.dn_dm`` evaluated with colossus 1.3 (flat LCDM H0 70, Om0 0.3, Ob0 0.05, sigma8 0.81,
#: ns 0.96, relspecies False) [physical kpc^-3 Msun^-1], at z = 0.2, 0.5, 0.9 and m = 1e7, 10^8.5, 1e10,
#: 3e7, 2e9 (the last two between the nodes of the tables in sim/los.py)
_COLOSSUS_DN_DM = {
    0.2: [9.648492e-15, 1.327705e-17, 1.907758e-20],
    0.5: [2.042997e-14, 2.801707e-17, 3.983943e-20],
    0.9: [4.575212e-14, 6.227584e-17, 8.678548e-20],
}
_MASSES = [1e7, 10**8.5, 1e10]


def test_mass_function_matches_colossus():
    for z, ref in _COLOSSUS_DN_DM.items():
        got = sheth_tormen_dn_dm(np.array(_MASSES), z)
        np.testing.assert_allclose(got, ref, rtol=2e-3)
    try:  # between the table's nodes, against colossus itself where it is installed
        from colossus.cosmology import cosmology
        from colossus.lss import peaks
    except ImportError:
        return
    cosmo = cosmology.setCosmology(
        "los_test", params=dict(flat=True, H0=70, Om0=0.3, Ob0=0.05, sigma8=0.81, ns=0.96, relspecies=False)
    )
    h = cosmo.h
    m = np.array([3e7, 2e9, 5.5e8])
    for z in (0.1, 0.6):
        r = peaks.lagrangianR(m * h)
        nu = peaks.collapseOverdensity(z=z, corrections=True) / cosmo.sigma(r, z)
        n2 = 0.707 * nu**2
        nfn = 2 * 0.32218 * (1 + n2**-0.3) * np.sqrt(n2 / (2 * np.pi)) * np.exp(-n2 / 2)
        ref = -1 / 3 * nfn * cosmo.rho_m(z) * h**2 / m**2 * cosmo.sigma(r, z, derivative=True)
        np.testing.assert_allclose(sheth_tormen_dn_dm(m, z), ref, rtol=5e-3)


def _slice_volumes_astropy(pre):
    """Per-slice physical volume [kpc^3] of the DG19 double cone, written out with astropy."""
    from astropy.cosmology import FlatLambdaCDM

    cos = FlatLambdaCDM(H0=pre.H0, Om0=pre.Om0)
    chi = lambda z: cos.comoving_distance(z).value  # noqa: E731
    zs, zl, dz = pre.z_source, pre.z_lens, pre.los_dz
    out = []
    for z0 in np.round(np.arange(pre.los_z_min, zs - dz, dz), 6):
        zh = z0 + dz / 2
        kpa = cos.angular_diameter_distance(zh).value * 1e3 * math.pi / 648000
        r = 0.5 * pre.los_cone_angle * kpa
        if zh > zl:
            r *= 1 - 0.8 * chi(zs) * (chi(zh) - chi(zl)) / ((chi(zs) - chi(zl)) * chi(zh))
        out.append((chi(z0 + dz) - chi(z0)) / (1 + z0) * 1e3 * math.pi * r * r)
    return np.array(out)


def test_counts_follow_the_mass_function():
    """Mean count per image = sum over slices of volume x int dn/dm (trapezoid on the Sheth-Tormen function,
    not its power-law fit) to 3 %; Poisson dispersion at fixed delta_los; linear in delta_los; redshifts
    distributed as the slices' means (chi^2); positions inside the cone; masses in range."""
    pre = resolve_preset("model_ii", {"delta_los": [1.0, 1.0]})
    vols = _slice_volumes_astropy(pre)
    zs = los_slices(pre)["z"]
    assert vols.shape == zs.shape
    m = np.logspace(math.log10(pre.los_mass[0]), math.log10(pre.los_mass[1]), 400)
    analytic = sum(v * np.trapezoid(sheth_tormen_dn_dm(m, z), m) for v, z in zip(vols, zs))
    assert abs(expected_los_count(pre) / analytic - 1) < 0.03
    n = 4000
    d = draw_los(pre, torch.Generator().manual_seed(0), n, n, None)
    c = d["los_count"].double()
    mu = expected_los_count(pre)
    assert abs(c.mean().item() - mu) < 4 * math.sqrt(mu / n)
    assert 0.9 < c.var().item() / c.mean().item() < 1.1  # Poisson
    # redshift histogram against the per-slice means (10 groups of slices)
    present = d["los_mass"] > 0
    z = d["los_z"][present].double().numpy()
    edges = np.quantile(zs, np.linspace(0, 1, 11))
    edges[-1] += 1
    obs = np.histogram(z, edges)[0]
    exp = np.histogram(zs, edges, weights=los_slices(pre)["mu"])[0] * n
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3
    r = torch.hypot(d["los_x"], d["los_y"])[present]
    assert float(r.max()) <= 0.5 * pre.los_cone_angle + 1e-5
    mass = d["los_mass"][present]
    assert float(mass.min()) >= pre.los_mass[0] * 0.999 and float(mass.max()) <= pre.los_mass[1] * 1.001
    # sorted by redshift within each image, foreground count = halos in front of the lens
    zz = torch.where(present, d["los_z"], torch.inf)
    assert torch.all(zz[:, 1:] >= zz[:, :-1])
    assert torch.equal(d["los_count_fore"], ((d["los_z"] < pre.z_lens) & present).sum(1))
    # linear in delta_los
    d2 = draw_los(
        resolve_preset(pre, {"delta_los": [2.0, 2.0]}), torch.Generator().manual_seed(1), n, n, None
    )
    assert abs(d2["los_count"].double().mean().item() / (2 * mu) - 1) < 4 / math.sqrt(2 * mu * n)


def _lenstronomy_lens(p, i, pre, *, with_los=True):
    """lenstronomy multi-plane kwargs of image i: EPL + multipoles + shear + TNFW subhalos at z_lens, the
    LOS TNFWs at their redshifts."""
    g = {k: v[i].double().numpy() for k, v in p.items()}
    f = lambda k: float(g[k])  # noqa: E731
    c = {"center_x": f("center_x"), "center_y": f("center_y")}
    lens = ["EPL", "SHEAR"]
    kw = [{"theta_E": f("theta_E"), "gamma": f("gamma"), "e1": f("e1"), "e2": f("e2"), **c},
          {"gamma1": f("gamma1"), "gamma2": f("gamma2")}]  # fmt: skip
    for m in (1, 3, 4):
        lens.append("MULTIPOLE")
        kw.append(
            {"m": m, "a_m": f(f"multipole_a{m}"), "phi_m": f(f"multipole_phi{m}"), "r_E": f("theta_E"), **c}
        )
    zl = [pre.z_lens] * len(lens)
    for k in range(int(g["subhalo_count"])):
        lens.append("TNFW")
        zl.append(pre.z_lens)
        kw.append({n: float(g[f"subhalo_{n}"][k]) for n in ("Rs", "alpha_Rs", "r_trunc")}
                  | {"center_x": float(g["subhalo_x"][k]), "center_y": float(g["subhalo_y"][k])})  # fmt: skip
    for k in range(int(g["los_count"]) if with_los else 0):
        lens.append("TNFW")
        zl.append(float(g["los_z"][k]))
        kw.append({n: float(g[f"los_{n}"][k]) for n in ("Rs", "alpha_Rs", "r_trunc")}
                  | {"center_x": float(g["los_x"][k]), "center_y": float(g["los_y"][k])})  # fmt: skip
    return lens, zl, kw


def _batch(p, pre, dtype=F64):
    return {k: (v.to(dtype) if v.dtype.is_floating_point else v) for k, v in p.items()}


def test_multi_plane_matches_lenstronomy():
    """Source-plane positions of every sub-pixel and noise-free images against lenstronomy's multi-plane
    LensModel (hidden draws: 3 cdm images, EPL + multipoles + shear + tNFW subhalos on the lens plane, LOS
    tNFWs at 1e8-1e10 Msun on their own planes, delta_los = 2; no compensation table, which lenstronomy
    cannot express). Tolerances: positions to 2e-6 arcsec and 1e-3 of the LOS halos' own effect (rms shift of
    the source-plane positions they cause; measured 1e-7 / 1e-5: the EPL series' 1e-6 truncation), images
    (float64, supersampling 2, no PSF) to 1e-5 relative L2."""
    from astropy.cosmology import FlatLambdaCDM
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util.simulation_util import data_configure_simple

    over = {"delta_los": [2.0, 2.0], "los_mass": [1e8, 1e10], "num_pix": 32, "delta_pix": 0.2,
            "psf_fwhm": None, "supersampling_convolution": False, "mass_compensation": "none",
            "sigma_sub": [0.002, 0.002], "class_names": ["cdm"], "noise": "none"}  # fmt: skip
    pre = resolve_preset("model_ii", over)
    n = 3
    lab = resolve_labels(pre, n, None, None)
    p = draw_parameters(pre, lab, torch.Generator().manual_seed(1234), paired=False)
    assert int(p["los_count"].min()) > 10 and int(p["los_count_fore"].min()) > 0
    rend = Renderer(preset=pre, device=torch.device("cpu"), dtype=F64)
    pb = _batch(p, pre)
    col = {k: (v[:, None] if v.dim() == 1 else v) for k, v in pb.items()}
    bx, by = rend._ray_shoot_eager(rend.x, rend.y, pb, col)
    ours = rend(pb)[:, 0].numpy()
    cos = FlatLambdaCDM(H0=pre.H0, Om0=pre.Om0)
    x, y = rend.x.numpy(), rend.y.numpy()
    for i in range(n):
        lens, zl, kw = _lenstronomy_lens(p, i, pre)
        lm = LensModel(lens, z_source=pre.z_source, lens_redshift_list=zl, multi_plane=True, cosmo=cos)
        rx, ry = lm.ray_shooting(x, y, kw)
        lens0, zl0, kw0 = _lenstronomy_lens(p, i, pre, with_los=False)
        lm0 = LensModel(lens0, z_source=pre.z_source, lens_redshift_list=zl0, multi_plane=True, cosmo=cos)
        x0, y0 = lm0.ray_shooting(x, y, kw0)
        effect = float(np.sqrt(np.mean((rx - x0) ** 2 + (ry - y0) ** 2)))
        err = np.hypot(bx[i].numpy() - rx, by[i].numpy() - ry)
        assert err.max() <= 2e-6 and err.max() <= 1e-3 * effect, (i, err.max(), effect)
        data = ImageData(**data_configure_simple(pre.num_pix, pre.delta_pix, inverse=False))
        src = {k: float(p[f"source_{k}"][i]) for k in ("amp", "R_sersic", "n_sersic", "e1", "e2")}
        src |= {"center_x": float(p["source_center_x"][i]), "center_y": float(p["source_center_y"][i])}
        im = ImageModel(data_class=data, psf_class=PSF("NONE"), lens_model_class=lm,
                        source_model_class=LightModel(["SERSIC_ELLIPSE"]),
                        kwargs_numerics={"supersampling_factor": pre.supersampling})  # fmt: skip
        ref = im.image(kw, [src])
        assert np.linalg.norm(ours[i] - ref) / np.linalg.norm(ref) <= 1e-5, i


def test_los_class_independent_and_not_compensated():
    """Every class of a paired group gets the same LOS halos; LOS on changes no other parameter (the
    compensation table and theta_E included: only the subhalos' monopole is subtracted); with LOS the no_sub
    image differs from the LOS-off one; cdm_smooth keeps the LOS halos clumpy (under "monopole" it equals its
    no_sub partner byte for byte, LOS included)."""
    classes = ["no_sub", "cdm", "cdm_smooth"]
    over = {**SMALL, "class_names": classes, "noise": "none"}
    on = simulate("model_ii", 24, seed=5, device="cpu", paired=True, overrides={**over, **LOS})
    off = simulate("model_ii", 24, seed=5, device="cpu", paired=True, overrides=over)
    p = on.params
    for k in ("los_count", "los_x", "los_mass", "los_alpha_Rs", "delta_los", "los_mass_total"):
        grp = p[k].reshape(8, 3, *p[k].shape[1:])
        assert torch.equal(grp, grp[:, :1].expand_as(grp)), k
    assert len(set(p["los_count"][::3].tolist())) > 1  # groups differ
    assert float(p["los_mass_total"].min()) >= 0 and float(p["los_mass_total"].max()) > 0
    for k, v in off.params.items():
        assert torch.equal(v, p[k]), k
    no_sub = on.labels == 0
    assert not torch.equal(on.images[no_sub], off.images[no_sub])
    assert torch.equal(on.images[on.labels == 2], on.images[no_sub])  # cdm_smooth == no_sub (+ same LOS)
    assert not torch.equal(on.images[on.labels == 1], on.images[no_sub])


def test_ring_size_observer_stays_blind_with_los():
    """The ring-size observer (cdm vs no_sub, paired, 8x Sigma_sub, heavier subhalos) stays at 0.5 with LOS
    halos on (they are the same in both classes; the compensation ignores them)."""
    over = {**SMALL, "sigma_sub": [0.0, 0.032], "subhalo_mass": [1e9, 1e10], **LOS}
    aucs = ring_size_aucs("model_ii", 60, 0, overrides=over, device="cpu")["cdm_vs_no_sub"]
    assert abs(aucs["auc_ring_radius"] - 0.5) <= 0.04
    assert abs(aucs["auc_theta_E_eff"] - 0.5) <= 0.02


def test_reproducible_and_batch_independent():
    over = {**SMALL, **LOS}
    kw = dict(device="cpu", overrides=over, classes=["no_sub", "axion"])
    a = simulate("model_ii", 66, seed=3, **kw)
    b = simulate("model_ii", 66, seed=3, batch_size=64, **kw)
    assert torch.equal(a.images, b.images)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    pre = resolve_preset("model_ii", over)
    c = draw_parameters(
        pre, resolve_labels(pre, 66, None, None), torch.Generator().manual_seed(4), paired=False
    )
    assert not torch.equal(a.params["los_x"], c["los_x"])


def test_device_draws_cover_los():
    r = simulate("model_ii", 6, seed=0, device="cpu", draws="device", overrides={**SMALL, **LOS})
    assert r.params["los_count"].shape == (6,) and torch.isfinite(r.images).all()


def test_off_by_default_and_capacity():
    pre = resolve_preset("model_ii")
    assert (
        pre.delta_los is None and "los_count" not in simulate("model_ii", 3, 0, "cpu", overrides=SMALL).params
    )
    assert los_capacity(resolve_preset("model_ii", {"delta_los": [0, 0]})) == 0
    on = resolve_preset("model_ii", LOS)
    assert 10 < expected_los_count(on) < 25  # 15.6 halos of 10^8.5-1e10 Msun at delta_los = 1
    assert los_capacity(on) >= expected_los_count(on, 2.0) + 8 * math.sqrt(expected_los_count(on, 2.0))
    assert 0 < lens_plane_w(on) < 1


@pytest.mark.parametrize(
    "over",
    [
        {"delta_los": [-1, 1]},
        {"delta_los": [2, 1]},
        {"delta_los": [0, 1e3]},
        {"delta_los": 1.0},
        {"los_mass": [1e10, 1e8]},
        {"los_mass": [1e3, 1e8]},
        {"los_cone_angle": 0},
        {"los_dz": 0.0},
        {"los_z_min": 0.0},
        {"delta_los": [0, 1], "los_z_min": 0.995},
    ],
)
def test_bad_fields(over):
    with pytest.raises(ValueError) as e:
        resolve_preset("model_ii", over)
    assert next(iter(over)) in str(e.value) or "los_z_min" in str(e.value)


def test_triton_kernel_multi_plane_matches_torch():
    """The fused kernel's multi-plane LOS path (Triton's interpreter on the CPU) renders what the torch
    renderer does, with tNFW subhalos, the monopole tables, cdm_smooth and the vortex on the lens plane
    (skipped visibly where triton is not installed)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="1")
    try:
        import triton  # noqa: F401
    except ImportError:
        interp = Path(sys.prefix) / "triton-interp"  # where `make install` puts it on a CPU machine
        if not (interp / "triton").is_dir():
            pytest.skip(f"triton is not installed (nor in {interp}): the kernel's LOS path goes unchecked")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(interp), env.get("PYTHONPATH", "")]))
    code = (
        "import torch\n"
        "from deeplense_ray.sim.simulate import _TritonBatches, _TorchBatches, resolve_labels\n"
        "from deeplense_ray.sim.presets import resolve_preset\n"
        "from deeplense_ray.sim.sampling import draw_parameters\n"
        "over = {'num_pix': 8, 'noise': 'none', 'delta_los': [2.0, 2.0],\n"
        "        'class_names': ['no_sub', 'cdm', 'cdm_smooth', 'axion']}\n"
        "pre = resolve_preset('model_ii', over)\n"
        "lab = resolve_labels(pre, 4, None, None)\n"
        "p = draw_parameters(pre, lab, torch.Generator().manual_seed(3), paired=True)\n"
        "assert int(p['los_count_fore'].min()) > 0 and bool((p['los_count'] > p['los_count_fore']).all())\n"
        "a = _TritonBatches(pre, p, torch.device('cpu'), 1)(0, 4)\n"
        "b = _TorchBatches(pre, p, torch.device('cpu'), torch.float32, None, 1, compile=False)(0, 4)\n"
        "off = resolve_preset(pre, {'delta_los': None})\n"
        "c = _TorchBatches(off, p, torch.device('cpu'), torch.float32, None, 1, compile=False)(0, 4)\n"
        "print(float((a - b).abs().max() / b.abs().max()), float((c - b).abs().max() / b.abs().max()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    err, effect = map(float, out.stdout.strip().splitlines()[-1].split())
    assert err < 1e-5 and effect > 1e-2
