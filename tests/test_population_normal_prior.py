"""A normal training prior (``sigma_sub_normal``, sim/priors.py) from the simulator's draws through the
inference run's recorded prior to the population inference that divides it out.

The point of it: a network that says nothing about a lens returns the training prior. Under a normal
training prior that posterior divided by the prior is flat, so such lenses drop out and the population's
scatter stays unconstrained; under a uniform prior a Gaussian head cannot return the prior and the same lens
reads as a measurement at the prior mean (tests/test_population.py::test_prior_like_posteriors_are_flagged).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from deeplense_ray.infer.population import (
    implied_likelihood,
    infer_population_1d,
    load_target,
    log_likelihood_analytic,
    log_likelihood_grid,
    log_likelihood_importance,
    log_likelihood_wide,
    prior_gaussian,
    sample_posteriors,
)
from deeplense_ray.infer.population_calibration import (
    calibration_run,
    coverage_check,
    simulate_population_posteriors,
)
from deeplense_ray.infer.posteriors import gaussian_posteriors, read_posteriors, write_posteriors
from deeplense_ray.sim import resolve_preset
from deeplense_ray.sim.priors import draw_in_range
from deeplense_ray.sim.sampling import draw_parameters
from deeplense_ray.sim.simulate import resolve_labels
from deeplense_ray.train.gaussian import prior_moments
from deeplense_ray.train.targets import preset_prior, target_spec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PRIOR = (0.0, 0.012)  # support of the training prior of Sigma_sub [kpc^-2]
NORMAL = (2e-3, 1.1e-3)  # paltas' N(2e-3, 1.1e-3^2)
NOISE = (0.5e-3, 2e-3)  # per-lens measurement std s_i ~ U(NOISE), before the prior


def _truncnorm(mean, std, lo, hi):
    return stats.truncnorm((lo - mean) / std, (hi - mean) / std, loc=mean, scale=std)


# ------------------------------------------------------------------------------------------- simulator
@pytest.mark.parametrize(
    "rng, normal", [((0.0, 8e-3), NORMAL), ((5e-3, 1e-2), NORMAL), ((-24.0, -22.0), (-23.5, 0.3))]
)
def test_draws_follow_the_truncated_normal(rng, normal):
    """The inverse-CDF map against scipy's truncated normal (KS), inside the range, also far in a tail."""
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = draw_in_range(u, rng, normal).numpy()
    assert x.min() >= rng[0] and x.max() <= rng[1]
    assert stats.kstest(x, _truncnorm(*normal, *rng).cdf).pvalue > 1e-3
    assert torch.equal(draw_in_range(u, rng, None), rng[0] + (rng[1] - rng[0]) * u)


def test_preset_draws_sigma_sub_and_axion_mass_from_the_normal_on_the_same_stream():
    over = {"mass_compensation": "none", "subhalo_mass": [1e9, 1e10], "class_names": ["cdm", "axion"]}
    normal = {
        "sigma_sub_normal": list(NORMAL),
        "sigma_sub": [0.0, 8e-3],
        "axion_log10_mass_normal": [-23.0, 0.4],
    }
    flat = resolve_preset("model_ii", {**over, "sigma_sub": [0.0, 8e-3]})
    pre = resolve_preset("model_ii", {**over, **normal})
    lab = resolve_labels(pre, 1200, None, None)
    p = draw_parameters(pre, lab, torch.Generator().manual_seed(4), paired=False)
    q = draw_parameters(flat, lab, torch.Generator().manual_seed(4), paired=False)
    cdm, axion = lab == 0, lab == 1
    sig = p["subhalo_sigma_sub"][cdm].numpy()
    assert stats.kstest(sig, _truncnorm(*NORMAL, 0.0, 8e-3).cdf).pvalue > 1e-3
    assert stats.kstest(q["subhalo_sigma_sub"][cdm].numpy(), stats.uniform(0.0, 8e-3).cdf).pvalue > 1e-3
    log_m = np.log10(p["axion_mass"][axion].numpy())
    assert stats.kstest(log_m, _truncnorm(-23.0, 0.4, -24.0, -22.0).cdf).pvalue > 1e-3
    # one uniform draw per value either way: the macro lens and source do not move
    for key in ("theta_E", "center_x", "source_x", "source_R_sersic"):
        if key in p:
            assert torch.equal(p[key], q[key]), key
    with pytest.raises(ValueError, match="sigma_sub_normal"):
        resolve_preset("model_ii", {"sigma_sub_normal": [2e-3, 0.0]})
    with pytest.raises(ValueError, match="mass >= 1e-06 inside"):
        resolve_preset("model_ii", {"sigma_sub_normal": [0.5, 1e-3]})


