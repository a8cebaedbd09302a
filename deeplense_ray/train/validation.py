"""Validation: the whole val split evaluated every epoch, each row counted once whatever the number of ranks.

:class:`Validator` deals the val shards to the ranks (:func:`~deeplense_ray.train.ingest.deal_shards`),
reads or renders this rank's share, predicts it and gathers every rank's predictions back in shard order
(:func:`merge_shard_predictions`), so every rank computes the metrics a single process would.
:func:`validate_epoch` first recalibrates BatchNorm (train/batchnorm.py, averaged over the ranks) and gives
every rank rank 0's buffers, so the ranks evaluate exactly the weights rank 0 checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deeplense_ray.train.batchnorm import recalibrate_batch_norm
from deeplense_ray.train.distributed import average_batch_norm_stats, gather, sync_buffers
from deeplense_ray.train.ingest import deal_shards, shard_batches
from deeplense_ray.train.metrics import classification_metrics
from deeplense_ray.train.modules import unwrap
from deeplense_ray.train.seeding import row_digests
from deeplense_ray.train.steps import predict_batches, probabilities
from deeplense_ray.train.worker import Training, WorkerContext


class Validator:
    """The whole val split, evaluated every epoch with each row counted once whatever the number of ranks.

    The val shards are dealt to the ranks (:func:`~deeplense_ray.train.ingest.deal_shards`); a rank reads its
    shards from HDF5 in row order and keeps them in host memory after the first epoch if its share is small
    (at most the loop config's ``val_cache_mb`` MiB of float32 images). Online (``simulate``) without a
    dataset, the fixed val set's chunks are the shards, each rendered once on this rank's device and kept.
    The predictions are gathered and put back in shard order, so every rank computes the whole-split
    metrics."""

    def __init__(self, ctx: WorkerContext) -> None:
        config, train = ctx.config, ctx.config.train
        self.ctx = ctx
        self.batch_size = config.eval_batch_size
        self._cache: dict[int, list[dict[str, torch.Tensor]]] | None = None
        self.paths: list[str] = []
        if ctx.simulate and not train.data_dir:
            from deeplense_ray.train.online import eval_batches, eval_chunks

            self.rows = eval_chunks(train.val_size)
            self.mine = deal_shards(self.rows, ctx.rank, ctx.world)
            self._cache = eval_batches(
                config.sim_preset, "val", seed=ctx.seed, size=train.val_size, positions=self.mine,
                device=ctx.device, batch_size=self.batch_size,
                targets=config.targets_config if ctx.inference else None,
            )  # fmt: skip
        else:
            from deeplense_ray.data.manifest import load_manifest, shard_paths

            manifest = load_manifest(train.data_dir)
            self.rows = [int(sh["rows"]) for sh in manifest["splits"]["val"]["shards"]]
            self.paths = [str(p) for p in shard_paths(train.data_dir, "val", manifest)]
            self.mine = deal_shards(self.rows, ctx.rank, ctx.world)
        c, h, w = config.image_shape
        val_bytes = sum(self.rows[i] for i in self.mine) * 4 * c * h * w
        self.keep_in_memory = 0 < val_bytes <= config.val_cache_mb * 2**20

    def batches(self) -> Mapping[int, Iterable[dict[str, torch.Tensor]]]:
        """{shard position: its batches} of this rank's shards (kept in memory if ``keep_in_memory``)."""
        if self._cache is not None:
            return self._cache
        if self.ctx.inference:  # the task's rows, with their targets
            from deeplense_ray.train.regression import shard_target_batches

            targets = self.ctx.config.targets_config
            batches = {
                i: shard_target_batches(self.paths[i], self.rows[i], self.batch_size, targets)
                for i in self.mine
            }
        else:
            batches = {i: shard_batches(self.paths[i], self.rows[i], self.batch_size) for i in self.mine}
        if self.keep_in_memory:
            self._cache = {i: list(b) for i, b in batches.items()}
            return self._cache
        return batches

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """:func:`classification_metrics` of ``model`` (unwrapped) on the whole split (equal on all ranks);
        task 'inference': train/regression.py's metrics (NLL, RMSE, bias, coverage) instead."""
        ctx = self.ctx
        record = ctx.hooks.record_inputs
        batches = self.batches()
        if ctx.inference:
            from deeplense_ray.train.regression import metrics_of, predict_outputs

            mine = {
                i: predict_outputs(model, b, device=ctx.device, amp_dtype=ctx.amp_dtype)
                for i, b in batches.items()
            }
            outputs, truth = merge_shard_predictions(gather(mine, ctx.world), self.rows, every_row=False)
            return metrics_of(outputs, truth, ctx.config.targets_config)
        if record:  # per shard, one digest per row: what this rank evaluated
            from deeplense_ray.io import atomic_write_json

            batches = {i: list(b) for i, b in batches.items()}
            rows = {str(i): row_digests(b) for i, b in batches.items()}
            atomic_write_json(Path(record) / f"val_r{ctx.rank}.json", rows)
        mine = {
            i: predict_batches(model, b, device=ctx.device, amp_dtype=ctx.amp_dtype)
            for i, b in batches.items()
        }
        logits, labels = merge_shard_predictions(gather(mine, ctx.world), self.rows)
        return classification_metrics(labels, probabilities(logits), list(ctx.config.class_names))


def validate_epoch(
    ctx: WorkerContext, training: Training, validator: Validator
) -> tuple[dict[str, Any], dict[str, float]]:
    """Precise BatchNorm (each rank on its recent inputs, averaged over the ranks), rank 0's buffers to every
    rank (so every rank evaluates exactly the weights rank 0 checkpoints), then the whole val split. Returns
    its metrics and {"val_seconds", "bn_recal_layers" (0: none recalibrated), "bn_recal_s"}."""
    t_val = time.perf_counter()
    model = unwrap(training.model)
    bn_layers = 0
    if training.keep is not None and len(training.keep):
        bn_layers = recalibrate_batch_norm(model, training.keep, device=ctx.device, amp_dtype=ctx.amp_dtype)
        average_batch_norm_stats(model)
        training.keep.clear()
    bn_seconds = time.perf_counter() - t_val
    sync_buffers(model)
    val = validator.evaluate(model)
    times = {
        "val_seconds": time.perf_counter() - t_val,
        "bn_recal_layers": bn_layers,
        "bn_recal_s": bn_seconds,
    }
    return val, times


def merge_shard_predictions(
    parts: Iterable[Mapping[int, tuple[np.ndarray, np.ndarray]]],
    shard_rows: Sequence[int],
    *,
    every_row: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The ranks' predictions ({shard position: (outputs, truths)} each) as one split in shard order.

    RuntimeError if a shard was evaluated by two ranks or by none, or (``every_row``) not for all of its
    rows: every row must count exactly once. Task 'inference' passes ``every_row=False``: a shard then holds
    only the rows of the task's classes (RuntimeError when no shard holds any).
    """
    merged: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for part in parts:
        for pos, pred in part.items():
            if pos in merged:
                raise RuntimeError(f"val shard {pos} was evaluated by two ranks")
            merged[pos] = pred
    missing = [i for i in range(len(shard_rows)) if i not in merged]
    short = [i for i, (_, y) in merged.items() if i < len(shard_rows) and len(y) != int(shard_rows[i])]
    if missing or (every_row and short) or len(merged) != len(shard_rows):
        raise RuntimeError(
            f"val predictions do not cover the split once: shards {missing} missing, shards "
            f"{short if every_row else []} with fewer or more rows than the manifest's {list(shard_rows)}"
        )
    order = [merged[i] for i in range(len(shard_rows)) if len(merged[i][1])]
    if not order:
        raise RuntimeError("the val split holds no image" + ("" if every_row else " of the task's classes"))
    return np.concatenate([p[0] for p in order]), np.concatenate([p[1] for p in order])
