"""Atomic file writes: the one way this package writes a file that readers may see half-written otherwise.

Every writer goes through :func:`atomic_path`: the content goes to a hidden temporary name in the same
directory (``.NAME.tmp-<random>``, so ``os.replace`` is a rename within one file system), optionally fsynced,
then renamed over the target; on any error the temporary file is removed and the target is untouched. Readers
therefore see the old file or the whole new one. :func:`remove_stale_tmp` deletes what a killed writer left.

``fsync``: the data files and the manifest of a dataset, and training checkpoints, are fsynced (a crash right
after the rename must not leave an empty file under the final name), and so is the directory after the
rename (and the parents of directories the write created), so that the new name itself survives a crash;
run-state and report files, rewritten often and cheap to regenerate, are not, unless asked.

:func:`directory_lock` takes an exclusive ``flock`` on a lock file inside a directory, so that two processes
cannot write the same directory at once (dataset builds and imports, see
:func:`deeplense_ray.data.manifest.dataset_lock`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import threading
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


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so that the names created, renamed or removed in it are on disk. File systems
    that cannot fsync a directory (EINVAL / ENOTSUP) are skipped."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def make_dirs(directory: str | os.PathLike[str], *, fsync: bool = False) -> Path:
    """``mkdir -p directory``; with ``fsync``, the parent of every directory it created is fsynced."""
    d = Path(directory)
    missing = []
    p = d
    while not p.is_dir() and p != p.parent:
        missing.append(p)
        p = p.parent
    d.mkdir(parents=True, exist_ok=True)
    if fsync:
        for created in missing:
            fsync_dir(created.parent)
    return d


@contextmanager
def atomic_path(
    path: str | os.PathLike[str], *, fsync: bool = False, sync_dir: bool | None = None
) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: <write the file tmp>``: on a normal exit ``tmp`` is (fsynced and)
    renamed to ``p``; on an exception it is removed and ``p`` is left as it was. Creates the directory.

    ``fsync``: fsync the file before the rename and its directory after it. ``sync_dir`` (default: as
    ``fsync``): fsync the directory after the rename (for a writer that fsyncs the file itself)."""
    out = Path(path)
    sync_dir = fsync if sync_dir is None else sync_dir
    make_dirs(out.parent, fsync=sync_dir)
    tmp = tmp_path_for(out)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, out)
        if sync_dir:
            fsync_dir(out.parent)
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


def remove_stale_tmp(directory: str | os.PathLike[str], *, max_depth: int | None = None) -> list[Path]:
    """Delete temporary files left by a killed writer under ``directory`` (recursively, or at most
    ``max_depth`` folders down: 0 is ``directory`` itself). Returns them."""
    removed: list[Path] = []
    root = Path(directory)
    if not root.is_dir():
        return removed
    if max_depth is None:
        found = root.rglob(f".*{TMP_MARK}*")
    else:
        found = (p for depth in range(max_depth + 1) for p in root.glob("*/" * depth + f".*{TMP_MARK}*"))
    for p in found:
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class DirectoryLockedError(OSError):
    """Another process holds the lock of a directory (see :func:`directory_lock`); the message names it."""


_HELD: dict[tuple[str, int], int] = {}  # (lock file, thread id) -> nesting depth in this process
_HELD_GUARD = threading.Lock()


@contextmanager
def directory_lock(
    directory: str | os.PathLike[str], name: str = ".lock", *, what: str = ""
) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (created if missing) for the ``with`` block.

    The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``directory/name``, a file created once and never
    removed (removing it would let a third process lock a new file while the second still holds the old
    one). If another process (or another thread of this one) holds it, :class:`DirectoryLockedError`
    names the directory at once; nothing waits. The same thread may nest ``directory_lock`` on the same
    directory (a job holding it calls a library function that takes it too). The kernel drops the lock
    when the process dies, so a killed job leaves no stale lock. Works on local file systems; on NFS,
    ``flock`` is only as good as the mount's lock support (NFSv4, or v3 with ``lockd``; a ``nolock`` mount
    locks per client only). ``what``: a hint for the error message (who is likely holding it).
    """
    if Path(directory).exists() and not Path(directory).is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    lock_file = Path(directory).resolve() / name
    key = (str(lock_file), threading.get_ident())
    with _HELD_GUARD:
        if _HELD.get(key):
            _HELD[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield lock_file
        finally:
            with _HELD_GUARD:
                _HELD[key] -= 1
        return
    make_dirs(lock_file.parent)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryLockedError(
                f"{lock_file.parent} is in use by another process (lock {lock_file} is held"
                f"{'; ' + what if what else ''}); wait for it to finish or use another directory"
            ) from None
        with _HELD_GUARD:
            _HELD[key] = 1
        try:
            yield lock_file
        finally:
            with _HELD_GUARD:
                _HELD.pop(key, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
