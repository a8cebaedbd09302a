"""Class-independent lens mass (sim/compensation.py), the cdm_smooth control and the ring-size observer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deeplense_ray.sim import resolve_preset, simulate
from deeplense_ray.sim.compensation import alpha_radial_table, macro_mean_factor
from deeplense_ray.sim.lens import alpha_tnfw
from deeplense_ray.sim.observers import ring_size_aucs
from deeplense_ray.sim.sampling import draw_parameters
from deeplense_ray.sim.simulate import resolve_labels

F64 = torch.float64
#: 8x the model_ii Sigma_sub prior, the heavier subhalos only (70 % of the mass, a third of the count: fast)
HEAVY_8X = {"sigma_sub": [0.0, 0.032], "subhalo_mass": [1e9, 1e10]}
#: the main deflector's (theta_E, gamma) solved per image (the monopole default leaves them as drawn)
RING_SLOPE = {"mass_compensation": "ring_slope"}
SMALL = {"num_pix": 24, "delta_pix": 0.27, "supersampling": 1}
SIS = {"lens_profile": "sie", "lens_gamma": [2.0, 2.0], "lens_gamma_sd": 0.0, "lens_q": [1.0, 1.0],
       **{f"lens_multipole_a{m}": [0.0, 0.0] for m in (1, 3, 4)}}  # fmt: skip


def _draw(over: dict, n: int, seed: int, classes=("no_sub", "cdm", "cdm_smooth"), paired=True):
    pre = resolve_preset("model_ii", {**over, "class_names": list(classes)})
    lab = resolve_labels(pre, n, None, None)
    return pre, lab, draw_parameters(pre, lab, torch.Generator().manual_seed(seed), paired=paired)


def _ring_mean(lens_model, kwargs, cx: float, cy: float, r: float, n_phi: int = 1024) -> float:
    """lenstronomy's azimuthal-mean radial deflection on a circle (Gauss: M(<r) / (pi Sigma_crit r))."""
    phi = 2 * np.pi * (np.arange(n_phi) + 0.5) / n_phi
    ax, ay = lens_model.alpha(cx + r * np.cos(phi), cy + r * np.sin(phi), kwargs)
    return float(np.mean(ax * np.cos(phi) + ay * np.sin(phi)))


def _tnfw_kwargs(p, i: int) -> list[dict]:
    keys = (("Rs", "subhalo_Rs"), ("alpha_Rs", "subhalo_alpha_Rs"), ("r_trunc", "subhalo_r_trunc"),
            ("center_x", "subhalo_x"), ("center_y", "subhalo_y"))  # fmt: skip
    return [{a: float(p[b][i, j]) for a, b in keys} for j in range(int(p["subhalo_count"][i]))]


def test_ring_size_observer_blind_with_compensation():
    """(a) At 8x Sigma_sub the ring radius and theta_E_eff tell cdm from no_sub without compensation, not
    with the default (ring mass and slope; paired images: the same macro lens and source)."""
    over = {**SMALL, **HEAVY_8X}
    on = ring_size_aucs("model_ii", 150, 0, overrides=over, device="cpu")
    off = ring_size_aucs("model_ii", 150, 0, overrides={**over, "mass_compensation": "none"}, device="cpu")
    on, off = on["cdm_vs_no_sub"], off["cdm_vs_no_sub"]
    assert off["auc_ring_radius"] > 0.62 and off["auc_theta_E_eff"] > 0.62
    assert on["auc_ring_radius"] <= 0.52 and abs(on["auc_theta_E_eff"] - 0.5) <= 0.02
    assert abs(on["mean_shift_theta_E_eff"]) < 0.1 * off["mean_shift_theta_E_eff"]


def _annulus_kappa(lens_model, kwargs, cx: float, cy: float, r: float, d: float = 0.1) -> float:
    """lenstronomy's mean convergence (f_xx + f_yy) / 2 over the annulus (1 -+ d) r: Gauss-Legendre in radius
    (weight r dr), 512 angles."""
    u, w = np.polynomial.legendre.leggauss(16)
    rad, w = r * (1 + d * u), w * r * (1 + d * u)
    phi = 2 * np.pi * (np.arange(512) + 0.5) / 512
    R, P = np.meshgrid(rad, phi, indexing="ij")
    fxx, _, _, fyy = lens_model.hessian((cx + R * np.cos(P)).ravel(), (cy + R * np.sin(P)).ravel(), kwargs)
    return float((0.5 * (fxx + fyy)).reshape(R.shape).mean(1) @ w / w.sum())


