"""Import a class-folder ``.npy`` image set (the published DeepLense Model I-IV layouts) as a sharded HDF5
dataset with a manifest, so that every job (train, tune, predict) runs on it.

Layouts read (``SRC`` the folder given):

- ``SRC/<class>/*.npy``: split by ``splits`` fractions (default train=0.8,val=0.1,test=0.1), per class,
  with a seeded shuffle;
- ``SRC/<split>/<class>/*.npy`` with split folders among train/, val/ (validation/), test/: the folders are
  kept as splits; without a val/ folder ``val_fraction`` of each class of train/ becomes the val split
  (``val_fraction=0``: no val split). ``splits`` given anyway pools every file and splits by the fractions.

The splits follow ``jobs/simulate.py``'s rules (:func:`deeplense_ray.data.config.check_splits`): no split is
left without a file of a class unless it is left out (of ``splits``, or ``val_fraction=0``), and every split
folder holds every class.

Each file holds one image, [H, W] or [1, H, W] (numeric), or the axion layout: an object array
``[image, axion_mass]``, read by the data-only unpickler of :mod:`deeplense_ray.npyio` (a file that asks for
anything but numpy arrays and numbers is refused: data never runs code). The axion mass is stored as the
parameter ``axion_mass`` (0 for files without one). Class order: no_sub, axion, cdm (the simulator's), then
any other class folder in name order. Rows of a split are shuffled (seeded) before sharding, so every shard
mixes the classes; ``DIR/sources.json`` lists every row's original file.

Every file's header is checked before anything is written; a file that cannot be read, has another shape
than the first one, or holds non-finite values stops the import with an error naming it. The dataset is
built in a temporary folder next to ``out`` and renamed into place at the end: nothing half-written is
left. ``out`` may not be, contain or lie inside ``src``; ``overwrite`` replaces only a dataset (its manifest,
sources, preview and the shards the manifest lists) and refuses, before deleting anything, a folder holding
any other file.
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
from deeplense_ray.io import fsync_dir

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


def _deal(
    files: list[Path], fractions: Mapping[str, float], rng: np.random.Generator
) -> dict[str, list[Path]]:
    from deeplense_ray.data.config import apportion

    order = [files[i] for i in rng.permutation(len(files))]
    out, start = {}, 0
    for split, count in apportion(len(order), fractions).items():
        out[split] = sorted(order[start : start + count])
        start += count
    return out


def plan_splits(
    layout: Mapping[str | None, Mapping[str, list[Path]]],
    *,
    fractions: Mapping[str, float] | None,
    val_fraction: float,
    seed: int,
    src: str | os.PathLike[str] = "SRC",
) -> tuple[list[str], dict[str, list[tuple[Path, int]]], str]:
    """(class names, {split: [(file, label)]}, how the splits were made). InputError naming ``src``, the
    class and the split that would be left without a file of it (:func:`check_splits`, as for a simulated
    dataset)."""
    from deeplense_ray.data.config import check_splits

    class_names = _class_order({c for classes in layout.values() for c in classes})
    per_class: dict[str, dict[str, list[Path]]] = {}

    def deal(files: list[Path], k: int, fractions: Mapping[str, float], where: str, remedy: str):
        source = f"{len(files)} files of class {class_names[k]!r} in {Path(src, where)}"
        try:
            check_splits(fractions, len(files), source=source, remedy=remedy)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        return _deal(files, fractions, np.random.default_rng([seed, k]))

    if fractions is not None or None in layout:
        fractions = dict(fractions or DEFAULT_FRACTIONS)
        how = "fractions " + ",".join(f"{k}={v:g}" for k, v in fractions.items())
        for k, name in enumerate(class_names):
            pooled = sorted(f for classes in layout.values() for f in classes.get(name, []))
            per_class[name] = deal(pooled, k, fractions, ".", "add files of the class or leave the split out")
    else:
        how = "split folders"
        for k, name in enumerate(class_names):
            per_class[name] = {s: list(classes.get(name, [])) for s, classes in layout.items()}
            for split, files in per_class[name].items():
                if not files:
                    raise InputError(
                        f"{src}: split {split!r} has no .npy files of class {name!r}: every split needs "
                        "every class (pass --splits to pool the folders and split by fractions)"
                    )
            if "val" not in layout and val_fraction > 0:
                val = {"train": 1 - val_fraction, "val": val_fraction}
                remedy = "raise --val-fraction, add a val/ folder, or pass --val-fraction 0 for no val split"
                per_class[name].update(deal(per_class[name]["train"], k, val, "train", remedy))
        if "val" not in layout:
            how += f" (val: {val_fraction:g} of train)" if val_fraction > 0 else " (no val split)"
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


def check_out(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """``out`` resolved (symlinks followed); ValueError if it is, contains or lies inside ``src``."""
    source = Path(src).expanduser().resolve()
    dest = Path(out).expanduser().resolve()
    if dest == source or dest in source.parents or source in dest.parents:
        how = "is" if dest == source else "contains" if dest in source.parents else "lies inside"
        raise ValueError(f"--out {dest} {how} the source folder {source}; choose an --out outside it")
    return dest


def dataset_files(dest: Path) -> list[Path]:
    """The files of the dataset at ``dest`` that an import writes (manifest, sources, preview, the shards the
    manifest lists); ValueError naming ``dest`` if it is no dataset or holds anything else, before anything
    is deleted."""
    from deeplense_ray.data.manifest import MANIFEST_NAME, load_manifest
    from deeplense_ray.data.pipeline import PREVIEW_NAME

    try:
        manifest = load_manifest(dest)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        raise ValueError(
            f"--overwrite replaces only a dataset, and {dest} is none ({exc}); nothing was deleted: choose "
            "another --out or clear it yourself"
        ) from None
    own = {dest / MANIFEST_NAME, dest / SOURCES_FILE, dest / PREVIEW_NAME}
    own |= {dest / s["path"] for info in manifest["splits"].values() for s in info["shards"]}
    found = [p for p in dest.rglob("*") if p.is_symlink() or not p.is_dir()]
    foreign = sorted(str(p.relative_to(dest)) for p in found if p not in own)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} files)" if len(foreign) > 5 else "")
        raise ValueError(
            f"--overwrite replaces only a dataset's own files, and {dest} holds others ({shown}); nothing "
            "was deleted: move them or choose another --out"
        )
    return found


def remove_dataset(dest: Path, files: Sequence[Path]) -> None:
    """Delete ``files`` (:func:`dataset_files`), then the folders they leave empty; OSError if anything else
    appeared meanwhile (it is kept)."""
    for f in files:
        f.unlink(missing_ok=True)
    for d in sorted((p for p in dest.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        d.rmdir()
    dest.rmdir()


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
    from deeplense_ray.data.config import check_splits
    from deeplense_ray.data.manifest import build_manifest, write_manifest
    from deeplense_ray.data.preview import write_preview
    from deeplense_ray.data.shards import shard_attrs, write_shard
    from deeplense_ray.io import atomic_write_text

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    if not 0 <= float(val_fraction) < 1:
        raise ValueError(f"val_fraction must be in [0, 1) (0: no val split), got {val_fraction!r}")
    if fractions is not None:
        check_splits(fractions)
    if pixel_scale is not None and not float(pixel_scale) > 0:
        raise ValueError(f"pixel_scale must be > 0 arcsec/pixel, got {pixel_scale!r}")
    dest = check_out(src, out)
    replaced: list[Path] = []
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        if not overwrite:
            raise ValueError(f"output {dest} exists and is not empty; pass --overwrite to replace it")
        replaced = dataset_files(dest)

    layout = find_layout(src)
    source = Path(src).expanduser().resolve()
    class_names, rows, how = plan_splits(
        layout, fractions=fractions, val_fraction=float(val_fraction), seed=seed, src=source
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
            remove_dataset(dest, replaced)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
