"""A trial that trains in its own Tune actor (``trial_runner='actor'``, the default with one worker/trial).

A trial run through Ray Train (``trial_runner='trainer'``) starts two processes of its own, the Train
controller and the worker, each importing torch and this package before the first batch: on the 2-core CPU
13-17 s of each trial's start, on one H200 40-54 s (benchmarks/results/demo_*.json). With one worker per
trial nothing needs them: here the trial's function runs the training loop
(:func:`deeplense_ray.train.loop.train_loop_per_worker`) itself, in the Tune actor that holds the trial's
CPUs and GPU share, and Tune reuses that actor for the next trial (``reuse_actors``), so after the first
trial no process is started and torch (and CUDA) are already up.

:class:`ActorTrialSession` gives the loop what a one-worker Ray Train run would: rank 0 of 1, the device Ray
assigned to the actor, the model unwrapped, the run's latest checkpoint to resume from, and per epoch a
checkpoint in ``<trainer_storage>/<trial_id>/checkpoint_<epoch>`` (written under a temporary name, then
renamed; the ``num_to_keep`` best by the search metric and the latest are kept) and a report to Tune carrying
``checkpoint_path`` (tune/best.py), through :func:`~deeplense_ray.tune.trial.sanitize_result`. What the
search does with trials (ASHA, MLflow child runs, disk pruning, the best checkpoint's test) is the same for
both runners. The ``split`` input (Ray Data's ``streaming_split``, a Train feature) becomes ``per_rank``: the
trial reads the split's shards itself, as its only rank.
"""

from __future__ import annotations

import math
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deeplense_ray.train.loop import LoopSession
from deeplense_ray.tune.best import CHECKPOINT_PATH_KEY
from deeplense_ray.tune.disk import CHECKPOINT_PREFIX, _metric_of, trial_checkpoints


def checkpoint_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}epoch_{int(epoch):05d}"


class ActorTrialSession(LoopSession):
    """The loop as the only rank of a trial's run, in the trial's Tune actor (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike[str], *, metric: str, mode: str, num_to_keep: int) -> None:
        self.run_dir = Path(run_dir)
        self.metric, self.mode, self.num_to_keep = metric, mode, max(1, int(num_to_keep))
        self.device = torch.device("cpu")

    def placement(self) -> tuple[int, int, torch.device]:
        import ray

        # Ray makes the actor's GPU share the only visible device (CUDA_VISIBLE_DEVICES) or hides all GPUs
        if ray.get_gpu_ids() and torch.cuda.is_available():
            self.device = torch.device("cuda", 0)
        return 0, 1, self.device

    def checkpoint_dir(self):
        latest = self.latest()
        return nullcontext(latest)

    def latest(self) -> Path | None:
        """The run's checkpoint of the highest epoch (a restored trial resumes from it), or None."""
        found = [(_metric_of(p, self.metric)[1], p) for p in trial_checkpoints(self.run_dir)]
        return max(found)[1] if found else None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def dataset_shard(self, name: str):
        raise RuntimeError(
            "a trial trained in its own actor reads its input itself (ingest 'per_rank' or 'memory'); "
            "the 'split' input needs trial_runner='trainer'"
        )

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.tune

        from deeplense_ray.tune.trial import sanitize_result

        out = dict(metrics)
        if checkpoint_dir is not None:
            out[CHECKPOINT_PATH_KEY] = str(self.persist(checkpoint_dir, int(metrics["epoch"])))
        ray.tune.report(sanitize_result(out, self.metric, self.mode))

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
        def rank(p: Path) -> tuple[float, int]:  # best first; NaN last; ties: the earlier epoch
            v, epoch = _metric_of(p, self.metric)
            return (math.inf if math.isnan(v) else (-v if self.mode == "max" else v)), epoch

        ranked = sorted(trial_checkpoints(self.run_dir), key=rank)
        keep = set(ranked[: self.num_to_keep]) | {latest}
        gone = [p for p in ranked if p not in keep]
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
        return gone


def train_in_actor(config: dict[str, Any], cfg, trial_id: str) -> None:
    """Train trial ``trial_id`` (TrainConfig ``cfg``) here, in its Tune actor; ``config['_search']`` as in
    :func:`deeplense_ray.tune.trial.train_trial`."""
    from deeplense_ray.train.loop import train_loop_per_worker
    from deeplense_ray.train.trainer import loop_config

    fixed = config["_search"]
    cfg = cfg.resolved()
    loop = loop_config(cfg, cfg.validate())
    if loop["ingest_mode"] == "split":
        loop["ingest_mode"] = "per_rank"
    if loop.get("compile"):  # a reused actor: dynamo's caches of the last trial's model would count against
        torch._dynamo.reset()  # its recompile limit (past it the model runs eager, silently)
    session = ActorTrialSession(
        Path(fixed["trainer_storage"]) / trial_id,
        metric=fixed["metric"],
        mode=fixed["mode"],
        num_to_keep=cfg.num_to_keep,
    )
    train_loop_per_worker(loop, session)
