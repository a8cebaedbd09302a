"""Datasets on disk: one writer per directory, renames that survive a crash, manifests that cannot lie about
their shards (row counts) or point outside the dataset."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deeplense_ray.data.manifest import (
    LOCK_NAME,
    MANIFEST_NAME,
    build_manifest,
    check_shard_rows,
    dataset_lock,
    load_manifest,
    shard_paths,
    verify_dataset,
    write_manifest,
)
from deeplense_ray.data.shards import ShardReadError, read_shard, shard_attrs, write_shard
from deeplense_ray.io import DirectoryLockedError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("no_sub", "cdm")


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job_safety", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_main(main, argv: list[str]) -> tuple[int, str, float]:
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue(), time.perf_counter() - t0


def _tiny_dataset(root: Path, rows: dict[str, int], claim: dict[str, int] | None = None) -> Path:
    """A real dataset of one shard per split (16x16 images, 2 classes); ``claim``: rows the manifest says
    instead (per split), as a hand-edited or corrupted manifest would."""
    rng = np.random.default_rng(0)
    entries = []
    for index, (split, n) in enumerate(rows.items()):
        rel = f"{split}/shard-00000.h5"
        images = rng.normal(size=(n, 1, 16, 16)).astype(np.float32)
        labels = np.arange(n) % len(CLASSES)
        params = {"theta_E": rng.uniform(0.8, 1.2, n)}
        attrs = shard_attrs(
            preset={"name": "tiny"}, class_names=CLASSES, seed=index, dataset_seed=0, split=split,
            shard_index=0, rows=n, image_dtype="float32",
        )  # fmt: skip
        digest, _ = write_shard(root / rel, images, labels, params, attrs)
        entries.append({"split": split, "index": 0, "path": rel, "rows": n, "sha256": digest, "seed": index})
    claimed = {**rows, **(claim or {})}
    for e in entries:
        e["rows"] = claimed[e["split"]]
    manifest = build_manifest(
        config={"preset": "tiny"}, class_names=CLASSES, image_shape=[1, 16, 16], image_dtype="float32",
        params={"theta_E": {"shape": [], "dtype": "float64"}}, split_rows=claimed, shards=entries,
    )  # fmt: skip
    write_manifest(root, manifest)
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- one writer

_HOLD_LOCK = r"""
import sys
from deeplense_ray.data.manifest import dataset_lock
with dataset_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_second_simulate_job_on_a_locked_out_exits_2_at_once_and_touches_nothing(tmp_path, no_ray):
    """A first job (another process) holds ``--out``: the second, even with --overwrite, stops before Ray
    with one line naming the directory; the first's shards, manifest and temporary file stay."""
    out = _tiny_dataset(tmp_path / "data", {"train": 6, "val": 2, "test": 2})
    (out / "train" / ".shard-00001.h5.tmp-0123456789ab").write_bytes(b"a shard being written")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(out)
        main = _job("simulate").main
        # a port nobody answers on: if the lock were ignored the job would fail connecting, not build
        base = ["--num-per-class", "20", "--out", str(out), "--address", "127.0.0.1:9"]
        for extra in (["--overwrite"], ["--resume"], []):
            rc, err, took = _run_main(main, [*base, *extra])
            assert rc == 2, (extra, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and str(out) in lines[0] and "in use by another process" in lines[0], err
            assert took < 5.0, took
            assert _snapshot(out) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_dataset_writer_takes_the_lock_before_any_write(tmp_path, no_ray):
    """build_dataset (Ray Data writing from Python) refuses a directory another thread's writer holds, before
    it deletes or writes anything; the lock nests within one thread and is free again afterwards."""
    from deeplense_ray.data import DatasetConfig, build_dataset

    out = _tiny_dataset(tmp_path / "data", {"train": 4, "val": 2, "test": 2})
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with dataset_lock(out):
            taken.set()
            release.wait(60)

    other = threading.Thread(target=hold)
    other.start()
    try:
        assert taken.wait(30)
        before = _snapshot(out)
        cfg = DatasetConfig(preset="model_ii", num_per_class=20, shard_size=4)
        t0 = time.perf_counter()
        with pytest.raises(DirectoryLockedError, match=re.escape(str(out))):
            build_dataset(cfg, out, overwrite=True, progress=False, preview=False)
        assert time.perf_counter() - t0 < 5.0
        with pytest.raises(DirectoryLockedError, match="in use by another process"):
            with dataset_lock(out):
                pass
        assert _snapshot(out) == before
    finally:
        release.set()
        other.join(30)
    with dataset_lock(out) as lock, dataset_lock(out):  # free again; nested in one thread
        assert lock == out.resolve() / LOCK_NAME


def test_overwrite_removes_only_the_dataset_files_it_recognises(tmp_path):
    from deeplense_ray.data.pipeline import clear_dataset_dir

    out = _tiny_dataset(tmp_path / "data", {"train": 4, "val": 2, "test": 2})
    (out / "train" / ".shard-00001.h5.tmp-0123456789ab").write_bytes(b"left by a killed writer")
    keep = {
        "notes.txt": b"mine",
        "train/labels_by_hand.csv": b"mine",
        "results/shard-summary.h5": b"not a shard name",
        "results/deeper/shard-00000.h5": b"two folders down",
        "results/deeper/.x.h5.tmp-0123456789ab": b"two folders down",
        "empty_mine/.keep": b"",
    }
    for rel, data in keep.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    clear_dataset_dir(out)
    assert _snapshot(out) == keep
    assert not (out / "val").exists() and not (out / "test").exists()


# ---------------------------------------------------------------------------------------------- fsync


def test_directory_is_fsynced_after_shard_manifest_and_checkpoint_renames(tmp_path, monkeypatch):
    import torch

    from deeplense_ray.train.checkpoint import MODEL_FILE, save_checkpoint

    synced_dirs: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            synced_dirs.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)

    def dir_id(p: Path) -> tuple[int, int]:
        st = os.stat(p)
        return st.st_dev, st.st_ino

    out = _tiny_dataset(tmp_path / "data", {"train": 4})
    assert dir_id(out) in synced_dirs  # the new train/ folder's name
    synced_dirs.clear()
    shard = read_shard(out / "train" / "shard-00000.h5", params=True)
    write_shard(out / "train" / "shard-00001.h5", shard["images"], shard["labels"], shard["params"], {})
    assert synced_dirs == [dir_id(out / "train")]  # the shard's rename
    synced_dirs.clear()
    write_manifest(out, load_manifest(out))
    assert synced_dirs == [dir_id(out)]  # the manifest's rename

    synced_dirs.clear()
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    ckpt = save_checkpoint(
        tmp_path / "ckpt", model=model, optimizer=opt, scheduler=sched, scaler=None, epoch=1,
        config={"seed": 0}, metrics={"val_loss": 0.5}, history=[],
    )  # fmt: skip
    assert (ckpt / MODEL_FILE).is_file()
    assert synced_dirs.count(dir_id(ckpt)) >= 3  # model.pt, train_state.pt, meta.json


