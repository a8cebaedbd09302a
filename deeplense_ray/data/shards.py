"""HDF5 shard schema: encode a shard to bytes, write it atomically, read it back, checksum it.

Schema (FORMAT_VERSION 1), one file per shard ``<split>/shard-00000.h5``:

- ``images``: float32 [N, 1, H, W] (float16 on request), chunks of a few images, Fletcher-32 checksummed,
  not compressed (noisy float images barely compress; see docs/datasets.md).
- ``labels``: int64 [N], class index into the ``class_names`` attribute.
- ``params/<name>``: one dataset per simulator parameter, leading axis N (e.g. ``theta_E`` [N],
  ``subhalo_mass`` [N, K] zero padded), gzip-1 + shuffle (they compress well) and Fletcher-32.
- attributes: format_version, package_version, preset (name), preset_json (the resolved preset),
  class_names (JSON list), seed (shard seed), dataset_seed, split, shard_index, rows, image_dtype.

HDF5 writes a shard straight to a temporary name in the same directory; the image chunks go in with
``write_direct_chunk`` and a Fletcher-32 computed in numpy, or on the GPU by the renderer
(``fletcher32_chunks``; the bytes HDF5's own filter would give either way). The file is then
hashed (sha256, read back from the page cache) while another thread fsyncs it, and renamed (``os.replace``,
then the directory is fsynced): a shard is either complete or absent. ``encode_shard`` gives the same bytes
in memory.
No timestamps are stored (``track_times=False`` everywhere), so identical inputs give identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from deeplense_ray.io import atomic_path

FORMAT_VERSION = 1
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


def fletcher32(data: np.ndarray | bytes | memoryview) -> int:
    """HDF5's Fletcher-32 checksum (``H5_checksum_fletcher32``) of a byte buffer, vectorised with numpy.

    HDF5 sums big-endian 16-bit words: ``sum1 += w; sum2 += sum1``, folding each sum with
    ``(s & 0xffff) + (s >> 16)`` (which keeps it congruent mod 65535 and positive once positive). So each
    final sum is 0 if every word is 0, else its true value mod 65535 mapped into [1, 65535]. With
    ``i`` the word index, sum2's true value is sum((n - i) * w_i); ``i mod 65535`` is the column index
    once the words are laid out in rows of 65535, so one column-sum pass does it. Result:
    ``(sum2 << 16) | sum1``; the filter stores it little-endian after the chunk's bytes.
    """
    if isinstance(data, np.ndarray):
        b = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        b = np.frombuffer(data, dtype=np.uint8)
    if b.size % 2:
        b = np.concatenate([b, np.zeros(1, np.uint8)])  # an odd last byte counts as the word (byte << 8)
    w = b.view(">u2")
    n, m = w.size, 65535
    q = n // m
    total = int(w.sum(dtype=np.uint64))
    if total == 0:
        return 0
    cols = np.arange(m, dtype=np.uint64)
    weighted = 0
    if q:
        weighted += int(w[: q * m].reshape(q, m).sum(axis=0, dtype=np.uint64) @ cols)
    tail = w[q * m :]
    weighted += int(tail.astype(np.uint64) @ cols[: tail.size])
    s1 = (total - 1) % m + 1
    s2 = ((n % m) * (total % m) - weighted) % m
    s2 = (s2 - 1) % m + 1
    return (s2 << 16) | s1


def fletcher32_chunks(images: Any, chunk_rows: int) -> Any:
    """HDF5 Fletcher-32 of every ``chunk_rows``-image chunk of a torch tensor, computed where it lives.

    ``images``: a contiguous torch tensor [N, ...] in its storage dtype (float32/float16), on any device;
    the last chunk is zero padded, as HDF5 stores it. Returns an int64 tensor [ceil(N / chunk_rows)] on
    the same device (no synchronisation), equal to :func:`fletcher32` of each chunk's bytes. The
    renderer runs this on the GPU, so the write tasks only copy bytes (and the checksum covers the image
    from device memory to disk).
    """
    import torch

    n = int(images.shape[0])
    per_image = int(images[0].numel()) * images.element_size() if n else 0
    n_chunks = -(-n // chunk_rows)
    raw = images.contiguous().view(torch.uint8).reshape(n, per_image)
    if n_chunks * chunk_rows != n:
        raw = torch.cat([raw, raw.new_zeros(n_chunks * chunk_rows - n, per_image)])
    b = raw.reshape(n_chunks, -1, 2)  # chunk bytes are even: itemsize 2 or 4
    m = 65535
    words = b[..., 0].to(torch.int64) * 256 + b[..., 1].to(torch.int64)  # big-endian 16-bit words
    n_words = words.shape[1]
    col = torch.arange(n_words, device=words.device, dtype=torch.int64) % m
    total = words.sum(1)  # <= 2^19 words * 65535 per 1 MiB chunk: far from int64 overflow
    weighted = (words * col).sum(1) % m  # same for (i mod 65535) * w summed
    s1 = torch.remainder(total - 1, m) + 1
    s2 = torch.remainder((n_words % m) * (total % m) - weighted, m)
    s2 = torch.remainder(s2 - 1, m) + 1
    return torch.where(total == 0, torch.zeros_like(total), (s2 << 16) | s1)


def _check_shard_inputs(images: np.ndarray, labels: np.ndarray, params: Mapping[str, np.ndarray]) -> None:
    n = images.shape[0] if images.ndim else 0
    if images.ndim != 4 or images.dtype not in (np.float32, np.float16):
        raise ValueError(f"images must be float32/float16 [N,1,H,W], got {images.dtype} {images.shape}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    for name, value in params.items():
        if np.asarray(value).shape[:1] != (n,):
            raise ValueError(
                f"param {name!r} must have leading axis {n}, got shape {np.asarray(value).shape}"
            )


def _write_images(f: h5py.File, images: np.ndarray, checksums: np.ndarray | None = None) -> None:
    """``images`` as a chunked, Fletcher-32 dataset, written chunk by chunk with precomputed checksums.

    Same bytes as ``create_dataset(data=images, fletcher32=True)`` (tested), without HDF5's byte-wise
    checksum loop and filter-pipeline copies. The last chunk is zero padded (HDF5's fill value).
    ``checksums``: the chunks' Fletcher-32 values if already known (:func:`fletcher32_chunks` on the GPU),
    else computed here with :func:`fletcher32`.
    """
    n, shape = images.shape[0], images.shape[1:]
    chunk = image_chunk_rows(n, shape, images.dtype.itemsize)
    n_chunks = -(-n // chunk)
    if checksums is not None and np.shape(checksums) != (n_chunks,):
        raise ValueError(f"expected {n_chunks} image chunk checksums, got shape {np.shape(checksums)}")
    ds = f.create_dataset(
        "images",
        shape=images.shape,
        dtype=images.dtype,
        chunks=(chunk, *shape),
        fletcher32=True,
        track_times=False,
    )
    chunk_bytes = chunk * int(np.prod(shape)) * images.dtype.itemsize
    buf = bytearray(chunk_bytes + 4)
    view = memoryview(buf)
    for k, start in enumerate(range(0, n, chunk)):
        part = np.ascontiguousarray(images[start : start + chunk])
        raw = memoryview(part).cast("B")
        view[: raw.nbytes] = raw
        if raw.nbytes < chunk_bytes:
            view[raw.nbytes : chunk_bytes] = bytes(chunk_bytes - raw.nbytes)
        check = fletcher32(view[:chunk_bytes]) if checksums is None else int(checksums[k])
        buf[chunk_bytes:] = check.to_bytes(4, "little")
        ds.id.write_direct_chunk((start, *(0,) * len(shape)), buf, filter_mask=0)


def _fill_shard(
    f: h5py.File,
    images: np.ndarray,
    labels: np.ndarray,
    params: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
    checksums: np.ndarray | None = None,
) -> None:
    for key in sorted(attrs):
        f.attrs[key] = attrs[key]
    _write_images(f, images, checksums)
    f.create_dataset("labels", data=labels, fletcher32=True, track_times=False, **_PARAM_COMPRESSION)
    group = _group_no_times(f, "params")
    for name in sorted(params):
        value = np.ascontiguousarray(params[name])
        group.create_dataset(name, data=value, fletcher32=True, track_times=False, **_PARAM_COMPRESSION)


def encode_shard(
    images: np.ndarray,
    labels: np.ndarray,
    params: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
) -> bytes:
    """Encode one shard as the bytes of an HDF5 file (deterministic: same inputs, same bytes).

    images: [N, 1, H, W] float32 or float16 (stored as given); labels: int64 [N]; params: name -> [N, ...];
    attrs: scalar/str attributes (written in sorted key order). The same bytes as :func:`write_shard`
    puts on disk.
    """
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    _check_shard_inputs(images, labels, params)
    # The core driver keeps the file in memory; the name is never stored in the file.
    block = max(1 << 20, images.nbytes + (1 << 20))  # one allocation, no regrowth
    with h5py.File(
        f"shard-{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False, block_size=block
    ) as f:
        _fill_shard(f, images, labels, params, attrs)
        f.flush()
        return f.id.get_file_image()


def write_shard(
    path: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    params: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
    *,
    fail_after_bytes: int | None = None,
    timings: dict[str, float] | None = None,
    image_checksums: np.ndarray | None = None,
) -> tuple[str, int]:
    """Write one shard to ``path`` atomically and return (sha256 hex, bytes); same bytes as encode_shard.

    HDF5 writes straight to a temporary file in the same directory; then the file is read back from the
    page cache for its sha256 while another thread fsyncs it (both release the GIL); then ``os.replace``.
    ``fail_after_bytes`` (fault injection): cut the temporary file there and raise OSError, as a crashed
    write would; nothing is left behind. ``timings`` (if given) gets encode_s, hash_s, write_s.
    ``image_checksums``: the image chunks' Fletcher-32 values, if computed already (see ``_write_images``).
    """
    from concurrent.futures import ThreadPoolExecutor

    labels = np.ascontiguousarray(labels, dtype=np.int64)
    _check_shard_inputs(images, labels, params)
    p = Path(path)
    t0 = time.perf_counter()
    with atomic_path(p, sync_dir=True) as tmp:  # the file is fsynced below, while it is hashed
        with h5py.File(tmp, "w") as f:
            _fill_shard(f, images, labels, params, attrs, image_checksums)
        t1 = time.perf_counter()
        if fail_after_bytes is not None:
            os.truncate(tmp, fail_after_bytes)
            raise OSError(f"injected write failure for {p} after {fail_after_bytes} bytes")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            with ThreadPoolExecutor(1) as pool:
                synced = pool.submit(os.fsync, fd)
                digest = sha256_file(tmp)
                t2 = time.perf_counter()
                synced.result()
        finally:
            os.close(fd)
        size = os.path.getsize(tmp)
    t3 = time.perf_counter()
    if timings is not None:
        timings.update({"encode_s": t1 - t0, "hash_s": t2 - t1, "write_s": t3 - t2})
    return digest, size


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, block: int = 8 << 20) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


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
    expect_rows: int | None = None,
) -> dict[str, Any]:
    """Read rows [start, stop) of a shard: ``{"images", "labels", "params": {...}, "attrs": {...}}``.

    params: False (none), True (all) or an iterable of names. Images come back float32 unless
    ``as_float32=False``. ``expect_rows``: the rows the shard must hold (its manifest entry). Any failure
    (missing, truncated, checksum mismatch, bad schema, another row count) raises :class:`ShardReadError`
    naming the file.
    """
    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
            if int(attrs.get("format_version", -1)) != FORMAT_VERSION:
                raise ValueError(f"format_version {attrs.get('format_version')!r}, expected {FORMAT_VERSION}")
            n = _rows_of(f, p, expect_rows)
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


def _rows_of(f: h5py.File, path: Path, expect_rows: int | None) -> int:
    """Rows of an open shard (images and labels must agree, and equal ``expect_rows`` if given)."""
    n = int(f["labels"].shape[0])
    if int(f["images"].shape[0]) != n:
        raise ShardReadError(f"shard {path} holds {f['images'].shape[0]} images but {n} labels")
    if expect_rows is not None and n != int(expect_rows):
        raise ShardReadError(f"shard {path} holds {n} rows, its manifest entry says {int(expect_rows)}")
    return n


def shard_num_rows(path: str | Path, expect_rows: int | None = None) -> int:
    """Rows in a shard (reads only the metadata); ShardReadError naming the file on failure, or if the rows
    differ from ``expect_rows`` (when given) or images and labels differ in number."""
    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            return _rows_of(f, p, expect_rows)
    except ShardReadError:
        raise
    except Exception as exc:
        raise ShardReadError(f"cannot read shard {p}: {type(exc).__name__}: {exc}") from exc


def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.generic):
        return v.item()
    return v
