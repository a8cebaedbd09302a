"""Images to predict on: find them, check them against the model's input before any work, read them.

An input is one of

- a dataset directory (``manifest.json`` + HDF5 shards, ``jobs/simulate.py`` or ``jobs/import_npy.py``):
  labels known;
- a ``.npy`` file or a folder of them, the DeepLense layout included (one image per file, in class folders
  ``axion/ cdm/ no_sub/``, possibly under ``train/ test/``; an axion file holds an object array
  ``[image, axion_mass]``);
- a FITS file (``.fits .fit .fts``, optionally ``.gz``) or a folder of them (astropy; the first HDU holding
  an image);
- a glob pattern (``'data/**/*.npy'``) over such files.

An array holds one image ([H, W] or [C, H, W]) or a stack ([N, C, H, W]; [N, H, W] for a 1-channel model only
when the caller says the first axis is a stack, ``stack_axis0``); its image shape must be the model's
[C, H, W] (training does not resize). Files under a folder named after one of the model's classes are
labelled with that class; labels are known when every file is (else none is, and a mix is an error).

Data never runs code: object arrays go through the data-only unpickler of :mod:`deeplense_ray.npyio`, which
refuses any class but numpy arrays, dtypes and scalars. A .npy header must match the file size; large .npy
files are memory-mapped and split into units of ``BLOCK_ROWS`` images, so no process reads one whole. A
folder or a glob is resolved file by file: a file reached twice (symlinks) counts once, and a symlink that
leads outside the folder (for a glob, the folders before its first wildcard) is an error. An existing file
whose name holds glob characters is that file, not a pattern.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deeplense_ray.npyio import NpyError, read_header, read_npy

NPY_SUFFIXES = (".npy",)
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")
#: Rows of an HDF5 shard read at once.
BLOCK_ROWS = 1024
ASTROPY_HINT = "pip install astropy (or: pip install -e '.[fits]')"


class InputError(ValueError):
    """A bad input file or pattern; the message names it."""


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) of one file; ``label`` the class folder's index, -1 unknown (HDF5: in the file)."""

    path: str
    kind: str  # "h5" | "npy" | "fits"
    start: int
    stop: int
    label: int = -1
    stacked: bool = False  # the caller said that a 3-d array's first axis is a stack of images

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class InputPlan:
    units: list[Unit]
    labelled: bool
    description: str

    @property
    def num_images(self) -> int:
        return sum(u.rows for u in self.units)


def _suffix_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NPY_SUFFIXES):
        return "npy"
    if name.endswith(FITS_SUFFIXES):
        return "fits"
    return None


def _fits():
    try:
        from astropy.io import fits
    except ImportError:
        msg = f"reading FITS files needs astropy, which is not installed: {ASTROPY_HINT}"
        raise InputError(msg) from None
    return fits


# ---------------------------------------------------------------------------------------------- shapes
def images_in_array(
    shape: Sequence[int], image_shape: Sequence[int], path: Any, *, stack_axis0: bool = False
) -> int:
    """Images of ``image_shape`` [C, H, W] in an array of ``shape``; InputError naming ``path``. An [N, H, W]
    array (N > 1) for a 1-channel model is N images only with ``stack_axis0``: it could as well be one image
    of N channels."""
    c, h, w = (int(v) for v in image_shape)
    s = tuple(int(v) for v in shape)
    if s[-2:] == (h, w):
        if len(s) == 2 and c == 1:
            return 1
        if len(s) == 3 and s[0] == c:
            return 1
        if len(s) == 3 and c == 1 and stack_axis0:
            return s[0]
        if len(s) == 3 and c == 1:
            raise InputError(
                f"{path}: array of shape {list(s)} for a 1-channel model: one image of {s[0]} channels or a "
                f"stack of {s[0]} images? Pass --stack-axis0 (stack_axis0=True) if the first axis is a "
                f"stack, or store it as [N, 1, {h}, {w}]"
            )
        if len(s) == 4 and s[1] == c:
            return s[0]
    raise InputError(
        f"{path}: array of shape {list(s)} does not hold images of the model's shape [{c}, {h}, {w}] "
        "(expected [H, W], [C, H, W], [N, C, H, W], or [N, H, W] with --stack-axis0; the model was trained "
        "on that size and images are not resized)"
    )


