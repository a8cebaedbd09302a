"""Targets of parameter inference (``task="inference"``): names, the images they exist on, their values from
the simulator's per-image parameters, and their training prior (the standardisation of the network's
outputs).

A target is any scalar the simulator stores per image (``SimResult.params`` / the shards' ``params/<name>``),
by its stored name, plus named transforms:

==================  ============================  ===========  ======================================
target              value per image               images of    training prior (from the preset)
==================  ============================  ===========  ======================================
``sigma_sub``       ``subhalo_sigma_sub``         ``cdm``      ``preset.sigma_sub`` [kpc^-2]
``log10_m_axion``   ``log10(axion_mass)``         ``axion``    ``preset.axion_log10_mass`` [log10 eV]
``theta_E``         ``theta_E``                   all          ``preset.theta_E`` [arcsec]
any other name      that stored parameter         all          the training split's [min, max]
==================  ============================  ===========  ======================================

A target is only defined on some classes (there is no Sigma_sub on a no-substructure image): the task's
classes (:func:`default_classes`) are the classes every target exists on; images of other classes are left
out of training, validation and test. An online run renders only those classes.

The preset's prior is uniform on its range, or with the range's ``_normal`` companion (``sigma_sub_normal``,
``axion_log10_mass_normal``) a normal truncated to it. Standardisation: ``z = (x - loc) / scale`` with the
prior's mean and std (a uniform prior on [a, b]: (a + b)/2 and (b - a)/sqrt(12)); for a target without a
preset prior the training split's (or, online, a sample's) mean and std. The run's loop config, its
checkpoints' ``meta.json`` (``arch``) and its logged model carry ``targets``, ``target_loc``,
``target_scale`` and ``target_prior`` (per target ``[kind, low, high]``, or ``[kind, low, high, mean, std]``
for a truncated normal), so predictions are de-standardised and a population inference can divide the prior
out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deeplense_ray.config import TASKS
from deeplense_ray.train.gaussian import prior_moments

#: target name -> (stored parameter, transform, the class it exists on or None (all), preset range field).
KNOWN_TARGETS: dict[str, tuple[str, str, str | None, str | None]] = {
    "sigma_sub": ("subhalo_sigma_sub", "identity", "cdm", "sigma_sub"),
    "log10_m_axion": ("axion_mass", "log10", "axion", "axion_log10_mass"),
    "theta_E": ("theta_E", "identity", None, "theta_E"),
}
#: Loop-config / checkpoint-arch keys of an inference run.
INFERENCE_ARCH_KEYS: tuple[str, ...] = ("task", "targets", "target_loc", "target_scale", "target_prior")
#: Images drawn (CPU) to estimate the standardisation of a target without a preset prior, online.
SAMPLE_IMAGES = 256


def stored_param(target: str) -> str:
    """The stored per-image parameter a target is computed from."""
    return KNOWN_TARGETS[target][0] if target in KNOWN_TARGETS else target


def default_classes(targets: Sequence[str], available: Sequence[str]) -> tuple[str, ...]:
    """The classes every target exists on, in ``available``'s order: the one class of a class-bound target
    (``sigma_sub``: cdm), else all ``available``. ValueError naming the targets when two need other classes
    or the class is not ``available``."""
    bound = {KNOWN_TARGETS[t][2] for t in targets if t in KNOWN_TARGETS and KNOWN_TARGETS[t][2] is not None}
    if len(bound) > 1:
        raise ValueError(
            f"targets {list(targets)} exist on different classes {sorted(bound)}: no image has all of them"
        )
    if bound:
        (cls,) = bound
        if cls not in available:
            raise ValueError(f"targets {list(targets)} need {cls!r} images; the data has {list(available)}")
        return (cls,)
    return tuple(available)


def check_task_options(task: str, targets: Sequence[str], classes: Sequence[str] | None) -> None:
    """ValueError naming the value for a bad task, target list or class list (no data access)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if task == "classification":
        if targets or classes:
            raise ValueError(
                f"targets {list(targets)} / classes {list(classes or ())} are options of task 'inference'"
            )
        return
    if not targets:
        raise ValueError("task 'inference' needs targets, e.g. --targets sigma_sub")
    if any(not isinstance(t, str) or not t for t in targets) or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct names, got {list(targets)}")
    if classes is not None and (not classes or len(set(classes)) != len(classes)):
        raise ValueError(f"classes must be distinct class names, got {list(classes)}")
    for t in targets:
        cls = KNOWN_TARGETS.get(t, (None, None, None, None))[2]
        if classes and cls is not None and any(c != cls for c in classes):
            raise ValueError(
                f"target {t!r} exists on {cls!r} images only; classes {list(classes)} has others"
            )


