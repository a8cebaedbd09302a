"""``DIR/manifest.json``: what a dataset holds, and the checks built on it (verify, hash, row counts).

Shard paths in a manifest are relative to its directory and stay inside it: an absolute path or a ``..``
component is refused when the manifest is loaded. :func:`dataset_lock` keeps two writers out of one dataset
directory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from deeplense_ray.data.shards import (
    FORMAT_VERSION,
    ShardReadError,
    package_version,
    sha256_file,
    shard_num_rows,
)
from deeplense_ray.io import atomic_write_text, directory_lock

MANIFEST_NAME = "manifest.json"
#: The lock file of a dataset directory (see :func:`dataset_lock`); it stays in the directory.
LOCK_NAME = ".lock"


@contextmanager
def dataset_lock(data_dir: str | Path) -> Iterator[Path]:
    """``with dataset_lock(DIR):`` hold the exclusive write lock of a dataset directory (created if missing).

    Every writer of a dataset (a simulate build, an import) holds it for its whole run, taken before it
    deletes or writes anything; a second writer gets :class:`deeplense_ray.io.DirectoryLockedError` naming
    the directory at once. Nestable within one thread. Local file systems; on NFS the mount must support
    locks (see :func:`deeplense_ray.io.directory_lock`). Yields the lock file's path.
    """
    with directory_lock(data_dir, LOCK_NAME, what="another dataset build or import is writing it") as lock:
        yield lock


def build_manifest(
    *,
    config: Mapping[str, Any],
    class_names: Iterable[str],
    image_shape: Iterable[int],
    image_dtype: str,
    params: Mapping[str, Mapping[str, Any]],
    split_rows: Mapping[str, int],
    shards: Iterable[Mapping[str, Any]],
) -> dict[str, Any]:
    """Assemble the manifest dict (deterministic: shards sorted by split order then index, no timestamps).

    shards: entries with keys split, index, path (relative), rows, sha256, seed.
    """
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in split_rows}
    for entry in shards:
        by_split[entry["split"]].append(
            {
                "path": entry["path"],
                "rows": int(entry["rows"]),
                "sha256": entry["sha256"],
                "seed": int(entry["seed"]),
                "index": int(entry["index"]),
            }
        )
    splits: dict[str, Any] = {}
    for split, rows in split_rows.items():
        entries = sorted(by_split[split], key=lambda e: e["index"])
        if sum(e["rows"] for e in entries) != rows:
            raise RuntimeError(
                f"split {split!r}: shards hold {sum(e['rows'] for e in entries)} rows, plan {rows}"
            )
        splits[split] = {
            "rows": int(rows),
            "shards": [{k: e[k] for k in ("path", "rows", "sha256", "seed")} for e in entries],
        }
    return {
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "config": dict(config),
        "class_names": list(class_names),
        "image_shape": [int(v) for v in image_shape],
        "image_dtype": image_dtype,
        "params": {k: dict(v) for k, v in sorted(params.items())},
        "splits": splits,
    }


def manifest_text(manifest: Mapping[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=False) + "\n"


def write_manifest(data_dir: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``DIR/manifest.json`` atomically (file and directory fsynced)."""
    path = Path(data_dir) / MANIFEST_NAME
    atomic_write_text(path, manifest_text(manifest), fsync=True)
    return path


def shard_file(root: Path, rel: Any, manifest_path: Path | str) -> Path:
    """``root / rel`` for a shard path of a manifest; ValueError naming the manifest and the path if ``rel``
    is not a relative path inside the dataset (absolute, a drive, a ``..`` component, empty)."""
    ok = isinstance(rel, str) and rel.strip() not in ("", ".")
    if ok:
        posix, win = PurePosixPath(rel), PureWindowsPath(rel)
        ok = not (posix.is_absolute() or win.is_absolute() or win.drive or win.root)
        ok = ok and ".." not in posix.parts and ".." not in win.parts and not rel.startswith("~")
    if not ok:
        raise ValueError(
            f"manifest {manifest_path}: shard path {rel!r} is not a relative path inside the dataset "
            "(absolute paths and '..' are refused)"
        )
    return root / rel