def test_compensated_lens_against_lenstronomy():
    """(b) lenstronomy's (compensated EPL + the TNFW subhalos) has the substructure-free EPL's mean radial
    deflection on the drawn ring and mean convergence in the annulus 0.9-1.1 theta_E about it (the slope);
    h(q, gamma) is lenstronomy's EPL ring mean."""
    pytest.importorskip("lenstronomy")
    from lenstronomy.LensModel.lens_model import LensModel

    pre, lab, p = _draw({**HEAVY_8X, **RING_SLOPE}, 9, seed=3)
    for i in (1, 4):
        assert lab[i] == 1 and int(p["subhalo_count"][i]) > 20 and float(p["theta_E_compensation"][i]) > 0.01
        assert float(p["gamma_compensation"][i]) < -0.02  # the substructure's mass is flatter than the EPL's
        cx, cy = float(p["center_x"][i]), float(p["center_y"][i])
        drawn = float(p["theta_E"][i] + p["theta_E_compensation"][i])
        g0 = float(p["gamma"][i] + p["gamma_compensation"][i])
        # the no_sub image of the same group keeps the drawn main deflector
        assert float(p["theta_E"][i - 1]) == pytest.approx(drawn, abs=1e-12)
        assert float(p["gamma"][i - 1]) == pytest.approx(g0, abs=1e-12)
        assert pre.lens_gamma[0] <= float(p["gamma"][i]) <= pre.lens_gamma[1]

        shape = {k: float(p[k][i]) for k in ("e1", "e2", "center_x", "center_y")}
        subs = _tnfw_kwargs(p, i)
        ref_lm, ref_kw = LensModel(["EPL"]), [{"theta_E": drawn, "gamma": g0, **shape}]
        lm = LensModel(["EPL"] + ["TNFW"] * len(subs))
        kw = [{"theta_E": float(p["theta_E"][i]), "gamma": float(p["gamma"][i]), **shape}] + subs
        ref = _ring_mean(ref_lm, ref_kw, cx, cy, drawn)
        assert abs(_ring_mean(lm, kw, cx, cy, drawn) - ref) < 1e-4
        kref = _annulus_kappa(ref_lm, ref_kw, cx, cy, drawn)
        assert abs(_annulus_kappa(lm, kw, cx, cy, drawn) - kref) < 1e-4
        h = macro_mean_factor(p["e1"][i : i + 1], p["e2"][i : i + 1], torch.tensor([g0], dtype=F64))
        assert abs(float(h) * drawn - ref) < 1e-6
    # SIE closed form: h = sqrt(q) / AGM(1, q)
    q = 0.6
    e1 = torch.tensor([(1 - q) / (1 + q)], dtype=F64)
    a, b = 1.0, q
    for _ in range(8):
        a, b = 0.5 * (a + b), (a * b) ** 0.5
    assert float(macro_mean_factor(e1, torch.zeros(1, dtype=F64))) == pytest.approx(q**0.5 / a, rel=1e-12)