def test_inference_run_records_the_truncated_normal_prior():
    pre = resolve_preset("model_ii", {"sigma_sub_normal": list(NORMAL), "sigma_sub": [0.0, 8e-3]}).to_dict()
    prior = preset_prior("sigma_sub", pre)
    assert prior == ["truncnormal", 0.0, 8e-3, *NORMAL]
    spec = target_spec(["sigma_sub", "theta_E"], pre, None)
    ref = _truncnorm(*NORMAL, 0.0, 8e-3)
    assert spec["target_loc"][0] == pytest.approx(ref.mean(), rel=1e-9)
    assert spec["target_scale"][0] == pytest.approx(ref.std(), rel=1e-9) == spec["prior_std"][0]
    assert spec["target_prior"][1][0] == "uniform" and prior_moments(spec["target_prior"][1])[1] > 0


# ------------------------------------------------------------------------------------------------- math
def test_implied_likelihood_is_the_posterior_over_the_prior():
    m, s = np.array([1e-3, 3e-3, 2.5e-3]), np.array([5e-4, 1e-3, 1.05e-3])
    ell, lam, keep = implied_likelihood(m, s, NORMAL)
    theta = np.linspace(-2e-3, 8e-3, 7)
    for i in range(m.size):
        ratio = stats.norm.logpdf(theta, m[i], s[i]) - stats.norm.logpdf(theta, *NORMAL)
        implied = stats.norm.logpdf(theta, ell[i], lam[i])
        np.testing.assert_allclose(ratio - ratio[0], implied - implied[0], rtol=1e-9, atol=1e-9)
    assert keep.all()
    _, lam, keep = implied_likelihood(np.array([2e-3]), np.array([1.2e-3]), NORMAL)
    assert not keep[0] and np.isnan(lam[0])  # wider than the prior: says nothing


@pytest.mark.parametrize(
    "m, s, mu, sigma", [(1e-3, 5e-4, 2e-3, 5e-4), (4e-3, 1e-3, 1e-3, 3e-3), (2e-3, 1e-3, 6e-3, 1e-3)]
)
def test_likelihood_matches_quadrature_under_the_normal_prior(m, s, mu, sigma):
    """L_i = int post_i p(theta | mu, sigma) / prior_train dtheta (truncated normals on the support) by
    quadrature, against the analytic form through the implied likelihood, up to one constant per lens."""
    a, b = PRIOR
    post, train = _truncnorm(m, s, a, b), _truncnorm(*NORMAL, a, b)

    def ref(mu_, sig_):
        pop = _truncnorm(mu_, sig_, a, b)
        return integrate.quad(
            lambda t: post.pdf(t) * pop.pdf(t) / train.pdf(t), a, b, points=[m, mu_], limit=200
        )[0]

    ell, lam, _ = implied_likelihood(np.array([m]), np.array([s]), NORMAL)
    grid = log_likelihood_analytic(ell, lam, a, b, np.array([mu, 2.5e-3]), np.array([sigma, 2e-3]))
    got = grid[0, 0, 0] - grid[0, 1, 1]
    assert got == pytest.approx(math.log(ref(mu, sigma) / ref(2.5e-3, 2e-3)), abs=1e-7)


def test_importance_sampling_agrees_with_analytic_under_the_normal_prior():
    rng = np.random.default_rng(3)
    d, s, _ = simulate_population_posteriors(5, 3e-3, 1.5e-3, PRIOR, NOISE, rng, prior_normal=NORMAL)
    mu, sigma = np.linspace(1e-3, 6e-3, 6), np.array([5e-4, 1e-3, 3e-3])
    exact = log_likelihood_grid(d, s, *PRIOR, mu, sigma, prior_normal=NORMAL)
    samples = sample_posteriors(d, s, *PRIOR, 200_000, rng)  # heavy weights where the prior is small
    approx = log_likelihood_grid(
        d, s, *PRIOR, mu, sigma, method="importance", samples=samples, prior_normal=NORMAL
    )
    # both up to a constant per lens: compare the shapes over the grid
    diff = (approx - approx.max()) - (exact - exact.max())
    assert np.abs(diff[exact > exact.max() - 6.0]).max() < 0.08
    flat = log_likelihood_importance(samples[:1], *PRIOR, mu, sigma)  # the uniform-prior weights differ
    assert np.ptp(flat - log_likelihood_importance(samples[:1], *PRIOR, mu, sigma, prior_normal=NORMAL)) > 0.1