def _check_shard_entries(manifest: Mapping[str, Any], root: Path, path: Path) -> None:
    """Every shard entry has a path inside ``root`` and a row count; each split's rows are their sum."""
    if not isinstance(manifest["splits"], Mapping):
        raise ValueError(f"manifest {path}: 'splits' is not a mapping")
    for split, info in manifest["splits"].items():
        shards = info.get("shards") if isinstance(info, Mapping) else None
        if not isinstance(shards, list):
            raise ValueError(f"manifest {path}: split {split!r} has no list of shards")
        total = 0
        for entry in shards:
            if not isinstance(entry, Mapping) or "path" not in entry:
                raise ValueError(f"manifest {path}: split {split!r} has a shard entry with no path: {entry}")
            shard_file(root, entry["path"], path)
            rows = entry.get("rows")
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
                raise ValueError(f"manifest {path}: shard {entry['path']!r} has rows {rows!r}, not a count")
            total += rows
        if info.get("rows") != total:
            raise ValueError(
                f"manifest {path}: split {split!r} says {info.get('rows')!r} rows, its shards {total}"
            )


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read ``DIR/manifest.json``. FileNotFoundError / ValueError naming the file."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no dataset manifest at {path} (build one with jobs/simulate.py)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"manifest {path} is not valid JSON: {exc}") from None
    missing = [
        k for k in ("format_version", "config", "class_names", "splits", "image_shape") if k not in manifest
    ]
    if missing:
        raise ValueError(f"manifest {path} lacks keys {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"manifest {path} has format_version {manifest['format_version']!r}, "
            f"this package reads {FORMAT_VERSION}"
        )
    _check_shard_entries(manifest, Path(data_dir), path)
    return manifest


def manifest_hash(data_dir: str | Path) -> str:
    """SHA-256 (hex) of ``DIR/manifest.json``: one id for the whole dataset (shard hashes are inside)."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no dataset manifest at {path}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_paths(data_dir: str | Path, split: str, manifest: Mapping[str, Any] | None = None) -> list[Path]:
    """Absolute shard paths of one split, in order. KeyError listing the splits if ``split`` is unknown."""
    root = Path(data_dir).resolve()
    manifest = manifest if manifest is not None else load_manifest(root)
    if split not in manifest["splits"]:
        raise KeyError(f"split {split!r} not in dataset {root}; splits: {list(manifest['splits'])}")
    where = root / MANIFEST_NAME
    return [shard_file(root, s["path"], where) for s in manifest["splits"][split]["shards"]]


def check_shard_rows(
    data_dir: str | Path, manifest: Mapping[str, Any] | None = None, splits: Iterable[str] | None = None
) -> None:
    """Open every shard of ``splits`` (default all) and compare its rows with its manifest entry (HDF5
    metadata only, no image bytes). ValueError naming the shard file and both counts, or the file that
    cannot be read; FileNotFoundError naming a missing one."""
    root = Path(data_dir).resolve()
    manifest = manifest if manifest is not None else load_manifest(root)
    for split in manifest["splits"] if splits is None else splits:
        rows = [int(entry["rows"]) for entry in manifest["splits"][split]["shards"]]
        check_row_counts(shard_paths(root, split, manifest), rows, root / MANIFEST_NAME)


def check_row_counts(paths: Iterable[Path | str], rows: Iterable[int], manifest_path: Path | str) -> None:
    """Each shard file in ``paths`` holds the number of rows given for it (see :func:`check_shard_rows`)."""
    for path, n in zip(paths, rows):
        if not Path(path).is_file():
            raise FileNotFoundError(f"shard {path} listed in {manifest_path} is missing")
        try:
            shard_num_rows(path, expect_rows=int(n))
        except ShardReadError as exc:
            raise ValueError(str(exc)) from None


def verify_dataset(data_dir: str | Path) -> list[str]:
    """Check every shard against the manifest (exists, sha256, rows). Returns problems, each naming a file."""
    root = Path(data_dir)
    try:
        manifest = load_manifest(root)
    except (FileNotFoundError, ValueError) as exc:
        return [str(exc)]
    problems: list[str] = []
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            path = root / shard["path"]
            if not path.is_file():
                problems.append(f"{path}: missing (split {split!r})")
                continue
            digest = sha256_file(path)
            if digest != shard["sha256"]:
                problems.append(
                    f"{path}: sha256 {digest[:16]}... does not match manifest {shard['sha256'][:16]}..."
                )
                continue
            try:  # the right file, but does the manifest say how many rows it holds?
                shard_num_rows(path, expect_rows=int(shard["rows"]))
            except ShardReadError as exc:
                problems.append(str(exc))
    return problems
