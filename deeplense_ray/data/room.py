"""Room for a dataset build, checked before Ray starts: its bytes on disk and its build plan in memory.

The sizes follow from the config alone: every image of every class of every split (the splits partition
``num_per_class``) is stored as the preset's image shape in the storage dtype, with an int64 label (the
parameters, compressed, come on top: the disk figure is a lower bound). The driver's build plan holds an
int64 label, a shuffle index and copies of the label of every row at once
(:func:`deeplense_ray.data.plan.plan_shards`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from deeplense_ray.data.config import DatasetConfig
from deeplense_ray.sizes import check_disk_room, check_memory_room, format_bytes

#: Bytes per row besides the image: the int64 label.
LABEL_BYTES = 8
#: Driver memory per row while the build plan is made (label, shuffle index, shuffled label, shard copy).
PLAN_BYTES_PER_ROW = 32


def row_bytes(image_shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of one stored row: its image in the storage ``dtype`` and its label."""
    return math.prod(int(v) for v in image_shape) * np.dtype(dtype).itemsize + LABEL_BYTES


def dataset_bytes(cfg: DatasetConfig, image_shape: tuple[int, ...], num_classes: int) -> int:
    """Bytes of images and labels of the whole dataset (all splits) of ``cfg``."""
    return sum(cfg.rows_per_class().values()) * int(num_classes) * row_bytes(image_shape, cfg.dtype)


def _existing_shard_bytes(out: Path) -> int:
    """Bytes of shard files already in ``out`` (kept by --resume or replaced by --overwrite)."""
    if not out.is_dir():
        return 0
    return sum(p.stat().st_size for p in out.glob("*/shard-*.h5") if p.is_file())


def check_dataset_room(cfg: DatasetConfig, out: str | Path, *, flag: str = "--num-per-class") -> None:
    """ValueError when the dataset of ``cfg`` cannot fit on the file system of ``out`` (its nearest existing
    parent), or its build plan not in this machine's memory; the message names ``flag`` and its value, the
    size needed and the room there is. ``cfg`` is validated already."""
    from deeplense_ray.sim import resolve_preset

    preset = resolve_preset(cfg.preset, dict(cfg.preset_overrides) or None)
    shape, classes = tuple(int(v) for v in preset.image_shape), len(preset.class_names)
    n = cfg.num_per_class
    what = (
        f"{flag} {n}: the dataset ({classes} classes x {n} images of {'x'.join(map(str, shape))} "
        f"{cfg.dtype} with a label, {format_bytes(row_bytes(shape, cfg.dtype))} each)"
    )
    need = dataset_bytes(cfg, shape, classes)
    check_disk_room(out, need, what=what, reclaimable=_existing_shard_bytes(Path(out)))
    rows = n * classes
    check_memory_room(rows * PLAN_BYTES_PER_ROW, what=f"{flag} {n}: the build plan of {rows} rows")
