"""Calibration of the population inference: coverage of intervals against known truths, per-lens posteriors
of a perfectly calibrated estimator, and replicated inferences of one population (used by
tests/test_population*.py and ``benchmarks/population_calibration.py``; docs/population.md, "Calibration").
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from deeplense_ray.infer.population import (
    LEVELS,
    infer_population_1d,
    prior_gaussian,
    truncnorm_draw,
    truncnorm_mean,
)


@dataclass(frozen=True)
class CoverageReport:
    """Observed coverage of intervals per level, and whether each is within ``tolerance`` of nominal."""

    n: int
    rates: dict[float, float]
    tolerance: float
    passed_levels: dict[float, bool]

    @property
    def passed(self) -> bool:
        return all(self.passed_levels.values())


def coverage_check(
    truth: np.ndarray | float,
    intervals: Mapping[float, tuple[np.ndarray, np.ndarray]],
    tolerance: float = 0.05,
) -> CoverageReport:
    """How often ``[lo, hi]`` holds ``truth`` per nominal level (``{0.68: (lo [R], hi [R]), ...}``, one
    interval per replicate); a level passes when its rate is within ``tolerance`` (0.05 = 5 points) of
    nominal."""
    if not intervals:
        raise ValueError("coverage_check needs intervals of at least one level")
    rates, ok, n = {}, {}, 0
    for level, (lo, hi) in intervals.items():
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        t = np.broadcast_to(np.asarray(truth, dtype=np.float64), lo.shape)
        if lo.size == 0:
            raise ValueError("coverage_check needs at least one replicate")
        n = lo.size
        rate = float(np.mean((lo <= t) & (t <= hi)))
        rates[float(level)] = rate
        ok[float(level)] = bool(abs(rate - float(level)) <= tolerance)
    return CoverageReport(n=n, rates=rates, tolerance=tolerance, passed_levels=ok)


def simulate_population_posteriors(
    n: int,
    mu: float,
    sigma: float,
    prior: tuple[float, float],
    noise: tuple[float, float],
    rng: np.random.Generator,
    overconfidence: float = 1.0,
    prior_normal: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-lens posteriors of a perfectly calibrated estimator: ``theta_i ~ N(mu, sigma^2)`` truncated to the
    prior, ``s_i ~ U(noise)``, ``d_i = theta_i + s_i eps``; the posterior under the uniform prior is
    ``N(d_i, s_i^2)`` truncated to it, under the normal ``prior_normal`` the product with its moment-matched
    Gaussian ``N(m0, s0^2)`` (:func:`prior_gaussian`), ``N((d_i/s_i^2 + m0/s0^2) v_i, v_i)``, ``1/v_i =
    1/s_i^2 + 1/s0^2`` (so a lens without information returns ``N(m0, s0^2)``, as a network at the prior
    does). Returns (means [n], stds [n] divided by ``overconfidence``, truths theta [n])."""
    low, high = prior
    if sigma > 0:
        theta = truncnorm_draw(float(mu), float(sigma), low, high, (n,), rng)
    else:
        theta = np.full(n, float(mu))
    s = rng.uniform(noise[0], noise[1], size=n)
    d = theta + s * rng.standard_normal(n)
    if prior_normal is not None:
        m0, s0 = prior_gaussian(prior_normal, prior)
        v = 1.0 / (1.0 / s**2 + 1.0 / s0**2)
        d, s = v * (d / s**2 + m0 / s0**2), np.sqrt(v)
    return d, s / overconfidence, theta


