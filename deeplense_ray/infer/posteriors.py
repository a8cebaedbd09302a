"""Per-lens posteriors of dark-matter parameters: the file that parameter inference writes and reads.

A regression model (task ``inference``) predicts for every image a Gaussian posterior over named scalar
targets (``sigma_sub``, ``log10_m_axion``, ...): a mean vector and a covariance matrix in the targets'
physical units. ``jobs/predict.py`` writes them with :func:`write_posteriors`; population inference
(``deeplense_ray.infer.population``) reads them with :func:`read_posteriors`. The training prior of each
target travels with the posteriors, because a population inference has to divide it out.

The file is a NumPy ``.npz`` archive without object arrays (read with ``allow_pickle=False``):

========================  ====================  ==========================================================
key                       shape, dtype          meaning
========================  ====================  ==========================================================
``targets``               [T] str               target names
``mean``                  [n, T] float64        posterior means
``cov``                   [n, T, T] float64     posterior covariances (symmetric, positive definite)
``truth``                 [n, T] float64        true values where known (simulated data), else NaN
``prior_kind``            [T] str               the training prior's family per target: ``uniform`` or
                                                ``truncnormal`` (a normal truncated to [low, high])
``prior_low``             [T] float64           its lower bound (the support's)
``prior_high``            [T] float64           its upper bound
``prior_mean``            [T] float64           ``truncnormal``: the normal's mean (NaN for ``uniform``)
``prior_std``             [T] float64           ``truncnormal``: the normal's std (NaN for ``uniform``)
``ids``                   [n] str               an identifier per lens (file and index, or dataset row)
``model_uri``             [] str                the model that produced them
========================  ====================  ==========================================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deeplense_ray.io import atomic_path

#: Training-prior families a posterior file may name.
PRIOR_KINDS = ("uniform", "truncnormal")


class PosteriorFileError(ValueError):
    """A posterior file that cannot be read or does not hold consistent posteriors (the message names it)."""


@dataclass(frozen=True)
class Posteriors:
    """Gaussian per-lens posteriors over ``targets`` with the training prior they were learnt under."""

    targets: tuple[str, ...]
    mean: np.ndarray  # [n, T]
    cov: np.ndarray  # [n, T, T]
    prior_kind: tuple[str, ...]
    prior_low: np.ndarray  # [T]
    prior_high: np.ndarray  # [T]
    truth: np.ndarray | None = None  # [n, T], NaN where unknown
    ids: tuple[str, ...] | None = None
    model_uri: str = ""
    prior_mean: np.ndarray | None = None  # [T] truncnormal: the normal's mean, NaN if uniform; None: all NaN
    prior_std: np.ndarray | None = None  # [T] truncnormal: the normal's std

    def __post_init__(self) -> None:
        t = len(self.targets)
        for name in ("prior_mean", "prior_std"):
            v = getattr(self, name)
            object.__setattr__(self, name, np.full(t, np.nan) if v is None else np.asarray(v, np.float64))
        check_posteriors(self)

    def prior(self, j: int) -> list:
        """The training prior of target ``j``: ``[kind, low, high]`` or ``[kind, low, high, mean, std]``."""
        p = [self.prior_kind[j], float(self.prior_low[j]), float(self.prior_high[j])]
        return p + [float(self.prior_mean[j]), float(self.prior_std[j])] if p[0] == "truncnormal" else p

    @property
    def n(self) -> int:
        return int(self.mean.shape[0])

    def std(self) -> np.ndarray:
        """Marginal posterior standard deviations [n, T]."""
        return np.sqrt(np.diagonal(self.cov, axis1=1, axis2=2))

    def target(self, name: str) -> int:
        """The column of target ``name``."""
        if name not in self.targets:
            raise PosteriorFileError(f"target {name!r} not among {list(self.targets)}")
        return self.targets.index(name)


def check_posteriors(p: Posteriors, where: str = "posteriors") -> None:
    """Raise :class:`PosteriorFileError` naming ``where`` if shapes, values or priors are inconsistent."""
    t = len(p.targets)
    if t == 0 or len(set(p.targets)) != t:
        raise PosteriorFileError(f"{where}: targets must be distinct names, got {list(p.targets)}")
    if p.mean.ndim != 2 or p.mean.shape[1] != t:
        raise PosteriorFileError(f"{where}: mean must be [n, {t}], got {list(p.mean.shape)}")
    n = p.mean.shape[0]
    if p.cov.shape != (n, t, t):
        raise PosteriorFileError(f"{where}: cov must be [{n}, {t}, {t}], got {list(p.cov.shape)}")
    if not (np.isfinite(p.mean).all() and np.isfinite(p.cov).all()):
        raise PosteriorFileError(f"{where}: mean and cov must be finite")
    if n and not np.allclose(p.cov, np.swapaxes(p.cov, 1, 2), rtol=1e-6, atol=0.0):
        raise PosteriorFileError(f"{where}: cov is not symmetric")
    if n and (np.linalg.eigvalsh(p.cov).min(axis=1) <= 0).any():
        bad = int(np.argmax(np.linalg.eigvalsh(p.cov).min(axis=1) <= 0))
        raise PosteriorFileError(f"{where}: cov of lens {bad} is not positive definite")
    if len(p.prior_kind) != t or p.prior_low.shape != (t,) or p.prior_high.shape != (t,):
        raise PosteriorFileError(f"{where}: one training prior per target needed ({t})")
    for name, kind, lo, hi in zip(p.targets, p.prior_kind, p.prior_low, p.prior_high):
        if kind not in PRIOR_KINDS:
            known = ", ".join(PRIOR_KINDS)
            raise PosteriorFileError(f"{where}: prior of {name!r} is {kind!r}; known: {known}")
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise PosteriorFileError(f"{where}: prior of {name!r} needs finite low < high, got [{lo}, {hi}]")
    if p.prior_mean.shape != (t,) or p.prior_std.shape != (t,):
        raise PosteriorFileError(f"{where}: prior_mean and prior_std need one value per target ({t})")
    for name, kind, mean, std in zip(p.targets, p.prior_kind, p.prior_mean, p.prior_std):
        if kind == "truncnormal" and not (np.isfinite(mean) and np.isfinite(std) and std > 0):
            raise PosteriorFileError(
                f"{where}: truncnormal prior of {name!r} needs a finite mean and std > 0, got {mean}, {std}"
            )
    if p.truth is not None and p.truth.shape != (n, t):
        raise PosteriorFileError(f"{where}: truth must be [{n}, {t}], got {list(p.truth.shape)}")
    if p.ids is not None and len(p.ids) != n:
        raise PosteriorFileError(f"{where}: {len(p.ids)} ids for {n} lenses")


def write_posteriors(path: str | os.PathLike[str], p: Posteriors) -> Path:
    """Write ``p`` to ``path`` (``.npz``) atomically: readers see no file or the whole one."""
    out = Path(path)
    if out.suffix != ".npz":
        raise PosteriorFileError(f"{out}: a posterior file ends in .npz")
    arrays = {
        "targets": np.asarray(p.targets, dtype=str),
        "mean": np.asarray(p.mean, dtype=np.float64),
        "cov": np.asarray(p.cov, dtype=np.float64),
        "truth": np.full(p.mean.shape, np.nan) if p.truth is None else np.asarray(p.truth, dtype=np.float64),
        "prior_kind": np.asarray(p.prior_kind, dtype=str),
        "prior_low": np.asarray(p.prior_low, dtype=np.float64),
        "prior_high": np.asarray(p.prior_high, dtype=np.float64),
        "prior_mean": np.asarray(p.prior_mean, dtype=np.float64),
        "prior_std": np.asarray(p.prior_std, dtype=np.float64),
        "ids": np.asarray(p.ids if p.ids is not None else [str(i) for i in range(p.n)], dtype=str),
        "model_uri": np.asarray(p.model_uri, dtype=str),
    }
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return out


def read_posteriors(path: str | os.PathLike[str]) -> Posteriors:
    """Read a posterior file written by :func:`write_posteriors`; errors name the file."""
    src = Path(path)
    try:
        with np.load(src, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise PosteriorFileError(f"{src}: not a readable posterior file ({e})") from None
    needed = ("targets", "mean", "cov", "prior_kind", "prior_low", "prior_high")
    missing = [k for k in needed if k not in data]
    if missing:
        raise PosteriorFileError(f"{src}: missing {', '.join(missing)}")
    truth = data.get("truth")
    try:
        return Posteriors(
            targets=tuple(str(x) for x in data["targets"]),
            mean=np.asarray(data["mean"], dtype=np.float64),
            cov=np.asarray(data["cov"], dtype=np.float64),
            prior_kind=tuple(str(x) for x in data["prior_kind"]),
            prior_low=np.asarray(data["prior_low"], dtype=np.float64),
            prior_high=np.asarray(data["prior_high"], dtype=np.float64),
            truth=None if truth is None or np.isnan(truth).all() else np.asarray(truth, dtype=np.float64),
            ids=tuple(str(x) for x in data["ids"]) if "ids" in data else None,
            model_uri=str(data["model_uri"]) if "model_uri" in data else "",
            prior_mean=data.get("prior_mean"),
            prior_std=data.get("prior_std"),
        )
    except PosteriorFileError as e:
        raise PosteriorFileError(f"{src}: {e}") from None


def gaussian_posteriors(
    targets: Sequence[str],
    mean: np.ndarray,
    cov: np.ndarray,
    prior: Sequence[Sequence],
    **extra,
) -> Posteriors:
    """Build :class:`Posteriors` from arrays; ``prior`` is one ``[kind, low, high]`` (uniform) or ``[kind,
    low, high, mean, std]`` (truncnormal) per target."""
    shape = [(float(p[3]), float(p[4])) if len(p) > 3 else (np.nan, np.nan) for p in prior]
    return Posteriors(
        targets=tuple(targets),
        mean=np.asarray(mean, dtype=np.float64),
        cov=np.asarray(cov, dtype=np.float64),
        prior_kind=tuple(str(p[0]) for p in prior),
        prior_low=np.asarray([p[1] for p in prior], dtype=np.float64),
        prior_high=np.asarray([p[2] for p in prior], dtype=np.float64),
        prior_mean=np.asarray([m for m, _ in shape], dtype=np.float64),
        prior_std=np.asarray([sd for _, sd in shape], dtype=np.float64),
        **extra,
    )
