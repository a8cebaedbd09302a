"""Per-model hyperparameter search spaces: the one place that says what a search may vary.

Every space has the optimiser keys (``lr`` log-uniform over a sane range, ``weight_decay`` log-uniform,
``batch_size`` a choice) plus the architecture keys that :func:`deeplense_ray.models.model_hparams`
exposes for the model, derived from their defaults by name:

- depth-like keys (``depth``, ``*_depth``, ``num_layers``): a choice around the default;
- head counts (``heads``, ``*_heads``, ``num_heads``): a choice around the default;
- widths (``dim``, ``*_emb_dim``, ``embed_dim``, ``hidden_dim``, ``width``, ``mlp_dim``, ...): a choice
  around the default whose every value is a multiple of every head count it is paired with (same stage
  prefix, else the unprefixed ``heads``), so ``dim % heads == 0`` for any combination the searcher draws;
- dropout-like keys (``dropout``, ``*_dropout``, ``drop_rate``, ``drop_path*``): uniform over [0, 0.3].

Keys of other kinds stay at the model's default. :data:`MODEL_SPACE_OVERRIDES` adjusts single models.
Search-space keys are flat; :func:`split_trial_config` maps a trial's config back to TrainConfig fields and
``build_model`` overrides.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ray import tune

#: Optimiser keys every space has (TrainConfig fields).
TRAIN_KEYS: tuple[str, ...] = ("lr", "weight_decay", "batch_size")
LR_RANGE: tuple[float, float] = (1e-5, 3e-3)
WEIGHT_DECAY_RANGE: tuple[float, float] = (1e-6, 1e-1)
BATCH_SIZES: tuple[int, ...] = (32, 64, 128)
DROPOUT_RANGE: tuple[float, float] = (0.0, 0.3)

#: Per-model adjustments: key -> Tune domain / constant (replaces the derived entry) or None (not searched).
MODEL_SPACE_OVERRIDES: dict[str, dict[str, Any]] = {}

_DEPTH = re.compile(r"^(?P<p>.*?)(depth|num_layers|layers)$")
_HEADS = re.compile(r"^(?P<p>.*?)(heads|num_heads)$")
_WIDTH = re.compile(r"^(?P<p>.*?)(dim|emb_dim|embed_dim|embedding_dim|hidden_dim|width|mlp_dim)$")
_DROPOUT = re.compile(r"(dropout|drop_rate|drop_path(_rate)?|attn_drop(_rate)?|stochastic_depth(_rate)?)$")
_NOT_WIDTH = ("dim_head", "head_dim")


def classify_hparam(key: str, default: Any) -> str | None:
    """Kind of an architecture hyperparameter: 'depth', 'heads', 'width', 'dropout' or None (not searched)."""
    if isinstance(default, bool):
        return None
    if isinstance(default, float) and _DROPOUT.search(key):
        return "dropout"
    if not isinstance(default, int) or default < 1:
        return None
    if key.endswith(_NOT_WIDTH):
        return None
    if _DEPTH.match(key):
        return "depth"
    if _HEADS.match(key):
        return "heads"
    if _WIDTH.match(key):
        return "width"
    return None


def _stage_prefix(key: str, pattern: re.Pattern) -> str:
    m = pattern.match(key)
    return m.group("p") if m else ""


def depth_choices(default: int) -> list[int]:
    """Depths around a default: half, same and one-and-a-half times (at least 1)."""
    return sorted({max(1, default // 2), default, default + max(1, default // 2)})


def head_choices(default: int) -> list[int]:
    """Head counts around a default: half, same and twice (at least 1)."""
    return sorted({max(1, default // 2), default, 2 * default})


def width_choices(default: int, multiple_of: int = 1) -> list[int]:
    """Widths around a default (half, same, twice), each rounded up to a multiple of ``multiple_of``."""
    m = max(1, int(multiple_of))
    out = set()
    for w in (max(1, default // 2), default, 2 * default):
        out.add(max(m, int(math.ceil(w / m)) * m))
    return sorted(out)


def model_space(model: str, hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Search-space entries for one model's architecture keys (flat key -> Tune domain).

    Args:
        model: canonical model name.
        hparams: the model's tunable keys and defaults; default ``deeplense_ray.models.model_hparams(model)``.
    """
    if hparams is None:
        from deeplense_ray.models import model_hparams

        hparams = model_hparams(model)
    kinds = {k: classify_hparam(k, v) for k, v in hparams.items()}
    heads: dict[str, list[int]] = {}
    space: dict[str, Any] = {}
    for k, kind in kinds.items():
        if kind == "heads":
            heads[_stage_prefix(k, _HEADS)] = head_choices(int(hparams[k]))
            space[k] = tune.choice(heads[_stage_prefix(k, _HEADS)])
        elif kind == "depth":
            space[k] = tune.choice(depth_choices(int(hparams[k])))
        elif kind == "dropout":
            hi = max(DROPOUT_RANGE[1], min(0.5, 1.5 * float(hparams[k])))
            space[k] = tune.uniform(DROPOUT_RANGE[0], hi)
    for k, kind in kinds.items():
        if kind != "width":
            continue
        prefix = _stage_prefix(k, _WIDTH)
        paired = heads.get(prefix, heads.get("", [1])) if not k.endswith("mlp_dim") else [1]
        space[k] = tune.choice(width_choices(int(hparams[k]), math.lcm(*paired)))
    for k, v in MODEL_SPACE_OVERRIDES.get(model, {}).items():
        if v is None:
            space.pop(k, None)
        else:
            space[k] = v
    return space


