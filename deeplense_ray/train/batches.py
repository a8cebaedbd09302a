"""A rank's training input: the batches of each epoch on its device, from a dataset split or its own renders.

:class:`TrainBatches` picks one of four inputs by the loop config's ``ingest_mode`` (``split``, ``per_rank``,
``memory`` or ``simulate``), seeds every epoch's shuffle from ``(seed, epoch, rank)`` and starts the next
epoch's Ray Data stream as soon as this epoch's input is drawn (train/ingest.py has the readers).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from deeplense_ray.train.ingest import (
    device_batches,
    load_split,
    memory_batches,
    memory_epoch_rows,
    rank_shards,
)
from deeplense_ray.train.seeding import derive_seed
from deeplense_ray.train.worker import WorkerContext


class TrainBatches:
    """This rank's training batches of each epoch on its device, from one of four inputs: ``split`` (its
    share of the ``train`` stream that Ray Data splits across the ranks), ``per_rank`` (its own Ray Data
    execution over the shards dealt to it this epoch, :func:`~deeplense_ray.train.ingest.rank_shards`),
    ``memory`` (the whole split read into its device memory once, its rows of a global permutation per
    epoch; what ``ingest="auto"`` picks for small splits) or ``simulate`` (images it renders itself, seeded
    by (seed, epoch, rank, chunk), train/online.py).

    A Ray Data stream is pulled on a background thread from its creation on. When an epoch's input is all
    drawn (its last rows still in the shuffle buffer and prefetch queue), the next epoch's stream is started:
    the Ray Data execution's start-up, which is most of a second, then overlaps the end of this epoch,
    validation and the checkpoint instead of stalling the next training pass. (With ``ingest="split"`` the
    next epoch of ``streaming_split`` can only begin once every rank has drawn all of this one, which is this
    point.)"""

    def __init__(self, ctx: WorkerContext) -> None:
        config = ctx.config
        self.ctx = ctx
        self.mode = config.ingest_mode  # split | per_rank | memory | simulate (TrainConfig.ingest_mode)
        self.per_rank = self.mode == "per_rank"
        self.shard = ctx.session.dataset_shard("train") if self.mode == "split" else None
        self._memory: tuple[torch.Tensor, ...] | None = None  # ingest="memory": loaded once
        self.shard_rows = list(config.train_shard_rows)
        # no 1-row last batch (BatchNorm); less than one batch lost per epoch
        self.drop_last = config.train_rows // ctx.world >= ctx.batch_size
        self.shuffle = config.train.shuffle_buffer
        self._started: dict[int, Iterator[dict[str, torch.Tensor]]] = {}  # epoch -> its batches, streaming

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``epoch`` ({"image", "label"} on the device): the stream started ahead, if any."""
        return self._started.pop(epoch, None) or self._stream(epoch)

    def _stream(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        ctx, config, train = self.ctx, self.ctx.config, self.ctx.config.train
        if ctx.simulate:
            from deeplense_ray.train.online import online_batches, steps_per_epoch

            return online_batches(
                config.sim_preset,
                seed=ctx.seed,
                epoch=epoch,
                rank=ctx.rank,
                num_batches=steps_per_epoch(train.images_per_epoch, train.batch_size),
                batch_size=ctx.batch_size,
                device=ctx.device,
                chunk_batches=train.sim_chunk_batches,
                prefetch=train.sim_prefetch,
                targets=config.targets_config if ctx.inference else None,
            )

        if self.mode == "memory":
            return self._memory_epoch(epoch)

        def start_next() -> None:
            if epoch < ctx.epochs:
                self._started[epoch + 1] = self._stream(epoch + 1)

        stream, max_rows, drop = self.shard, None, self.drop_last
        if self.per_rank:  # this rank's own Ray Data execution over the shards dealt to it this epoch
            from deeplense_ray.data import read_split

            order_seed = derive_seed(ctx.seed, epoch, 3)
            mine, max_rows = rank_shards(self.shard_rows, ctx.rank, ctx.world, order_seed)
            drop = max_rows >= ctx.batch_size  # this epoch's rows per rank (equal on every rank)
            stream = read_split(
                train.data_dir, "train", image_dtype="stored", block_rows=config.train_block_rows, shards=mine
            ).iterator()
        shuffle_gen = torch.Generator(device=ctx.device).manual_seed(
            derive_seed(ctx.seed, epoch, ctx.rank, 2)
        )
        return device_batches(
            stream,
            max_rows=max_rows,
            batch_size=ctx.batch_size,
            device=ctx.device,
            shuffle_rows=self.shuffle,
            generator=shuffle_gen,
            drop_last=drop,
            start_now=True,
            on_input_end=start_next,
        )

    def _memory_epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """``ingest="memory"``: this rank's rows of the epoch's global permutation, from the split it read
        into device memory at its first epoch (train/ingest.py)."""
        ctx, data_dir = self.ctx, self.ctx.config.train.data_dir
        if self._memory is None:
            if ctx.inference:  # the task's classes only, with their standardised targets
                from deeplense_ray.train.regression import load_memory_split

                self._memory = load_memory_split(data_dir, "train", ctx.device, ctx.config.targets_config)
                self.drop_last = len(self._memory[1]) // ctx.world >= ctx.batch_size
            else:
                self._memory = load_split(data_dir, "train", ctx.device)
        images, labels = self._memory[:2]
        rows = memory_epoch_rows(
            len(labels), ctx.rank, ctx.world, ctx.batch_size, derive_seed(ctx.seed, epoch, 5), self.drop_last
        )
        if ctx.inference:
            return memory_batches(images, labels, rows, ctx.batch_size, targets=self._memory[2])
        return memory_batches(images, labels, rows, ctx.batch_size)
