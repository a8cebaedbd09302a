"""Atomic file writes: the one way this package writes a file that readers may see half-written otherwise.

Every writer goes through :func:`atomic_path`: the content goes to a hidden temporary name in the same
directory (``.NAME.tmp-<random>``, so ``os.replace`` is a rename within one file system), optionally fsynced,
then renamed over the target; on any error the temporary file is removed and the target is untouched. Readers
therefore see the old file or the whole new one. :func:`remove_stale_tmp` deletes what a killed writer left.

``fsync``: the data files and the manifest of a dataset are fsynced (a crash right after the rename must not
leave an empty file under the final name); run-state and report files, rewritten often and cheap to
regenerate, are not, unless asked.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Marks a temporary file of an atomic write (``.NAME.tmp-<random>``).
TMP_MARK = ".tmp-"


def tmp_path_for(path: str | os.PathLike[str]) -> Path:
    """A unique hidden temporary name next to ``path`` (same directory, so os.replace is atomic)."""
    p = Path(path)
    return p.with_name(f".{p.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: <write the file tmp>``: on a normal exit ``tmp`` is (fsynced and)
    renamed to ``p``; on an exception it is removed and ``p`` is left as it was. Creates the directory."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(out)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(
    path: str | os.PathLike[str],
    data: bytes | memoryview,
    *,
    fsync: bool = True,
    fail_after_bytes: int | None = None,
) -> Path:
    """Write ``data`` to ``path`` atomically (fsynced by default). Returns the path.

    ``fail_after_bytes`` (fault injection for tests): write that many bytes, then raise OSError, as a crashed
    write would; the temporary file is removed, so nothing half-written is left.
    """
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as fh:
        if fail_after_bytes is not None:
            fh.write(memoryview(data)[:fail_after_bytes])
            fh.flush()
            raise OSError(f"injected write failure for {path} after {fail_after_bytes} bytes")
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (fsynced by default). Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def json_ready(x: Any) -> Any:
    """``x`` with non-finite floats as None, NumPy scalars and arrays as Python numbers and lists, mapping
    keys as strings (so ``json.dumps(..., allow_nan=False)`` accepts it)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    item = getattr(x, "item", None)
    if callable(item) and getattr(x, "shape", None) == ():  # NumPy / torch scalar
        return json_ready(item())
    tolist = getattr(x, "tolist", None)
    if callable(tolist) and hasattr(x, "shape"):  # NumPy array
        return json_ready(tolist())
    return x


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, fsync: bool = False) -> Path:
    """``obj`` as JSON (indent 2, sorted keys, nan -> null, see :func:`json_ready`) written atomically."""
    text = json.dumps(json_ready(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_text(path, text, fsync=fsync)


def remove_stale_tmp(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files left by a killed writer under ``directory`` (recursively). Returns them."""
    removed: list[Path] = []
    root = Path(directory)
    if not root.is_dir():
        return removed
    for p in root.rglob(f".*{TMP_MARK}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
