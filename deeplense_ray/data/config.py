"""Dataset build configuration: what to simulate, how many, how it is split and sharded.

Everything here is pure (no Ray, no I/O besides reading a YAML file), so a bad value fails before any cluster
work starts, with an error naming the value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SPLITS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
STORAGE_DTYPES: tuple[str, ...] = ("float32", "float16")
_SPLIT_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_MAX_SEED = 2**63 - 1


def parse_splits(text: str) -> dict[str, float]:
    """Parse ``"train=0.8,val=0.1,test=0.1"`` into an ordered dict (order kept as written).

    Raises ValueError naming the offending item. Summing to 1 is checked by :meth:`DatasetConfig.validate`.
    """
    out: dict[str, float] = {}
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"bad split {item!r} in {text!r}: expected NAME=FRACTION, e.g. train=0.8")
        try:
            frac = float(value)
        except ValueError:
            raise ValueError(f"bad fraction {value.strip()!r} for split {name!r} in {text!r}") from None
        if name in out:
            raise ValueError(f"split {name!r} given twice in {text!r}")
        out[name] = frac
    if not out:
        raise ValueError(f"no splits in {text!r}: expected e.g. train=0.8,val=0.1,test=0.1")
    return out


def apportion(total: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Split ``total`` items into integer parts proportional to ``fractions`` that sum exactly to ``total``.

    Largest-remainder (Hamilton) method; ties go to the split listed first. Pure and order-stable.
    """
    names = list(fractions)
    raw = [total * float(fractions[n]) for n in names]
    parts = [math.floor(r + 1e-9) for r in raw]
    left = total - sum(parts)
    order = sorted(range(len(names)), key=lambda i: (-(raw[i] - parts[i]), i))
    for i in order[: max(left, 0)]:
        parts[i] += 1
    return dict(zip(names, parts))


def check_splits(
    splits: Any,
    num_per_class: int | None = None,
    *,
    source: str | None = None,
    remedy: str = "raise num_per_class or drop the split",
) -> None:
    """The split rules of every dataset: names of letters, digits, '_' or '-'; fractions in (0, 1] summing to
    1; and, given ``num_per_class``, no split left without an image of a class (:func:`apportion`). An empty
    split is asked for by leaving it out. ValueError naming the value; ``source`` says where the per-class
    count comes from (default ``num_per_class=N``), ``remedy`` what to change."""
    if not isinstance(splits, Mapping) or not splits:
        raise ValueError(f"splits must be a non-empty mapping name -> fraction, got {splits!r}")
    for name, frac in splits.items():
        if not isinstance(name, str) or not name or set(name) - _SPLIT_NAME_CHARS:
            raise ValueError(f"split name {name!r} must be non-empty letters, digits, '_' or '-'")
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 < float(frac) <= 1.0:
            raise ValueError(f"split {name!r} fraction must be in (0, 1], got {frac!r}")
    total = sum(float(f) for f in splits.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {total:g} from {dict(splits)!r}")
    if num_per_class is None:
        return
    for name, rows in apportion(num_per_class, splits).items():
        if rows == 0:
            raise ValueError(
                f"split {name!r} gets 0 images per class with {source or f'num_per_class={num_per_class}'} "
                f"and fraction {splits[name]!r}: {remedy}"
            )


@dataclass
class DatasetConfig:
    """What ``build_dataset`` makes.

    Attributes:
        preset: base simulator preset name (``deeplense_ray.sim.list_presets()``).
        preset_overrides: preset fields to override (validated by ``deeplense_ray.sim.resolve_preset``).
        num_per_class: images of EACH class in all, partitioned by ``splits`` (each image in one split).
        splits: split name -> fraction; fractions sum to 1; order is kept.
        shard_size: rows per HDF5 shard (the last shard of a split may be smaller).
        seed: master seed; every shard's seed derives from (seed, split, shard index) only.
        dtype: storage dtype of ``images``: 'float32' or 'float16' (rendering is always float32).
    """

    preset: str = "model_ii"
    preset_overrides: dict[str, Any] = field(default_factory=dict)
    num_per_class: int = 1000
    splits: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    shard_size: int = 4096
    seed: int = 0
    dtype: str = "float32"

    def validate(self) -> DatasetConfig:
        """Check every field; raise ValueError naming the bad value. Returns self."""
        if not isinstance(self.preset, str) or not self.preset:
            raise ValueError(f"preset must be a preset name (str), got {self.preset!r}")
        if not isinstance(self.preset_overrides, Mapping):
            raise ValueError(
                f"preset_overrides must be a mapping, got {type(self.preset_overrides).__name__}"
            )
        for key, name, lo in (("num_per_class", "num_per_class", 1), ("shard_size", "shard_size", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= _MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**63-1], got {self.seed!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {self.dtype!r}")
        self._validate_splits()
        self._validate_preset()
        return self

    def _validate_splits(self) -> None:
        check_splits(self.splits, self.num_per_class)

    def _validate_preset(self) -> None:
        from deeplense_ray.sim import resolve_preset

        preset = resolve_preset(self.preset, dict(self.preset_overrides) or None)
        c = len(preset.class_names)
        if preset.paired and self.shard_size % c:
            raise ValueError(
                f"shard_size {self.shard_size} must be a multiple of the {c} classes for the paired "
                f"preset {preset.name!r} (each group of {c} rows shares a macro lens)"
            )

    def rows_per_class(self) -> dict[str, int]:
        """Images of each class per split (sums to num_per_class)."""
        return apportion(self.num_per_class, self.splits)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-safe dict of the fields (the manifest's ``config`` adds the resolved preset)."""
        d = asdict(self)
        d["splits"] = {k: float(v) for k, v in self.splits.items()}
        d["preset_overrides"] = dict(self.preset_overrides)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetConfig:
        """Inverse of :meth:`to_dict` (unknown keys are a ValueError listing the valid ones)."""
        valid = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown DatasetConfig keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**{k: data[k] for k in data})


def load_preset_yaml(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """Read a YAML preset file: ``preset: NAME`` (optional base preset) plus preset fields to override.

    Returns (base preset name or None, overrides). Raises FileNotFoundError / ValueError naming the file.
    """
    import yaml

    from deeplense_ray.yamlio import yaml_load

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        data = yaml_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {p} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"config file {p} must hold a mapping of preset fields, got {type(data).__name__}")
    data = dict(data)
    base = data.pop("preset", None)
    if base is not None and not isinstance(base, str):
        raise ValueError(f"config file {p}: 'preset' must be a preset name, got {base!r}")
    return base, data
