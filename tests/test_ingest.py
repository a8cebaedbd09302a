"""The training input path: device-side shuffle buffer and re-batching (deeplense_ray.train.ingest)."""

from __future__ import annotations

import pytest
import torch

from deeplense_ray.train.ingest import read_block_rows, shuffle_batches


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
