"""Population (hierarchical) inference of one target from per-lens Gaussian posteriors, the training prior
divided out.

A regression network gives for lens ``i`` a Gaussian posterior ``N(theta; m_i, s_i^2)`` of a target (e.g.
``sigma_sub``, the subhalo mass function normalisation Sigma_sub in kpc^-2), learnt under the training prior
``U(a, b)``; the posterior under that prior is the Gaussian truncated to ``[a, b]`` (:mod:`posteriors`).
Following Wagner-Carena et al. 2022 (arXiv:2203.00690, paltas), the population of the target is

    theta_i ~ p(theta | mu, sigma) = N(theta; mu, sigma^2) 1[a <= theta <= b] / Z(mu, sigma),
    Z(mu, sigma) = Phi((b - mu) / sigma) - Phi((a - mu) / sigma),

(a normal truncated to the training prior's support; ``sigma = 0`` is a delta at ``mu``: every lens shares
one value) and each lens contributes the likelihood ratio

    L_i(mu, sigma) = p(d_i | mu, sigma) / p(d_i | training prior)
                   = int post_i(theta) p(theta | mu, sigma) / prior_train(theta) dtheta,

with ``post_i = N(m_i, s_i^2)`` truncated to ``[a, b]`` (normalised by ``A_i = Phi((b - m_i)/s_i) -
Phi((a - m_i)/s_i)``) and ``prior_train = 1 / (b - a)``. For these forms the integral is analytic
(Gaussian product, then the truncation by erf):

    L_i = (b - a) / (A_i Z) * N(m_i; mu, s_i^2 + sigma^2) * [Phi((b - c_i)/tau_i) - Phi((a - c_i)/tau_i)],
    c_i = (m_i sigma^2 + mu s_i^2) / (s_i^2 + sigma^2),   tau_i^2 = s_i^2 sigma^2 / (s_i^2 + sigma^2),

and ``L_i = (b - a) / A_i * N(mu; m_i, s_i^2)`` at ``sigma = 0``. :func:`log_likelihood_grid` evaluates it on
a (mu, sigma) grid, vectorised over lenses and grid, in log space (``log_ndtr`` differences, stable far in
the tails); ``method="importance"`` is paltas' estimator instead: ``K`` samples ``theta_ik`` from each
lens's (truncated) posterior, ``L_i ~ mean_k p(theta_ik | mu, sigma) / prior_train(theta_ik)`` (``sigma > 0``
only: a delta population has no density at the samples).

With a normal training prior (a normal truncated to ``[a, b]``: ``sigma_sub_normal``, ``sim/priors.py``, as
paltas trains) the prior divided out is its moment-matched Gaussian ``N(mu_0, sigma_0^2)`` (the truncated
normal's mean and std: what a Gaussian head trained by likelihood returns for an image that tells nothing;
the normal itself where the truncation is negligible). The ratio ``post_i / N(mu_0, sigma_0^2)`` is, up to
a constant, the Gaussian ``N(theta; l_i, lambda_i^2)`` with ``1/lambda_i^2 = 1/s_i^2 - 1/sigma_0^2`` and
``l_i = lambda_i^2 (m_i / s_i^2 - mu_0 / sigma_0^2)`` (:func:`implied_likelihood`): the formula above with
``(m_i, s_i)`` replaced by ``(l_i, lambda_i)``. A lens whose posterior is no narrower than the prior
(``s_i >= sigma_0``) has the convex ratio ``exp(a_i theta^2 + b_i theta)``, integrated against the
population in closed form or by quadrature (:func:`log_likelihood_wide`). It must be kept, not dropped: a
network at the prior returns stds scattered about ``sigma_0``, and keeping only the narrower ones turns that
scatter into a false measurement. Under a uniform prior a lens at the prior reads as a measurement at the
prior's mean, because a Gaussian head cannot return the uniform prior itself; that is why a population needs
the normal training prior when per-lens posteriors are broad (docs/population.md).

Hyperprior: flat in ``mu`` over the training prior's support (or a sub-range) and flat in ``sigma`` over
``[0, sigma_max]`` (default ``sigma_max = b - a``; beyond it the truncated population is nearly uniform over
the support and indistinguishable from wider ones). Flat, not log-flat, in ``sigma``: a log-flat prior
diverges at ``sigma = 0``, which is a physical case here (one universal Sigma_sub), and with a lower cut-off
its upper limits would depend on that arbitrary cut-off whenever the per-lens widths exceed ``sigma``
(usual for Sigma_sub: the data then cannot tell ``sigma = 0`` from small ``sigma``).

The posterior of (mu, sigma) is evaluated on a grid over the whole hyperprior range, then on finer grids
zoomed onto where each marginal exceeds e^-:data:`ZOOM_LOG_DROP` of its peak, until every marginal has
:data:`RESOLUTION` grid points per standard deviation: enough for 10 or 10^4 lenses alike. Summaries: the mu
marginal's mean, std, median and equal-tailed 68 % and 95 % intervals (quantiles 0.16/0.84 and 0.025/0.975:
invariant under reparametrisation and what the calibration checks use); the sigma marginal's median and 95 %
upper limit (its 0.95 quantile); the population mean ``E[theta]`` (a derived quantity: better identified
than mu when the population sits near the prior's edge and the per-lens widths exceed sigma; see
docs/population.md).

Multi-target posteriors are marginalised to the target's 1-D Gaussian (mean, and variance from the
covariance diagonal: the exact marginal of the network's multivariate Gaussian). This treats the other
targets' population as their training prior and ignores how their prior truncation would reshape this
target's marginal when targets correlate.

:mod:`deeplense_ray.infer.population_calibration` holds the calibration checks (used by the tests and
``benchmarks/population_calibration.py``), :mod:`deeplense_ray.infer.population_report` the plot and the
MLflow run. ``jobs/population.py`` is the command line; see docs/population.md.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import log_ndtr, logsumexp, ndtr, ndtri

from deeplense_ray.infer.posteriors import PosteriorFileError, Posteriors, read_posteriors

#: Grid sizes (mu, sigma) of the first, full-range pass and the least of each zoomed pass (which has
#: 1.25 x RESOLUTION points per standard deviation of the previous pass's marginals, MAX_POINTS at most).
COARSE_GRID = (65, 33)
FINE_GRID = (49, 49)
MAX_POINTS = 129
#: A zoomed grid spans where each marginal exceeds e^-16 (~1e-7) of its peak (one point wider).
ZOOM_LOG_DROP = 16.0
#: Grid points per posterior standard deviation (of each marginal) below which the grid is zoomed.
RESOLUTION = 5.0
#: Zoom passes at most after the full-range one.
MAX_ZOOMS = 6
#: Equal-tailed intervals reported for mu.
LEVELS = (0.68, 0.95)
#: Lenses per block of the vectorised likelihood (bounds memory at ~ block x grid floats per array).
LENS_BLOCK = 256
METHODS = ("analytic", "importance")
DEFAULT_IS_SAMPLES = 2000
_LOG_2PI = math.log(2.0 * math.pi)
#: |x| beyond which Phi(x) is 0 or 1 to within 1e-16 (Phi(-8.3) = 5e-17).
_UNIT_CUT = 8.3
#: hi^2 - lo^2 beyond which Phi(-hi) / Phi(-lo) < e^-40 (0 < lo < hi).
_TAIL_GAP = 80.0


class PopulationError(ValueError):
    """Input that a population inference cannot use (the message names the value)."""


# ------------------------------------------------------------------------------------------- the math
def log_ndtr_diff(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``log(Phi(hi) - Phi(lo))`` for ``lo <= hi`` elementwise, stable in both tails (``-inf`` where equal).

    Where one bound's term is below 1e-16 of the other (``Phi(hi) = 1`` to 5e-17 with ``lo <= 0``, or
    ``Phi(-hi) / Phi(-lo) <= exp(-(hi^2 - lo^2) / 2) < e^-40`` with ``lo > 0``, the Mills ratio being
    decreasing; mirrored for the lower tail) the value is one ``log_ndtr`` (the usual case on a population
    grid); elsewhere the difference is taken on the tail side."""
    lo, hi = np.broadcast_arrays(np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64))
    upper = hi > _UNIT_CUT  # log Phi(hi) - Phi(lo) = log Phi(-lo) ...
    check = upper & (lo > 0)  # ... unless Phi(-hi) is not negligible against Phi(-lo)
    if check.any():
        a, b = lo[check], hi[check]
        upper[check] = (b - a) * (b + a) > _TAIL_GAP
    lower = lo < -_UNIT_CUT  # log Phi(hi) ...
    check = lower & (hi < 0)  # ... unless Phi(lo) is not negligible against Phi(hi)
    if check.any():
        a, b = lo[check], hi[check]
        lower[check] = (b - a) * -(b + a) > _TAIL_GAP
    arg = np.where(upper, -lo, hi)
    out = np.zeros(arg.shape)  # log Phi(arg) > -5e-17 for arg > 8.3: 0 without calling log_ndtr (slow)
    need = arg < _UNIT_CUT
    out[need] = log_ndtr(arg[need])
    both = ~(upper | lower)
    if both.any():
        a, b = lo[both], hi[both]
        flip = a > 0  # upper tail: Phi(b) - Phi(a) = Phi(-a) - Phi(-b), computed where it is not 1 - 1
        top = log_ndtr(np.where(flip, -a, b))
        bottom = log_ndtr(np.where(flip, -b, a))
        with np.errstate(divide="ignore", invalid="ignore"):
            out[both] = np.where(b > a, top + np.log1p(-np.exp(bottom - top)), -np.inf)
    return out