def as_images(array: Any, image_shape: Sequence[int], path: Any, *, stack_axis0: bool = False) -> np.ndarray:
    """float32 [N, C, H, W] from an array holding images; InputError naming ``path`` if non-numeric,
    of the wrong shape, or non-finite (naming the image)."""
    a = np.asarray(array)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise InputError(f"{path}: array of dtype {a.dtype} is not numeric image data")
    n = images_in_array(a.shape, image_shape, path, stack_axis0=stack_axis0)
    x = a.astype(np.float32, copy=False).reshape(n, *(int(v) for v in image_shape))
    finite = np.isfinite(x).reshape(n, -1).all(axis=1)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise InputError(f"{path}: image {bad} has non-finite values (NaN or inf)")
    return x


def split_object_array(array: np.ndarray, path: Any) -> tuple[np.ndarray, list[float]]:
    """The DeepLense object layout ``[image, axion_mass]`` -> (image array, [scalars]); InputError naming
    ``path`` if it holds no image."""
    items = list(array.ravel())
    images = [np.asarray(v) for v in items if np.ndim(v) >= 2]
    scalars = [float(np.asarray(v)) for v in items if np.ndim(v) == 0]
    if len(images) != 1:
        raise InputError(
            f"{path}: object array of {len(items)} items holds {len(images)} images; expected one image "
            "and its scalar parameters (the DeepLense [image, axion_mass] layout)"
        )
    return images[0], scalars


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy header checked against the file size, without reading the data;
    InputError naming the file."""
    try:
        header = read_header(path)
    except NpyError as exc:
        raise InputError(str(exc)) from None
    return header.shape, header.dtype


def load_npy(path: str | Path) -> tuple[np.ndarray, list[float]]:
    """(image data, [scalar parameters]) of a .npy file (large plain arrays memory-mapped; object arrays
    through the data-only unpickler). InputError naming the file."""
    try:
        a = read_npy(path)
    except NpyError as exc:
        raise InputError(str(exc)) from None
    if a.dtype == object:
        return split_object_array(a, path)
    return a, []


def _fits_image_hdu(hdul: Any, path: Any) -> Any:
    for hdu in hdul:
        if getattr(hdu, "is_image", False) and hdu.header.get("NAXIS", 0) >= 2:
            return hdu
    raise InputError(f"{path}: no image HDU (NAXIS >= 2) in the FITS file")


def fits_shape(path: Path) -> tuple[int, ...]:
    fits = _fits()
    try:
        with fits.open(path, memmap=True) as hdul:
            return tuple(int(v) for v in _fits_image_hdu(hdul, path).shape)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: unreadable FITS file: {type(exc).__name__}: {exc}") from None


def load_fits(path: str | Path) -> np.ndarray:
    fits = _fits()
    try:
        with fits.open(path, memmap=False) as hdul:
            return np.array(_fits_image_hdu(hdul, path).data)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: unreadable FITS file: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------- discovery
def _label_of(path: Path, root: Path, class_names: Sequence[str]) -> int:
    """Index of the nearest folder (below or at ``root``) named after a class; -1 if none."""
    parts = [root.name, *path.relative_to(root).parts[:-1]] if path != root else []
    for part in reversed(parts):
        if part in class_names:
            return list(class_names).index(part)
    return -1


def _file_units(
    path: Path, kind: str, image_shape: Sequence[int], label: int, stack_axis0: bool = False
) -> list[Unit]:
    """The units of one file: an npy stack in blocks of ``BLOCK_ROWS`` images (each read through a memory
    map), anything else whole."""
    if kind == "npy":
        shape, dtype = npy_header(path)
        # an object array ([image, axion_mass]) holds one image; its shape is checked when it is read
        n = 1 if dtype.hasobject else images_in_array(shape, image_shape, path, stack_axis0=stack_axis0)
        stacked = stack_axis0 and len(shape) == 3 and n > 1
        return [
            Unit(str(path), kind, start, min(start + BLOCK_ROWS, n), label, stacked)
            for start in range(0, n, BLOCK_ROWS)
        ]
    n = images_in_array(fits_shape(path), image_shape, path, stack_axis0=stack_axis0)
    return [Unit(str(path), kind, 0, n, label, stack_axis0 and n > 1)] if n else []


def _files_plan(
    files: list[Path], root: Path, image_shape, class_names, what: str, stack_axis0: bool = False
) -> InputPlan:
    labels = [_label_of(f, root, class_names) for f in files]
    known = sum(lab >= 0 for lab in labels)
    if 0 < known < len(files):
        stray = next(f for f, lab in zip(files, labels) if lab < 0)
        raise InputError(
            f"{what}: {known} of {len(files)} files are in class folders ({', '.join(class_names)}) and "
            f"{len(files) - known} are not (e.g. {stray}); predict on one kind at a time"
        )
    units: list[Unit] = []
    for f, lab in zip(files, labels):
        units.extend(_file_units(f, _suffix_kind(f) or "", image_shape, lab, stack_axis0))
    return InputPlan(units, labelled=known == len(files), description=what)


def _resolve_under(found: Iterable[str | Path], root: Path, what: str) -> list[Path]:
    """The image files among ``found`` resolved (symlinks followed), each once, sorted; InputError naming a
    symlink that leads outside ``root`` (resolved)."""
    root = root.resolve()
    files: set[Path] = set()
    for p in found:
        f = Path(p).resolve()
        if not (f.is_file() and _suffix_kind(f)):
            continue
        if f != root and root not in f.parents:
            raise InputError(f"{what}: {p} leads to {f}, outside {root} (a symlink out of the input folder)")
        files.add(f)
    return sorted(files)


def _dataset_plan(root: Path, image_shape, class_names, splits: Sequence[str] | None) -> InputPlan:
    from deeplense_ray.data.manifest import load_manifest

    manifest = load_manifest(root)
    if list(manifest["class_names"]) != list(class_names):
        raise InputError(
            f"dataset {root} has classes {list(manifest['class_names'])}; the model predicts "
            f"{list(class_names)}"
        )
    if [int(v) for v in manifest["image_shape"]] != [int(v) for v in image_shape]:
        raise InputError(
            f"dataset {root} has images of shape {list(manifest['image_shape'])}; the model takes "
            f"{list(image_shape)} (images are not resized)"
        )
    chosen = list(splits) if splits else list(manifest["splits"])
    unknown = [s for s in chosen if s not in manifest["splits"]]
    if unknown:
        raise InputError(f"dataset {root} has no split(s) {unknown}; splits: {list(manifest['splits'])}")
    units = []
    for split in chosen:
        for shard in manifest["splits"][split]["shards"]:
            path = root / shard["path"]
            if not path.is_file():
                raise InputError(f"{path}: shard listed in {root}/manifest.json is missing")
            for start in range(0, int(shard["rows"]), BLOCK_ROWS):
                units.append(Unit(str(path), "h5", start, min(start + BLOCK_ROWS, int(shard["rows"]))))
    return InputPlan(units, labelled=True, description=f"dataset {root} (splits {', '.join(chosen)})")


def plan_inputs(
    source: str | os.PathLike[str],
    *,
    image_shape: Sequence[int],
    class_names: Sequence[str],
    splits: Sequence[str] | None = None,
    stack_axis0: bool = False,
) -> InputPlan:
    """Find every image of ``source`` and check the shapes (headers only); InputError naming the file.
    ``stack_axis0``: a 3-d array for a 1-channel model is a stack of images (else an error)."""
    text = str(source)
    path = Path(text).expanduser()
    if glob.has_magic(text) and not path.exists():  # an existing file named run[1].npy is that file
        pattern = os.path.expanduser(text)
        fixed = []  # the folders before the first wildcard: class folders are looked for below them
        for part in Path(pattern).parts[:-1]:
            if glob.has_magic(part):
                break
            fixed.append(part)
        root = Path(*fixed).resolve() if fixed else Path.cwd().resolve()
        what = f"pattern {text!r}"
        files = _resolve_under(glob.iglob(pattern, recursive=True), root, what)
        if not files:
            raise InputError(f"pattern {text!r} matches no .npy or FITS file")
        return _files_plan(files, root, image_shape, class_names, what, stack_axis0)
    if not path.exists():
        raise InputError(f"input {text!r} does not exist")
    path = path.resolve()
    if path.is_dir() and (path / "manifest.json").is_file():
        return _dataset_plan(path, image_shape, class_names, splits)
    if splits:
        raise InputError(f"--split applies to a dataset directory (manifest.json); {path} is not one")
    if path.is_file():
        if _suffix_kind(path) is None:
            raise InputError(
                f"{path}: unsupported file type (expected .npy or FITS, or a dataset directory with "
                "manifest.json)"
            )
        return _files_plan([path], path.parent, image_shape, class_names, f"file {path}", stack_axis0)
    what = f"folder {path}"
    files = _resolve_under((f for f in path.rglob("*") if f.name[0] != "."), path, what)
    if not files:
        raise InputError(f"{path}: no .npy or FITS files (and no manifest.json) in the folder")
    return _files_plan(files, path, image_shape, class_names, what, stack_axis0)


# ---------------------------------------------------------------------------------------------- reading
def read_unit(unit: Unit, image_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(float32 images [n, C, H, W], int64 labels [n]) of one unit; InputError naming the file."""
    if unit.kind == "h5":
        from deeplense_ray.data.shards import read_shard

        part = read_shard(unit.path, start=unit.start, stop=unit.stop)
        return as_images(part["images"], image_shape, unit.path), part["labels"]
    if unit.kind == "npy":
        data = load_npy(unit.path)[0]  # a memory map when large: only the unit's rows are read
        if images_in_array(data.shape, image_shape, unit.path, stack_axis0=unit.stacked) > 1:
            data, start, stop = data[unit.start : unit.stop], 0, unit.rows
        else:
            start, stop = unit.start, unit.stop
    else:
        data, start, stop = load_fits(unit.path), unit.start, unit.stop
    images = as_images(data, image_shape, unit.path, stack_axis0=unit.stacked)[start:stop]
    if len(images) != unit.rows:
        raise InputError(f"{unit.path}: holds {len(images)} images, its header said {unit.rows}")
    return images, np.full(len(images), unit.label, np.int64)


