"""The training input path: device-side shuffle buffer and re-batching (deeplense_ray.train.ingest)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deeplense_ray.train.ingest import (
    Background,
    device_batches,
    rank_shards,
    read_block_rows,
    shuffle_batches,
    take_rows,
)


def _stream(sizes, width=3):
    """Batches with ids 0..N-1 in order; each image row holds its id (so rows can be traced)."""
    start = 0
    for n in sizes:
        ids = torch.arange(start, start + n)
        yield {"image": ids[:, None].repeat(1, width).float(), "label": ids}
        start += n


def _collect(batches):
    out = list(batches)
    for b in out:
        assert torch.equal(b["image"][:, 0].long(), b["label"])  # image and label rows stay together
    return out


def test_without_buffer_rebatches_in_order():
    out = _collect(shuffle_batches(_stream([1024, 1024, 100]), 256))
    assert [len(b["label"]) for b in out] == [256] * 8 + [100]
    assert torch.equal(torch.cat([b["label"] for b in out]), torch.arange(2148))


@pytest.mark.parametrize("sizes", [[1024, 1024, 1024, 37], [100] * 7, [5000]])
def test_buffer_shuffles_every_row_exactly_once(sizes):
    total = sum(sizes)
    gen = torch.Generator().manual_seed(0)
    out = _collect(shuffle_batches(_stream(sizes), 64, buffer_rows=512, generator=gen))
    ids = torch.cat([b["label"] for b in out])
    assert torch.equal(ids.sort().values, torch.arange(total))
    assert not torch.equal(ids, torch.arange(total))  # actually shuffled
    assert all(len(b["label"]) == 64 for b in out[:-1])
    # rows move at most about one buffer away from their stream position (a local shuffle, not global)
    first = out[0]["label"]
    assert int(first.max()) < 512 + 64 + max(sizes)


def test_same_seed_same_order_other_seed_other_order():
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.cat(
            [b["label"] for b in shuffle_batches(_stream([1000] * 3), 100, buffer_rows=300, generator=gen)]
        )

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_drop_last_drops_only_the_partial_batch():
    out = list(
        shuffle_batches(
            _stream([1000]), 256, buffer_rows=100, drop_last=True, generator=torch.Generator().manual_seed(0)
        )
    )
    assert [len(b["label"]) for b in out] == [256, 256, 256]
    assert len(set(torch.cat([b["label"] for b in out]).tolist())) == 768


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="batch_size"):
        list(shuffle_batches(_stream([10]), 0))
    with pytest.raises(ValueError, match="buffer_rows"):
        list(shuffle_batches(_stream([10]), 4, buffer_rows=-1))


def test_read_blocks_hold_about_64_mib_of_float32_images():
    assert read_block_rows((1, 64, 64)) == 4096  # 16 KiB per image
    assert read_block_rows((1, 150, 150)) == 1024  # 745 by bytes, raised to the fetch size
    assert read_block_rows((1, 16, 16)) == 8192  # capped


def test_rank_shards_deal_disjoint_shards_and_equal_rows():
    rows = [16, 16, 16, 7, 16]
    for seed in range(5):
        parts = [rank_shards(rows, r, 2, seed) for r in range(2)]
        a, b = parts[0][0], parts[1][0]
        assert sorted(a + b) == list(range(5)) and not set(a) & set(b)
        take = parts[0][1]
        assert take == parts[1][1] == min(sum(rows[i] for i in a), sum(rows[i] for i in b))
    # the deal changes with the seed (per epoch), so no shard always falls in the unused tail
    assert len({tuple(rank_shards(rows, 0, 2, s)[0]) for s in range(10)}) > 1
    with pytest.raises(ValueError, match="cannot feed 3 ranks"):
        rank_shards([4, 4], 0, 3, 0)
    with pytest.raises(ValueError, match="rank 2"):
        rank_shards(rows, 2, 2, 0)


def test_take_rows_cuts_the_stream():
    out = list(take_rows(_stream([100, 100, 100]), 250))
    assert [len(b["label"]) for b in out] == [100, 100, 50]
    assert torch.equal(torch.cat([b["label"] for b in out]), torch.arange(250))
    with pytest.raises(RuntimeError, match="50 rows short of the 350"):
        list(take_rows(_stream([100, 100, 100]), 350))


def test_background_starts_at_once_keeps_order_and_stops_on_close():
    import threading
    import time

    started = threading.Event()
    produced = []

    def source():
        started.set()
        for i in range(100):
            produced.append(i)
            yield i

    bg = Background(source(), depth=3)
    assert started.wait(5), "the source must start before the first next()"
    time.sleep(0.2)
    assert len(produced) <= 3 + 2  # bounded read-ahead: depth queued, one blocked in put, one in hand
    it = iter(bg)
    assert [next(it) for _ in range(10)] == list(range(10))
    it.close()  # the consumer stops early (as take_rows does): the thread must end, not block forever
    bg._thread.join(5)
    assert not bg._thread.is_alive()
    assert len(produced) < 100


def test_background_raises_the_source_error_in_the_consumer():
    def source():
        yield 1
        raise OSError("shard /x/train-00001.h5 unreadable")

    with pytest.raises(OSError, match="train-00001"):
        list(Background(source(), depth=2))


def test_background_yields_everything_then_ends():
    assert list(Background(iter(range(1000)), depth=4)) == list(range(1000))


def test_on_input_end_fires_once_the_stream_is_drawn_before_the_buffer_drains():
    class Shard:  # the DataIterator interface device_batches uses, over tensors already in memory
        def iter_torch_batches(self, batch_size, **_):
            for start in range(0, 100, batch_size):
                yield {"image": torch.zeros(min(batch_size, 100 - start), 1, 2, 2), "label": torch.arange(
                    start, min(start + batch_size, 100))}  # fmt: skip

    fired = []
    out = device_batches(
        Shard(), batch_size=8, device=torch.device("cpu"), shuffle_rows=32, fetch_rows=10,
        max_rows=90, start_now=True, on_input_end=lambda: fired.append(True),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    first = next(out)
    assert len(first["label"]) == 8
    rest = list(out)
    labels = torch.cat([first["label"]] + [b["label"] for b in rest])
    assert sorted(labels.tolist()) == list(range(90))  # max_rows cut the stream; every row once
    assert fired == [True]


@pytest.mark.parametrize("rows, batch", [(48, 8), (50, 8), (1000, 32)])
def test_memory_rows_give_the_same_global_batches_on_any_number_of_workers(rows, batch):
    """ingest='memory': step i's global batch (the union of the ranks' i-th batches) holds the same rows for
    1, 2 and 4 workers; each rank takes the same number of rows, none twice, all drawn from the epoch's
    permutation; another seed gives another order."""
    from deeplense_ray.train.ingest import memory_epoch_rows

    def global_batches(world: int, seed: int) -> list[set[int]]:
        per = batch // world
        ranks = [memory_epoch_rows(rows, r, world, per, seed, drop_last=True) for r in range(world)]
        assert len({len(x) for x in ranks}) == 1 and len(ranks[0]) % per == 0
        flat = torch.cat(ranks)
        assert len(set(flat.tolist())) == len(flat)  # no row twice in an epoch
        steps = range(0, len(ranks[0]), per)
        return [set(torch.cat([x[i : i + per] for x in ranks]).tolist()) for i in steps]

    one = global_batches(1, 7)
    assert len(one) == rows // batch and all(len(b) == batch for b in one)
    assert global_batches(2, 7) == one and global_batches(4, 7) == one
    assert global_batches(1, 8) != one
    # without drop_last every rank still takes rows // world rows (DDP ranks in step)
    last = [memory_epoch_rows(rows, r, 3, 4, 7, drop_last=False) for r in range(3)]
    assert [len(x) for x in last] == [rows // 3] * 3


def test_memory_batches_gather_float32_images_and_labels_in_row_order():
    from deeplense_ray.train.ingest import memory_batches

    images = torch.arange(10 * 4, dtype=torch.float16).reshape(10, 1, 2, 2)
    labels = torch.arange(10) % 3
    rows = torch.tensor([9, 0, 4, 7, 2])
    out = list(memory_batches(images, labels, rows, 2))
    assert [len(b["label"]) for b in out] == [2, 2, 1]
    assert all(b["image"].dtype == torch.float32 for b in out)
    assert torch.equal(torch.cat([b["label"] for b in out]), labels[rows])
    assert torch.equal(torch.cat([b["image"] for b in out]), images[rows].float())


@pytest.mark.slow
def test_load_split_reads_every_shard_as_stored(ray_session, tmp_path, monkeypatch):
    """A real (tiny, float16) dataset: load_split returns the split's rows in manifest order, float16 kept,
    equal to reading each shard file; ingest='auto' picks memory for it and split above the size limit."""
    from deeplense_ray import config as config_mod
    from deeplense_ray.config import TrainConfig, describe_dataset
    from deeplense_ray.data import DatasetConfig, build_dataset
    from deeplense_ray.data.manifest import load_manifest, shard_paths
    from deeplense_ray.data.shards import read_shard
    from deeplense_ray.train.ingest import load_split

    out = tmp_path / "d"
    build_dataset(
        DatasetConfig(preset="model_ii", preset_overrides={"num_pix": 8}, num_per_class=10, shard_size=8,
                      seed=2, dtype="float16"),
        out, progress=False,
    )  # fmt: skip
    images, labels = load_split(str(out), "train", torch.device("cpu"))
    parts = [read_shard(p, as_float32=False) for p in shard_paths(out, "train", load_manifest(out))]
    assert len(parts) > 1 and images.dtype == torch.float16
    assert torch.equal(images, torch.from_numpy(np.concatenate([p["images"] for p in parts])))
    assert torch.equal(labels, torch.from_numpy(np.concatenate([p["labels"] for p in parts])))

    info = describe_dataset(out)
    assert info.image_dtype == "float16"
    cfg = TrainConfig(model="ResNetSimple", data_dir=str(out))
    assert cfg.ingest == "auto" and cfg.ingest_mode(info) == "memory"
    nbytes = info.split_rows["train"] * 8 * 8 * 2
    monkeypatch.setattr(config_mod, "MEMORY_INGEST_MAX_MB", (nbytes - 1) / 2**20)
    assert cfg.ingest_mode(info) == "split"
    monkeypatch.setattr(config_mod, "MEMORY_INGEST_MAX_MB", nbytes / 2**20)
    assert cfg.ingest_mode(info) == "memory"
    for mode in ("split", "per_rank", "memory"):
        assert TrainConfig(model="ResNetSimple", data_dir=str(out), ingest=mode).ingest_mode(info) == mode
