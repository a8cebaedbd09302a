"""The training input path: a rank's Ray Data stream -> shuffled batches on the rank's device.

Ray Data reads the HDF5 shards (``deeplense_ray.data.read_split``) and ``streaming_split`` hands each rank its
share. What a rank does with its share decides how fast a GPU is fed, because the rank's Python thread also
launches the model's kernels (one GIL). So per rank:

- Ray Data reads ~64 MiB blocks (:func:`read_block_rows`) and hands over *large* host batches (``FETCH_ROWS``
  rows), pinned when the device is a GPU, prefetched ``PREFETCH_BATCHES`` ahead on its background thread:
  few Python round trips per image.
- Images travel as stored (a float16 dataset stays float16 until it is on the device: half the bytes) and
  are converted to float32 on the device.
- The shuffle buffer lives on the device (:func:`shuffle_batches`): rows are permuted with one ``randperm``
  and one gather per buffer refill, instead of Ray Data's host-side local shuffle (a numpy gather per batch,
  on the CPU, holding the GIL).

Two ways to give ranks their share (``TrainConfig.ingest``):

- ``split`` (default): one Ray Data execution of the train split, split across ranks by Ray Train
  (``streaming_split``); which rows a rank receives is decided by Ray Data as blocks become ready.
- ``per_rank``: every rank runs its own Ray Data execution over its own shards (:func:`rank_shards`: the
  shards are dealt round-robin from an order seeded per epoch; every rank stops after the same number of
  rows, so DDP ranks take the same number of steps; up to one shard's worth of rows per rank goes unused in
  an epoch, and a different one the next).

Both modes deliver far more than training takes: on 2x H200 (``benchmarks/train_ingest.py``, 240k 64x64
float32 images, no model) one rank got 126k img/s with ``split`` and 132k with ``per_rank``; two ranks
143k and 102k in total. So ``split`` is what large splits use.

A third way, for small splits: ``memory`` (:func:`load_split`, :func:`memory_epoch_rows`): every rank reads
the whole train split into its device memory once and draws its rows of one global permutation per epoch.
No Ray Data at all: a Ray Data execution costs a coordinator actor and read tasks, each a process that
imports torch, and on the GPU machine the first batch of a 48k-image ViT job came 20.9 s after its epoch
began (a study of 15 small runs at once had over 100 worker processes starting). ``ingest="auto"`` (the
default) picks ``memory`` up to ``MEMORY_INGEST_MAX_MB`` (2 GiB as stored) and ``split`` above.

Start-up: a Ray Data execution takes 0.2-0.7 s to its first batch, every epoch. The training loop hides it:
each rank pulls its stream on a background thread (:class:`Background`) and starts the next epoch's stream
as soon as the current one is all drawn (``device_batches(on_input_end=...)``).

Reproducibility: the permutation comes from a torch generator seeded per (seed, epoch, rank); with
``memory`` per (seed, epoch), on the CPU, so a global batch holds the same images on any number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


def rank_shards(shard_rows: Sequence[int], rank: int, world: int, seed: int) -> tuple[list[int], int]:
    """This rank's shards for one epoch (``ingest="per_rank"``) and the rows every rank takes.

    The shard indices are permuted with ``seed`` (vary it per epoch) and dealt round-robin: rank ``r`` gets
    ``order[r::world]``. Every rank takes the same number of rows, the smallest total of any rank, so that
    DDP ranks run the same number of steps. ValueError if a rank would get no shard.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, {world})")
    if len(shard_rows) < world:
        raise ValueError(
            f"{len(shard_rows)} shard(s) cannot feed {world} ranks (one shard per rank at least)"
        )
    order = np.random.default_rng(seed).permutation(len(shard_rows))
    totals = [int(sum(shard_rows[i] for i in order[r::world])) for r in range(world)]
    return [int(i) for i in order[rank::world]], min(totals)


