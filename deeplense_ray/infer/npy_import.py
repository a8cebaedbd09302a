"""Import a class-folder ``.npy`` image set (the published DeepLense Model I-IV layouts) as a sharded HDF5
dataset with a manifest, so that every job (train, tune, predict) runs on it.

Layouts read (``SRC`` the folder given):

- ``SRC/<class>/*.npy``: split by ``splits`` fractions (default train=0.8,val=0.1,test=0.1), per class,
  with a seeded shuffle;
- ``SRC/<split>/<class>/*.npy`` with split folders among train/, val/ (validation/), test/: the folders are
  kept as splits; without a val/ folder ``val_fraction`` of each class of train/ becomes the val split.
  ``splits`` given anyway pools every file and splits by the fractions.

Each file holds one image, [H, W] or [1, H, W] (numeric), or the axion layout: an object array
``[image, axion_mass]`` (unpickled: import only files you trust). The axion mass is stored as the
parameter ``axion_mass`` (0 for files without one). Class order: no_sub, axion, cdm (the simulator's), then
any other class folder in name order. Rows of a split are shuffled (seeded) before sharding, so every shard
mixes the classes; ``DIR/sources.json`` lists every row's original file.

Every file's header is checked before anything is written; a file that cannot be read, has another shape
than the first one, or holds non-finite values stops the import with an error naming it. The dataset is
built in a temporary folder next to ``out`` and renamed into place at the end: nothing half-written is
left.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deeplense_ray.infer.inputs import InputError, load_npy, npy_header

SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
DEFAULT_SHARD_SIZE = 4096
PRESET_NAME = "imported_npy"
SOURCES_FILE = "sources.json"


def _class_order(names: set[str]) -> list[str]:
    from deeplense_ray.sim.presets import KNOWN_CLASSES

    return [c for c in KNOWN_CLASSES if c in names] + sorted(names - set(KNOWN_CLASSES))


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """{class folder name: sorted .npy files} of the subfolders of ``folder`` that hold .npy files."""
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.rglob("*.npy") if f.is_file() and not f.name.startswith("."))
        if files:
            out[sub.name] = files
    return out


def find_layout(src: str | os.PathLike[str]) -> dict[str | None, dict[str, list[Path]]]:
    """{split (None without split folders): {class: files}}; InputError naming ``src`` if it has no layout."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise InputError(f"{root}: not a folder (expected SRC/<class>/*.npy or SRC/train/<class>/*.npy)")
    root = root.resolve()
    split_dirs = {
        SPLIT_FOLDERS[p.name.lower()]: p
        for p in root.iterdir()
        if p.is_dir() and p.name.lower() in SPLIT_FOLDERS
    }
    if split_dirs:
        layout: dict[str | None, dict[str, list[Path]]] = {}
        for split, folder in split_dirs.items():
            if split in layout:
                raise InputError(f"{root}: two folders name the {split!r} split")
            layout[split] = _class_folders(folder)
            if not layout[split]:
                raise InputError(f"{folder}: split folder without class folders of .npy files")
    else:
        layout = {None: _class_folders(root)}
        if not layout[None]:
            raise InputError(
                f"{root}: no class folders of .npy files (expected SRC/<class>/*.npy or "
                "SRC/train/<class>/*.npy, SRC/test/<class>/*.npy)"
            )
    return layout


def _split_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder apportionment of ``n`` items over the fractions (sums to n)."""
    raw = {k: n * float(f) for k, f in fractions.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _deal(
    files: list[Path], fractions: Mapping[str, float], rng: np.random.Generator
) -> dict[str, list[Path]]:
    order = [files[i] for i in rng.permutation(len(files))]
    out, start = {}, 0
    for split, count in _split_counts(len(order), fractions).items():
        out[split] = sorted(order[start : start + count])
        start += count
    return out


def plan_splits(
    layout: Mapping[str | None, Mapping[str, list[Path]]],
    *,
    fractions: Mapping[str, float] | None,
    val_fraction: float,
    seed: int,
) -> tuple[list[str], dict[str, list[tuple[Path, int]]], str]:
    """(class names, {split: [(file, label)]}, how the splits were made)."""
    class_names = _class_order({c for classes in layout.values() for c in classes})
    per_class: dict[str, dict[str, list[Path]]] = {}
    if fractions is not None or None in layout:
        fractions = dict(fractions or DEFAULT_FRACTIONS)
        how = "fractions " + ",".join(f"{k}={v:g}" for k, v in fractions.items())
        for k, name in enumerate(class_names):
            pooled = sorted(f for classes in layout.values() for f in classes.get(name, []))
            per_class[name] = _deal(pooled, fractions, np.random.default_rng([seed, k]))
    else:
        how = "split folders"
        for k, name in enumerate(class_names):
            per_class[name] = {s: list(classes.get(name, [])) for s, classes in layout.items()}
            if "val" not in layout:
                train = per_class[name].get("train", [])
                dealt = _deal(
                    train, {"train": 1 - val_fraction, "val": val_fraction}, np.random.default_rng([seed, k])
                )
                per_class[name].update(dealt)
        if "val" not in layout:
            how += f" (val: {val_fraction:g} of train)"
    split_names = [s for s in ("train", "val", "test") if any(s in d for d in per_class.values())]
    split_names += sorted({s for d in per_class.values() for s in d} - set(split_names))
    rows = {
        s: [(f, k) for k, name in enumerate(class_names) for f in per_class[name].get(s, [])]
        for s in split_names
    }
    return class_names, rows, how


def _check_headers(rows: Mapping[str, list[tuple[Path, int]]]) -> tuple[int, int] | None:
    """Every plain array's header: one numeric image [H, W] or [1, H, W] of one size. Returns (H, W) of
    the first plain file (None if every file is an object array; those are checked when read)."""
    first: tuple[tuple[int, int], Path] | None = None
    for items in rows.values():
        for path, _ in items:
            shape, dtype = npy_header(path)
            if dtype.hasobject:
                continue
            hw = _image_hw(shape, path, dtype)
            if first is None:
                first = (hw, path)
            elif hw != first[0]:
                raise InputError(
                    f"{path}: image of {hw[0]}x{hw[1]} pixels, but {first[1]} has {first[0][0]}x{first[0][1]}"
                )
    return first[0] if first else None


def _image_hw(shape: Sequence[int], path: Path, dtype: np.dtype) -> tuple[int, int]:
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise InputError(f"{path}: array of dtype {dtype} is not numeric image data")
    s = tuple(int(v) for v in shape)
    if len(s) == 2 or (len(s) == 3 and s[0] == 1):
        if min(s[-2:]) < 2:
            raise InputError(f"{path}: array of shape {list(s)} is not an image")
        return s[-2], s[-1]
    raise InputError(f"{path}: array of shape {list(s)} is not one image ([H, W] or [1, H, W])")


def read_image(path: Path, hw: tuple[int, int] | None, first: Path | None) -> tuple[np.ndarray, float]:
    """(float32 [1, H, W], axion mass or 0) of one file; InputError naming it (shape, size, non-finite)."""
    data, scalars = load_npy(path)
    a = np.asarray(data)
    got = _image_hw(a.shape, path, a.dtype)
    if hw is not None and got != hw:
        raise InputError(f"{path}: image of {got[0]}x{got[1]} pixels, but {first} has {hw[0]}x{hw[1]}")
    image = a.astype(np.float32).reshape(1, *got)
    if not np.isfinite(image).all():
        raise InputError(f"{path}: image has non-finite values (NaN or inf)")
    return image, (scalars[0] if scalars else 0.0)


def import_npy(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    fractions: Mapping[str, float] | None = None,
    val_fraction: float = 0.1,
    shard_size: int = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    dtype: str = "float32",
    pixel_scale: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert ``src`` (see the module docstring) into a dataset at ``out``; returns its manifest."""
    from deeplense_ray.data.manifest import build_manifest, write_manifest
    from deeplense_ray.data.preview import write_preview
    from deeplense_ray.data.shards import shard_attrs, write_shard
    from deeplense_ray.io import atomic_write_text

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    if not 0 < float(val_fraction) < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if fractions is not None:
        if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    if pixel_scale is not None and not float(pixel_scale) > 0:
        raise ValueError(f"pixel_scale must be > 0 arcsec/pixel, got {pixel_scale!r}")
    dest = Path(out).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise ValueError(f"output {dest} exists and is not empty; pass --overwrite to replace it")

    layout = find_layout(src)
    class_names, rows, how = plan_splits(
        layout, fractions=fractions, val_fraction=float(val_fraction), seed=seed
    )
    if len(class_names) < 2:
        raise InputError(f"{src}: one class folder ({class_names[0]}); training needs at least 2 classes")
    hw = _check_headers(rows)
    first = next((p for items in rows.values() for p, _ in items if not npy_header(p)[1].hasobject), None)

    config = {
        "preset": PRESET_NAME,
        "imported_from": str(Path(src).expanduser().resolve()),
        "splits_from": how,
        "seed": int(seed),
        "dtype": dtype,
        "shard_size": int(shard_size),
        "class_files": {s: int(len(items)) for s, items in rows.items()},
    }
    if pixel_scale is not None:
        config["preset_resolved"] = {"name": PRESET_NAME, "delta_pix": float(pixel_scale)}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        shards, sources, image_shape = [], {}, None
        total, done = sum(len(v) for v in rows.values()), 0
        for split, items in rows.items():
            order = np.random.default_rng([seed, 0x5350, len(split), *split.encode()]).permutation(len(items))
            items = [items[i] for i in order]
            sources[split] = [str(p) for p, _ in items]
            for index, start in enumerate(range(0, len(items), shard_size)):
                part = items[start : start + shard_size]
                images, masses = [], []
                for path, _ in part:
                    image, mass = read_image(path, hw, first)
                    if hw is None:  # every file so far an object array: the first image sets the size
                        hw, first = image.shape[-2:], path
                    images.append(image)
                    masses.append(mass)
                x = np.stack(images).astype(dtype)
                image_shape = list(x.shape[1:])
                rel = f"{split}/shard-{index:05d}.h5"
                attrs = shard_attrs(
                    preset={"name": PRESET_NAME}, class_names=class_names, seed=seed, dataset_seed=seed,
                    split=split, shard_index=index, rows=len(part), image_dtype=dtype,
                )  # fmt: skip
                labels = np.array([k for _, k in part], np.int64)
                digest, _ = write_shard(tmp / rel, x, labels, {"axion_mass": np.array(masses)}, attrs)
                shards.append(
                    {
                        "split": split,
                        "index": index,
                        "path": rel,
                        "rows": len(part),
                        "sha256": digest,
                        "seed": seed,
                    }
                )
                done += len(part)
                if progress:
                    print(f"import_npy: {done}/{total} images ({rel})", file=sys.stderr)
        manifest = build_manifest(
            config=config,
            class_names=class_names,
            image_shape=image_shape,
            image_dtype=dtype,
            params={"axion_mass": {"shape": [], "dtype": "float64"}},
            split_rows={s: len(items) for s, items in rows.items()},
            shards=shards,
        )
        atomic_write_text(tmp / SOURCES_FILE, json.dumps(sources, indent=1) + "\n")
        write_manifest(tmp, manifest)
        write_preview(tmp, manifest)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
