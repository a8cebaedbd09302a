"""``DIR/manifest.json``: what a dataset holds, and the checks built on it (verify, hash)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from deeplense_ray.data.shards import FORMAT_VERSION, package_version, sha256_file
from deeplense_ray.io import atomic_write_text

MANIFEST_NAME = "manifest.json"


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
    """Write ``DIR/manifest.json`` atomically."""
    path = Path(data_dir) / MANIFEST_NAME
    atomic_write_text(path, manifest_text(manifest))
    return path


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
    return [root / s["path"] for s in manifest["splits"][split]["shards"]]


def verify_dataset(data_dir: str | Path) -> list[str]:
    """Check every shard against the manifest (exists, sha256). Returns problems, each naming a file."""
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
    return problems
