"""Where the training loop runs: a :class:`LoopSession` gives it its rank, device, checkpoint and reports.

:class:`RayTrainSession` (the default) is a Ray Train V2 worker: Ray Train places it, restores its run's
latest checkpoint (or the run directory's newer one written in one process: one checkpoint layout, so a run
resumes with either runner), wraps the model in DDP, splits the ``train`` dataset and persists the reported
checkpoints. A one-worker run in a process that already holds the run's resources uses
``deeplense_ray.train.local.LocalRunSession`` instead, with the same checkpoints and reports.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn


class LoopSession:
    """Where the loop runs: its rank, world size and device, the checkpoint it resumes from, how its model is
    wrapped, its share of a Ray Data ``train`` split, and where an epoch's report and checkpoint go."""

    def placement(self) -> tuple[int, int, torch.device]:
        """(rank, world size, device)."""
        raise NotImplementedError

    def checkpoint_dir(self):
        """A context manager giving the directory of the checkpoint to resume from, or None."""
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def dataset_shard(self, name: str):
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Report an epoch (every rank; only rank 0 passes its checkpoint, written to ``checkpoint_dir``, a
        temporary directory that is deleted afterwards; none when a restored run reports its last, already
        checkpointed epoch again)."""
        raise NotImplementedError


class RayTrainSession(LoopSession):
    """A Ray Train (V2) worker: Ray Train places it, restores its run's latest checkpoint, wraps the model
    (DDP over the workers), splits the ``train`` dataset and persists the reported checkpoints.

    ``run_dir``: the run's directory; a checkpoint there written by a one-process segment of the run
    (``checkpoint_epoch_NNNNN``) of a higher epoch than Ray Train's latest is the one resumed from."""

    def __init__(self, run_dir: str | None = None) -> None:
        self.run_dir = run_dir

    def placement(self) -> tuple[int, int, torch.device]:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()

    def checkpoint_dir(self):
        import ray.train

        from deeplense_ray.train.checkpoint import LOCAL_CHECKPOINT_PREFIX, latest_checkpoint, metrics_of

        checkpoint = ray.train.get_checkpoint()
        local = latest_checkpoint(self.run_dir, LOCAL_CHECKPOINT_PREFIX) if self.run_dir else None
        if local is not None:
            # Ray's checkpoint path is a local directory for a local or shared-filesystem storage path; on
            # other storage it reads as epoch 0 here, and the run directory (then absent) has no local one
            ray_epoch = int(metrics_of(Path(checkpoint.path)).get("epoch", 0)) if checkpoint else -1
            if int(metrics_of(local).get("epoch", 0)) > ray_epoch:
                return nullcontext(local)
        if checkpoint is None:
            return nullcontext(None)
        return _as_path(checkpoint.as_directory())

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def dataset_shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train
        from ray.train import Checkpoint

        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=ckpt)


class _as_path:
    """A checkpoint's ``as_directory()`` context manager, giving a Path."""

    def __init__(self, cm) -> None:
        self.cm = cm

    def __enter__(self) -> Path:
        return Path(self.cm.__enter__())

    def __exit__(self, *exc) -> Any:
        return self.cm.__exit__(*exc)