def test_cdm_smooth_deflection_against_lenstronomy():
    """(b) The cdm_smooth image's deflection is radial with the population's azimuthal-mean radial deflection
    (lenstronomy TNFW, Gauss) at every radius, interpolated between the table's nodes; cdm and cdm_smooth of a
    group share the population and the compensation."""
    pytest.importorskip("lenstronomy")
    from lenstronomy.LensModel.lens_model import LensModel

    _, lab, p = _draw({**HEAVY_8X, **RING_SLOPE}, 6, seed=5)
    i, s = 1, 2
    assert lab[i] == 1 and lab[s] == 2
    for k in ("subhalo_count", "subhalo_x", "subhalo_Rs", "subhalo_sigma_sub"):
        assert torch.equal(p[k][i], p[k][s])
    assert float(p["theta_E"][s]) == float(p["theta_E"][i])
    assert float(p["radial_dr"][i]) == 0 and float(p["radial_dr"][s]) > 0
    assert int(p["subhalo_smoothed"][i]) == 0 and int(p["subhalo_smoothed"][s]) == 1
    subs = _tnfw_kwargs(p, s)
    lm = LensModel(["TNFW"] * len(subs))
    cx, cy, dr = float(p["center_x"][s]), float(p["center_y"][s]), float(p["radial_dr"][s])
    table = p["radial_alpha"][s]
    drawn = float(p["theta_E"][s] + p["theta_E_compensation"][s])
    radii = np.array([0.35, 0.8, 1.0, 1.13, 1.47, 2.0, 2.9]) * drawn
    ref = np.array([_ring_mean(lm, subs, cx, cy, r) for r in radii])
    # the renderer's smooth deflection at those radii, along a direction
    ang = 0.7
    x = torch.tensor(cx + radii * np.cos(ang))[None]
    y = torch.tensor(cy + radii * np.sin(ang))[None]
    col = lambda k: p[k][s : s + 1, None]  # noqa: E731
    ax, ay = alpha_radial_table(x, y, col("center_x"), col("center_y"), col("radial_dr"), table[None])
    mag = (ax * np.cos(ang) + ay * np.sin(ang))[0].numpy()
    assert float((ax * np.sin(ang) - ay * np.cos(ang)).abs().max()) < 1e-12  # radial
    assert len(subs) > 20 and np.abs(mag - ref).max() < 1e-4 + 5e-3 * ref.max()  # linear between nodes
    nodes = np.arange(3, 30, 4)
    ref_nodes = np.array([_ring_mean(lm, subs, cx, cy, j * dr) for j in nodes])
    assert np.abs(table[nodes].numpy() - ref_nodes).max() < 1e-4


def test_diagnostics_sis_and_vortex():
    """(c) theta_E_eff of a no_sub SIS is its theta_E; compensation keeps it for cdm and axion and lowers the
    main deflector by the substructure's ring mean (a vortex of half length h < theta_E: its whole mass);
    without compensation cdm and axion rings grow."""
    over = {**SIS, **HEAVY_8X, "vortex_half_length_ref": 0.003}
    _, lab, p = _draw({**over, **RING_SLOPE}, 30, seed=2, classes=("no_sub", "axion", "cdm"))
    _, _, q = _draw({**over, "mass_compensation": "none"}, 30, seed=2, classes=("no_sub", "axion", "cdm"))
    drawn = p["theta_E"] + p["theta_E_compensation"]
    assert torch.equal(drawn, q["theta_E"])
    assert torch.allclose(p["theta_E_eff"], drawn, atol=1e-5)
    nosub, axion, cdm = lab == 0, lab == 1, lab == 2
    assert torch.equal(p["theta_E_compensation"][nosub], torch.zeros(int(nosub.sum()), dtype=F64))
    assert bool((p["theta_E_compensation"][cdm] > 0).all())
    tv = p["vortex_theta_E"][axion]
    assert torch.allclose(p["theta_E_compensation"][axion], tv * tv / drawn[axion], rtol=1e-9)
    assert torch.equal(q["theta_E_compensation"], torch.zeros(30, dtype=F64))
    assert bool((p["gamma"] == 2).all()) and not bool(p["gamma_compensation"].any())  # SIE: theta_E alone
    assert torch.allclose(q["theta_E_eff"][nosub], q["theta_E"][nosub], rtol=0, atol=1e-12)
    assert bool((q["theta_E_eff"][cdm | axion] > q["theta_E"][cdm | axion] + 1e-3).all())


