"""build_dataset on the real Ray runtime: end to end, worker invariance, retry, resume, corruption.

Tiny data: model_ii, 10 images per class (8/1/1 per split), 8 rows per shard -> 5 shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplense_ray.data import (
    DatasetConfig,
    LensShardDataset,
    ShardReadError,
    build_dataset,
    lens_shard_datasource,
    load_manifest,
    manifest_hash,
    read_shard,
    read_split,
    verify_dataset,
)
from deeplense_ray.data.plan import plan_shards
from deeplense_ray.io import TMP_MARK

pytestmark = pytest.mark.slow

CFG = DatasetConfig(preset="model_ii", num_per_class=10, shard_size=8, seed=11)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _no_tmp(root: Path) -> bool:
    return not [p for p in root.rglob("*") if TMP_MARK in p.name]


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """One dataset built with 1 worker; the other tests compare against its bytes."""
    out = tmp_path_factory.mktemp("ref") / "ds"
    stats: dict = {}
    manifest = build_dataset(CFG, out, workers=1, progress=False, stats=stats)
    return out, manifest, stats


def test_end_to_end_tiny_dataset(reference):
    out, manifest, stats = reference
    assert manifest == load_manifest(out)
    assert manifest["class_names"] == ["no_sub", "axion", "cdm"]
    assert manifest["image_shape"] == [1, 64, 64]
    assert {s: v["rows"] for s, v in manifest["splits"].items()} == {"train": 24, "val": 3, "test": 3}
    assert [len(v["shards"]) for v in manifest["splits"].values()] == [3, 1, 1]
    assert manifest["config"]["preset_resolved"]["name"] == "model_ii"
    assert stats["shards_written"] == 5 and stats["images_written"] == 30
    assert verify_dataset(out) == []
    assert (out / "preview.png").stat().st_size > 1000 and (out / "preview.png").read_bytes()[
        :4
    ] == b"\x89PNG"
    assert not (out / ".building.json").exists() and _no_tmp(out)
    assert len(manifest_hash(out)) == 64

    # Every shard holds exactly what the simulator makes for its (seed, labels): an independent check.
    from deeplense_ray.sim import simulate

    spec = plan_shards(CFG, 3)[1]
    shard = read_shard(out / spec.path, params=True)
    sim = simulate(
        "model_ii", n=spec.rows, seed=spec.seed, device="cpu", labels=torch.from_numpy(spec.label_array())
    )
    np.testing.assert_array_equal(shard["images"], sim["images"].numpy())
    np.testing.assert_array_equal(shard["labels"], sim["labels"].numpy())
    np.testing.assert_array_equal(shard["params"]["theta_E"], sim["params"]["theta_E"].numpy())
    assert shard["attrs"]["seed"] == spec.seed and shard["attrs"]["split"] == "train"

    # Reading back: Ray Data (one read task per shard) and torch, both streaming.
    ds = read_split(out, "train", params=["theta_E"])
    rows = ds.take_all()
    assert len(rows) == 24
    assert rows[0]["image"].shape == (1, 64, 64) and rows[0]["image"].dtype == np.float32
    assert sorted(np.bincount([r["label"] for r in rows]).tolist()) == [8, 8, 8]
    assert len(lens_shard_datasource(out, "train").get_read_tasks(1)) == 3  # one read task per shard
    tds = LensShardDataset(out, "val", augment=True, normalize="per_image_standard")
    items = list(tds)
    assert len(items) == len(tds) == 3 and items[0][0].shape == (1, 64, 64)
    assert abs(float(items[0][0].mean())) < 1e-4
    with pytest.raises(KeyError, match="nope"):
        read_split(out, "nope")


def test_two_workers_and_a_retried_write_give_identical_bytes(reference, tmp_path):
    """2 renderer actors, and the first write of train/1 fails half-way: Ray retries it, and the
    result is byte-identical to the 1-worker build with no temporary file left."""
    ref, _, _ = reference
    out = tmp_path / "ds"
    stats: dict = {}
    build_dataset(CFG, out, workers=2, progress=False, faults={"train/1": 1}, stats=stats)
    assert stats["faults_injected"] == 1
    assert _no_tmp(out)
    assert _files(out) == _files(ref)


def test_resume_after_crash_keeps_good_shards(reference, tmp_path):
    ref, _, _ = reference
    out = tmp_path / "ds"
    # train/2 fails on every attempt: the build dies after its retries, leaving no manifest, no partial file.
    with pytest.raises(Exception, match="injected write failure"):
        build_dataset(CFG, out, workers=1, progress=False, faults={"train/2": 99}, preview=False)
    assert not (out / "manifest.json").exists() and _no_tmp(out)
    assert not (out / "train/shard-00002.h5").exists()
    survivors = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("shard-*.h5")}
    # Without --resume / --overwrite a non-empty dir is refused.
    with pytest.raises(ValueError, match="not empty"):
        build_dataset(CFG, out, progress=False)
    # A different config cannot resume this directory.
    with pytest.raises(ValueError, match="seed"):
        build_dataset(DatasetConfig(**{**CFG.to_dict(), "seed": 12}), out, resume=True, progress=False)
    stats: dict = {}
    build_dataset(CFG, out, workers=1, resume=True, progress=False, stats=stats)
    assert stats["shards_kept"] == len(survivors) and stats["shards_written"] == 5 - len(survivors)
    for p, (ino, mtime) in survivors.items():
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == (ino, mtime), f"{p} was rewritten"
    assert _files(out) == _files(ref)

    # With a manifest: a corrupted shard is redone, the others are kept; a second resume renders nothing.
    victim = out / "val/shard-00000.h5"
    victim.write_bytes(victim.read_bytes()[:-100])
    build_dataset(CFG, out, resume=True, progress=False, stats=stats)
    assert stats["shards_written"] == 1 and stats["shards_kept"] == 4
    build_dataset(CFG, out, resume=True, progress=False, stats=stats)
    assert stats["shards_written"] == 0 and stats["shards_kept"] == 5
    assert _files(out) == _files(ref)

    # A resume that crashes keeps the manifest (every shard's sha256) until a build replaces it.
    manifest = (out / "manifest.json").read_bytes()
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(Exception, match="injected write failure"):
        build_dataset(CFG, out, resume=True, progress=False, faults={"val/0": 99}, preview=False)
    assert (out / "manifest.json").read_bytes() == manifest
    build_dataset(CFG, out, resume=True, progress=False, stats=stats)
    assert stats["shards_written"] == 1 and stats["shards_kept"] == 4
    assert _files(out) == _files(ref)


def test_verify_and_readers_name_corrupted_shards(reference, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(reference[0], out)
    truncated, flipped = out / "train/shard-00001.h5", out / "test/shard-00000.h5"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    import h5py

    with h5py.File(flipped, "r") as f:
        offset = f["images"].id.get_chunk_info(0).byte_offset  # where the first image chunk starts
    data = bytearray(flipped.read_bytes())
    data[offset + 100 : offset + 116] = b"\x7f" * 16  # silent corruption inside the image data
    flipped.write_bytes(bytes(data))
    problems = verify_dataset(out)
    assert len(problems) == 2
    assert any(str(truncated) in p for p in problems) and any(str(flipped) in p for p in problems)
    with pytest.raises(Exception, match="shard-00001.h5"):
        read_split(out, "train").take_all()
    with pytest.raises(ShardReadError, match="test/shard-00000.h5"):
        list(LensShardDataset(out, "test"))
    # Dataset-level errors name the path, before any Ray work.
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_split(tmp_path / "missing", "train")
    (out / "manifest.json").write_text(json.dumps({"bad": 1}))
    assert "lacks keys" in verify_dataset(out)[0]


def test_read_split_feeds_a_ray_train_trainer(reference, tmp_path):
    """read_split datasets handed to a TorchTrainer: every row reaches the worker."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Defined here so cloudpickle ships it by value (workers cannot import the test module).
    def _count_rows_loop(config):
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        rows, labels = 0, []
        for batch in shard.iter_torch_batches(
            batch_size=8, dtypes={"image": torch.float32, "label": torch.int64}
        ):
            assert batch["image"].shape[1:] == (1, 64, 64)
            rows += batch["image"].shape[0]
            labels += batch["label"].tolist()
        val_rows = sum(
            b["label"].shape[0] for b in ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=8)
        )
        counts = {"rows": rows, "val_rows": val_rows, "label_sum": sum(labels)}
        Path(config["counts_path"]).write_text(json.dumps(counts))  # same machine: the test reads it back
        ray.train.report(counts)

    out, manifest, _ = reference
    counts_path = tmp_path / "counts.json"
    trainer = TorchTrainer(
        _count_rows_loop,
        train_loop_config={"counts_path": str(counts_path)},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
        datasets={"train": read_split(out, "train"), "val": read_split(out, "val")},
        run_config=RunConfig(name="read_split_check", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    assert result.error is None
    labels = np.concatenate(
        [read_shard(out / s["path"])["labels"] for s in manifest["splits"]["train"]["shards"]]
    )
    counts = json.loads(counts_path.read_text())
    assert counts == {"rows": 24, "val_rows": 3, "label_sum": int(labels.sum())}
