"""Gaussian posterior head: the math of parameter inference as a training task, in pure functions.

A regression network predicts, for every image, a Gaussian over ``T`` standardised targets. Its raw output
vector has ``T + T(T+1)/2`` entries (:func:`num_outputs`), laid out as

* ``[0, T)``: the mean ``mu`` (standardised units);
* ``[T, 2T)``: ``log diag(L)``, the log-diagonal of ``L``, the lower-triangular Cholesky factor of the
  *precision* matrix ``P = L L^T`` (the exponential keeps the diagonal positive, so ``P`` is positive
  definite for any output);
* ``[2T, T + T(T+1)/2)``: the strictly lower entries of ``L``, row by row (``torch.tril_indices(T, T, -1)``).

With the precision factor the negative log-likelihood needs no matrix inverse (Wagner-Carena et al. 2021):

    NLL(y) = 1/2 |L^T (y - mu)|^2 - sum_i log L_ii + T/2 log(2 pi)

which equals ``-MultivariateNormal(mu, precision_matrix=L L^T).log_prob(y)``. The covariance is
``(L L^T)^-1`` (:func:`covariance`). Physical units: ``x = loc + scale * z`` per target, so the physical
mean is ``loc + scale * mu`` and the physical covariance ``D C D`` with ``D = diag(scale)``
(:func:`to_physical`).

Calibration (numpy, :func:`coverage`): a marginal central interval of level ``q`` around the mean holds the
truth when ``|y - mu| / sigma <= Phi^-1((1 + q) / 2)``; over a set of lenses, a calibrated posterior holds
it for a fraction ``q`` of them. :func:`calibration_check` passes when the observed coverage of the 68 % and
95 % intervals is within ``tol`` (default 5 points) of nominal for every target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

#: log-diagonal entries of the precision factor are clamped to this range (standardised units: a marginal
#: std between e^-8 and e^8 of the prior's) so an early bad step cannot overflow the loss.
LOG_DIAG_CLAMP = 8.0
#: The nominal levels of the coverage metrics and of the calibration check.
COVERAGE_LEVELS: tuple[float, ...] = (0.68, 0.95)
#: Largest distance (fraction, 0.05 = 5 points) of an observed coverage from its nominal level that passes.
CALIBRATION_TOL = 0.05
#: Confidence levels of the calibration curve (expected vs observed coverage).
CURVE_LEVELS: tuple[float, ...] = tuple(round(q, 2) for q in np.linspace(0.05, 0.95, 19)) + (0.99,)


def num_outputs(num_targets: int) -> int:
    """Outputs of the head for ``num_targets`` targets: mean (T) + Cholesky factor (T(T+1)/2)."""
    t = int(num_targets)
    if t < 1:
        raise ValueError(f"need at least one target, got {num_targets!r}")
    return t + t * (t + 1) // 2


def num_targets_of(outputs: int) -> int:
    """Inverse of :func:`num_outputs`; ValueError if ``outputs`` is no head size."""
    for t in range(1, 64):
        if num_outputs(t) == int(outputs):
            return t
    raise ValueError(f"{outputs} outputs is not T + T(T+1)/2 for any number of targets T")


def split_head(out: torch.Tensor, num_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [B, T], precision Cholesky factor L [B, T, T], lower triangular, positive diagonal) of head
    outputs ``out`` [B, T + T(T+1)/2] (see the module docstring for the layout)."""
    t = int(num_targets)
    if out.ndim != 2 or out.shape[1] != num_outputs(t):
        raise ValueError(f"head output must be [B, {num_outputs(t)}] for {t} targets, got {list(out.shape)}")
    mean = out[:, :t]
    log_diag = out[:, t : 2 * t].clamp(-LOG_DIAG_CLAMP, LOG_DIAG_CLAMP)
    factor = torch.diag_embed(torch.exp(log_diag))
    if t > 1:
        rows, cols = torch.tril_indices(t, t, -1, device=out.device)
        off = out.new_zeros(out.shape[0], t, t)
        off[:, rows, cols] = out[:, 2 * t :]  # into a fresh tensor: autograd-safe
        factor = factor + off
    return mean, factor