def test_slope_compensation_diagnostics_and_vortex():
    """(c) ring_slope: no_sub keeps the drawn (theta_E, gamma); cdm and cdm_smooth of a group share the
    rendered pair; gamma stays in the preset's range (at an end only where recorded as clipped); "ring" moves
    theta_E alone. A centred vortex (half length < 0.9 theta_E) on a circular EPL: the ring mass and the
    annulus mass (closed forms, kappa = (3-g)/2 (theta_E/r)^(g-1)) equal the substructure-free lens's."""
    circ = {"lens_q": [1.0, 1.0], **{f"lens_multipole_a{m}": [0.0, 0.0] for m in (1, 3, 4)}}
    over = {**circ, **HEAVY_8X, "vortex_half_length_ref": 0.003}
    classes = ("no_sub", "axion", "cdm", "cdm_smooth")
    pre, lab, p = _draw({**over, **RING_SLOPE}, 40, seed=2, classes=classes)
    _, _, q = _draw({**over, "mass_compensation": "ring"}, 40, seed=2, classes=classes)
    g0, te0 = p["gamma"] + p["gamma_compensation"], p["theta_E"] + p["theta_E_compensation"]
    assert torch.equal(te0, q["theta_E"] + q["theta_E_compensation"]) and torch.allclose(g0, q["gamma"])
    assert torch.equal(q["gamma_compensation"], torch.zeros(40, dtype=F64))
    nosub, axion = lab == 0, lab == 1
    assert not bool(p["gamma_compensation"][nosub].any() or p["theta_E_compensation"][nosub].any())
    for k in ("theta_E", "gamma"):
        assert torch.equal(p[k][2::4], p[k][3::4])
    lo, hi = pre.lens_gamma
    assert bool(((p["gamma"] >= lo) & (p["gamma"] <= hi)).all())
    at_end = (p["gamma"] == lo) | (p["gamma"] == hi)
    assert torch.equal(p["gamma_clipped"].bool(), at_end & (p["gamma_compensation"] != 0))
    assert bool((p["gamma_compensation"][lab == 2] < 0).all())

    def enclosed(r, te, g):  # M(<r) / (pi Sigma_crit) of a circular EPL
        return te ** (g - 1) * r ** (3 - g)

    rings: list[float] = []
    for i in torch.nonzero(axion).squeeze(1).tolist():
        te, g, te1, g1 = float(te0[i]), float(g0[i]), float(p["theta_E"][i]), float(p["gamma"][i])
        tv2 = float(p["vortex_theta_E"][i]) ** 2  # the whole vortex is inside 0.9 theta_E
        assert float(p["vortex_half_length"][i]) < 0.9 * te and g1 < g  # the macro flattens about the mass
        assert enclosed(te, te1, g1) + tv2 == pytest.approx(enclosed(te, te, g), rel=1e-10)
        for a, b in ((te1, g1), (te, g)):  # the annulus 0.9-1.1 theta_E
            rings.append(enclosed(1.1 * te, a, b) - enclosed(0.9 * te, a, b))
        assert rings[-2] == pytest.approx(rings[-1], rel=1e-10)


def test_cdm_smooth_renders_and_validates():
    """cdm_smooth images render on the eager and the dense path alike; the class needs a normalised
    population; the published presets keep the uncompensated recipe."""
    over = {**SMALL, **HEAVY_8X, **RING_SLOPE, "class_names": ["no_sub", "cdm", "cdm_smooth"]}
    over["noise"] = "none"
    a = simulate("model_ii", 6, seed=1, device="cpu", overrides=over, paired=True)
    assert torch.isfinite(a.images).all()
    from deeplense_ray.sim.simulate import Renderer

    pre = a.preset
    pf = {k: (v.float() if v.is_floating_point() else v) for k, v in a.params.items()}
    eager = Renderer(preset=pre, device=torch.device("cpu"), dtype=torch.float32)(pf)
    dense = Renderer(preset=pre, device=torch.device("cpu"), dtype=torch.float32, dense=True)(pf)
    assert float((eager - dense).norm() / eager.norm()) < 1e-5
    # the smooth image differs from both the clumpy and the substructure-free one
    assert not torch.equal(a.images[1], a.images[2]) and not torch.equal(a.images[0], a.images[2])
    with pytest.raises(ValueError, match="cdm_smooth"):
        resolve_preset("deeplense_model_ii", {"class_names": ["no_sub", "cdm_smooth"]})
    with pytest.raises(ValueError, match="mass_compensation"):
        resolve_preset("model_ii", {"mass_compensation": "sheet"})
    assert resolve_preset("deeplense_model_i").mass_compensation == "none"
    assert resolve_preset("model_ii").class_names == ("no_sub", "axion", "cdm")