@pytest.mark.parametrize("m, s", [(2.1e-3, 1.3e-3), (3e-3, 3e-3), (1e-3, 1.02e-3)])
def test_wide_lenses_match_quadrature(m, s):
    """A lens no narrower than the prior: closed form (population narrower than its curvature allows) and
    Gauss-Legendre (wider), against scipy's quadrature of post / prior x truncated population, up to one
    constant per lens; sigma = 0 is the ratio at mu."""
    a, b = 0.0, 8e-3
    divide = prior_gaussian(NORMAL, (a, b))
    pts = [(2e-3, 1e-3), (5e-3, 2e-3), (1e-3, 0.0), (7e-3, 3e-4), (3e-3, 5e-3), (4e-3, 8e-3)]

    def ref(mu, sig):
        def ratio(t):
            return math.exp(stats.norm.logpdf(t, m, s) - stats.norm.logpdf(t, *divide))

        if sig == 0:
            return math.log(ratio(mu))
        pop = _truncnorm(mu, sig, a, b)
        return math.log(integrate.quad(lambda t: ratio(t) * pop.pdf(t), a, b, points=[mu], limit=400,
                                       epsabs=0, epsrel=1e-12)[0])  # fmt: skip

    got = [
        log_likelihood_wide(np.array([m]), np.array([s]), a, b, [mu], [sig], divide)[0, 0, 0]
        for mu, sig in pts
    ]
    want = [ref(mu, sig) for mu, sig in pts]
    np.testing.assert_allclose(np.array(got) - got[0], np.array(want) - want[0], atol=1e-9)


# ------------------------------------------------------------------------------------------ calibration
def test_normal_prior_divided_out_gives_the_measurement_likelihood():
    """Lenses measured as d_i = theta_i + s_i eps, posteriors under the normal prior: dividing the prior out
    must give back the measurement N(theta; d_i, s_i^2), so the population inference equals the one on the
    raw measurements under a uniform prior (to round-off), whatever the population."""
    rng = np.random.default_rng(3)
    theta, s = rng.uniform(*PRIOR, 50), rng.uniform(*NOISE, 50)
    d = theta + s * rng.standard_normal(50)
    m0, s0 = prior_gaussian(NORMAL, PRIOR)  # what is divided out: the truncated normal's moments
    assert s0 == pytest.approx(_truncnorm(*NORMAL, *PRIOR).std()) and s0 < 0.95 * NORMAL[1]
    v = 1.0 / (1.0 / s**2 + 1.0 / s0**2)
    post_mean, post_std = v * (d / s**2 + m0 / s0**2), np.sqrt(v)
    ell, lam, keep = implied_likelihood(post_mean, post_std, (m0, s0))
    np.testing.assert_allclose(ell, d, rtol=0, atol=1e-15)
    np.testing.assert_allclose(lam, s, rtol=1e-12)
    a = infer_population_1d(post_mean, post_std, PRIOR, prior_normal=NORMAL)
    b = infer_population_1d(d, s, PRIOR)
    for key in ("mu_mean", "mu_std", "sigma_upper95", "pop_mean_mean"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-9), key


def test_population_mean_unbiased_and_covered_under_the_normal_prior():
    """Populations at 1x, 2x and 4x the prior mean (sigma* = 0.5e-3), N = 100, posteriors of a calibrated
    estimator under the normal prior (which pulls each lens towards 2e-3): mu_hat unbiased within its
    uncertainty, the 68 / 95 % intervals cover mu* within 5 points (pooled, 150 replicates). (At 0.5x mu is
    not identified against the support's edge, as under the uniform prior: tests/test_population.py.)"""
    runs = [
        calibration_run(100, mu, 5e-4, PRIOR, NOISE, 50, seed=41 + k, prior_normal=NORMAL)
        for k, mu in enumerate((2e-3, 4e-3, 8e-3))
    ]
    z = np.concatenate([(r.mu_mean - r.mu_true) / r.mu_std for r in runs])
    bounds = {
        lv: tuple(np.concatenate([r.intervals[lv][k] for r in runs]) for k in (0, 1)) for lv in (0.68, 0.95)
    }
    truth = np.concatenate([np.full(r.mu_mean.size, r.mu_true) for r in runs])
    report = coverage_check(truth, bounds)
    print(f"\nnormal prior, N=100, 150 replicates: bias_z {z.mean():+.2f}, coverage {report.rates}")
    assert abs(z.mean()) < 0.25 and report.passed, (z.mean(), report.rates)


