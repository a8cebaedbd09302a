"""Population inference (deeplense_ray/infer/population.py, jobs/population.py) on per-lens posteriors that
are exactly what a calibrated estimator gives: theta_i ~ population(mu*, sigma*) truncated to the training
prior U(0, 0.02) kpc^-2, d_i = theta_i + s_i eps, posterior N(d_i, s_i^2) truncated to the prior.

CPU only, numpy/scipy; the larger calibration study is benchmarks/population_calibration.py (numbers in
docs/population.md). Populations at 0.5x, 1x, 2x, 4x the model_ii prior mean of Sigma_sub (2e-3 kpc^-2).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate, stats

from deeplense_ray.infer.population import (
    PopulationError,
    infer_population_1d,
    log_likelihood_analytic,
    log_likelihood_grid,
    log_likelihood_importance,
    log_ndtr_diff,
    sample_posteriors,
    truncnorm_mean,
)
from deeplense_ray.infer.population_calibration import (
    calibration_run,
    coverage_check,
    simulate_population_posteriors,
)
from deeplense_ray.infer.posteriors import gaussian_posteriors, read_posteriors, write_posteriors

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PRIOR = (0.0, 0.02)  # training prior of Sigma_sub, wide enough for 4x the model_ii prior mean
MU_STARS = (1e-3, 2e-3, 4e-3, 8e-3)  # 0.5x, 1x, 2x, 4x the model_ii prior mean 2e-3
NOISE = (0.5e-3, 2e-3)  # per-lens posterior std s_i ~ U(NOISE), kpc^-2
SPREAD = 0.55  # sigma* / mu*: the paltas population N(2e-3, 1.1e-3)


def _posteriors(n=20, seed=0, mu=2e-3, truth=True, noise=NOISE):
    d, s, theta = simulate_population_posteriors(
        n, mu, SPREAD * mu, PRIOR, noise, np.random.default_rng(seed)
    )
    other = np.random.default_rng(seed + 1).uniform(-1.0, 1.0, n)
    mean = np.stack([d, other], axis=1)
    cov = np.zeros((n, 2, 2))
    cov[:, 0, 0], cov[:, 1, 1] = s**2, 0.3**2
    cov[:, 0, 1] = cov[:, 1, 0] = 0.5 * s * 0.3  # correlated: the marginal must use the diagonal only
    extra = {"truth": np.stack([theta, np.full(n, np.nan)], axis=1)} if truth else {}
    return gaussian_posteriors(
        ["sigma_sub", "shear"], mean, cov, [("uniform", *PRIOR), ("uniform", -1.0, 1.0)], **extra
    )


# ---------------------------------------------------------------------------------------------- the math
def test_log_ndtr_diff_is_stable_in_both_tails():
    lo = np.array([-50.0, -3.0, 1.0, 19.0, 30.0, -40.0, 0.5])
    hi = np.array([-49.0, 3.0, 2.0, 19.5, 31.0, 40.0, 0.5])
    ref = []
    for a, b in zip(lo, hi):  # tail side of the difference, in logs (scipy's logsf / logcdf)
        if b <= a:
            ref.append(-np.inf)
        elif a > 0:
            ref.append(stats.norm.logsf(a) + math.log1p(-math.exp(stats.norm.logsf(b) - stats.norm.logsf(a))))
        else:
            ref.append(
                stats.norm.logcdf(b) + math.log1p(-math.exp(stats.norm.logcdf(a) - stats.norm.logcdf(b)))
            )
    np.testing.assert_allclose(log_ndtr_diff(lo, hi), ref, rtol=1e-10)


@pytest.mark.parametrize(
    "m, s, mu, sigma",
    [
        (1e-3, 1e-3, 1e-3, 5e-4),
        (-1e-3, 2e-3, 2e-4, 3e-3),
        (0.019, 1e-3, 0.015, 1e-2),
        (5e-3, 1e-4, 4e-3, 1e-3),
    ],
)
def test_analytic_likelihood_matches_quadrature(m, s, mu, sigma):
    """L_i = int post_i(theta) p(theta | mu, sigma) / prior(theta) dtheta, post_i the truncated Gaussian."""
    a, b = PRIOR
    post = stats.truncnorm((a - m) / s, (b - m) / s, loc=m, scale=s)
    pop = stats.truncnorm((a - mu) / sigma, (b - mu) / sigma, loc=mu, scale=sigma)
    ref = integrate.quad(lambda t: post.pdf(t) * pop.pdf(t) * (b - a), a, b, points=[m, mu], limit=200)[0]
    got = log_likelihood_analytic(np.array([m]), np.array([s]), a, b, np.array([mu]), np.array([sigma]))
    assert math.exp(got[0, 0, 0]) == pytest.approx(ref, rel=1e-8)


def test_delta_population_is_the_sigma_to_zero_limit():
    m, s = np.array([1e-3, 4e-3]), np.array([1e-3, 2e-3])
    mu = np.linspace(0.0, 0.01, 11)[1:-1]
    at0 = log_likelihood_analytic(m, s, *PRIOR, mu, np.array([0.0]))
    near0 = log_likelihood_analytic(m, s, *PRIOR, mu, np.array([1e-9]))
    np.testing.assert_allclose(at0, near0, atol=1e-6)
    assert truncnorm_mean(3e-3, 0.0, *PRIOR) == pytest.approx(3e-3)
    ref = stats.truncnorm((0 - 1e-3) / 2e-3, (0.02 - 1e-3) / 2e-3, loc=1e-3, scale=2e-3).mean()
    assert truncnorm_mean(1e-3, 2e-3, *PRIOR) == pytest.approx(ref, rel=1e-10)


def test_importance_sampling_agrees_with_analytic():
    """paltas' estimator (samples of each posterior, reweighted by population / training prior) against the
    analytic integral: per lens within its Monte Carlo error, and the whole inference."""
    rng = np.random.default_rng(3)
    d, s, _ = simulate_population_posteriors(6, 3e-3, 1.5e-3, PRIOR, NOISE, rng)
    mu, sigma = np.linspace(5e-4, 8e-3, 7), np.array([5e-4, 1e-3, 3e-3, 8e-3])
    exact = log_likelihood_analytic(d, s, *PRIOR, mu, sigma)
    samples = sample_posteriors(d, s, *PRIOR, 40_000, rng)
    approx = log_likelihood_importance(samples, *PRIOR, mu, sigma)
    typical = exact > exact.max(axis=(1, 2), keepdims=True) - 3.0  # where the posterior samples land
    assert np.abs(approx - exact)[typical].max() < 0.05  # relative Monte Carlo error of L_i, ~1/sqrt(ESS)
    # (far in the tails few samples land near mu: the estimate degrades there, a known limit of sampling)
    d, s, _ = simulate_population_posteriors(40, 3e-3, 1.5e-3, PRIOR, NOISE, np.random.default_rng(4))
    mu, sigma = np.linspace(1e-3, 5e-3, 25), np.linspace(2e-4, 4e-3, 12)
    samples = sample_posteriors(d, s, *PRIOR, 1000, np.random.default_rng(1))
    summaries = []
    for method in ("analytic", "importance"):
        logp = log_likelihood_grid(d, s, *PRIOR, mu, sigma, method=method, samples=samples)
        p_mu = np.exp(logp - logp.max()).sum(axis=1)
        p_mu /= p_mu.sum()
        mean = float((mu * p_mu).sum())
        summaries.append((mean, math.sqrt(float(((mu - mean) ** 2 * p_mu).sum()))))
    (ma, sa), (mi, si) = summaries
    assert abs(ma - mi) < 0.1 * sa and si == pytest.approx(sa, rel=0.1)
    kw = {"coarse_grid": (33, 17), "fine_grid": (33, 33), "resolution": 3}
    res = infer_population_1d(d[:8], s[:8], PRIOR, method="importance", n_samples=200, sigma_min=2e-4, **kw)
    assert res.method == "importance" and res.mu_intervals[0.95][0] < res.mu_mean < res.mu_intervals[0.95][1]
    with pytest.raises(PopulationError, match="sigma > 0"):
        infer_population_1d(d, s, PRIOR, method="importance")


def test_grid_summaries_match_a_fine_grid():
    """The zoomed grids give the summaries of a much finer one (to ~1 % of the posterior std)."""
    d, s, _ = simulate_population_posteriors(200, 2e-3, 1.1e-3, PRIOR, NOISE, np.random.default_rng(7))
    got = infer_population_1d(d, s, PRIOR)
    ref = infer_population_1d(d, s, PRIOR, coarse_grid=(257, 129), fine_grid=(129, 129), resolution=12)
    for lv in (0.68, 0.95):
        np.testing.assert_allclose(got.mu_intervals[lv], ref.mu_intervals[lv], atol=0.02 * ref.mu_std)
    assert got.mu_mean == pytest.approx(ref.mu_mean, abs=0.01 * ref.mu_std)
    assert got.sigma_upper95 == pytest.approx(ref.sigma_upper95, rel=0.02)


# ------------------------------------------------------------------------------------------- calibration
def test_coverage_check_both_ways():
    truth = 1.0
    good = {0.68: (np.full(100, 0.0), np.r_[np.full(68, 2.0), np.full(32, 0.5)])}
    report = coverage_check(truth, good)
    assert report.rates == {0.68: 0.68} and report.passed
    bad = {0.68: (np.full(100, 0.0), np.r_[np.full(60, 2.0), np.full(40, 0.5)])}
    assert not coverage_check(truth, bad).passed
    with pytest.raises(ValueError):
        coverage_check(truth, {})


def test_exact_coverage_when_truths_come_from_the_hyperprior():
    """Simulation-based calibration: with (mu*, sigma*) drawn from the hyperprior the Bayesian intervals
    cover at their nominal rates for any N (here N = 10), which the inference can meet only if the
    likelihood, the prior correction and the grid summaries are all right."""
    mu_range, sigma_max = (0.0, 0.01), 0.004
    rng = np.random.default_rng(11)
    reps = 200
    truths, bounds = (
        np.empty(reps),
        {0.68: (np.empty(reps), np.empty(reps)), 0.95: (np.empty(reps), np.empty(reps))},
    )
    for r in range(reps):
        mu_star, sigma_star = rng.uniform(*mu_range), rng.uniform(0.0, sigma_max)
        d, s, _ = simulate_population_posteriors(10, mu_star, sigma_star, PRIOR, NOISE, rng)
        res = infer_population_1d(d, s, PRIOR, mu_range=mu_range, sigma_max=sigma_max)
        truths[r] = mu_star
        for lv in bounds:
            bounds[lv][0][r], bounds[lv][1][r] = res.mu_intervals[lv]
    report = coverage_check(truths, bounds)
    print(f"\nSBC N=10, {reps} replicates: mu coverage {report.rates}")
    assert report.passed, report.rates


NARROW = 1e-3  # sigma* of a population well inside the prior: mu is identified, the posterior near-Gaussian


@pytest.fixture(scope="module")
def fixed_runs():
    """Replicates at fixed populations N(mu*, 1e-3) (the full study with sigma* = 0.55 mu*, where mu is not
    identified near the prior's edge, is benchmarks/population_calibration.py and docs/population.md)."""
    runs = {(10, 8e-3): calibration_run(10, 8e-3, NARROW, PRIOR, NOISE, 30, seed=1)}
    for k, mu in enumerate((4e-3, 8e-3)):
        runs[100, mu] = calibration_run(100, mu, NARROW, PRIOR, NOISE, 40, seed=20 + k)
    runs[1000, 8e-3] = calibration_run(1000, 8e-3, NARROW, PRIOR, NOISE, 2, seed=3)
    for key, run in runs.items():
        sm = run.summary()
        print(
            f"\nN={key[0]} mu*={key[1]:g}: mu coverage {sm['coverage']} bias_z {sm['bias_z']:+.2f} std "
            f"{sm['mu_std_mean']:.2e}; population mean coverage {sm['population_mean']['coverage']}"
        )
    return runs


def test_mu_unbiased_and_covered_where_identified(fixed_runs):
    """N = 100, mu* = 2x and 4x the prior mean, sigma* = 1e-3: mu_hat unbiased within its uncertainty, the
    68 / 95 % intervals cover mu* within 5 points (pooled, 80 replicates)."""
    runs = [fixed_runs[100, mu] for mu in (4e-3, 8e-3)]
    z = np.concatenate([(r.mu_mean - r.mu_true) / r.mu_std for r in runs])
    assert abs(z.mean()) < 0.25, z.mean()
    bounds = {
        lv: tuple(np.concatenate([r.intervals[lv][k] for r in runs]) for k in (0, 1)) for lv in (0.68, 0.95)
    }
    truth = np.concatenate([np.full(r.mu_mean.size, r.mu_true) for r in runs])
    report = coverage_check(truth, bounds)
    assert report.passed, report.rates


def test_uncertainty_shrinks_like_one_over_sqrt_n(fixed_runs):
    std = {n: float(np.mean(fixed_runs[n, 8e-3].mu_std)) for n in (10, 100, 1000)}
    print(f"\nmu* = 8e-3, sigma* = 1e-3: mean posterior std of mu by N: {std}")
    assert std[100] < std[10] and std[1000] < std[100]
    assert std[1000] * math.sqrt(10) == pytest.approx(std[100], rel=0.2)  # 1/sqrt(N) once identified
    run = fixed_runs[1000, 8e-3]
    assert np.all(np.abs(run.mu_mean - run.mu_true) < 3 * run.mu_std)


def test_overconfident_posteriors_fail_the_coverage_check():
    """The same check on the per-lens posteriors (the network's calibration, before any population): exact
    ones pass, stds shrunk 2x (an over-confident network) fail. At the population level a free sigma absorbs
    the missing per-lens width (sigma is over-estimated, mu stays covered; see docs/population.md)."""
    rng = np.random.default_rng(5)
    d, s, theta = simulate_population_posteriors(2000, 4e-3, 2.2e-3, PRIOR, NOISE, rng)
    for shrink, ok in ((1.0, True), (2.0, False)):
        scale = s / shrink
        post = stats.truncnorm((PRIOR[0] - d) / scale, (PRIOR[1] - d) / scale, loc=d, scale=scale)
        intervals = {lv: (post.ppf((1 - lv) / 2), post.ppf((1 + lv) / 2)) for lv in (0.68, 0.95)}
        report = coverage_check(theta, intervals)
        print(f"\nper-lens posteriors, std / {shrink:g}: coverage {report.rates}")
        assert report.passed is ok, report.rates
    run = calibration_run(100, 4e-3, SPREAD * 4e-3, PRIOR, NOISE, 10, seed=2, overconfidence=2.0)
    exact = calibration_run(100, 4e-3, SPREAD * 4e-3, PRIOR, NOISE, 10, seed=2)
    # the missing per-lens variance (3/4 s_i^2) moves into sigma^2: here ~ +13 % on sigma
    assert np.mean(run.sigma_upper95) > 1.05 * np.mean(exact.sigma_upper95)


# ------------------------------------------------------------------------------------ files and the job


def test_file_round_trip_and_marginal(tmp_path):
    post = _posteriors(30, seed=5)
    path = write_posteriors(tmp_path / "p.npz", post)
    from deeplense_ray.infer.population import infer_population, load_target

    data = load_target([path], "sigma_sub")
    np.testing.assert_allclose(data.std, np.sqrt(post.cov[:, 0, 0]))
    np.testing.assert_allclose(data.mean, post.mean[:, 0])
    a = infer_population(data)
    b = infer_population_1d(post.mean[:, 0], np.sqrt(post.cov[:, 0, 0]), PRIOR)
    assert a.mu_mean == b.mu_mean and a.n == 30 and a.truth is not None
    assert read_posteriors(path).targets == ("sigma_sub", "shear")


def test_job_end_to_end_with_mlflow(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from jobs.population import main

    a = write_posteriors(tmp_path / "a.npz", _posteriors(40, seed=1))
    b = write_posteriors(tmp_path / "b.npz", _posteriors(25, seed=2))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "pop.json"
    argv = ["--posteriors", str(a), str(b), "--target", "sigma_sub", "--select", "50", "--out", str(out)]
    assert main([*argv, "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert "sigma 95% upper limit" in printed and "lenses" in printed
    doc = json.loads(out.read_text())
    assert doc["n"] == 50 and doc["target"] == "sigma_sub" and doc["mu"]["interval_kind"] == "equal-tailed"
    lo, hi = doc["mu"]["interval_95"]
    assert 0.0 <= lo < doc["mu"]["mean"] < hi <= 0.02 and doc["sigma"]["upper_95"] > 0
    assert doc["truth"]["n"] == 50 and Path(doc["plot"]).stat().st_size > 10_000
    assert doc["prior_like"] is False and doc["posterior_std_over_prior_std"] < 0.5
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("population")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["target"] == "sigma_sub" and run.data.metrics["n"] == 50
    assert run.data.metrics["mu_mean"] == pytest.approx(doc["mu"]["mean"])
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert names == {"pop.json", "pop.png"}
    assert main([*argv, "--no-mlflow"]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert main([*argv, "--no-mlflow", "--overwrite", "--select", "65"]) == 0


def test_prior_like_posteriors_are_flagged(tmp_path, capsys):
    """Posteriors as wide as the uniform training prior (a network at the prior): the job still answers, and
    says the scatter is not trustworthy (the mean is: every lens at the prior mean gives it)."""
    from jobs.population import main

    n, (a, b) = 200, PRIOR
    rng = np.random.default_rng(3)
    std = (b - a) / np.sqrt(12.0)
    mean = np.stack([np.full(n, 0.5 * (a + b)) + rng.normal(0.0, 0.02 * std, n), np.zeros(n)], axis=1)
    cov = np.zeros((n, 2, 2))
    cov[:, 0, 0], cov[:, 1, 1] = std**2, 0.3**2
    truth = np.stack([rng.uniform(a, b, n), np.full(n, np.nan)], axis=1)
    priors = [("uniform", *PRIOR), ("uniform", -1.0, 1.0)]
    post = gaussian_posteriors(["sigma_sub", "shear"], mean, cov, priors, truth=truth)
    path = write_posteriors(tmp_path / "p.npz", post)
    out = tmp_path / "pop.json"
    argv = ["--posteriors", str(path), "--target", "sigma_sub", "--out", str(out), "--no-mlflow"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    doc = json.loads(out.read_text())
    assert doc["prior_like"] is True and doc["posterior_std_over_prior_std"] == pytest.approx(1.0, rel=1e-6)
    assert "not trustworthy" in captured.err and "posterior std / prior std" in captured.out
    # the failure it warns about: the population mean is right, the scatter far too small
    assert abs(doc["population_mean"]["mean"] - 0.5 * (a + b)) < 3 * doc["population_mean"]["std"] + 1e-4
    assert doc["sigma"]["upper_95"] < 0.5 * float(np.std(truth[:, 0]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target", "m_axion"], "target 'm_axion' not among"),
        (["--target", "sigma_sub", "--mu-range", "-0.01", "0.01"], "outside the training prior's support"),
        (["--target", "sigma_sub", "--select", "500"], "--select 500"),
        (["--target", "sigma_sub", "--sigma-max", "-1"], "sigma max must be"),
        (["--target", "sigma_sub", "--method", "importance"], "sigma > 0"),
        (["--target", "sigma_sub", "--out", "x.txt"], "ends in .json"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, message, monkeypatch):
    from jobs.population import main

    monkeypatch.chdir(tmp_path)
    path = write_posteriors(tmp_path / "a.npz", _posteriors(20))
    assert main(["--posteriors", str(path), "--no-mlflow", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "population_sigma_sub.json").exists()


def test_bad_files_exit_2(tmp_path, capsys):
    from jobs.population import main

    empty = gaussian_posteriors(["sigma_sub"], np.zeros((0, 1)), np.zeros((0, 1, 1)), [("uniform", *PRIOR)])
    e = write_posteriors(tmp_path / "empty.npz", empty)
    other = gaussian_posteriors(
        ["sigma_sub"], np.full((3, 1), 1e-3), np.full((3, 1, 1), 1e-6), [("uniform", 0, 0.01)]
    )
    o = write_posteriors(tmp_path / "other.npz", other)
    a = write_posteriors(tmp_path / "a.npz", _posteriors(5))
    cases = [
        ([str(tmp_path / "missing.npz")], "does not exist"),
        ([str(e)], "no lenses"),
        ([str(a), str(o)], "training prior of 'sigma_sub' differs"),
    ]
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cases.append(([str(tmp_path / "junk.npz")], "not a readable posterior file"))
    for files, message in cases:
        out = tmp_path / "r.json"
        assert main(["--posteriors", *files, "--target", "sigma_sub", "--no-mlflow", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err, err
        assert not out.exists()
