"""The dataset of a search without ``data_dir``: a small simulated ``preset`` dataset, built once per config.

It lives in ``<storage_path>/datasets/<preset>-n<num_per_class>-<hash>/`` (the hash covers the preset, its
overrides, the size and the seed), so every search with the same dataset config reuses it. Searches starting
at once share it through a file lock (:func:`dataset_lock`): one builds, the others wait, then reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from deeplense_ray.tune.settings import TuneSettings


def dataset_dir_for(settings: TuneSettings, storage_path: str) -> str:
    """Directory of the auto-simulated dataset: one per distinct dataset config, so it is reused."""
    key = json.dumps(
        {
            "preset": settings.preset,
            "overrides": settings.preset_overrides,
            "n": settings.num_per_class,
            "seed": settings.data_seed,
        },
        sort_keys=True,
    )
    h = hashlib.sha256(key.encode()).hexdigest()[:10]
    return os.path.join(storage_path, "datasets", f"{settings.preset}-n{settings.num_per_class}-{h}")


@contextmanager
def dataset_lock(data_dir: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<data_dir>.lock`` (``fcntl.flock``; the kernel releases it if the process
    dies). Searches without data_dir share one auto-simulated dataset per config: under this lock one of
    them builds it and the others wait, then reuse it, instead of building into the same directory at once
    and deleting each other's temporary files."""
    import fcntl

    os.makedirs(os.path.dirname(data_dir), exist_ok=True)
    with open(f"{data_dir}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another search building the dataset {data_dir}", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def dataset_config(settings: TuneSettings):
    """The validated :class:`~deeplense_ray.data.DatasetConfig` of the auto-simulated dataset."""
    from deeplense_ray.data import DatasetConfig

    return DatasetConfig(
        preset=settings.preset,
        preset_overrides=dict(settings.preset_overrides),
        num_per_class=settings.num_per_class,
        seed=settings.data_seed,
    ).validate()


def ensure_dataset(settings: TuneSettings, storage_path: str) -> str:
    """``settings.data_dir``, or a small simulated ``settings.preset`` dataset (built once, then reused; a
    search finding another one building it waits for it, see :func:`dataset_lock`)."""
    if settings.data_dir is not None:
        return os.path.abspath(settings.data_dir)
    from deeplense_ray.data import build_dataset, verify_dataset

    out = dataset_dir_for(settings, storage_path)
    cfg = dataset_config(settings)
    with dataset_lock(out):
        if os.path.isfile(os.path.join(out, "manifest.json")) and not verify_dataset(out):
            return out
        n = settings.num_per_class * 3
        print(
            f"[search] simulating a {settings.preset} dataset ({settings.num_per_class} images per class) "
            f"into {out} ...",
            flush=True,
        )
        t0 = time.time()
        build_dataset(cfg, out, resume=os.path.isdir(out), progress=False)
        print(f"[search] dataset ready ({n} images, {time.time() - t0:.0f} s)", flush=True)
    return out