def test_prior_like_lenses_leave_the_scatter_unconstrained():
    """1000 lenses whose posterior is the training prior: under the normal prior the scatter's 95 % limit
    stays near the hyperprior's (nothing is learnt); read as uniform it is falsely tight."""
    d, s, theta = simulate_population_posteriors(
        1000, *NORMAL, PRIOR, (1.0, 1.0), np.random.default_rng(0), prior_normal=NORMAL
    )
    ref = _truncnorm(*NORMAL, *PRIOR)  # a network at the prior returns its mean and std
    assert np.allclose(s, ref.std(), rtol=1e-6) and np.allclose(d, ref.mean(), rtol=1e-2)
    honest = infer_population_1d(d, s, PRIOR, prior_normal=NORMAL)
    wrong = infer_population_1d(d, s, PRIOR)
    assert honest.data["informative_lenses"] == 0
    assert honest.sigma_upper95 > 0.5 * (PRIOR[1] - PRIOR[0]) > np.std(theta)
    assert wrong.sigma_upper95 < 0.2 * np.std(theta)


# ------------------------------------------------------------------------------------- files and the job
def _posteriors(n, seed, mu=2e-3, sigma=1e-3):
    d, s, theta = simulate_population_posteriors(
        n, mu, sigma, PRIOR, NOISE, np.random.default_rng(seed), prior_normal=NORMAL
    )
    return gaussian_posteriors(
        ["sigma_sub"],
        d[:, None],
        (s**2)[:, None, None],
        [("truncnormal", *PRIOR, *NORMAL)],
        truth=theta[:, None],
    )


def test_file_round_trip_and_job(tmp_path, capsys):
    from jobs.population import main

    a = write_posteriors(tmp_path / "a.npz", _posteriors(60, 1))
    back = read_posteriors(a)
    assert back.prior_kind == ("truncnormal",) and back.prior(0) == ["truncnormal", *PRIOR, *NORMAL]
    data = load_target([a], "sigma_sub")
    assert data.prior_normal == NORMAL and "N(0.002" in data.prior_label()
    b = write_posteriors(
        tmp_path / "b.npz",
        gaussian_posteriors(
            ["sigma_sub"], np.full((3, 1), 2e-3), np.full((3, 1, 1), 1e-6), [("uniform", *PRIOR)]
        ),
    )
    with pytest.raises(ValueError, match="differs between"):
        load_target([a, b], "sigma_sub")
    out = tmp_path / "pop.json"
    assert main(["--posteriors", str(a), "--target", "sigma_sub", "--out", str(out), "--no-mlflow"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(out.read_text())
    assert doc["training_prior"] == {
        "kind": "truncnormal",
        "low": PRIOR[0],
        "high": PRIOR[1],
        "mean": NORMAL[0],
        "std": NORMAL[1],
    }
    assert doc["scatter_trustworthy"] is True and "informative lenses" in captured.out
    lo, hi = doc["population_mean"]["interval_95"]
    assert lo < 2e-3 < hi
    assert doc["informed"] is True and doc["mu_std_over_hyperprior_std"] < 0.8

    # lenses at the prior: the job says the numbers are the hyperprior's, not a measurement
    d, sd, theta = simulate_population_posteriors(
        50, *NORMAL, PRIOR, (1.0, 1.0), np.random.default_rng(2), prior_normal=NORMAL
    )
    flat = gaussian_posteriors(
        ["sigma_sub"], d[:, None], (sd**2)[:, None, None], [("truncnormal", *PRIOR, *NORMAL)]
    )
    c = write_posteriors(tmp_path / "c.npz", flat)
    argv = ["--posteriors", str(c), "--target", "sigma_sub", "--out", str(out), "--no-mlflow", "--overwrite"]
    assert main(argv) == 0
    doc, err = json.loads(out.read_text()), capsys.readouterr().err
    assert doc["informed"] is False and doc["prior_like"] is True and doc["scatter_trustworthy"] is True
    assert "not a measurement" in err and "not trustworthy" not in err
