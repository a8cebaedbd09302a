"""The build plan: which shard holds which rows, labels and seed. Pure functions, no Ray, no I/O.

Every number here derives from (config, split name, shard index) only, through numpy's SeedSequence
(a stable hash, unlike Python's ``hash()``), so the dataset's bytes never depend on worker count.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from deeplense_ray.data.config import DatasetConfig

_LABEL_STREAM = 0x4C41424C  # "LABL": spawn key separating the label shuffle from the shard seeds


def split_id(split: str) -> int:
    """Stable 32-bit id of a split name (CRC-32 of its UTF-8 bytes)."""
    return zlib.crc32(split.encode("utf-8"))


def shard_seed(seed: int, split: str, index: int) -> int:
    """Seed of shard ``index`` of ``split`` (a 63-bit int), from (seed, split, index) only."""
    ss = np.random.SeedSequence([int(seed), split_id(split), int(index)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & np.uint64(2**63 - 1))


def split_labels(
    seed: int, split: str, rows_per_class: int, num_classes: int, *, shuffle: bool = True
) -> np.ndarray:
    """Balanced int64 label vector of one split: ``rows_per_class`` of each class, shuffled by (seed, split).

    ``shuffle=False`` keeps the interleaved order 0,1,..,C-1,0,1,.. (paired presets need whole groups).
    """
    labels = np.arange(rows_per_class * num_classes, dtype=np.int64) % num_classes
    if not shuffle:
        return labels
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_id(split), _LABEL_STREAM]))
    return labels[rng.permutation(labels.shape[0])]


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-00000.h5``."""
    return f"shard-{index:05d}.h5"


@dataclass(frozen=True)
class ShardSpec:
    """One shard to render: rows [start, stop) of ``split``; ``path`` is relative to the dataset dir."""

    split: str
    index: int
    start: int
    stop: int
    seed: int
    labels: bytes  # int64 little-endian, one per row (compact: plans of 1e7 rows stay small)

    def label_array(self) -> np.ndarray:
        return np.frombuffer(self.labels, dtype="<i8").astype(np.int64)

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def path(self) -> str:
        return f"{self.split}/{shard_name(self.index)}"

    @property
    def key(self) -> str:
        """``split/index``: the name used by fault injection and logs."""
        return f"{self.split}/{self.index}"


def plan_shards(cfg: DatasetConfig, num_classes: int, *, paired: bool = False) -> list[ShardSpec]:
    """All shards of a dataset, split by split (in the config's order), then by index.

    ``paired`` (the preset's): labels stay interleaved so each group of C consecutive rows holds every
    class once (``DatasetConfig.validate`` makes shard_size a multiple of C then).
    """
    specs: list[ShardSpec] = []
    for split, per_class in cfg.rows_per_class().items():
        labels = split_labels(cfg.seed, split, per_class, num_classes, shuffle=not paired)
        total = labels.shape[0]
        for index, start in enumerate(range(0, total, cfg.shard_size)):
            stop = min(start + cfg.shard_size, total)
            specs.append(
                ShardSpec(
                    split=split,
                    index=index,
                    start=start,
                    stop=stop,
                    seed=shard_seed(cfg.seed, split, index),
                    labels=labels[start:stop].astype("<i8").tobytes(),
                )
            )
    return specs
