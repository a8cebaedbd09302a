"""Lens and light kernels against lenstronomy (float64, 1e-6 relative) and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.LightModel.light_model import LightModel

from deeplense_ray.sim import cosmology
from deeplense_ray.sim.lens import (
    alpha_line_segment,
    alpha_nfw,
    alpha_point_mass,
    alpha_point_masses_sum,
    alpha_shear,
    alpha_sie,
    alpha_sis,
    alpha_tnfw,
    ellipticity_to_phi_q,
    phi_q_to_ellipticity,
)
from deeplense_ray.sim.light import pixelated_source, sersic_elliptical, sersic_spherical, sersic_total_flux

F64 = torch.float64
RNG = np.random.default_rng(20240611)


def _points(n: int = 400, half: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    x = RNG.uniform(-half, half, n)
    y = RNG.uniform(-half, half, n)
    return x, y


def _rel_err(ours: tuple[torch.Tensor, torch.Tensor], ref: tuple[np.ndarray, np.ndarray]) -> float:
    ox, oy = (o.numpy() for o in ours)
    rx, ry = ref
    err = np.hypot(ox - rx, oy - ry)
    scale = np.hypot(rx, ry)
    return float(np.max(err / np.maximum(scale, 1e-12)))


def _t(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=F64)


def _random_lens_kwargs(name: str) -> dict[str, float]:
    cx, cy = RNG.uniform(-0.3, 0.3, 2)
    if name == "SIS":
        return {"theta_E": RNG.uniform(0.5, 2.0), "center_x": cx, "center_y": cy}
    if name == "SIE":
        e1, e2 = RNG.uniform(-0.4, 0.4, 2)
        return {"theta_E": RNG.uniform(0.5, 2.0), "e1": e1, "e2": e2, "center_x": cx, "center_y": cy}
    if name == "SHEAR":
        g1, g2 = RNG.uniform(-0.1, 0.1, 2)
        return {"gamma1": g1, "gamma2": g2}
    if name == "POINT_MASS":
        return {"theta_E": RNG.uniform(0.01, 1.0), "center_x": cx, "center_y": cy}
    if name == "NFW":
        return {
            "Rs": RNG.uniform(0.1, 2.0),
            "alpha_Rs": RNG.uniform(0.01, 1.0),
            "center_x": cx,
            "center_y": cy,
        }
    if name == "TNFW":
        rs = RNG.uniform(0.1, 1.0)
        return {
            "Rs": rs,
            "alpha_Rs": RNG.uniform(0.01, 1.0),
            "r_trunc": rs * RNG.uniform(1.5, 10.0),
            "center_x": cx,
            "center_y": cy,
        }
    raise AssertionError(name)


_FN = {
    "SIS": lambda x, y, k: alpha_sis(x, y, *map(_t, (k["theta_E"], k["center_x"], k["center_y"]))),
    "SIE": lambda x, y, k: alpha_sie(
        x, y, *map(_t, (k["theta_E"], k["e1"], k["e2"], k["center_x"], k["center_y"]))
    ),
    "SHEAR": lambda x, y, k: alpha_shear(x, y, _t(k["gamma1"]), _t(k["gamma2"])),
    "POINT_MASS": lambda x, y, k: alpha_point_mass(
        x, y, *map(_t, (k["theta_E"], k["center_x"], k["center_y"]))
    ),
    "NFW": lambda x, y, k: alpha_nfw(x, y, *map(_t, (k["Rs"], k["alpha_Rs"], k["center_x"], k["center_y"]))),
    "TNFW": lambda x, y, k: alpha_tnfw(
        x, y, *map(_t, (k["Rs"], k["alpha_Rs"], k["r_trunc"], k["center_x"], k["center_y"]))
    ),
}


@pytest.mark.parametrize("name", ["SIS", "SIE", "SHEAR", "POINT_MASS", "NFW", "TNFW"])
def test_deflection_matches_lenstronomy_float64(name):
    lm = LensModel([name])
    for _ in range(5):
        kw = _random_lens_kwargs(name)
        x, y = _points()
        ref = lm.alpha(x, y, [kw])
        ours = _FN[name](torch.from_numpy(x), torch.from_numpy(y), kw)
        assert _rel_err(ours, ref) <= 1e-6, (name, kw)


def test_sie_near_round_and_at_centre():
    x, y = (torch.from_numpy(a) for a in _points(200))
    sis = alpha_sis(x, y, _t(1.3), _t(0.0), _t(0.0))
    for eps in (0.0, 1e-12, 1e-8, 1e-5):
        sie = alpha_sie(x, y, _t(1.3), _t(eps), _t(-eps / 2), _t(0.0), _t(0.0))
        assert torch.isfinite(sie[0]).all() and torch.isfinite(sie[1]).all()
        err = _rel_err(sie, (sis[0].numpy(), sis[1].numpy()))
        assert err <= 1e-6 + 2 * eps, (eps, err)
    # float32, exactly round and nearly round
    x32, y32 = x.float(), y.float()
    sis32 = alpha_sis(x32, y32, torch.tensor(1.3), 0.0, 0.0)
    for eps in (0.0, 1e-9, 1e-6):
        sie32 = alpha_sie(x32, y32, torch.tensor(1.3), torch.tensor(eps), torch.tensor(0.0), 0.0, 0.0)
        err = _rel_err(
            tuple(a.double() for a in sie32), (sis32[0].double().numpy(), sis32[1].double().numpy())
        )
        assert err <= 1e-6 + 2 * eps, (eps, err)
    # exactly at the centre: finite (zero) in both precisions, also for q -> 1
    for dtype in (torch.float32, torch.float64):
        z = torch.zeros(3, dtype=dtype)
        for e in (0.0, 1e-7, 0.3):
            ax, ay = alpha_sie(
                z,
                z,
                torch.tensor(1.0, dtype=dtype),
                torch.tensor(e, dtype=dtype),
                torch.tensor(0.0, dtype=dtype),
                0.0,
                0.0,
            )
            assert torch.isfinite(ax).all() and torch.isfinite(ay).all()
            assert float(ax.abs().max()) == 0.0 and float(ay.abs().max()) == 0.0


def test_sie_float32_close_to_float64():
    x, y = _points()
    kw = _random_lens_kwargs("SIE")
    ref = LensModel(["SIE"]).alpha(x, y, [kw])
    t32 = [torch.tensor(kw[k], dtype=torch.float32) for k in ("theta_E", "e1", "e2", "center_x", "center_y")]
    ours = alpha_sie(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), *t32)
    assert _rel_err(tuple(o.double() for o in ours), ref) <= 1e-4


def test_ellipticity_conventions_match_lenstronomy():
    from lenstronomy.Util import param_util

    phi = torch.tensor(RNG.uniform(0, math.pi, 50))
    q = torch.tensor(RNG.uniform(0.2, 1.0, 50))
    e1, e2 = phi_q_to_ellipticity(phi, q)
    r1, r2 = param_util.phi_q2_ellipticity(phi.numpy(), q.numpy())
    np.testing.assert_allclose(e1.numpy(), r1, rtol=0, atol=1e-14)
    np.testing.assert_allclose(e2.numpy(), r2, rtol=0, atol=1e-14)
    p2, q2, _ = ellipticity_to_phi_q(e1, e2)
    rp, rq = param_util.ellipticity2phi_q(e1.numpy(), e2.numpy())
    np.testing.assert_allclose(q2.numpy(), rq, atol=1e-14)
    np.testing.assert_allclose(p2.numpy(), rp, atol=1e-14)


def test_point_masses_sum_matches_lenstronomy():
    K = 7
    th = RNG.uniform(0.001, 0.1, K)
    cx, cy = RNG.uniform(-2, 2, K), RNG.uniform(-2, 2, K)
    kws = [{"theta_E": th[k], "center_x": cx[k], "center_y": cy[k]} for k in range(K)]
    x, y = _points()
    ref = LensModel(["POINT_MASS"] * K).alpha(x, y, kws)
    pad = lambda a: torch.tensor(np.concatenate([a, np.zeros(3)]))[None]  # noqa: E731 (zero padding)
    ours = alpha_point_masses_sum(torch.from_numpy(x), torch.from_numpy(y), pad(th), pad(cx), pad(cy))
    assert _rel_err((ours[0][0], ours[1][0]), ref) <= 1e-6


def _segment_by_quadrature(x, y, theta_tot, h, angle):
    from scipy.integrate import quad

    mu = theta_tot**2 / (2 * h)
    out = []
    for xi, yi in zip(x, y):
        u = math.cos(angle) * xi + math.sin(angle) * yi
        v = -math.sin(angle) * xi + math.cos(angle) * yi
        opts = dict(epsabs=0, epsrel=1e-11, limit=200)
        au = quad(lambda s, u=u, v=v: mu * (u - s) / ((u - s) ** 2 + v**2), -h, h, **opts)[0]
        av = quad(lambda s, u=u, v=v: mu * v / ((u - s) ** 2 + v**2), -h, h, **opts)[0]
        out.append((math.cos(angle) * au - math.sin(angle) * av, math.sin(angle) * au + math.cos(angle) * av))
    return np.array(out).T


def test_line_segment_closed_form_quadrature_and_point_masses():
    theta_tot, h, angle = 0.2, 0.7, 0.6
    x, y = _points(60, 2.0)
    ours = alpha_line_segment(torch.from_numpy(x), torch.from_numpy(y), _t(theta_tot), _t(h), _t(angle))
    ref = _segment_by_quadrature(x, y, theta_tot, h, angle)
    assert _rel_err(ours, (ref[0], ref[1])) <= 1e-8
    # many equal point masses along the line (lenstronomy POINT_MASS), away from the segment itself
    N = 2000
    s = (np.arange(N) + 0.5) / N * 2 * h - h
    kws = [
        {
            "theta_E": theta_tot / math.sqrt(N),
            "center_x": si * math.cos(angle),
            "center_y": si * math.sin(angle),
        }
        for si in s
    ]
    xs, ys = _points(40, 2.0)
    v = -math.sin(angle) * xs + math.cos(angle) * ys
    keep = np.abs(v) > 0.1
    xs, ys = xs[keep], ys[keep]
    ref_pm = LensModel(["POINT_MASS"] * N).alpha(xs, ys, kws)
    ours2 = alpha_line_segment(torch.from_numpy(xs), torch.from_numpy(ys), _t(theta_tot), _t(h), _t(angle))
    assert _rel_err(ours2, ref_pm) <= 1e-3
    # far away it is a point mass of the same total
    far = torch.tensor([40.0, -30.0], dtype=F64), torch.tensor([25.0, 50.0], dtype=F64)
    seg = alpha_line_segment(*far, _t(theta_tot), _t(h), _t(angle))
    pm = alpha_point_mass(*far, _t(theta_tot))
    assert _rel_err(seg, (pm[0].numpy(), pm[1].numpy())) <= 1e-3


def test_sersic_matches_lenstronomy():
    x, y = _points(500, 2.0)
    lm = LightModel(["SERSIC_ELLIPSE", "SERSIC"])
    for _ in range(5):
        e1, e2 = RNG.uniform(-0.4, 0.4, 2)
        k1 = {
            "amp": RNG.uniform(1, 20),
            "R_sersic": RNG.uniform(0.1, 1.0),
            "n_sersic": RNG.uniform(0.5, 4.0),
            "e1": e1,
            "e2": e2,
            "center_x": RNG.uniform(-0.3, 0.3),
            "center_y": RNG.uniform(-0.3, 0.3),
        }
        k2 = {
            "amp": RNG.uniform(1, 20),
            "R_sersic": RNG.uniform(0.1, 1.0),
            "n_sersic": RNG.uniform(0.5, 4.0),
            "center_x": RNG.uniform(-0.3, 0.3),
            "center_y": RNG.uniform(-0.3, 0.3),
        }
        ref1 = lm.surface_brightness(x, y, [k1, {**k2, "amp": 0.0}])
        ref2 = lm.surface_brightness(x, y, [{**k1, "amp": 0.0}, k2])
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        o1 = sersic_elliptical(
            tx,
            ty,
            *map(_t, (k1["amp"], k1["R_sersic"], k1["n_sersic"], e1, e2, k1["center_x"], k1["center_y"])),
        ).numpy()
        o2 = sersic_spherical(
            tx, ty, *map(_t, (k2["amp"], k2["R_sersic"], k2["n_sersic"], k2["center_x"], k2["center_y"]))
        ).numpy()
        np.testing.assert_allclose(o1, ref1, rtol=1e-6, atol=0)
        np.testing.assert_allclose(o2, ref2, rtol=1e-6, atol=0)
        from lenstronomy.LightModel.Profiles.sersic import SersicElliptic

        tot = SersicElliptic().total_flux(amp=k1["amp"], R_sersic=k1["R_sersic"], n_sersic=k1["n_sersic"])
        ours_tot = sersic_total_flux(_t(k1["amp"]), _t(k1["R_sersic"]), _t(k1["n_sersic"]))
        assert abs(float(ours_tot) / tot - 1) <= 1e-6


def test_pixelated_source_matches_lenstronomy_interpol():
    S = 16
    stamp = RNG.uniform(0, 1, (S, S))
    stamp[0, :] = stamp[-1, :] = 0.0
    stamp /= stamp.sum()
    scale, angle, cx, cy, flux = 0.05, 0.7, 0.1, -0.05, 3.0
    x, y = _points(500, 0.6)
    ref = LightModel(["INTERPOL"]).surface_brightness(
        x,
        y,
        [
            {
                "image": stamp,
                "amp": flux / scale**2,
                "center_x": cx,
                "center_y": cy,
                "phi_G": angle,
                "scale": scale,
            }
        ],
    )
    ours = pixelated_source(
        torch.from_numpy(x)[None],
        torch.from_numpy(y)[None],
        torch.from_numpy(stamp)[None, None],
        _t(flux)[None],
        _t(S * scale)[None],
        _t(angle)[None],
        _t(cx)[None],
        _t(cy)[None],
    )[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9 * ref.max())


def test_cosmology_einstein_radius_and_distances():
    theta = cosmology.einstein_radius_point_mass(1e12, 0.5, 1.0)
    assert 1.65 < theta < 1.68  # not the 1.28" of luminosity distances
    import astropy.cosmology as astropy_cosmo

    c = astropy_cosmo.FlatLambdaCDM(H0=70, Om0=0.3)
    for z in (0.1, 0.5, 1.0, 2.5):
        assert abs(cosmology.angular_diameter_distance(z) / c.angular_diameter_distance(z).value - 1) < 1e-9
    assert (
        abs(
            cosmology.angular_diameter_distance_z1z2(0.5, 1.0) / c.angular_diameter_distance(0.5, 1.0).value
            - 1
        )
        < 1e-9
    )
    assert (
        abs(cosmology.critical_density_msun_per_mpc3(0.5) / c.critical_density(0.5).to("Msun/Mpc3").value - 1)
        < 1e-6
    )
    # lenstronomy's own conversion (its LensCosmo uses astropy distances)
    from lenstronomy.Cosmo.lens_cosmo import LensCosmo

    lc = LensCosmo(z_lens=0.5, z_source=1.0, cosmo=c)
    # (lenstronomy's physical constants differ from ours (IAU 2015 GM_sun) at the 1e-4 level)
    assert abs(theta / _lenstronomy_point_mass_theta(lc, 1e12) - 1) < 1e-3
    assert abs(cosmology.sigma_crit_msun_per_arcsec2(0.5, 1.0) / lc.sigma_crit_angle - 1) < 1e-3
    with pytest.raises(ValueError, match="z_source > z_lens"):
        cosmology.angular_diameter_distance_z1z2(1.0, 0.5)


def _lenstronomy_point_mass_theta(lc, mass: float) -> float:
    # theta_E^2 = M / (pi Sigma_crit) in angular units
    sigma_crit_arcsec = lc.sigma_crit_angle  # Msun / arcsec^2
    return math.sqrt(mass / (math.pi * sigma_crit_arcsec))
