"""``DIR/preview.png``: a grid of example images per class with their key parameters."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deeplense_ray.data.shards import read_shard
from deeplense_ray.io import atomic_write_bytes

# Shown under each image when the shard has them (first match wins for each slot).
KEY_PARAMS: tuple[tuple[str, str, str], ...] = (
    ("theta_E", 'θE={:.2f}"', "theta_E"),
    ("subhalo_count", "Nsub={:.0f}", "subhalo_count"),
    ("axion_mass", "m_a={:.1e}", "axion_mass"),
    ("gamma1", "γ1={:.2f}", "gamma1"),
)


def _caption(params: Mapping[str, np.ndarray], j: int, label: str) -> str:
    parts = []
    for name, fmt, _ in KEY_PARAMS:
        if name in params:
            value = np.asarray(params[name][j]).reshape(-1)
            if value.size == 1:
                v = float(value[0])
                if name == "axion_mass" and v == 0:
                    continue
                parts.append(fmt.format(v))
    return "\n".join(parts[:3])


def write_preview(
    data_dir: str | Path, manifest: Mapping[str, Any], *, per_class: int = 4, split: str | None = None
) -> Path:
    """Plot up to ``per_class`` images of each class from the first shard of ``split`` (default: the first
    split); rows are classes. Written atomically to ``DIR/preview.png``. Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    root = Path(data_dir)
    split = split or next(iter(manifest["splits"]))
    shards = manifest["splits"][split]["shards"]
    class_names = list(manifest["class_names"])
    shard = read_shard(root / shards[0]["path"], params=True, stop=4096)
    images, labels, params = shard["images"], shard["labels"], shard["params"]
    fig, axes = plt.subplots(
        len(class_names), per_class, figsize=(2.1 * per_class, 2.4 * len(class_names)), squeeze=False
    )
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(labels == c)[:per_class]
        for k in range(per_class):
            ax = axes[c, k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(idx):
                ax.axis("off")
                continue
            j = int(idx[k])
            ax.imshow(images[j, 0], cmap="inferno", origin="lower")
            ax.set_xlabel(_caption(params, j, name), fontsize=7)
            if k == 0:
                ax.set_ylabel(name, fontsize=10)
    preset = manifest.get("config", {}).get("preset", "")
    fig.suptitle(f"{preset}: {split} examples per class", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    path = root / "preview.png"
    atomic_write_bytes(path, buf.getvalue())
    return path