def target_values(params: Mapping[str, Any], targets: Sequence[str]):
    """[N, T] float64 values of ``targets`` from per-image ``params`` (numpy arrays or torch tensors, same
    kind out). KeyError naming a missing parameter; ValueError for a non-scalar one."""
    cols = []
    for t in targets:
        name = stored_param(t)
        if name not in params:
            raise KeyError(f"target {t!r} needs the per-image parameter {name!r}; stored: {sorted(params)}")
        v = params[name]
        if v.ndim != 1:
            raise ValueError(f"target {t!r}: parameter {name!r} is not one scalar per image (shape "
                             f"{list(v.shape)})")  # fmt: skip
        v = v.double() if hasattr(v, "double") else np.asarray(v, np.float64)
        if t in KNOWN_TARGETS and KNOWN_TARGETS[t][1] == "log10":
            v = v.clamp_min(1e-300).log10() if hasattr(v, "log10") else np.log10(np.maximum(v, 1e-300))
        cols.append(v)
    if hasattr(cols[0], "double"):
        import torch

        return torch.stack(cols, dim=1)
    return np.stack(cols, axis=1)


def preset_prior(target: str, preset: Mapping[str, Any] | None) -> list[Any] | None:
    """The training prior of ``target`` from a resolved preset dict: ``["uniform", low, high]`` on the
    preset's range, or ``["truncnormal", low, high, mean, std]`` with the range's ``_normal`` companion set
    (``sim/priors.py``); None if the preset has none."""
    if preset is None or target not in KNOWN_TARGETS:
        return None
    field = KNOWN_TARGETS[target][3]
    rng = preset.get(field)
    if rng is None or len(rng) != 2 or not float(rng[1]) > float(rng[0]):
        return None
    normal = preset.get(f"{field}_normal")
    if normal is not None:
        return ["truncnormal", float(rng[0]), float(rng[1]), float(normal[0]), float(normal[1])]
    return ["uniform", float(rng[0]), float(rng[1])]


def target_spec(
    targets: Sequence[str], preset: Mapping[str, Any] | None, sample: Any | None
) -> dict[str, Any]:
    """{"targets", "target_loc", "target_scale", "target_prior", "prior_std"}: per target the preset's
    uniform prior and its moments, else the [min, max] and mean/std of ``sample`` ([N, T] values; needed
    only for such targets). ValueError when a target has neither or no spread."""
    loc, scale, prior = [], [], []
    for k, t in enumerate(targets):
        p = preset_prior(t, preset)
        if p is not None:
            m, s = prior_moments(p)
        else:
            if sample is None:
                raise ValueError(f"target {t!r} has no preset prior and no sample to standardise it")
            col = np.asarray(sample, np.float64)[:, k]
            col = col[np.isfinite(col)]
            if len(col) < 2 or not float(col.max()) > float(col.min()):
                raise ValueError(f"target {t!r} does not vary in the training data: cannot be inferred")
            p = ["uniform", float(col.min()), float(col.max())]
            m, s = float(col.mean()), float(col.std())
        loc.append(m)
        scale.append(s)
        prior.append(list(p))
    return {
        "targets": list(targets),
        "target_loc": loc,
        "target_scale": scale,
        "target_prior": prior,
        "prior_std": prior_std_of(prior),
    }


def needs_sample(targets: Sequence[str], preset: Mapping[str, Any] | None) -> bool:
    return any(preset_prior(t, preset) is None for t in targets)


def class_label_ids(classes: Sequence[str], data_classes: Sequence[str]) -> list[int]:
    """Label ids (positions in ``data_classes``) of the task's ``classes``."""
    return [list(data_classes).index(c) for c in classes]


def prior_std_of(prior: Sequence[Sequence[Any]]) -> list[float]:
    """The std of each target's training prior (:func:`deeplense_ray.train.gaussian.prior_moments`)."""
    return [prior_moments(p)[1] for p in prior]


__all__ = [
    "INFERENCE_ARCH_KEYS",
    "KNOWN_TARGETS",
    "TASKS",
    "check_task_options",
    "class_label_ids",
    "default_classes",
    "needs_sample",
    "preset_prior",
    "prior_std_of",
    "stored_param",
    "target_spec",
    "target_values",
]
