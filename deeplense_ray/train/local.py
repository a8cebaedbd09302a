"""A one-worker training run in this process: the loop without a Ray Train controller or worker processes.

A Ray Train run starts two processes of its own, the Train controller and the worker, each importing torch
and this package before the first batch: on the 2-core CPU 13-17 s of a search trial's start, on one H200
40-54 s (benchmarks/results/demo_*.json). With one worker nothing needs them: a search trial's Tune actor
(tune/trial.py, ``trial_runner='actor'``) or a study's task (study/runner.py) runs the training loop
(:func:`deeplense_ray.train.loop.train_loop_per_worker`) itself, on the CPUs and GPU share Ray gave it, and
Ray reuses that process for the next trial or run, so torch (and CUDA) are already up.

:class:`LocalRunSession` gives the loop what a one-worker Ray Train run would: rank 0 of 1, the device Ray
assigned to this process, the model unwrapped, the run's latest checkpoint to resume from (whichever runner
wrote it: train/checkpoint.py), and per epoch a checkpoint in ``<run_dir>/checkpoint_epoch_NNNNN`` (written
under a temporary name, then renamed; of its own, the ``num_to_keep`` best by the score metric and the
latest are kept). :func:`fit_here` runs the loop and returns
what ``TorchTrainer.fit()`` returns that :func:`~deeplense_ray.train.run.run_training` reads (the latest
checkpoint, the kept ones with their metrics). The ``split`` input (Ray Data's ``streaming_split``, a Train
feature) becomes ``per_rank``: the run reads the split's shards itself, as its only rank.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deeplense_ray.train.checkpoint import (
    LOCAL_CHECKPOINT_PREFIX,
    checkpoint_name,
    latest_checkpoint,
    ranked_checkpoints,
    run_checkpoints,
)
from deeplense_ray.train.session import LoopSession
from deeplense_ray.train.worker_config import LoopConfig, LoopHooks


class LocalRunSession(LoopSession):
    """The loop as the only rank of a run, in this process (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike[str], *, metric: str, mode: str, num_to_keep: int) -> None:
        self.run_dir = Path(run_dir)
        self.metric, self.mode, self.num_to_keep = metric, mode, max(1, int(num_to_keep))
        self.device = torch.device("cpu")
        self.last_metrics: dict[str, Any] = {}

    def placement(self) -> tuple[int, int, torch.device]:
        import ray

        # in a Ray actor or task, Ray makes its GPU share the only visible device (CUDA_VISIBLE_DEVICES), or
        # hides every GPU when it holds none
        if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available():
            self.device = torch.device("cuda", 0)
        return 0, 1, self.device

    def checkpoint_dir(self):
        latest = self.latest()
        return nullcontext(latest)

    def latest(self) -> Path | None:
        """The run's checkpoint of the highest epoch, whichever runner wrote it (a restored run resumes from
        it), or None."""
        return latest_checkpoint(self.run_dir)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def dataset_shard(self, name: str):
        raise RuntimeError(
            "a run trained in this process reads its input itself (ingest 'per_rank' or 'memory'); the "
            "'split' input needs Ray Train (a search: trial_runner='trainer')"
        )

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            self.persist(checkpoint_dir, int(metrics["epoch"]))
        self.last_metrics = dict(metrics)

    def persist(self, checkpoint_dir: Path, epoch: int) -> Path:
        """Copy an epoch's checkpoint into the run (temporary name, then rename), then drop the checkpoints
        that are neither among the ``num_to_keep`` best by the metric nor the latest."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        final = self.run_dir / checkpoint_name(epoch)
        tmp = self.run_dir / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        shutil.rmtree(final, ignore_errors=True)  # the same epoch again after a restore
        os.replace(tmp, final)
        self.prune(latest=final)
        return final

    def prune(self, *, latest: Path) -> list[Path]:
        # its own only: Ray Train's checkpoints of the run stay as its checkpoint-manager snapshot lists them
        ranked = ranked_checkpoints(self.run_dir, self.metric, self.mode, LOCAL_CHECKPOINT_PREFIX)
        keep = set(ranked[: self.num_to_keep]) | {latest}
        gone = [p for p in ranked if p not in keep]
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
        return gone


@dataclass
class LocalResult:
    """What :func:`fit_here` returns: the fields of Ray Train's ``Result`` that run_training reads."""

    checkpoint: Any  # the latest (ray.train.Checkpoint)
    best_checkpoints: list[tuple[Any, dict[str, Any]]]  # every kept checkpoint with its epoch's metrics
    metrics: dict[str, Any]
    error: BaseException | None = None


def local_loop_config(cfg, info, extra: Mapping[str, Any] | None = None) -> LoopConfig:
    """The loop config of a one-worker run in this process (``extra``: LoopConfig fields on top; ``split``
    read as ``per_rank``; a reused process drops torch.compile's caches of its last model, whose recompiles
    would count against dynamo's limit, past which a model runs eager, silently)."""
    from deeplense_ray.train.trainer import loop_config

    loop = LoopConfig.from_dict({**loop_config(cfg, info), **dict(extra or {})})
    if loop.ingest_mode == "split":
        loop = dataclasses.replace(loop, ingest_mode="per_rank")
    if loop.train.compile:
        torch._dynamo.reset()
    return loop


def fit_here(session: LocalRunSession, loop: LoopConfig, hooks: LoopHooks | None = None) -> LocalResult:
    """Run the training loop in this process over ``session`` (``hooks``: the tests'); the run's checkpoints
    as a Result would."""
    from ray.train import Checkpoint

    from deeplense_ray.train.loop import train_loop_per_worker

    train_loop_per_worker(loop.to_dict(), session, hooks)  # the plain dict a Ray Train worker gets
    kept = []
    for p in run_checkpoints(session.run_dir):
        try:
            meta = json.loads((p / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        kept.append((Checkpoint.from_directory(str(p)), dict(meta.get("metrics", {}))))
    latest = session.latest()
    return LocalResult(
        checkpoint=Checkpoint.from_directory(str(latest)) if latest is not None else None,
        best_checkpoints=kept,
        metrics=session.last_metrics,
    )