def log_trunc_norm_z(mu: np.ndarray, sigma: np.ndarray, low: float, high: float) -> np.ndarray:
    """``log Z(mu, sigma)``: log of the mass of ``N(mu, sigma^2)`` inside ``[low, high]``; 0 at ``sigma = 0``
    (a delta inside the support, ``mu`` in ``[low, high]``)."""
    mu, sigma = np.broadcast_arrays(np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64))
    pos = sigma > 0
    safe = np.where(pos, sigma, 1.0)
    return np.where(pos, log_ndtr_diff((low - mu) / safe, (high - mu) / safe), 0.0)


def _log_norm_pdf(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    return -0.5 * (_LOG_2PI + np.log(var) + (x - mean) ** 2 / var)


def log_likelihood_analytic(
    m: np.ndarray, s: np.ndarray, low: float, high: float, mu: np.ndarray, sigma: np.ndarray
) -> np.ndarray:
    """Per-lens ``log L_i(mu, sigma)`` (module docstring) for lenses ``m, s`` [n] on the grid ``mu`` [M] x
    ``sigma`` [S] (``sigma >= 0``), training prior ``U(low, high)``. Returns [n, M, S]."""
    m = np.asarray(m, dtype=np.float64)[:, None, None]
    s = np.asarray(s, dtype=np.float64)[:, None, None]
    mu = np.asarray(mu, dtype=np.float64).ravel()
    sigma = np.asarray(sigma, dtype=np.float64).ravel()
    s2 = s * s
    mu_g = mu[None, :, None]
    const = math.log(high - low) - log_ndtr_diff((low - m) / s, (high - m) / s)  # [n, 1, 1]: log (b-a)/A_i
    d2 = (m - mu_g) ** 2  # [n, M, 1]
    out = np.empty((m.shape[0], mu.size, sigma.size))
    delta = sigma == 0  # a delta population: L_i = (b - a) / A_i N(mu; m_i, s_i^2)
    if delta.any():
        out[:, :, delta] = const - 0.5 * (_LOG_2PI + np.log(s2) + d2 / s2)
    if not delta.all():
        pos = ~delta
        sig = sigma[pos][None, None, :]
        var = s2 + sig * sig  # [n, 1, S]
        w = sig * sig / var  # c_i = w m_i + (1 - w) mu
        inv_tau = 1.0 / (s * np.sqrt(w))  # tau^2 = s^2 w
        lo = (low - w * m) * inv_tau - ((1.0 - w) * inv_tau) * mu_g  # (low - c_i) / tau_i, [n, M, S]
        log_in = log_ndtr_diff(lo, lo + (high - low) * inv_tau)
        log_z = log_trunc_norm_z(mu[:, None], sigma[pos][None, :], low, high)  # [M, S]
        log_in -= d2 * (0.5 / var)
        log_in += const - 0.5 * (_LOG_2PI + np.log(var))
        log_in -= log_z
        out[:, :, pos] = log_in
    return out


def truncnorm_draw(
    m: np.ndarray, s: np.ndarray, low: float, high: float, shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """Draws of ``N(m, s^2)`` truncated to ``[low, high]`` by inverting the CDF (``m``, ``s`` broadcast to
    ``shape``); on the tail side where the mean lies above the support's middle, so that no precision is lost
    to ``1 - Phi``."""
    m, s = np.broadcast_to(m, shape), np.broadcast_to(s, shape)
    alpha, beta = (low - m) / s, (high - m) / s
    upper = alpha > -beta  # most of the mass above: draw -theta, whose bounds are (-beta, -alpha)
    lo, hi = np.where(upper, -beta, alpha), np.where(upper, -alpha, beta)
    p_lo, p_hi = ndtr(lo), ndtr(hi)
    z = ndtri(p_lo + rng.random(shape) * (p_hi - p_lo))
    z = np.clip(np.where(np.isfinite(z), z, lo), lo, hi)
    return m + s * np.where(upper, -z, z)


def sample_posteriors(
    m: np.ndarray, s: np.ndarray, low: float, high: float, n_samples: int, rng: np.random.Generator
) -> np.ndarray:
    """``n_samples`` draws [n, K] from each lens's posterior ``N(m_i, s_i^2)`` truncated to ``[low, high]``
    (seeded by ``rng``)."""
    m = np.asarray(m, dtype=np.float64)[:, None]
    s = np.asarray(s, dtype=np.float64)[:, None]
    return truncnorm_draw(m, s, low, high, (m.shape[0], int(n_samples)), rng)


def log_likelihood_importance(
    samples: np.ndarray,
    low: float,
    high: float,
    mu: np.ndarray,
    sigma: np.ndarray,
    prior_normal: tuple[float, float] | None = None,
) -> np.ndarray:
    """paltas' importance-sampling estimate of per-lens ``log L_i(mu, sigma)`` [n, M, S] from posterior
    samples [n, K]: ``log mean_k p(theta_ik | mu, sigma) / prior_train(theta_ik)`` (uniform on ``[low,
    high]``, or ``prior_normal`` truncated to it, up to its normalisation). Needs ``sigma > 0``."""
    sigma = np.asarray(sigma, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    if (sigma <= 0).any():
        raise PopulationError(
            f"importance sampling needs sigma > 0 (a delta population has no density at the samples), got "
            f"sigma = {float(sigma.min()):g}; use method='analytic' or a sigma range above 0"
        )
    x = np.asarray(samples, dtype=np.float64)
    n, k = x.shape
    log_z = log_trunc_norm_z(mu[:, None], sigma[None, :], low, high)  # [M, S]
    out = np.empty((n, mu.size, sigma.size))
    block = max(1, int(4e6 // max(1, k * mu.size)))
    for j in range(sigma.size):
        var = sigma[j] ** 2
        for i0 in range(0, n, block):
            xb = x[i0 : i0 + block, None, :]  # [b, 1, K]
            logp = _log_norm_pdf(xb, mu[None, :, None], var)  # [b, M, K]
            if prior_normal is not None:
                logp -= _log_norm_pdf(xb, prior_normal[0], prior_normal[1] ** 2)
            out[i0 : i0 + block, :, j] = logsumexp(logp, axis=2) - math.log(k)
        out[:, :, j] += math.log(high - low) - log_z[None, :, j]
    return out


def prior_gaussian(prior_normal: tuple[float, float], support: tuple[float, float]) -> tuple[float, float]:
    """(mean, std) of ``N(prior_normal)`` truncated to ``support``: the Gaussian a population divides out."""
    from deeplense_ray.train.gaussian import truncnorm_moments

    return truncnorm_moments(prior_normal[0], prior_normal[1], support[0], support[1])


def implied_likelihood(
    m: np.ndarray, s: np.ndarray, prior_normal: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(l, lambda, informative)`` [n]: the Gaussian ``N(theta; l_i, lambda_i^2)`` proportional to the
    posterior ``N(m_i, s_i^2)`` over the normal training prior ``N(mean, std^2)`` (module docstring);
    ``informative`` is False (and ``l, lambda`` NaN) where ``s_i >= std``: the ratio is flat there."""
    mean0, std0 = float(prior_normal[0]), float(prior_normal[1])
    m = np.asarray(m, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    scaled = (s / std0) ** 2  # the precision difference 1/s^2 - 1/std0^2 = (1 - scaled) / s^2
    informative = scaled < 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        lam2 = np.where(informative, s * s / (1.0 - scaled), np.nan)
        ell = lam2 * (m / (s * s) - mean0 / std0**2)
    return ell, np.sqrt(lam2), informative


def informative_lenses(
    m: np.ndarray, s: np.ndarray, prior: tuple[float, float], prior_normal: tuple[float, float] | None
) -> int:
    """Lenses whose likelihood (posterior over training prior) is narrower than the prior's support: all of
    them under a uniform prior (its Gaussian posterior always reads as one, see the module docstring), under a
    normal prior those with ``lambda_i < high - low``."""
    if prior_normal is None:
        return int(np.size(m))
    _, lam, keep = implied_likelihood(m, s, prior_normal)
    return int((keep & (np.nan_to_num(lam, nan=np.inf) < prior[1] - prior[0])).sum())


#: Gauss-Legendre nodes over the support for a population wider than a wide lens's curvature allows in
#: closed form (the integrand is then the exponential of a convex quadratic: smooth, no endpoint singularity).
WIDE_LENS_NODES = 64


def log_likelihood_wide(
    m: np.ndarray,
    s: np.ndarray,
    low: float,
    high: float,
    mu: np.ndarray,
    sigma: np.ndarray,
    divide: tuple[float, float],
    nodes: int = WIDE_LENS_NODES,
) -> np.ndarray:
    """Per-lens ``log L_i(mu, sigma)`` [n, M, S] (up to a constant per lens) of lenses no narrower than the
    divided-out Gaussian ``divide = (mu_0, sigma_0)``. In ``t = (theta - mu_0) / sigma_0`` the ratio
    ``post_i / N(mu_0, sigma_0^2)`` is ``exp(A_i t^2 + B_i t)`` with ``0 <= A_i <= 1/2``; against the
    truncated population ``N(m_t, s_t^2)`` (standardised) the integrand stays Gaussian while ``D = 1 - 2 A_i
    s_t^2 > 0``, giving ``(B^2 s_t^2 + 2 B m_t + 2 A m_t^2) / (2 D) - log(D) / 2 + log(Phi(hi) - Phi(lo)) -
    log Z`` with the bounds of the support about ``c = (B s_t^2 + m_t) / D`` in units of ``s_t / sqrt(D)``;
    where ``D <= 0`` the integral over the support is by Gauss-Legendre (``nodes``)."""
    mu0, s0 = float(divide[0]), float(divide[1])
    m = np.asarray(m, dtype=np.float64)[:, None, None]
    s = np.asarray(s, dtype=np.float64)[:, None, None]
    big_a = 0.5 * (1.0 - (s0 / s) ** 2)  # [n, 1, 1], >= 0 for these lenses
    big_b = (m - mu0) * s0 / s**2  # post / prior in t: exp(A t^2 + B t) up to a constant
    mt = (np.asarray(mu, dtype=np.float64).ravel() - mu0) / s0
    st = np.asarray(sigma, dtype=np.float64).ravel() / s0
    lo_t, hi_t = (low - mu0) / s0, (high - mu0) / s0
    mt_g, st_g = mt[None, :, None], st[None, None, :]
    d = 1.0 - 2.0 * big_a * st_g**2  # [n, 1, S]
    log_z = log_trunc_norm_z(mt[:, None], st[None, :], lo_t, hi_t)[None]  # [1, M, S]
    out = np.empty((m.shape[0], mt.size, st.size))
    closed = d > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        dd = np.where(closed, d, 1.0)
        c = (big_b * st_g**2 + mt_g) / dd
        scale = np.where(st_g > 0, np.sqrt(dd) / np.where(st_g > 0, st_g, 1.0), np.inf)
        inside = np.where(
            st_g > 0, log_ndtr_diff((lo_t - c) * scale, (hi_t - c) * scale), 0.0
        )  # sigma = 0: the delta lies inside the support
        val = (big_b**2 * st_g**2 + 2.0 * big_b * mt_g + 2.0 * big_a * mt_g**2) / (2.0 * dd)
        val = val - 0.5 * np.log(dd) + inside - log_z
    out[...] = np.where(closed, val, 0.0)
    if not closed.all():
        x, w = np.polynomial.legendre.leggauss(int(nodes))
        t = lo_t + 0.5 * (x + 1.0) * (hi_t - lo_t)  # [K]
        log_w = np.log(0.5 * (hi_t - lo_t) * w)
        for i, j in zip(*np.nonzero(~closed[:, 0, :])):  # (lens, sigma) pairs; few: sigma >= the prior's
            sj = st[j]
            e = big_a[i, 0, 0] * t**2 + big_b[i, 0, 0] * t  # [K]
            logp = -0.5 * ((t[None, :] - mt[:, None]) / sj) ** 2 - math.log(sj) - 0.5 * _LOG_2PI  # [M, K]
            out[i, :, j] = logsumexp(e[None, :] + logp + log_w[None, :], axis=1) - log_z[0, :, j]
    return out


def log_likelihood_grid(
    m: np.ndarray,
    s: np.ndarray,
    low: float,
    high: float,
    mu: np.ndarray,
    sigma: np.ndarray,
    *,
    method: str = "analytic",
    samples: np.ndarray | None = None,
    prior_normal: tuple[float, float] | None = None,
) -> np.ndarray:
    """``sum_i log L_i(mu, sigma)`` [M, S] over all lenses (blocks of :data:`LENS_BLOCK` lenses), up to a
    constant; ``method="importance"`` uses ``samples`` [n, K] (:func:`sample_posteriors`). With
    ``prior_normal`` (the Gaussian divided out) lenses narrower than it take the analytic form through
    :func:`implied_likelihood`, the others :func:`log_likelihood_wide`."""
    total = np.zeros((np.size(mu), np.size(sigma)))
    wide_m = wide_s = np.zeros(0)
    if method == "analytic" and prior_normal is not None:
        ell, lam, keep = implied_likelihood(m, s, prior_normal)
        wide_m, wide_s = np.asarray(m, np.float64)[~keep], np.asarray(s, np.float64)[~keep]
        m, s = ell[keep], lam[keep]
    n = np.size(m)
    for i0 in range(0, n, LENS_BLOCK):
        sl = slice(i0, i0 + LENS_BLOCK)
        if method == "analytic":
            part = log_likelihood_analytic(m[sl], s[sl], low, high, mu, sigma)
        elif method == "importance":
            if samples is None:
                raise PopulationError("method='importance' needs posterior samples")
            part = log_likelihood_importance(samples[sl], low, high, mu, sigma, prior_normal=prior_normal)
        else:
            raise PopulationError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        total += part.sum(axis=0)
    block = max(1, LENS_BLOCK // 8)
    for i0 in range(0, wide_m.size, block):
        sl = slice(i0, i0 + block)
        total += log_likelihood_wide(wide_m[sl], wide_s[sl], low, high, mu, sigma, prior_normal).sum(axis=0)
    return total


# -------------------------------------------------------------------------------------- grid posterior
def _trapz(y: np.ndarray, x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.trapezoid(y, x, axis=axis) if x.size > 1 else np.take(y, 0, axis=axis)


def _normalise(logp: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Density on the grid from a log posterior (max subtracted), integrating to 1 (trapezoid)."""
    p = np.exp(logp - logp.max())
    mass = _trapz(_trapz(p, sigma, axis=1), mu)
    return p / mass


def _quantiles(x: np.ndarray, density: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """Quantiles of a 1-D density tabulated on ``x`` (trapezoid CDF, linear interpolation)."""
    if x.size == 1:
        return np.full(len(q), float(x[0]))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(x))])
    cdf /= cdf[-1]
    return np.interp(np.asarray(q, dtype=np.float64), cdf, x)


def truncnorm_mean(mu: np.ndarray, sigma: np.ndarray, low: float, high: float) -> np.ndarray:
    """Mean of ``N(mu, sigma^2)`` truncated to ``[low, high]`` (``mu`` at ``sigma = 0``), elementwise."""
    mu, sigma = np.broadcast_arrays(np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64))
    pos = sigma > 0
    safe = np.where(pos, sigma, 1.0)
    alpha, beta = (low - mu) / safe, (high - mu) / safe
    log_z = log_ndtr_diff(alpha, beta)
    with np.errstate(over="ignore", invalid="ignore"):
        shift = (np.exp(-0.5 * alpha**2 - log_z) - np.exp(-0.5 * beta**2 - log_z)) / math.sqrt(2 * math.pi)
    out = np.where(pos, mu + safe * shift, mu)
    return np.clip(np.where(np.isfinite(out), out, mu), low, high)


def _cell_weights(x: np.ndarray) -> np.ndarray:
    """Trapezoid quadrature weights of the grid ``x``."""
    if x.size < 2:
        return np.ones(x.size)
    dx = np.diff(x)
    return np.concatenate([[dx[0] / 2], (dx[1:] + dx[:-1]) / 2, [dx[-1] / 2]])


def _weighted_summary(values: np.ndarray, weights: np.ndarray, q: Sequence[float]):
    """(mean, std, quantiles) of a derived quantity given its values and posterior weights on the grid."""
    w = weights / weights.sum()
    mean = float(np.sum(w * values))
    std = math.sqrt(max(float(np.sum(w * (values - mean) ** 2)), 0.0))
    order = np.argsort(values)
    cdf = np.cumsum(w[order]) - 0.5 * w[order]
    return mean, std, np.interp(np.asarray(q, dtype=np.float64), cdf, values[order])


def _marginal_range(x: np.ndarray, density: np.ndarray, bounds: tuple[float, float]) -> tuple[float, float]:
    """The span of ``x`` where the 1-D marginal ``density`` exceeds e^-ZOOM_LOG_DROP of its peak, one grid
    point wider on each side; where that reaches the grid's edge inside the hyperprior ``bounds`` (the mass
    may go on beyond it), half the span wider on that side, within ``bounds``."""
    keep = np.flatnonzero(density >= density.max() * math.exp(-ZOOM_LOG_DROP))
    i0, i1 = max(keep[0] - 1, 0), min(keep[-1] + 1, x.size - 1)
    lo, hi = float(x[i0]), float(x[i1])
    span = max(hi - lo, float(x[-1] - x[0]) / max(x.size - 1, 1))
    if keep[0] == 0 and x[0] > bounds[0]:
        lo = max(bounds[0], lo - span / 2)
    if keep[-1] == x.size - 1 and x[-1] < bounds[1]:
        hi = min(bounds[1], hi + span / 2)
    return lo, hi


def _std(x: np.ndarray, density: np.ndarray) -> float:
    if x.size < 2:
        return 0.0
    mean = _trapz(x * density, x)
    return math.sqrt(max(float(_trapz((x - mean) ** 2 * density, x)), 0.0))


def _resolved(x: np.ndarray, density: np.ndarray, resolution: float) -> bool:
    """Whether the grid ``x`` has at least ``resolution`` points per standard deviation of ``density``."""
    return x.size < 2 or bool((x[1] - x[0]) * resolution <= _std(x, density))


def _points(lo: float, hi: float, x: np.ndarray, density: np.ndarray, least: int, resolution: float) -> int:
    """Grid points over ``[lo, hi]`` for 1.25 x ``resolution`` per standard deviation of ``density`` on
    ``x`` (at least ``least``, at most :data:`MAX_POINTS`); ``least`` when ``x`` has fewer than two points
    per standard deviation (the estimate is then unreliable: the next pass, on the narrower box, sizes the
    grid)."""
    std = _std(x, density)
    if x.size < 2 or std < 2 * (x[1] - x[0]):
        return least
    return int(min(max(math.ceil(1.25 * resolution * (hi - lo) / std) + 1, least), MAX_POINTS))


@dataclass(frozen=True)
class PopulationResult:
    """The hyperparameter posterior of one target on a (mu, sigma) grid and its summaries."""

    target: str
    n: int
    prior: tuple[float, float]  # training prior's support [low, high]
    mu_range: tuple[float, float]  # hyperprior of mu: flat on it
    sigma_range: tuple[float, float]  # hyperprior of sigma: flat on it
    method: str
    mu: np.ndarray  # [M] grid
    sigma: np.ndarray  # [S] grid
    density: np.ndarray  # [M, S] posterior density of (mu, sigma), integrates to 1 over the grid
    mu_marginal: np.ndarray  # [M]
    sigma_marginal: np.ndarray  # [S]
    mu_mean: float
    mu_std: float
    mu_median: float
    mu_intervals: dict[float, tuple[float, float]]  # equal-tailed, per level
    sigma_median: float
    sigma_upper95: float
    sigma_mean: float
    # the population's mean E[theta] = mu + sigma (phi(alpha) - phi(beta)) / Z (truncated normal), derived
    pop_mean_mean: float = float("nan")
    pop_mean_std: float = float("nan")
    pop_mean_intervals: dict[float, tuple[float, float]] = field(default_factory=dict)
    truth: dict[str, float] | None = None  # mean / std / n of the lenses' true values, when known
    data: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    prior_normal: tuple[float, float] | None = None  # training prior N(mean, std^2) truncated; None: uniform

    def hyperprior_ratio(self) -> float:
        """The posterior std of mu over its flat hyperprior's std: about one when the lenses say nothing about
        the population (its numbers are then the hyperprior's)."""
        return self.mu_std / ((self.mu_range[1] - self.mu_range[0]) / math.sqrt(12.0))

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (the grid marginals included, not the 2-D grid)."""
        return {
            "target": self.target,
            "n": self.n,
            "method": self.method,
            "training_prior": training_prior_summary(self.prior, self.prior_normal),
            "hyperprior": {
                "mu": {"kind": "uniform", "low": self.mu_range[0], "high": self.mu_range[1]},
                "sigma": {"kind": "uniform", "low": self.sigma_range[0], "high": self.sigma_range[1]},
                "population": "normal(mu, sigma) truncated to the training prior's support",
            },
            "mu": {
                "mean": self.mu_mean,
                "std": self.mu_std,
                "median": self.mu_median,
                "interval_kind": "equal-tailed",
                **{f"interval_{round(lv * 100)}": list(self.mu_intervals[lv]) for lv in self.mu_intervals},
            },
            "sigma": {"median": self.sigma_median, "upper_95": self.sigma_upper95, "mean": self.sigma_mean},
            "population_mean": {
                "mean": self.pop_mean_mean,
                "std": self.pop_mean_std,
                "interval_kind": "equal-tailed",
                **{
                    f"interval_{round(lv * 100)}": list(self.pop_mean_intervals[lv])
                    for lv in self.pop_mean_intervals
                },
            },
            "truth": self.truth,
            "data": self.data,
            "grid": {
                "mu": self.mu.tolist(),
                "sigma": self.sigma.tolist(),
                "mu_marginal": self.mu_marginal.tolist(),
                "sigma_marginal": self.sigma_marginal.tolist(),
            },
            "seconds": self.seconds,
        }


def training_prior_summary(prior: tuple[float, float], normal: tuple[float, float] | None) -> dict[str, Any]:
    """JSON form of a training prior: its kind, support and (truncnormal) the normal's mean and std."""
    out: dict[str, Any] = {
        "kind": "uniform" if normal is None else "truncnormal",
        "low": prior[0],
        "high": prior[1],
    }
    if normal is not None:
        out.update(mean=normal[0], std=normal[1])
    return out


def _check_range(name: str, rng: Sequence[float], low: float, high: float, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(rng[0]), float(rng[1]))
    except (TypeError, ValueError, IndexError):
        raise PopulationError(f"{name} must be two numbers (low, high), got {rng!r}") from None
    if len(rng) != 2 or not (math.isfinite(lo) and math.isfinite(hi)) or not hi > lo:
        raise PopulationError(f"{name} must be finite with low < high, got {list(rng)}")
    if lo < low or hi > high:
        raise PopulationError(f"{name} {[lo, hi]} lies outside {what} [{low:g}, {high:g}]")
    return lo, hi


def infer_population_1d(
    m: np.ndarray,
    s: np.ndarray,
    prior: tuple[float, float],
    *,
    prior_normal: tuple[float, float] | None = None,
    target: str = "theta",
    mu_range: Sequence[float] | None = None,
    sigma_max: float | None = None,
    sigma_min: float = 0.0,
    method: str = "analytic",
    n_samples: int = DEFAULT_IS_SAMPLES,
    seed: int = 0,
    truth: np.ndarray | None = None,
    coarse_grid: tuple[int, int] = COARSE_GRID,
    fine_grid: tuple[int, int] = FINE_GRID,
    resolution: float = RESOLUTION,
) -> PopulationResult:
    """Posterior of (mu, sigma) from per-lens Gaussian posteriors ``N(m_i, s_i^2)`` learnt under the training
    prior ``U(prior)``, or with ``prior_normal = (mean, std)`` under that normal truncated to ``prior``
    (module docstring). ``mu_range`` (default: the prior's support) and ``[sigma_min,
    sigma_max]`` (default ``[0, high - low]``) are the flat hyperprior's ranges; ``method`` ``analytic`` or
    ``importance`` (``n_samples`` per lens, seeded; needs ``sigma_min > 0``). ``coarse_grid``, ``fine_grid``
    and ``resolution`` (points per posterior standard deviation) set the grids (module constants)."""
    started = time.perf_counter()
    m = np.asarray(m, dtype=np.float64).ravel()
    s = np.asarray(s, dtype=np.float64).ravel()
    low, high = (float(prior[0]), float(prior[1]))
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise PopulationError(f"training prior of {target!r} needs finite low < high, got [{low}, {high}]")
    if m.size == 0:
        raise PopulationError(f"no lenses: the posteriors of {target!r} are empty")
    if m.shape != s.shape:
        raise PopulationError(f"{m.size} means but {s.size} standard deviations")
    if not (np.isfinite(m).all() and np.isfinite(s).all()):
        raise PopulationError(f"posterior means and stds of {target!r} must be finite")
    if (s <= 0).any():
        bad = int(np.argmax(s <= 0))
        raise PopulationError(f"posterior std of lens {bad} is {s[bad]:g}; it must be > 0")
    if method not in METHODS:
        raise PopulationError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    divide = None  # the Gaussian divided out: the normal training prior's moment-matched one
    if prior_normal is not None:
        prior_normal = (float(prior_normal[0]), float(prior_normal[1]))
        if not (math.isfinite(prior_normal[0]) and math.isfinite(prior_normal[1]) and prior_normal[1] > 0):
            raise PopulationError(f"normal training prior of {target!r} needs a finite mean and std > 0, got "
                                  f"{list(prior_normal)}")  # fmt: skip
        divide = prior_gaussian(prior_normal, (low, high))
    mu_lo, mu_hi = _check_range(
        "mu range", mu_range or (low, high), low, high, "the training prior's support"
    )
    sig_hi = float(high - low) if sigma_max is None else float(sigma_max)
    if not (math.isfinite(sig_hi) and sig_hi > 0):
        raise PopulationError(f"sigma max must be a finite number > 0, got {sigma_max!r}")
    if not (math.isfinite(sigma_min) and 0 <= sigma_min < sig_hi):
        raise PopulationError(
            f"sigma min must satisfy 0 <= sigma min < sigma max ({sig_hi:g}), got {sigma_min!r}"
        )
    if method == "importance" and sigma_min <= 0:
        raise PopulationError(
            "importance sampling needs sigma > 0 (a delta population has no density at the samples): give "
            "a sigma min > 0, or use method='analytic'"
        )
    samples = None
    if method == "importance":
        samples = sample_posteriors(m, s, low, high, n_samples, np.random.default_rng(seed))

    def evaluate(box: tuple[float, float, float, float], shape: tuple[int, int]):
        mu = np.linspace(box[0], box[1], shape[0])
        sigma = np.linspace(box[2], box[3], shape[1])
        return (
            mu,
            sigma,
            log_likelihood_grid(
                m, s, low, high, mu, sigma, method=method, samples=samples, prior_normal=divide
            ),
        )

    box, shape = (mu_lo, mu_hi, float(sigma_min), sig_hi), coarse_grid
    for _ in range(1 + MAX_ZOOMS):
        mu, sigma, logp = evaluate(box, shape)
        if not np.isfinite(logp).any():
            raise PopulationError(f"the population likelihood of {target!r} vanishes on the whole grid")
        density = _normalise(logp, mu, sigma)
        mu_marg, sig_marg = _trapz(density, sigma, axis=1), _trapz(density, mu, axis=0)
        if _resolved(mu, mu_marg, resolution) and _resolved(sigma, sig_marg, resolution):
            break
        new_box = (
            *_marginal_range(mu, mu_marg, (mu_lo, mu_hi)),
            *_marginal_range(sigma, sig_marg, (sigma_min, sig_hi)),
        )
        new_shape = (
            _points(new_box[0], new_box[1], mu, mu_marg, fine_grid[0], resolution),
            _points(new_box[2], new_box[3], sigma, sig_marg, fine_grid[1], resolution),
        )
        if new_shape == shape and np.allclose(new_box, box, rtol=0.05, atol=0.0):
            break  # no narrower box and no more points: this is the resolution the caps allow
        box, shape = new_box, new_shape
    mu_mean = float(_trapz(mu * mu_marg, mu))
    mu_std = float(math.sqrt(max(float(_trapz((mu - mu_mean) ** 2 * mu_marg, mu)), 0.0)))
    qs = [0.5] + [q for lv in LEVELS for q in ((1 - lv) / 2, (1 + lv) / 2)]
    mq = _quantiles(mu, mu_marg, qs)
    intervals = {lv: (float(mq[1 + 2 * k]), float(mq[2 + 2 * k])) for k, lv in enumerate(LEVELS)}
    sq = _quantiles(sigma, sig_marg, [0.5, 0.95])
    pm = truncnorm_mean(mu[:, None], sigma[None, :], low, high)
    weights = density * _cell_weights(mu)[:, None] * _cell_weights(sigma)[None, :]
    pm_mean, pm_std, pm_q = _weighted_summary(pm.ravel(), weights.ravel(), qs[1:])
    truth_summary = None
    if truth is not None:
        t = np.asarray(truth, dtype=np.float64).ravel()
        t = t[np.isfinite(t)]
        if t.size:
            truth_summary = {"n": int(t.size), "mean": float(t.mean()), "std": float(t.std())}
    return PopulationResult(
        target=target,
        n=int(m.size),
        prior=(low, high),
        mu_range=(mu_lo, mu_hi),
        sigma_range=(float(sigma_min), sig_hi),
        method=method,
        mu=mu,
        sigma=sigma,
        density=density,
        mu_marginal=mu_marg,
        sigma_marginal=sig_marg,
        mu_mean=mu_mean,
        mu_std=mu_std,
        mu_median=float(mq[0]),
        mu_intervals=intervals,
        sigma_median=float(sq[0]),
        sigma_upper95=float(sq[1]),
        sigma_mean=float(_trapz(sigma * sig_marg, sigma)),
        pop_mean_mean=pm_mean,
        pop_mean_std=pm_std,
        pop_mean_intervals={lv: (float(pm_q[2 * k]), float(pm_q[2 * k + 1])) for k, lv in enumerate(LEVELS)},
        truth=truth_summary,
        data={
            "mean_of_means": float(m.mean()),
            "median_std": float(np.median(s)),
            "informative_lenses": informative_lenses(m, s, (low, high), divide),
        },
        seconds=time.perf_counter() - started,
        prior_normal=prior_normal,
    )


# ------------------------------------------------------------------------------------ posterior files
@dataclass(frozen=True)
class TargetPosteriors:
    """One target's 1-D posteriors gathered from one or more files (multi-target ones marginalised)."""

    target: str
    mean: np.ndarray  # [n]
    std: np.ndarray  # [n]
    prior: tuple[float, float]  # the training prior's support
    truth: np.ndarray | None  # [n], NaN where unknown
    ids: tuple[str, ...]
    sources: tuple[str, ...]
    model_uris: tuple[str, ...]
    prior_normal: tuple[float, float] | None = None  # (mean, std) of a truncnormal training prior

    def prior_label(self) -> str:
        lo, hi = self.prior
        if self.prior_normal is None:
            return f"U({lo:g}, {hi:g})"
        return f"N({self.prior_normal[0]:g}, {self.prior_normal[1]:g}^2) on [{lo:g}, {hi:g}]"


def target_posteriors(post: Posteriors, target: str, where: str = "posteriors") -> TargetPosteriors:
    """The 1-D marginal of ``target`` (mean, std from the covariance diagonal) and its training prior."""
    try:
        j = post.target(target)
    except PosteriorFileError as e:
        raise PopulationError(f"{where}: {e}") from None
    if post.prior_kind[j] not in ("uniform", "truncnormal"):
        raise PopulationError(
            f"{where}: prior of {target!r} is {post.prior_kind[j]!r}; handled: uniform, truncnormal"
        )
    normal = None
    if post.prior_kind[j] == "truncnormal":
        normal = (float(post.prior_mean[j]), float(post.prior_std[j]))
    truth = None if post.truth is None else np.asarray(post.truth[:, j], dtype=np.float64)
    ids = post.ids if post.ids is not None else tuple(str(i) for i in range(post.n))
    return TargetPosteriors(
        target=target,
        mean=np.asarray(post.mean[:, j], dtype=np.float64),
        std=np.asarray(post.std()[:, j], dtype=np.float64),
        prior=(float(post.prior_low[j]), float(post.prior_high[j])),
        truth=truth,
        ids=tuple(ids),
        sources=(where,) * post.n,
        model_uris=(post.model_uri,),
        prior_normal=normal,
    )


def load_target(paths: Sequence[str | os.PathLike[str]], target: str) -> TargetPosteriors:
    """Read posterior files and gather ``target``: every file must name it with the same training prior."""
    if not paths:
        raise PopulationError("no posterior files given")
    parts = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise PopulationError(f"posterior file {str(p)!r} does not exist")
        parts.append(target_posteriors(read_posteriors(p), target, where=str(p)))
    first = parts[0]
    for part in parts[1:]:
        same_normal = (part.prior_normal is None) == (first.prior_normal is None) and (
            part.prior_normal is None
            or np.allclose(part.prior_normal, first.prior_normal, rtol=1e-12, atol=0.0)
        )
        if not (same_normal and np.allclose(part.prior, first.prior, rtol=1e-12, atol=0.0)):
            raise PopulationError(
                f"training prior of {target!r} differs between {first.sources[0]} ({first.prior_label()}) "
                f"and {part.sources[0]} ({part.prior_label()}); the prior correction needs one training prior"
            )
    if sum(part.mean.size for part in parts) == 0:
        raise PopulationError(f"no lenses in {', '.join(str(p) for p in paths)}")
    truths = [part.truth if part.truth is not None else np.full(part.mean.size, np.nan) for part in parts]
    truth = np.concatenate(truths)
    return TargetPosteriors(
        target=target,
        mean=np.concatenate([part.mean for part in parts]),
        std=np.concatenate([part.std for part in parts]),
        prior=first.prior,
        truth=None if np.isnan(truth).all() else truth,
        ids=tuple(i for part in parts for i in part.ids),
        sources=tuple(src for part in parts for src in part.sources if part.mean.size) or first.sources,
        model_uris=tuple(dict.fromkeys(u for part in parts for u in part.model_uris if u)),
        prior_normal=first.prior_normal,
    )


#: Posterior std of mu over its hyperprior's std above which the lenses do not constrain the population.
UNINFORMED_RATIO = 0.8
#: Median per-lens posterior std over the training prior's std above which the posteriors are prior-like.
PRIOR_LIKE_RATIO = 0.8


def prior_std(data: TargetPosteriors) -> float:
    """The std of the training prior: uniform ``(b - a) / sqrt 12``, or the truncated normal's."""
    a, b = data.prior
    if data.prior_normal is None:
        return (b - a) / math.sqrt(12.0)
    return prior_gaussian(data.prior_normal, data.prior)[1]


def prior_width_ratio(data: TargetPosteriors) -> float:
    """Median over the lenses of the posterior std over the training prior's std: about one when the network
    says nothing about a lens. Under a uniform prior such a Gaussian posterior, divided by the prior, reads as
    a measurement at the prior mean: the mean of the population is still right, its scatter is not; under a
    normal prior its ratio is flat (docs/population.md, "Uninformative per-lens posteriors")."""
    return float(np.median(data.std) / prior_std(data))


def select_lenses(data: TargetPosteriors, count: int | None, seed: int = 0) -> TargetPosteriors:
    """``count`` lenses drawn without replacement (seeded, kept in file order); all of them for None."""
    if count is None:
        return data
    n = data.mean.size
    if count < 1 or count > n:
        raise PopulationError(f"--select {count}: between 1 and the {n} lenses available")
    idx = np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))
    return TargetPosteriors(
        target=data.target,
        mean=data.mean[idx],
        std=data.std[idx],
        prior=data.prior,
        truth=None if data.truth is None else data.truth[idx],
        ids=tuple(data.ids[i] for i in idx),
        sources=tuple(data.sources[i] for i in idx),
        model_uris=data.model_uris,
        prior_normal=data.prior_normal,
    )


def infer_population(data: TargetPosteriors, **kwargs) -> PopulationResult:
    """:func:`infer_population_1d` on gathered posteriors (keyword arguments passed on)."""
    return infer_population_1d(
        data.mean,
        data.std,
        data.prior,
        prior_normal=data.prior_normal,
        target=data.target,
        truth=data.truth,
        **kwargs,
    )
