"""The training input path: device-side shuffle buffer and re-batching (deeplense_ray.train.ingest)."""

from __future__ import annotations

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