def test_monopole_compensation_against_lenstronomy():
    """(b) "monopole" (the default): lenstronomy's EPL (as drawn) + the image's TNFW subhalos + the image's
    radial table has the substructure-free EPL's enclosed mass (mean radial deflection, Gauss) at radii on
    and between the table's nodes, inside and outside the ring (to 2 % of the subhalos' own monopole); the
    macro lens keeps its drawn theta_E and gamma."""
    pytest.importorskip("lenstronomy")
    from lenstronomy.LensModel.lens_model import LensModel

    pre, lab, p = _draw(HEAVY_8X, 9, seed=3)
    assert pre.mass_compensation == "monopole"
    for i in (1, 4):
        assert lab[i] == 1 and int(p["subhalo_count"][i]) > 20
        assert float(p["theta_E_compensation"][i]) == 0 and float(p["gamma_compensation"][i]) == 0
        assert float(p["theta_E"][i]) == float(p["theta_E"][i - 1])  # the no_sub partner's macro lens
        assert float(p["substructure_ring_alpha"][i]) > 0.01
        te, cx, cy = float(p["theta_E"][i]), float(p["center_x"][i]), float(p["center_y"][i])
        shape = {k: float(p[k][i]) for k in ("e1", "e2", "center_x", "center_y")}
        epl = [{"theta_E": te, "gamma": float(p["gamma"][i]), **shape}]
        subs = _tnfw_kwargs(p, i)
        lm_epl, lm_sub = LensModel(["EPL"]), LensModel(["TNFW"] * len(subs))
        radii = np.array([0.37, 0.8, 0.95, 1.0, 1.13, 1.5, 2.21]) * te
        ang = np.linspace(0.0, 2 * np.pi, 1024, endpoint=False)
        c = {k: p[k][i : i + 1, None] for k in ("center_x", "center_y", "radial_dr")}
        for r in radii:
            x, y = torch.tensor(cx + r * np.cos(ang))[None], torch.tensor(cy + r * np.sin(ang))[None]
            ax, ay = alpha_radial_table(x, y, c["center_x"], c["center_y"], c["radial_dr"],
                                        p["radial_alpha"][i : i + 1])  # fmt: skip
            table_mean = float((ax[0].numpy() * np.cos(ang) + ay[0].numpy() * np.sin(ang)).mean())
            sub_mean = _ring_mean(lm_sub, subs, cx, cy, r)
            assert table_mean < 0 < sub_mean
            # the whole lens's enclosed mass is the EPL's: the residual is a small part of the subhalos' own
            assert abs(sub_mean + table_mean) < 1e-4 + 0.02 * sub_mean, (r / te, sub_mean, table_mean)
            total = _ring_mean(lm_epl, epl, cx, cy, r) + sub_mean + table_mean
            assert abs(total - _ring_mean(lm_epl, epl, cx, cy, r)) < 1e-4 + 0.02 * sub_mean


def test_monopole_smooth_control_is_no_sub_and_ring_blind():
    """Under "monopole" a cdm_smooth image is its no_sub partner, byte for byte (the smoothed population's
    deflection minus the same monopole is 0), on the eager and the dense renderer; cdm and axion images carry
    a table, and the ring radius and theta_E_eff no longer tell cdm from no_sub at 8x Sigma_sub."""
    over = {**SMALL, **HEAVY_8X, "class_names": ["no_sub", "cdm", "cdm_smooth", "axion"], "noise": "none"}
    a = simulate("model_ii", 8, seed=1, device="cpu", overrides=over, paired=True)
    p = a.params
    assert torch.equal(a.images[2], a.images[0]) and torch.equal(a.images[6], a.images[4])
    assert not torch.equal(a.images[1], a.images[0])
    assert p["subhalo_smoothed"].tolist() == [0, 0, 1, 0] * 2
    assert bool((p["radial_dr"][1::4] > 0).all() and (p["radial_dr"][3::4] > 0).all())
    assert not bool(p["radial_dr"][0::4].any() or p["radial_dr"][2::4].any())
    from deeplense_ray.sim.simulate import Renderer

    pf = {k: (v.float() if v.is_floating_point() else v) for k, v in p.items()}
    eager = Renderer(preset=a.preset, device=torch.device("cpu"), dtype=torch.float32)(pf)
    dense = Renderer(preset=a.preset, device=torch.device("cpu"), dtype=torch.float32, dense=True)(pf)
    assert float((eager - dense).norm() / eager.norm()) < 1e-5
    aucs = ring_size_aucs("model_ii", 150, 0, overrides={**SMALL, **HEAVY_8X}, device="cpu")["cdm_vs_no_sub"]
    assert abs(aucs["auc_ring_radius"] - 0.5) <= 0.03 and abs(aucs["auc_theta_E_eff"] - 0.5) <= 1e-9


