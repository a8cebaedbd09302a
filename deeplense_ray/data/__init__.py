"""Sharded HDF5 lens datasets: build them with Ray Data, read them back with Ray Data or torch.

See docs/datasets.md for the shard schema, the manifest and examples. Names are imported lazily so that
Ray write tasks (which need only the shard writer) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "NORMALIZE_MODES": "augment",
    "augment_batch": "augment",
    "normalize_batch": "augment",
    "DEFAULT_SPLITS": "config",
    "DatasetConfig": "config",
    "load_preset_yaml": "config",
    "parse_splits": "config",
    "load_manifest": "manifest",
    "manifest_hash": "manifest",
    "shard_paths": "manifest",
    "verify_dataset": "manifest",
    "build_dataset": "pipeline",
    "FORMAT_VERSION": "shards",
    "ShardReadError": "shards",
    "read_shard": "shards",
    "LensShardDataset": "source",
    "lens_shard_datasource": "source",
    "read_split": "source",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from deeplense_ray.data.augment import NORMALIZE_MODES, augment_batch, normalize_batch  # noqa: F401
    from deeplense_ray.data.config import DEFAULT_SPLITS, DatasetConfig, load_preset_yaml, parse_splits  # noqa: F401
    from deeplense_ray.data.manifest import load_manifest, manifest_hash, shard_paths, verify_dataset  # noqa: F401
    from deeplense_ray.data.pipeline import build_dataset  # noqa: F401
    from deeplense_ray.data.shards import FORMAT_VERSION, ShardReadError, read_shard  # noqa: F401
    from deeplense_ray.data.source import LensShardDataset, lens_shard_datasource, read_split  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deeplense_ray.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"deeplense_ray.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
