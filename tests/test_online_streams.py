"""Online streams: the training images each rank renders are the stream of (seed, epoch, rank) that the
renderer gives when asked directly, and a 2-rank ``--simulate`` run trains on exactly those images, epoch by
epoch, and evaluates val/test taken from ``--data`` on exactly the dataset's rows. Real Ray runtime, renderer,
HDF5 data and SQLite MLflow store."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from deeplense_ray.config import TrainConfig
from deeplense_ray.sim import simulate
from deeplense_ray.train.online import TRAIN_STREAM, online_batches, resolve_sim_preset, steps_per_epoch
from deeplense_ray.train.seeding import derive_seed, input_digest

CPU = torch.device("cpu")


def _independent_stream(preset, *, seed, epoch, rank, num_batches, batch_size, chunk_batches):
    """The documented stream, from the renderer: chunk k = simulate(preset, n, derive_seed(seed, TRAIN_STREAM,
    epoch, rank, k)), its rows permuted by a generator seeded with that seed, cut into batches."""
    out = []
    for first in range(0, num_batches, chunk_batches):
        n = min(chunk_batches, num_batches - first) * batch_size
        chunk_seed = derive_seed(seed, TRAIN_STREAM, epoch, rank, first // chunk_batches)
        res = simulate(preset, n, chunk_seed, "cpu")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(chunk_seed))
        x, y = res.images[perm], res.labels[perm].long()
        out += [input_digest(x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, n, batch_size)]
    return out


def _stream(preset, **kw):
    return [input_digest(b["image"], b["label"]) for b in online_batches(preset, device=CPU, **kw)]


def test_online_batches_are_the_renderers_stream_of_seed_epoch_rank():
    preset = resolve_sim_preset("deeplense_model_i", {"num_pix": 16})
    for epoch, rank in ((1, 0), (2, 1)):
        kw = dict(seed=5, epoch=epoch, rank=rank, num_batches=3, batch_size=4, chunk_batches=2)
        expected = _independent_stream(preset, **kw)
        assert _stream(preset, **kw, prefetch=True) == expected == _stream(preset, **kw, prefetch=False)
    assert len(set(expected)) == 3


def _dataset_rows(data_dir, split: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Per-row digests, images and labels of a split, read from its HDF5 shards here (shard order)."""
    from deeplense_ray.data.manifest import load_manifest, shard_paths

    digests, images, labels = [], [], []
    for path in shard_paths(data_dir, split, load_manifest(data_dir)):
        with h5py.File(path, "r") as f:
            x = torch.from_numpy(np.asarray(f["images"][:], dtype=np.float32))
            y = torch.from_numpy(np.asarray(f["labels"][:], dtype=np.int64))
        digests += [input_digest(x[i : i + 1], y[i : i + 1]) for i in range(len(y))]
        images.append(x)
        labels.append(y)
    return digests, torch.cat(images), torch.cat(labels)


@pytest.mark.slow
def test_two_ranks_train_on_their_streams_and_evaluate_the_datasets_rows(tiny_dataset, tmp_path):
    from deeplense_ray.train import LoopHooks, load_model_from_checkpoint, run_training

    record = tmp_path / "inputs"
    cfg = TrainConfig(
        model="ResNetSimple", model_overrides={"width": 8}, simulate="model_ii",
        sim_overrides={"num_pix": 16}, data_dir=str(tiny_dataset), images_per_epoch=32, sim_chunk_batches=2,
        epochs=2, batch_size=8,
        num_workers=2, cpus_per_worker=1, seed=9, storage_path=str(tmp_path / "ray"),
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="online-streams",
    )  # fmt: skip
    result = run_training(cfg, runner="trainer", hooks=LoopHooks(record_inputs=str(record)))

    preset = resolve_sim_preset("model_ii", {"num_pix": 16})
    for epoch in (1, 2):
        for rank in (0, 1):
            seen = json.loads((record / f"train_e{epoch}_r{rank}.json").read_text())
            again = _stream(preset, seed=9, epoch=epoch, rank=rank, num_batches=steps_per_epoch(32, 8),
                            batch_size=4, chunk_batches=2, prefetch=False)  # fmt: skip
            assert seen == again, (epoch, rank)
    assert [h["train_images"] for h in result.history] == [32, 32]

    # val: the two ranks together evaluated every row of the dataset's val split once, bytes and labels
    val_rows, _, _ = _dataset_rows(tiny_dataset, "val")
    by_shard: dict[str, list[str]] = {}
    for rank in (0, 1):
        for shard, rows in json.loads((record / f"val_r{rank}.json").read_text()).items():
            assert shard not in by_shard  # each shard on one rank
            by_shard[shard] = rows
    assert [r for s in sorted(by_shard, key=int) for r in by_shard[s]] == val_rows
    assert all(h["val_n"] == len(val_rows) for h in result.history)

    # test: the metrics of the best checkpoint on the dataset's test rows, read and evaluated here
    _, x, y = _dataset_rows(tiny_dataset, "test")
    model = load_model_from_checkpoint(result.best_checkpoint).eval()
    with torch.no_grad():
        logits = model(x).double()
    assert result.test_metrics["n"] == len(y)
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    assert result.test_metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert result.test_metrics["accuracy"] == pytest.approx(float((logits.argmax(1) == y).double().mean()))