def test_triton_kernel_radial_tables_match_torch():
    """The fused kernel's radial tables (cdm_smooth, minus a monopole), run by Triton's interpreter on the
    CPU, render what the torch renderer does (skipped visibly where triton is not installed)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    try:
        import triton  # noqa: F401
    except ImportError:
        interp = Path(sys.prefix) / "triton-interp"  # where `make install` puts it on a CPU machine
        if not (interp / "triton").is_dir():
            pytest.skip(f"triton is not installed (nor in {interp}): the kernel's radial tables go unchecked")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(interp), env.get("PYTHONPATH", "")]))
    code = (
        "import torch\n"
        "from deeplense_ray.sim.simulate import _TritonBatches, _TorchBatches, resolve_labels\n"
        "from deeplense_ray.sim.presets import resolve_preset\n"
        "from deeplense_ray.sim.sampling import draw_parameters\n"
        "worst = 0.0\n"
        "for comp in ('monopole', 'ring_slope'):\n"
        "    over = {'num_pix': 20, 'noise': 'none', 'mass_compensation': comp, 'sigma_sub': [0.0, 0.032],\n"
        "            'class_names': ['no_sub', 'cdm', 'cdm_smooth', 'axion']}\n"
        "    pre = resolve_preset('model_ii', over)\n"
        "    lab = resolve_labels(pre, 8, None, None)\n"
        "    p = draw_parameters(pre, lab, torch.Generator().manual_seed(3), paired=True)\n"
        "    assert bool((p['radial_dr'] > 0).any())\n"
        "    a = _TritonBatches(pre, p, torch.device('cpu'), 1)(0, 8)\n"
        "    b = _TorchBatches(pre, p, torch.device('cpu'), torch.float32, None, 1, compile=False)(0, 8)\n"
        "    worst = max(worst, float((a - b).abs().max() / b.abs().max()))\n"
        "print(worst)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


# ----------------------------------------------------------------------------- the subhalo mean radial table

#: tNFW subhalos (Rs, alpha_Rs, r_trunc) over model_ii's ranges: compact (tau ~ 2), typical, tau = 44,
#: large, tau = 0.3 (truncated inside Rs)
_SUBS = [(0.04, 0.0008, 0.09), (0.2, 0.0017, 1.8), (0.05, 0.001, 2.2), (1.5, 0.012, 8.5), (0.3, 0.003, 0.09)]
#: (s, r): subhalo distance from the centre and circle radius: on the circle, 1e-3 inside / outside it (at
#: two radii), far inside, far outside, at the centre, a large circle
_GEOMETRIES = [(1.2, 1.2), (1.2, 1.201), (1.2, 1.199), (4.7, 4.75), (4.7, 4.6), (0.3, 2.5), (3.5, 0.5),
               (0.004, 0.8), (4.5, 8.0)]  # fmt: skip


def _one_subhalo_images(pairs) -> tuple[dict, torch.Tensor]:
    """One image per (s, r, Rs, alpha_Rs, r_trunc): the subhalo at angle 0.3 k about centre (0.07, -0.04)."""
    a = torch.tensor(pairs, dtype=F64)
    n = a.shape[0]
    ang = 0.3 * torch.arange(n, dtype=F64)
    cx, cy = torch.full((n,), 0.07, dtype=F64), torch.full((n,), -0.04, dtype=F64)
    sx, sy = cx + a[:, 0] * torch.cos(ang), cy + a[:, 0] * torch.sin(ang)
    p = {"subhalo_count": torch.ones(n, dtype=torch.int64), "center_x": cx, "center_y": cy,
         "subhalo_x": sx[:, None], "subhalo_y": sy[:, None], "subhalo_Rs": a[:, 2:3],
         "subhalo_alpha_Rs": a[:, 3:4], "subhalo_r_trunc": a[:, 4:5]}  # fmt: skip
    return p, a[:, 1:2]


def test_subhalo_mean_radial_against_lenstronomy():
    """The graded Gauss-Legendre half-circle rule against lenstronomy's TNFW averaged over 2^18 angles
    (subhalos on, 1e-3 off, far inside / outside the circle, at the centre; compact to large, tau 0.3-44):
    errors within 2e-5 of the subhalo's own m_tot / r in float32 (the profile's float32 evaluation) and 2e-6
    in float64 (the quadrature; a wrong factor, arc or node map fails); the former 64-angle ring misses
    compact subhalos near large circles by > 1 %."""
    pytest.importorskip("lenstronomy")
    from lenstronomy.LensModel.lens_model import LensModel

    from deeplense_ray.sim.compensation import subhalo_mean_radial

    pairs = [(s, r, *sub) for sub in _SUBS for s, r in _GEOMETRIES]
    p, radii = _one_subhalo_images(pairs)
    cpu, rows = torch.device("cpu"), torch.arange(len(pairs))
    ours = subhalo_mean_radial(p, rows, radii, "tnfw", device=cpu)[:, 0].numpy()
    ours64 = subhalo_mean_radial(p, rows, radii, "tnfw", device=cpu, dtype=F64)[:, 0].numpy()
    ring = subhalo_mean_radial(p, rows, radii, "tnfw", device=cpu, method="ring")[:, 0].numpy()
    lm = LensModel(["TNFW"])
    ref, scale = [], []
    for s, r, rs, a_rs, rt in pairs:
        kw = [{"Rs": rs, "alpha_Rs": a_rs, "r_trunc": rt, "center_x": s, "center_y": 0.0}]
        ref.append(_ring_mean(lm, kw, 0.0, 0.0, r, n_phi=2**18))
        big = 1e4 * (rs + rt)
        scale.append(float(lm.alpha(big, 0.0, kw)[0]) * big / r)  # m_tot / r: its mean far outside
    ref, scale = np.array(ref), np.array(scale)
    err, err64 = np.abs(ours - ref) / scale, np.abs(ours64 - ref) / scale
    assert err.max() < 2e-5 and err64.max() < 2e-6, (err.max(), err64.max(), pairs[int(np.argmax(err64))])
    assert (np.abs(ring - ref) / scale).max() > 0.01  # the former 64-angle ring: compact subhalos, large r
    # the exact limits: a subhalo at the centre has mean radial deflection |alpha(r)| (the renderer's), and
    # r = 0 gives 0
    centre = [(0.0, r, *sub) for sub in _SUBS for r in (0.05, 1.3)]
    p0, r0 = _one_subhalo_images(centre)
    got = subhalo_mean_radial(p0, torch.arange(len(centre)), r0, "tnfw", device=cpu, dtype=F64)[:, 0]
    z = torch.zeros(len(centre), dtype=F64)
    a0 = torch.tensor(centre, dtype=F64)
    exact = alpha_tnfw(a0[:, 1], z, a0[:, 2], a0[:, 3], a0[:, 4])[0]
    assert torch.allclose(got, exact, rtol=1e-12, atol=0)
    zero = subhalo_mean_radial(p0, torch.arange(len(centre)), torch.zeros_like(r0), "tnfw", device=cpu)
    assert torch.equal(zero, torch.zeros_like(r0))


def test_tnfw_radial_matches_alpha_tnfw():
    """The table's in-place tNFW a(rho) = |alpha| / rho is ``alpha_tnfw``'s (floors included: X < 1e-3, X = 1
    exactly, tau < 1 and > 1): in float64 to rounding (1e-9: the formula's terms cancel as X -> 0); in
    float32 as close to the float64 value as ``alpha_tnfw``'s float32 (which loses digits to the same
    cancellation, ~1e-7 / X^2, and for tau < 1 at X >> 1) where X >= 0.02."""
    from deeplense_ray.sim.compensation import _tnfw_radial

    X = torch.tensor(
        [1e-5, 5e-4, 1e-3, 0.02, 0.1, 0.5, 1.0 - 1e-9, 1.0, 1.0 + 1e-7, 1.5, 7.0, 60.0, 400.0], dtype=F64
    )
    for rs, a_rs, rt in _SUBS:
        Rs, a, T = (torch.tensor([[v]], dtype=F64) for v in (rs, a_rs, rt))  # [1, 1] (images, subhalos)
        rho = X * rs
        ref = alpha_tnfw(rho, torch.zeros_like(rho), Rs[0], a[0], T[0])[0] / rho
        f32 = [v.float() for v in (rho, torch.zeros_like(rho), Rs[0], a[0], T[0])]
        ren32 = (alpha_tnfw(*f32)[0] / f32[0]).double()
        for dt in (F64, torch.float32):
            col = lambda v, dt=dt: v.to(dt)[..., None]  # noqa: E731
            rho2 = (rho * rho)[None, None, None].to(dt)  # [1, 1, 1, nodes]
            got = _tnfw_radial(rho2, torch.empty_like(rho2), a[..., None], Rs[..., None], T[..., None], col)
            err = (got[0, 0, 0].double() - ref).abs()
            if dt == F64:
                assert (err <= 1e-9 * ref.abs()).all(), (rs, rt, err / ref)
            else:
                ok = err <= 3 * (ren32 - ref).abs() + 2e-6 * ref.abs()
                assert ok[X >= 0.02].all(), (rs, rt, err / ref, (ren32 - ref) / ref)


def test_subhalo_mean_radial_independent_of_chunking():
    """The same tables, to the last bit, whatever the chunk size (the images' grouping and the zero padding
    of their subhalo lists), the images' order, or which other images are in the call."""
    from deeplense_ray.sim.compensation import smooth_table_size, subhalo_mean_radial

    pre, _, p = _draw({}, 60, seed=4, classes=("no_sub", "cdm"))
    rows = torch.nonzero(p["subhalo_count"] > 0).squeeze(1)
    assert rows.numel() >= 20 and len(set(p["subhalo_count"][rows].tolist())) >= 10
    radii = p["theta_E"][rows, None] * torch.arange(smooth_table_size(pre), dtype=F64) / 10
    cpu = torch.device("cpu")
    ref = subhalo_mean_radial(p, rows, radii, "tnfw", device=cpu)
    for budget in (1, 2**13, 2**16, 2**24):
        assert torch.equal(subhalo_mean_radial(p, rows, radii, "tnfw", device=cpu, budget=budget), ref)
    back = torch.arange(rows.numel() - 1, -1, -1)
    assert torch.equal(subhalo_mean_radial(p, rows[back], radii[back], "tnfw", device=cpu), ref[back])
    for k in (0, rows.numel() // 2, rows.numel() - 1):
        one = subhalo_mean_radial(p, rows[k : k + 1], radii[k : k + 1], "tnfw", device=cpu)
        assert torch.equal(one[0], ref[k])


def test_monopole_images_match_former_ring_tables(monkeypatch):
    """Rendered monopole images (noise free) with the Gauss-Legendre tables equal those with the former
    64-angle ring tables to 1e-4 of the brightest pixel (the two differ where the ring was inexact)."""
    import functools

    from deeplense_ray.sim import compensation

    over = {**SMALL, "noise": "none", "class_names": ["no_sub", "cdm"]}
    new = simulate("model_ii", 12, seed=3, device="cpu", overrides=over).images.double()
    ring = functools.partial(compensation.subhalo_mean_radial, method="ring")
    monkeypatch.setattr(compensation, "subhalo_mean_radial", ring)
    old = simulate("model_ii", 12, seed=3, device="cpu", overrides=over)
    assert old.preset.mass_compensation == "monopole" and bool((old.params["radial_dr"] > 0).any())
    diff = float((new - old.images.double()).abs().max() / new.abs().max())
    assert 0 < diff < 1e-4


def test_point_mass_mean_radial_is_gauss():
    """Point-mass subhalos: theta_E^2 / r for those inside the circle, half of it on it, none outside; 0 at
    r = 0 (the table's first node), not 0 / 0."""
    from deeplense_ray.sim.compensation import subhalo_mean_radial

    te = torch.tensor([[0.1, 0.2, 0.05]], dtype=F64)
    p = {"subhalo_count": torch.tensor([3]), "center_x": torch.tensor([0.5], dtype=F64),
         "center_y": torch.tensor([0.0], dtype=F64), "subhalo_theta_E": te,
         "subhalo_x": torch.tensor([[0.5 + 0.3, 0.5, 0.5 - 1.0]], dtype=F64),
         "subhalo_y": torch.tensor([[0.0, 2.0, 0.0]], dtype=F64)}  # fmt: skip
    radii = torch.tensor([[0.0, 0.2, 1.0, 1.5, 2.5]], dtype=F64)
    got = subhalo_mean_radial(p, torch.tensor([0]), radii, "point_mass", device=torch.device("cpu"))[0]
    t2 = (te[0] ** 2).tolist()
    want = [0.0, 0.0, (t2[0] + 0.5 * t2[2]) / 1.0, (t2[0] + t2[2]) / 1.5, sum(t2) / 2.5]
    assert torch.allclose(got, torch.tensor(want, dtype=F64), rtol=1e-6, atol=0)
