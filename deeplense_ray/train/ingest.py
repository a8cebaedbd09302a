"""The training input path: a rank's Ray Data stream -> shuffled batches on the rank's device.

Ray Data reads the HDF5 shards (``deeplense_ray.data.read_split``) and ``streaming_split`` hands each rank its
share. What a rank does with its share decides how fast a GPU is fed, because the rank's Python thread also
launches the model's kernels (one GIL). So per rank:

- Ray Data hands over *large* host batches (``FETCH_ROWS`` rows, a whole read block), pinned when the device
  is a GPU, prefetched ``PREFETCH_BATCHES`` ahead on its background thread: few Python round trips per image.
- Images travel as stored (a float16 dataset stays float16 until it is on the device: half the bytes) and
  are converted to float32 on the device.
- The shuffle buffer lives on the device (:func:`shuffle_batches`): rows are permuted with one ``randperm``
  and one gather per buffer refill, instead of Ray Data's host-side local shuffle (a numpy gather per batch,
  on the CPU, holding the GIL).

Reproducibility: the permutation comes from a torch generator seeded per (seed, epoch, rank); which rows a
rank receives is decided by Ray Data's streaming split, as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

#: Rows per host batch handed over by Ray Data.
FETCH_ROWS = 1024
#: Host batches Ray Data prepares ahead of the training step.
PREFETCH_BATCHES = 4
#: Bytes of float32 images per Ray Data read block of the training split (see :func:`read_block_rows`).
READ_BLOCK_BYTES = 64 << 20


def read_block_rows(image_shape: tuple[int, ...]) -> int:
    """Rows per Ray Data read block of the training split: ~64 MiB of float32 images, 1024 to 8192 rows.

    Fewer, bigger blocks cost Ray Data less per image: on 2x H200, 64x64 images in 4096-row blocks reached
    43.2k img/s against 39.6k in 1024-row blocks (``benchmarks/train_ingest.py``).
    """
    per_image = 4 * int(np.prod(image_shape))
    return int(min(8192, max(FETCH_ROWS, READ_BLOCK_BYTES // max(per_image, 1))))


def shuffle_batches(
    batches: Iterable[Mapping[str, torch.Tensor]],
    batch_size: int,
    *,
    buffer_rows: int = 0,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Re-batch a stream of ``{"image", "label"}`` batches to ``batch_size`` rows, shuffling in a buffer.

    With ``buffer_rows`` > 0 (a local shuffle buffer, as Ray Data's ``local_shuffle_buffer_size``): rows
    are collected until the buffer holds ``buffer_rows + batch_size``; then the buffer is permuted
    (``torch.randperm`` with ``generator``, on the tensors' device) and full batches are emitted until
    ``buffer_rows`` remain. At the end the rest is permuted and emitted; a last partial batch is kept unless
    ``drop_last``. With ``buffer_rows`` = 0 the order is kept. Every input row comes out exactly once
    (except a dropped partial last batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if buffer_rows < 0:
        raise ValueError(f"buffer_rows must be >= 0, got {buffer_rows}")
    parts: list[dict[str, torch.Tensor]] = []
    held = 0
    threshold = buffer_rows + batch_size

    def merged() -> dict[str, torch.Tensor]:
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def permuted(buf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = len(buf["label"])
        dev = buf["label"].device
        gen_dev = generator.device if generator is not None else dev
        perm = torch.randperm(n, generator=generator, device=gen_dev).to(dev)
        return {k: v[perm] for k, v in buf.items()}

    for batch in batches:
        parts.append({k: batch[k] for k in ("image", "label")})
        held += len(batch["label"])
        if held < threshold:
            continue
        buf = merged()
        if buffer_rows:
            buf = permuted(buf)
        n_out = (held - buffer_rows) // batch_size * batch_size
        for start in range(0, n_out, batch_size):
            yield {k: v[start : start + batch_size] for k, v in buf.items()}
        rest = {k: v[n_out:] for k, v in buf.items()}
        held = len(rest["label"])
        parts = [rest] if held else []
    if held:
        buf = merged()
        if buffer_rows:
            buf = permuted(buf)
        stop = held // batch_size * batch_size if drop_last else held
        for start in range(0, stop, batch_size):
            yield {k: v[start : start + batch_size] for k, v in buf.items()}


def device_batches(
    shard: Any,
    *,
    batch_size: int,
    device: torch.device,
    shuffle_rows: int = 0,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    fetch_rows: int = FETCH_ROWS,
    prefetch_batches: int = PREFETCH_BATCHES,
) -> Iterator[dict[str, torch.Tensor]]:
    """A rank's training batches from a Ray Data ``DataIterator`` (``ray.train.get_dataset_shard``).

    Yields ``{"image": float32 [B,1,H,W], "label": int64 [B]}`` on ``device``, shuffled on the device with
    a buffer of ``shuffle_rows`` rows (0 = stream order). See the module docstring for why.
    """
    cuda = device.type == "cuda"
    host = shard.iter_torch_batches(
        batch_size=max(int(fetch_rows), int(batch_size)),
        device=device,
        pin_memory=cuda,
        prefetch_batches=int(prefetch_batches),
        drop_last=False,
    )
    on_device = ({"image": b["image"].to(torch.float32), "label": b["label"].to(torch.int64)} for b in host)
    yield from shuffle_batches(
        on_device, int(batch_size), buffer_rows=int(shuffle_rows), generator=generator, drop_last=drop_last
    )