def read_units(units: Sequence[Unit], image_shape: Sequence[int]) -> dict[str, np.ndarray]:
    """The columns of a prediction batch: image, label, source (file), index (position in the file)."""
    images, labels, sources, index = [], [], [], []
    for unit in units:
        x, y = read_unit(unit, image_shape)
        images.append(x)
        labels.append(y)
        sources.extend([unit.path] * len(x))
        index.append(np.arange(unit.start, unit.start + len(x), dtype=np.int64))
    c, h, w = (int(v) for v in image_shape)
    return {
        "image": np.concatenate(images) if images else np.zeros((0, c, h, w), np.float32),
        "label": np.concatenate(labels) if labels else np.zeros(0, np.int64),
        "source": np.asarray(sources, dtype=object),
        "index": np.concatenate(index) if index else np.zeros(0, np.int64),
    }


def chunk_units(units: Sequence[Unit], rows: int = BLOCK_ROWS) -> Iterator[list[Unit]]:
    """Consecutive units grouped into chunks of about ``rows`` images (one Ray Data row each)."""
    chunk: list[Unit] = []
    size = 0
    for unit in units:
        if chunk and size + unit.rows > rows:
            yield chunk
            chunk, size = [], 0
        chunk.append(unit)
        size += unit.rows
    if chunk:
        yield chunk


def units_to_json(units: Sequence[Unit]) -> str:
    return json.dumps([asdict(u) for u in units])


def units_from_json(text: str) -> list[Unit]:
    return [Unit(**d) for d in json.loads(text)]