def deal_shards(shard_rows: Sequence[int], rank: int, world: int) -> list[int]:
    """The shards (positions in the manifest's list) that ``rank`` evaluates: each shard goes to exactly one
    rank, so every validation row is counted once whatever the number of ranks.

    Largest shard first, each to the rank holding the fewest rows so far (ties: the lower shard position,
    the lower rank), so ranks get about equal rows; a pure function of the shard sizes and ``world``. A rank
    gets no shard when there are fewer shards than ranks. Returns the positions in ascending order.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, {world})")
    load = [0] * world
    mine = []
    for i in sorted(range(len(shard_rows)), key=lambda i: (-int(shard_rows[i]), i)):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += int(shard_rows[i])
        if owner == rank:
            mine.append(i)
    return sorted(mine)


def shard_batches(path: str, rows: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """``{"image": float32 [B,1,H,W], "label": int64 [B]}`` batches of one shard file, in row order (host
    memory; each batch one HDF5 read)."""
    from deeplense_ray.data.shards import read_shard

    for start in range(0, int(rows), int(batch_size)):
        part = read_shard(path, start=start, stop=min(start + int(batch_size), int(rows)))
        yield {"image": torch.from_numpy(part["images"]), "label": torch.from_numpy(part["labels"])}


def take_rows(batches: Iterable[Mapping[str, torch.Tensor]], rows: int) -> Iterator[dict[str, torch.Tensor]]:
    """Exactly the first ``rows`` rows of a stream of ``{"image", "label"}`` batches (the last one cut).

    RuntimeError if the stream ends sooner: with ``ingest="per_rank"`` every DDP rank must take the same
    number of steps, and a rank that stopped early would leave the others waiting in a collective.
    """
    left = int(rows)
    for batch in batches:
        n = len(batch["label"])
        yield {k: batch[k][:left] for k in ("image", "label")} if n > left else batch
        left -= n
        if left <= 0:
            return
    if left > 0:
        raise RuntimeError(
            f"the training stream ended {left} rows short of the {rows} rows this rank must take"
        )


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


def _then(items: Iterable[Any], done: Callable[[], None]) -> Iterator[Any]:
    """``items``, then ``done()`` once they are exhausted (not if the consumer stops early)."""
    yield from items
    done()


class Background:
    """Iterate ``iterable`` on a daemon thread from construction on, ``depth`` items ahead.

    Lets a rank start the next epoch's Ray Data execution (0.2-0.7 s to its first batch) while it finishes,
    validates and checkpoints the current one. An exception in the thread is raised in the consumer;
    :meth:`close` (also when the consuming generator is closed or collected) stops the thread at its next
    item.
    """

    _DONE = object()

    def __init__(self, iterable: Iterable[Any], depth: int = PREFETCH_BATCHES):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterable,), name="dlr-ingest", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterable: Iterable[Any]) -> None:
        try:
            for item in iterable:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)
            return
        self._put(self._DONE)

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                item = self._queue.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()


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
    max_rows: int | None = None,
    start_now: bool = False,
    on_input_end: Callable[[], None] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """A rank's training batches from a Ray Data ``DataIterator`` (``ray.train.get_dataset_shard``, or
    ``Dataset.iterator()`` of the rank's own stream).

    Yields ``{"image": float32 [B,1,H,W], "label": int64 [B]}`` on ``device``, shuffled on the device with
    a buffer of ``shuffle_rows`` rows (0 = stream order); at most ``max_rows`` rows if given. See the
    module docstring for why. ``start_now``: start the Ray Data execution at once and pull the stream on a
    background thread (:class:`Background`), instead of at the first ``next()``. ``on_input_end``: called
    once no more input will be drawn (the stream is exhausted, or ``max_rows`` are taken), on the thread
    that pulls the stream, while the last rows still wait in the shuffle buffer and the prefetch queue: the
    training loop starts the next epoch's stream there, so its start-up overlaps the end of this epoch.
    """
    cuda = device.type == "cuda"
    host: Iterable[Any] = shard.iter_torch_batches(
        batch_size=max(int(fetch_rows), int(batch_size)),
        device=device,
        pin_memory=cuda,
        prefetch_batches=int(prefetch_batches),
        drop_last=False,
    )
    on_device: Iterable[dict[str, torch.Tensor]] = (
        {"image": b["image"].to(torch.float32), "label": b["label"].to(torch.int64)} for b in host
    )
    if max_rows is not None:
        on_device = take_rows(on_device, max_rows)
    if on_input_end is not None:
        on_device = _then(on_device, on_input_end)
    if start_now:
        on_device = Background(on_device, depth=prefetch_batches)
    return shuffle_batches(
        on_device, int(batch_size), buffer_rows=int(shuffle_rows), generator=generator, drop_last=drop_last
    )


def load_split(data_dir: str, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``ingest="memory"``: every shard of ``split`` read once, in manifest order, onto ``device``.

    Returns (images as stored, e.g. float16 stays float16, [N, C, H, W]; labels int64 [N]). No Ray Data:
    for a small split this replaces a Ray Data execution per epoch (a coordinator actor and read tasks per
    run, each a process to start) by one read of a few seconds at most. ShardReadError names a bad file.
    """
    from deeplense_ray.data.manifest import load_manifest, shard_paths
    from deeplense_ray.data.shards import read_shard

    manifest = load_manifest(data_dir)
    images, labels = [], []
    for path in shard_paths(data_dir, split, manifest):
        part = read_shard(path, as_float32=False)
        images.append(torch.from_numpy(part["images"]).to(device))
        labels.append(torch.from_numpy(part["labels"]).to(device))
    return torch.cat(images), torch.cat(labels)


def memory_epoch_rows(
    rows: int, rank: int, world: int, batch_size: int, seed: int, drop_last: bool
) -> torch.Tensor:
    """Row indices (CPU int64) a rank trains on in one epoch with ``ingest="memory"``.

    One permutation of all ``rows`` from a CPU generator seeded with ``seed`` (the same on every rank and
    device type); rank r takes rows r, r + world, r + 2 world, ... of it, every rank the same number
    (``rows // world``, cut to whole batches of ``batch_size`` with ``drop_last``). So step i's global batch,
    the union of the ranks' i-th batches, is rows [i B, (i + 1) B) of the permutation (B = world x
    batch_size): the same images whatever the number of workers.
    """
    perm = torch.randperm(int(rows), generator=torch.Generator().manual_seed(int(seed)))
    per_rank = int(rows) // int(world)
    if drop_last:
        per_rank -= per_rank % int(batch_size)
    return perm[int(rank) :: int(world)][:per_rank]


def memory_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    batch_size: int,
    targets: torch.Tensor | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """``{"image": float32 [B, C, H, W], "label": int64 [B]}`` batches of ``images[rows]`` in ``rows``' order,
    gathered on the tensors' device; with ``targets`` [N, T] (task 'inference') also "target"."""
    idx_all = rows.to(images.device)
    for start in range(0, len(idx_all), int(batch_size)):
        idx = idx_all[start : start + int(batch_size)]
        batch = {"image": images.index_select(0, idx).to(torch.float32), "label": labels.index_select(0, idx)}
        if targets is not None:
            batch["target"] = targets.index_select(0, idx)
        yield batch