# ---------------------------------------------------------------------------------------------- manifests


def test_shard_holding_fewer_rows_than_its_manifest_entry_is_an_error_everywhere(tmp_path, no_ray):
    """5 rows claimed, 3 in the file: open, read, verify, the torch dataset and jobs/train.py all refuse,
    naming the shard file and both counts."""
    from deeplense_ray.data import LensShardDataset

    out = _tiny_dataset(tmp_path / "data", {"train": 3, "val": 2, "test": 2}, claim={"train": 5})
    shard = out / "train" / "shard-00000.h5"
    assert load_manifest(out)["splits"]["train"]["rows"] == 5  # consistent with itself
    said = f"shard {shard} holds 3 rows, its manifest entry says 5"
    with pytest.raises(ValueError, match=re.escape(said)):
        check_shard_rows(out)
    with pytest.raises(ShardReadError, match=re.escape(said)):
        read_shard(shard, expect_rows=5)
    with pytest.raises(ValueError, match=re.escape(said)):
        LensShardDataset(out, "train")
    assert verify_dataset(out) == [said]
    rc, err, _ = _run_main(_job("simulate").main, ["--verify", str(out)])
    assert rc == 1 and said in err

    rc, err, took = _run_main(
        _job("train").main, ["--model", "ResNetSimple", "--data", str(out), "--epochs", "1"]
    )
    assert rc == 2 and said in err, err


@pytest.mark.parametrize("bad", ["../outside/shard-00000.h5", "/etc/passwd", "train/../../outside.h5"])
def test_manifest_shard_paths_must_stay_inside_the_dataset(tmp_path, bad, no_ray):
    out = _tiny_dataset(tmp_path / "data", {"train": 3, "val": 2, "test": 2})
    outside = tmp_path / "outside" / "shard-00000.h5"
    outside.parent.mkdir()
    (out / "train" / "shard-00000.h5").rename(outside)  # a real shard, outside the dataset
    (tmp_path / "outside.h5").write_bytes(outside.read_bytes())
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["splits"]["train"]["shards"][0]["path"] = bad
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    said = f"manifest {out / MANIFEST_NAME}: shard path {bad!r} is not a relative path inside the dataset"
    with pytest.raises(ValueError, match=re.escape(said)):
        load_manifest(out)
    with pytest.raises(ValueError, match="is not a relative path inside the dataset"):
        shard_paths(out, "train", manifest)
    assert verify_dataset(out) == [said + " (absolute paths and '..' are refused)"]
    train = ["--model", "ResNetSimple", "--data", str(out), "--epochs", "1"]
    rc, err, _ = _run_main(_job("train").main, train)
    assert rc == 2 and said in err, err
