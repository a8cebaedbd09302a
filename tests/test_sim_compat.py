"""Rendered images against lenstronomy's ImageModel.image (same grid, supersampling and PSF)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lenstronomy.Data.imaging_data import ImageData
from lenstronomy.Data.psf import PSF
from lenstronomy.ImSim.image_model import ImageModel
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.LightModel.light_model import LightModel
from lenstronomy.Util.simulation_util import data_configure_simple

from deeplense_ray.sim import simulate
from deeplense_ray.sim.compat import lenstronomy_image


def lenstronomy_reference(
    lens_list, kw_lens, src_list, kw_src, num_pix, delta_pix, ss, fwhm, kw_ll=None, *, ss_conv=False
):
    data = ImageData(**data_configure_simple(num_pix, delta_pix, inverse=False))
    psf = PSF("GAUSSIAN", fwhm=fwhm, truncation=5) if fwhm else PSF("NONE")
    model = ImageModel(
        data_class=data,
        psf_class=psf,
        lens_model_class=LensModel(lens_list),
        source_model_class=LightModel(src_list),
        lens_light_model_class=LightModel(["SERSIC_ELLIPSE"] if kw_ll else []),
        kwargs_numerics={"supersampling_factor": ss, "supersampling_convolution": ss_conv},
    )
    return model.image(kw_lens, kw_src, kwargs_lens_light=kw_ll)


def _rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _random_config(rng):
    e1, e2, se1, se2 = rng.uniform(-0.3, 0.3, 4)
    lens = ["SIE", "SHEAR", "POINT_MASS", "POINT_MASS", "NFW", "TNFW"]
    kw_lens = [
        {
            "theta_E": rng.uniform(0.8, 1.6),
            "e1": e1,
            "e2": e2,
            "center_x": rng.uniform(-0.1, 0.1),
            "center_y": rng.uniform(-0.1, 0.1),
        },
        {"gamma1": rng.uniform(-0.05, 0.05), "gamma2": rng.uniform(-0.05, 0.05)},
        {
            "theta_E": rng.uniform(0.01, 0.08),
            "center_x": rng.uniform(-1.5, 1.5),
            "center_y": rng.uniform(-1.5, 1.5),
        },
        {
            "theta_E": rng.uniform(0.01, 0.08),
            "center_x": rng.uniform(-1.5, 1.5),
            "center_y": rng.uniform(-1.5, 1.5),
        },
        {
            "Rs": rng.uniform(0.05, 0.3),
            "alpha_Rs": rng.uniform(0.005, 0.05),
            "center_x": rng.uniform(-1.5, 1.5),
            "center_y": rng.uniform(-1.5, 1.5),
        },
        {
            "Rs": rng.uniform(0.05, 0.3),
            "alpha_Rs": rng.uniform(0.005, 0.05),
            "r_trunc": rng.uniform(0.5, 1.5),
            "center_x": rng.uniform(-1.5, 1.5),
            "center_y": rng.uniform(-1.5, 1.5),
        },
    ]
    src = ["SERSIC_ELLIPSE", "SERSIC"]
    kw_src = [
        {
            "amp": rng.uniform(5, 20),
            "R_sersic": rng.uniform(0.15, 0.4),
            "n_sersic": rng.uniform(0.7, 3.0),
            "e1": se1,
            "e2": se2,
            "center_x": rng.uniform(-0.3, 0.3),
            "center_y": rng.uniform(-0.3, 0.3),
        },
        {
            "amp": rng.uniform(1, 5),
            "R_sersic": rng.uniform(0.1, 0.3),
            "n_sersic": rng.uniform(0.7, 2.0),
            "center_x": rng.uniform(-0.3, 0.3),
            "center_y": rng.uniform(-0.3, 0.3),
        },
    ]
    return lens, kw_lens, src, kw_src


@pytest.mark.parametrize(
    "ss,fwhm,num_pix,delta_pix", [(1, None, 40, 0.1), (2, 0.16, 40, 0.101), (3, 0.087, 48, 0.05)]
)
def test_lenstronomy_image_matches(ss, fwhm, num_pix, delta_pix):
    rng = np.random.default_rng(1000 + ss)
    for _ in range(3):
        cfg = _random_config(rng)
        ref = lenstronomy_reference(*cfg, num_pix, delta_pix, ss, fwhm)
        ours32 = lenstronomy_image(*cfg, num_pix, delta_pix, ss, fwhm, dtype=torch.float32)
        ours64 = lenstronomy_image(*cfg, num_pix, delta_pix, ss, fwhm)
        assert ours32.shape == ref.shape == (num_pix, num_pix)
        assert _rel_l2(ours32, ref) <= 1e-3
        assert _rel_l2(ours64, ref) <= 1e-6


def test_lenstronomy_image_bad_input():
    cfg = (
        ["SIE"],
        [{"theta_E": 1.0, "e1": 0.0, "e2": 0.0}],
        ["SERSIC"],
        [{"amp": 1, "R_sersic": 0.2, "n_sersic": 1}],
    )
    with pytest.raises(ValueError, match="'SPEP' is not supported"):
        lenstronomy_image(["SPEP"], cfg[1], *cfg[2:], 16, 0.1)
    with pytest.raises(ValueError, match=r"lacks keyword\(s\) \['e2'\]"):
        lenstronomy_image(["SIE"], [{"theta_E": 1.0, "e1": 0.0}], *cfg[2:], 16, 0.1)
    with pytest.raises(ValueError, match="theta_E = nan"):
        lenstronomy_image(["SIE"], [{"theta_E": float("nan"), "e1": 0.0, "e2": 0.0}], *cfg[2:], 16, 0.1)
    with pytest.raises(ValueError, match="delta_pix"):
        lenstronomy_image(*cfg, 16, -0.1)


def _kwargs_from_params(p, i, K):
    """lenstronomy kwargs for image i of a simulate() result (SIE or EPL + multipoles + shear + point-mass
    subhalos)."""
    g = {k: v[i].double().numpy() for k, v in p.items()}
    main = {
        "theta_E": float(g["theta_E"]),
        "e1": float(g["e1"]),
        "e2": float(g["e2"]),
        "center_x": float(g["center_x"]),
        "center_y": float(g["center_y"]),
    }
    epl = float(g.get("gamma", 2.0)) != 2.0
    lens = ["EPL" if epl else "SIE", "SHEAR"]
    kw = [{**main, "gamma": float(g["gamma"])} if epl else main]
    kw.append({"gamma1": float(g["gamma1"]), "gamma2": float(g["gamma2"])})
    for m in (1, 3, 4) if "multipole_a1" in g else ():
        lens.append("MULTIPOLE")
        kw.append({"m": m, "a_m": float(g[f"multipole_a{m}"]), "phi_m": float(g[f"multipole_phi{m}"]),
                   "center_x": main["center_x"], "center_y": main["center_y"], "r_E": main["theta_E"]})
    for k in range(int(g["subhalo_count"])):
        lens.append("POINT_MASS")
        kw.append(
            {
                "theta_E": float(g["subhalo_theta_E"][k]),
                "center_x": float(g["subhalo_x"][k]),
                "center_y": float(g["subhalo_y"][k]),
            }
        )
    src = ["SERSIC_ELLIPSE"]
    kws = [
        {
            "amp": float(g["source_amp"]),
            "R_sersic": float(g["source_R_sersic"]),
            "n_sersic": float(g["source_n_sersic"]),
            "e1": float(g["source_e1"]),
            "e2": float(g["source_e2"]),
            "center_x": float(g["source_center_x"]),
            "center_y": float(g["source_center_y"]),
        }
    ]
    return lens, kw, src, kws


def test_simulate_noise_free_matches_lenstronomy():
    """The batched renderer (not only the compat path) reproduces lenstronomy for drawn no_sub/cdm images."""
    # point-mass subhalos (the normalised tNFW population is checked in test_sim_substructure.py); the PSF
    # on the supersampled grid as model_ii has it (lenstronomy supersampling_convolution=True)
    # (the "monopole" compensation's radial table has no lenstronomy profile: test_sim_compensation.py checks
    # it against lenstronomy's subhalo deflections; here the lens is what lenstronomy's kwargs hold)
    pm = {"sigma_sub": None, "subhalo_profile": "point_mass", "subhalo_mass": [1e6, 1e10],
          "mass_compensation": "ring_slope"}  # fmt: skip
    over = {"num_pix": 40, "noise": "none", "source_amp": [5.0, 10.0], "subhalo_count": [5, 8], **pm}
    res = simulate("model_ii", 4, seed=3, device="cpu", classes=["no_sub", "cdm"], overrides=over)
    pre = res.preset
    assert pre.supersampling_convolution
    for i in range(4):
        cfg = _kwargs_from_params(res.params, i, pre.max_subhalos)
        ref = lenstronomy_reference(
            *cfg, pre.num_pix, pre.delta_pix, pre.supersampling, pre.psf_fwhm, ss_conv=True
        )
        assert _rel_l2(res.images[i, 0].numpy(), ref) <= 1e-3, i
    assert int(res.params["subhalo_count"][1]) >= 5 and int(res.params["subhalo_count"][0]) == 0
    # with lens light (Sersic at the lens centre with the lens ellipticity), instrument units
    res = simulate(
        "model_iii",
        2,
        seed=8,
        device="cpu",
        classes=["cdm"],
        overrides={
            "num_pix": 40,
            "noise": "none",
            "lens_light": True,
            "supersampling_convolution": False,
            **pm,
        },
    )
    pre = res.preset
    for i in range(2):
        cfg = _kwargs_from_params(res.params, i, pre.max_subhalos)
        g = {k: float(v[i]) for k, v in res.params.items() if v.dim() == 1}
        kw_ll = [
            {
                "amp": g["lens_light_amp"],
                "R_sersic": g["lens_light_R_sersic"],
                "n_sersic": g["lens_light_n_sersic"],
                "e1": g["e1"],
                "e2": g["e2"],
                "center_x": g["center_x"],
                "center_y": g["center_y"],
            }
        ]
        ref = lenstronomy_reference(*cfg, pre.num_pix, pre.delta_pix, pre.supersampling, pre.psf_fwhm, kw_ll)
        assert _rel_l2(res.images[i, 0].numpy(), ref) <= 1e-3, i
