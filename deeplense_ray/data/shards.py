"""HDF5 shard schema: encode a shard to bytes, write it atomically, read it back, checksum it.

Schema (FORMAT_VERSION 1), one file per shard ``<split>/shard-00000.h5``:

- ``images``: float32 [N, 1, H, W] (float16 on request), chunks of a few images, Fletcher-32 checksummed,
  not compressed (noisy float images barely compress; see docs/datasets.md).
- ``labels``: int64 [N], class index into the ``class_names`` attribute.
- ``params/<name>``: one dataset per simulator parameter, leading axis N (e.g. ``theta_E`` [N],
  ``subhalo_mass`` [N, K] zero padded), gzip-1 + shuffle (they compress well) and Fletcher-32.
- attributes: format_version, package_version, preset (name), preset_json (the resolved preset),
  class_names (JSON list), seed (shard seed), dataset_seed, split, shard_index, rows, image_dtype.

Files are encoded in memory (HDF5 core driver), hashed, then written with one sequential write + fsync to a
temporary name in the same directory and renamed (``os.replace``): a shard is either complete or absent.
No timestamps are stored (``track_times=False`` everywhere), so identical inputs give identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT_VERSION = 1
TMP_MARK = ".tmp-"
_PARAM_COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
_TARGET_CHUNK_BYTES = 1 << 20  # ~1 MiB image chunks: 64 images of 64x64 float32


class ShardReadError(OSError):
    """A shard could not be read or failed its checksums; the message names the file."""


def package_version() -> str:
    from deeplense_ray import __version__

    return str(__version__)


def image_chunk_rows(rows: int, image_shape: tuple[int, ...], itemsize: int) -> int:
    """Images per HDF5 chunk: about 1 MiB, at least 1, at most 64 and at most ``rows``."""
    per_image = int(np.prod(image_shape)) * itemsize
    return int(max(1, min(rows, 64, _TARGET_CHUNK_BYTES // max(per_image, 1))))


def _group_no_times(parent: h5py.Group, name: str) -> h5py.Group:
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_obj_track_times(False)
    h5py.h5g.create(parent.id, name.encode("utf-8"), gcpl=gcpl)
    return parent[name]


def encode_shard(
    images: np.ndarray,
    labels: np.ndarray,
    params: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
) -> bytes:
    """Encode one shard as the bytes of an HDF5 file (deterministic: same inputs, same bytes).

    images: [N, 1, H, W] float32 or float16 (stored as given); labels: int64 [N]; params: name -> [N, ...];
    attrs: scalar/str attributes (written in sorted key order).
    """
    images = np.ascontiguousarray(images)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    n = images.shape[0]
    if images.ndim != 4 or images.dtype not in (np.float32, np.float16):
        raise ValueError(f"images must be float32/float16 [N,1,H,W], got {images.dtype} {images.shape}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    for name, value in params.items():
        if np.asarray(value).shape[:1] != (n,):
            raise ValueError(
                f"param {name!r} must have leading axis {n}, got shape {np.asarray(value).shape}"
            )
    # The core driver keeps the file in memory; the name is never stored in the file.
    with h5py.File(f"shard-{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False) as f:
        for key in sorted(attrs):
            f.attrs[key] = attrs[key]
        chunk = image_chunk_rows(n, images.shape[1:], images.dtype.itemsize)
        f.create_dataset(
            "images", data=images, chunks=(chunk, *images.shape[1:]), fletcher32=True, track_times=False
        )
        f.create_dataset("labels", data=labels, fletcher32=True, track_times=False, **_PARAM_COMPRESSION)
        group = _group_no_times(f, "params")
        for name in sorted(params):
            value = np.ascontiguousarray(params[name])
            group.create_dataset(name, data=value, fletcher32=True, track_times=False, **_PARAM_COMPRESSION)
        f.flush()
        return bytes(f.id.get_file_image())


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, block: int = 8 << 20) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def tmp_path_for(path: str | Path) -> Path:
    """A unique temporary name next to ``path`` (same directory, so os.replace is atomic)."""
    p = Path(path)
    return p.with_name(f".{p.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def atomic_write_bytes(
    path: str | Path, data: bytes | memoryview, *, fail_after_bytes: int | None = None
) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, os.replace.

    ``fail_after_bytes`` (fault injection for tests): write that many bytes, then raise OSError, as a crashed
    write would; the temporary file is removed, so nothing half-written is left.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(p)
    try:
        with open(tmp, "wb") as fh:
            if fail_after_bytes is not None:
                fh.write(memoryview(data)[:fail_after_bytes])
                fh.flush()
                raise OSError(f"injected write failure for {p} after {fail_after_bytes} bytes")
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_tmp(directory: str | Path) -> list[Path]:
    """Delete temporary files left by a killed writer under ``directory`` (recursively). Returns them."""
    removed = []
    root = Path(directory)
    if not root.is_dir():
        return removed
    for p in root.rglob(f".*{TMP_MARK}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def shard_attrs(
    *,
    preset: Mapping[str, Any],
    class_names: Iterable[str],
    seed: int,
    dataset_seed: int,
    split: str,
    shard_index: int,
    rows: int,
    image_dtype: str,
) -> dict[str, Any]:
    """The fixed attribute set of a shard (all scalars or strings; no timestamps)."""
    return {
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "preset": str(preset.get("name", "")),
        "preset_json": json.dumps(dict(preset), sort_keys=True),
        "class_names": json.dumps(list(class_names)),
        "seed": np.uint64(seed),
        "dataset_seed": np.uint64(dataset_seed),
        "split": split,
        "shard_index": int(shard_index),
        "rows": int(rows),
        "image_dtype": image_dtype,
    }


def read_shard(
    path: str | Path,
    *,
    params: Iterable[str] | bool = False,
    start: int = 0,
    stop: int | None = None,
    as_float32: bool = True,
) -> dict[str, Any]:
    """Read rows [start, stop) of a shard: ``{"images", "labels", "params": {...}, "attrs": {...}}``.

    params: False (none), True (all) or an iterable of names. Images come back float32 unless
    ``as_float32=False``. Any failure (missing, truncated, checksum mismatch, bad schema) raises
    :class:`ShardReadError` naming the file.
    """
    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
            if int(attrs.get("format_version", -1)) != FORMAT_VERSION:
                raise ValueError(f"format_version {attrs.get('format_version')!r}, expected {FORMAT_VERSION}")
            n = f["labels"].shape[0]
            stop_ = n if stop is None else min(stop, n)
            images = f["images"][start:stop_]
            labels = f["labels"][start:stop_].astype(np.int64, copy=False)
            if params is True:
                names = list(f["params"].keys())
            elif params is False:
                names = []
            else:
                names = list(params)
            out_params = {}
            for name in names:
                if name not in f["params"]:
                    raise KeyError(f"param {name!r} not in shard; have {sorted(f['params'].keys())}")
                out_params[name] = f["params"][name][start:stop_]
    except ShardReadError:
        raise
    except Exception as exc:  # h5py raises OSError/KeyError/ValueError/RuntimeError for bad files
        raise ShardReadError(f"cannot read shard {p}: {type(exc).__name__}: {exc}") from exc
    if as_float32 and images.dtype != np.float32:
        images = images.astype(np.float32)
    return {"images": images, "labels": labels, "params": out_params, "attrs": attrs}


def shard_num_rows(path: str | Path) -> int:
    """Rows in a shard (reads only the metadata); ShardReadError naming the file on failure."""
    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            return int(f["labels"].shape[0])
    except Exception as exc:
        raise ShardReadError(f"cannot read shard {p}: {type(exc).__name__}: {exc}") from exc


def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.generic):
        return v.item()
    return v