def batch_size_choices(num_workers: int = 1) -> list[int]:
    """Global batch sizes near :data:`BATCH_SIZES`, each divisible by the trial's ``num_workers``."""
    k = max(1, int(num_workers))
    return sorted({max(k, int(math.ceil(b / k)) * k) for b in BATCH_SIZES})


def train_space(num_workers: int = 1) -> dict[str, Any]:
    """Optimiser entries shared by every model: lr and weight decay log-uniform, batch size a choice."""
    return {
        "lr": tune.loguniform(*LR_RANGE),
        "weight_decay": tune.loguniform(*WEIGHT_DECAY_RANGE),
        "batch_size": tune.choice(batch_size_choices(num_workers)),
    }


def search_space(
    model: str,
    *,
    overrides: Mapping[str, Any] | None = None,
    hparams: Mapping[str, Any] | None = None,
    num_workers: int = 1,
) -> dict[str, Any]:
    """The full flat search space of a model: :func:`train_space` + :func:`model_space` + ``overrides``.

    ``overrides`` values replace entries (a Tune domain or a constant); a value None removes the key.
    Keys in ``overrides`` that are neither optimiser keys nor the model's hyperparameters raise ValueError.
    """
    if hparams is None:
        from deeplense_ray.models import model_hparams

        hparams = model_hparams(model)
    space = {**train_space(num_workers), **model_space(model, hparams)}
    for k, v in (overrides or {}).items():
        if k not in TRAIN_KEYS and k not in hparams:
            raise ValueError(
                f"search-space key {k!r} is neither an optimiser key {list(TRAIN_KEYS)} nor a "
                f"hyperparameter of {model} ({', '.join(sorted(hparams)) or 'none'})"
            )
        if v is None:
            space.pop(k, None)
        else:
            space[k] = checked_entry(model, k, v)
    return space


def _check_train_value(key: str, value: Any) -> Any:
    """A value of an optimiser key: lr a number > 0, weight_decay a number >= 0, batch_size an integer >= 1
    (an integral float counts); ValueError naming the key and the value."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if key == "batch_size":
        if number and float(value).is_integer() and value >= 1:
            return int(value)
        raise ValueError(f"search-space key 'batch_size': {value!r} is not an integer >= 1")
    if key == "lr" and not (number and value > 0):
        raise ValueError(f"search-space key 'lr': {value!r} is not a number > 0 (default range {LR_RANGE})")
    if key == "weight_decay" and not (number and value >= 0):
        raise ValueError(
            f"search-space key 'weight_decay': {value!r} is not a number >= 0 "
            f"(default range {WEIGHT_DECAY_RANGE})"
        )
    return value


def checked_entry(model: str, key: str, entry: Any) -> Any:
    """A search-space entry given by the user (a constant or a ``tune.choice``) with every value checked
    against the key's domain: the optimiser keys are numbers (:func:`_check_train_value`), a model
    hyperparameter takes the type of its constructor parameter
    (:func:`deeplense_ray.models.registry.check_override`). Other Tune domains pass unchanged. Returns the
    entry with the checked values; ValueError naming the key and the bad value."""
    from ray.tune.search.sample import Categorical, Domain

    from deeplense_ray.models.registry import check_override

    def check(value: Any) -> Any:
        return _check_train_value(key, value) if key in TRAIN_KEYS else check_override(model, key, value)

    if isinstance(entry, Categorical):
        return tune.choice([check(v) for v in entry.categories])
    if isinstance(entry, Domain):
        return entry
    return check(entry)


def split_trial_config(config: Mapping[str, Any], hparams: Mapping[str, Any]) -> tuple[dict, dict]:
    """Split a trial's sampled values into (TrainConfig fields, build_model overrides)."""
    train = {k: config[k] for k in TRAIN_KEYS if k in config}
    model = {k: config[k] for k in hparams if k in config}
    if "batch_size" in train:
        train["batch_size"] = int(train["batch_size"])
    for k, v in list(model.items()):
        if isinstance(hparams[k], int) and not isinstance(hparams[k], bool):
            model[k] = int(v)
    return train, model


def trial_train_fields(
    train: Mapping[str, Any], config: Mapping[str, Any], hparams: Mapping[str, Any]
) -> dict[str, Any]:
    """TrainConfig fields of one trial: the search's fixed ``train`` fields updated by the trial's sampled
    values (:func:`split_trial_config`; model hyperparameters merged into ``model_overrides``)."""
    train_kw, model_kw = split_trial_config(config, hparams)
    kwargs = dict(train)
    kwargs.update(train_kw)
    kwargs["model_overrides"] = {**kwargs.get("model_overrides", {}), **model_kw}
    return kwargs