@dataclass(frozen=True)
class CalibrationRun:
    """Replicates of one population (mu*, sigma*) at one N: per-replicate mu summaries and their coverage."""

    n: int
    mu_true: float
    sigma_true: float
    mu_mean: np.ndarray  # [R]
    mu_std: np.ndarray  # [R]
    intervals: dict[float, tuple[np.ndarray, np.ndarray]]  # level -> (lo [R], hi [R])
    sigma_upper95: np.ndarray  # [R]
    coverage: CoverageReport
    sigma_coverage95: float  # fraction of replicates with sigma* below the 95 % upper limit
    pop_mean_true: float  # the population's mean E[theta] (truncated normal)
    pop_mean_z: np.ndarray  # [R] (posterior mean - true) / posterior std of the population mean
    pop_mean_coverage: CoverageReport
    seconds: float

    @property
    def bias_z(self) -> float:
        """Mean over replicates of (mu_hat - mu*) / std_hat (0 for an unbiased, calibrated inference)."""
        return float(np.mean((self.mu_mean - self.mu_true) / self.mu_std))

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "mu_true": self.mu_true,
            "sigma_true": self.sigma_true,
            "replicates": int(self.mu_mean.size),
            "coverage": {str(k): v for k, v in self.coverage.rates.items()},
            "coverage_passed": self.coverage.passed,
            "bias_z": self.bias_z,
            "z_std": float(np.std((self.mu_mean - self.mu_true) / self.mu_std)),
            "bias_rel": float(np.mean(self.mu_mean - self.mu_true) / self.mu_true) if self.mu_true else None,
            "mu_std_mean": float(np.mean(self.mu_std)),
            "mu_hat_scatter": float(np.std(self.mu_mean)),
            "sigma_coverage95": self.sigma_coverage95,
            "population_mean": {
                "true": self.pop_mean_true,
                "coverage": {str(k): v for k, v in self.pop_mean_coverage.rates.items()},
                "coverage_passed": self.pop_mean_coverage.passed,
                "bias_z": float(np.mean(self.pop_mean_z)),
            },
            "seconds": self.seconds,
        }


def calibration_run(
    n: int,
    mu_true: float,
    sigma_true: float,
    prior: tuple[float, float],
    noise: tuple[float, float],
    replicates: int,
    *,
    seed: int = 0,
    overconfidence: float = 1.0,
    tolerance: float = 0.05,
    **kwargs,
) -> CalibrationRun:
    """``replicates`` populations of ``n`` lenses (:func:`simulate_population_posteriors`, replicate ``r``
    seeded by ``(seed, r)``), each inferred (:func:`infer_population_1d`, ``kwargs`` passed on; their
    ``prior_normal`` is also the prior the posteriors are simulated under)."""
    started = time.perf_counter()
    means, stds, sig95 = np.empty(replicates), np.empty(replicates), np.empty(replicates)
    bounds = {lv: (np.empty(replicates), np.empty(replicates)) for lv in LEVELS}
    pm_bounds = {lv: (np.empty(replicates), np.empty(replicates)) for lv in LEVELS}
    pm_true = float(truncnorm_mean(mu_true, sigma_true, prior[0], prior[1]))
    pm_z = np.empty(replicates)
    for r in range(replicates):
        rng = np.random.default_rng([seed, r])
        d, s, _ = simulate_population_posteriors(
            n, mu_true, sigma_true, prior, noise, rng, overconfidence, kwargs.get("prior_normal")
        )
        res = infer_population_1d(d, s, prior, **kwargs)
        means[r], stds[r], sig95[r] = res.mu_mean, res.mu_std, res.sigma_upper95
        pm_z[r] = (res.pop_mean_mean - pm_true) / res.pop_mean_std
        for lv in LEVELS:
            bounds[lv][0][r], bounds[lv][1][r] = res.mu_intervals[lv]
            pm_bounds[lv][0][r], pm_bounds[lv][1][r] = res.pop_mean_intervals[lv]
    return CalibrationRun(
        n=n,
        mu_true=float(mu_true),
        sigma_true=float(sigma_true),
        mu_mean=means,
        mu_std=stds,
        intervals=bounds,
        sigma_upper95=sig95,
        coverage=coverage_check(mu_true, bounds, tolerance),
        sigma_coverage95=float(np.mean(sigma_true <= sig95)),
        pop_mean_true=pm_true,
        pop_mean_z=pm_z,
        pop_mean_coverage=coverage_check(pm_true, pm_bounds, tolerance),
        seconds=time.perf_counter() - started,
    )