def nll(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example Gaussian negative log-likelihood [B] of standardised ``target`` [B, T] under the head
    outputs ``out`` (full covariance; ``-MultivariateNormal.log_prob``)."""
    t = int(target.shape[1])
    mean, factor = split_head(out, t)
    resid = (target - mean).unsqueeze(-1)  # [B, T, 1]
    z = (factor.transpose(-1, -2) @ resid).squeeze(-1)  # L^T (y - mu)
    log_det = torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum(-1)
    return 0.5 * (z * z).sum(-1) - log_det + 0.5 * t * math.log(2 * math.pi)


def gaussian_nll_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loss: mean :func:`nll` over the batch, in float32 (autocast off: under bf16 autocast the
    matrix product of the whitened residual would be rounded to bf16)."""
    with torch.autocast(device_type=out.device.type, enabled=False):
        return nll(out.float(), target.float()).mean()


def covariance(factor: torch.Tensor) -> torch.Tensor:
    """Covariance ``(L L^T)^-1`` [B, T, T] from the precision's Cholesky factor ``L`` [B, T, T]."""
    return torch.cholesky_inverse(factor)


def head_to_gaussian(out: Any, num_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [N, T], covariance [N, T, T]) in standardised units, float64 numpy, of head outputs [N, P]."""
    o = torch.as_tensor(np.asarray(out), dtype=torch.float64)
    mean, factor = split_head(o, num_targets)
    return mean.numpy(), covariance(factor).numpy()


def to_physical(
    mean: np.ndarray, cov: np.ndarray, loc: Sequence[float], scale: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Standardised (mean [N, T], cov [N, T, T]) -> physical units: ``loc + scale * mean``, ``D cov D``."""
    loc_a = np.asarray(loc, dtype=np.float64)
    sc = np.asarray(scale, dtype=np.float64)
    return loc_a + sc * np.asarray(mean, np.float64), np.asarray(cov, np.float64) * sc[:, None] * sc[None, :]


def standardize(values: Any, loc: Sequence[float], scale: Sequence[float]) -> np.ndarray:
    """Physical values [N, T] -> standardised ``(x - loc) / scale``."""
    return (np.asarray(values, np.float64) - np.asarray(loc, np.float64)) / np.asarray(scale, np.float64)


def uniform_moments(low: float, high: float) -> tuple[float, float]:
    """(mean, std) of the uniform distribution on [low, high]: the standardisation of a uniform prior."""
    return 0.5 * (float(low) + float(high)), (float(high) - float(low)) / math.sqrt(12.0)


def truncnorm_moments(mean: float, std: float, low: float, high: float) -> tuple[float, float]:
    """(mean, std) of ``N(mean, std^2)`` truncated to [low, high] (closed form)."""
    from scipy.stats import truncnorm

    a, b = (float(low) - float(mean)) / float(std), (float(high) - float(mean)) / float(std)
    m, v = truncnorm.stats(a, b, loc=float(mean), scale=float(std), moments="mv")
    return float(m), float(math.sqrt(float(v)))


#: Training-prior families of a target: ``[kind, low, high]`` (uniform) or ``[kind, low, high, mean, std]``
#: (a normal truncated to [low, high]); [low, high] is the support either way.
PRIOR_KINDS: tuple[str, ...] = ("uniform", "truncnormal")


def prior_moments(prior: Sequence[Any]) -> tuple[float, float]:
    """(mean, std) of a training prior ``[kind, low, high, *shape]`` (:data:`PRIOR_KINDS`)."""
    kind = str(prior[0])
    if kind == "uniform":
        return uniform_moments(prior[1], prior[2])
    if kind == "truncnormal":
        return truncnorm_moments(prior[3], prior[4], prior[1], prior[2])
    raise ValueError(f"unknown training-prior kind {kind!r}; known: {list(PRIOR_KINDS)}")


# ---------------------------------------------------------------------------------------------- calibration
def _z_of_level(level: float) -> float:
    """Half-width in standard deviations of the central interval of probability ``level``."""
    from scipy.special import ndtri

    return float(ndtri(0.5 * (1.0 + float(level))))


def coverage(mean: Any, cov: Any, truth: Any, levels: Sequence[float] = COVERAGE_LEVELS) -> np.ndarray:
    """Observed coverage [len(levels), T]: the fraction of lenses whose true value of each target lies in
    the marginal central interval of each level (``|y - mu| <= z_q sigma``). Any consistent units."""
    m = np.asarray(mean, np.float64)
    y = np.asarray(truth, np.float64)
    sd = np.sqrt(np.diagonal(np.asarray(cov, np.float64), axis1=1, axis2=2))
    z = np.abs(y - m) / sd
    return np.stack([(z <= _z_of_level(q)).mean(axis=0) for q in levels])


def calibration_check(
    observed: Mapping[float, Sequence[float]] | np.ndarray,
    levels: Sequence[float] = COVERAGE_LEVELS,
    tol: float = CALIBRATION_TOL,
) -> bool:
    """True when every target's observed coverage at each nominal level is within ``tol`` of it.

    ``observed``: the [len(levels), T] array of :func:`coverage` (or {level: [T]}). An over-confident
    posterior (intervals too narrow) covers less than nominal and fails; so does an under-confident one."""
    if isinstance(observed, Mapping):
        obs = np.stack([np.asarray(observed[q], np.float64) for q in levels])
    else:
        obs = np.asarray(observed, np.float64)
    nominal = np.asarray(levels, np.float64)[:, None]
    return bool(np.all(np.isfinite(obs)) and np.all(np.abs(obs - nominal) <= tol))


def regression_metrics(
    outputs: Any,
    truth_std: Any,
    targets: Sequence[str],
    loc: Sequence[float],
    scale: Sequence[float],
    prior_std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """All metrics of one split from the head outputs [N, P] and the standardised truths [N, T].

    Returns ``n``, ``nll`` (mean per lens, standardised units: the loss), ``loss`` (= ``nll``), per target
    ``rmse`` / ``bias`` (physical units, mean of prediction - truth), ``std_mean`` (mean predicted std,
    physical), ``rmse_over_prior`` (rmse / the prior's std: < 1 beats predicting the prior mean),
    ``coverage_68`` / ``coverage_95`` (fractions), ``calibration_curve`` {level: [T]}, ``calibrated``
    (:func:`calibration_check`, 1/0), ``diverged`` (1 if any output is non-finite) and the physical
    ``mean`` [N, T], ``cov`` [N, T, T], ``truth`` [N, T] arrays (dropped by :func:`flatten_regression`)."""
    out = np.asarray(outputs, np.float64)
    y = np.asarray(truth_std, np.float64)
    names = list(targets)
    t = len(names)
    n = int(y.shape[0])
    finite = bool(np.isfinite(out).all()) and n > 0
    base: dict[str, Any] = {"n": n, "targets": names, "diverged": int(not finite)}
    if not finite:
        nan = {k: math.nan for k in names}
        return {**base, "nll": math.nan, "loss": math.nan, "rmse": nan, "bias": nan, "std_mean": nan,
                "rmse_over_prior": nan, "coverage_68": nan, "coverage_95": nan, "calibration_curve": {},
                "calibrated": 0}  # fmt: skip
    with torch.no_grad():
        o = torch.from_numpy(out)
        nll_mean = float(nll(o, torch.from_numpy(y)).mean())
    mean_s, cov_s = head_to_gaussian(out, t)
    mean, cov = to_physical(mean_s, cov_s, loc, scale)
    truth = np.asarray(loc, np.float64) + np.asarray(scale, np.float64) * y
    err = mean - truth
    sd = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    cov_levels = coverage(mean, cov, truth, COVERAGE_LEVELS)
    curve = coverage(mean, cov, truth, CURVE_LEVELS)
    prior = np.asarray(prior_std if prior_std is not None else scale, np.float64)
    rmse = np.sqrt((err**2).mean(axis=0))
    return {
        **base,
        "nll": nll_mean,
        "loss": nll_mean,
        "rmse": dict(zip(names, rmse.tolist())),
        "bias": dict(zip(names, err.mean(axis=0).tolist())),
        "std_mean": dict(zip(names, sd.mean(axis=0).tolist())),
        "rmse_over_prior": dict(zip(names, (rmse / prior).tolist())),
        "coverage_68": dict(zip(names, cov_levels[0].tolist())),
        "coverage_95": dict(zip(names, cov_levels[1].tolist())),
        "calibration_curve": {float(q): curve[i].tolist() for i, q in enumerate(CURVE_LEVELS)},
        "calibrated": int(calibration_check(cov_levels)),
        "mean": mean,
        "cov": cov,
        "truth": truth,
    }


#: Keys of :func:`regression_metrics` holding per-lens arrays (not metrics).
ARRAY_KEYS = ("mean", "cov", "truth")


def flatten_regression(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Scalar view of :func:`regression_metrics` for reports and MLflow: ``<prefix>_nll``, ``_loss``,
    ``_calibrated``, ``_diverged`` and per target ``<prefix>_rmse_<t>``, ``_bias_<t>``, ``_std_<t>``,
    ``_rmse_over_prior_<t>``, ``_coverage68_<t>``, ``_coverage95_<t>``."""
    out = {
        f"{prefix}_nll": float(metrics["nll"]),
        f"{prefix}_loss": float(metrics["loss"]),
        f"{prefix}_calibrated": float(metrics["calibrated"]),
        f"{prefix}_diverged": float(metrics.get("diverged", 0)),
    }
    for key, name in (("rmse", "rmse"), ("bias", "bias"), ("std_mean", "std"),
                      ("rmse_over_prior", "rmse_over_prior"), ("coverage_68", "coverage68"),
                      ("coverage_95", "coverage95")):  # fmt: skip
        for target, value in metrics[key].items():
            out[f"{prefix}_{name}_{target}"] = float(value)
    return out


__all__ = [
    "ARRAY_KEYS",
    "CALIBRATION_TOL",
    "COVERAGE_LEVELS",
    "CURVE_LEVELS",
    "calibration_check",
    "covariance",
    "coverage",
    "flatten_regression",
    "gaussian_nll_loss",
    "head_to_gaussian",
    "nll",
    "num_outputs",
    "num_targets_of",
    "regression_metrics",
    "split_head",
    "standardize",
    "to_physical",
    "uniform_moments",
    "truncnorm_moments",
    "prior_moments",
    "PRIOR_KINDS",
]
