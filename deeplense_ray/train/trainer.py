"""Ray Train wiring of a run: the loop config the workers get, the ``TorchTrainer`` and its best checkpoint.

:func:`loop_config` (the config plus what the manifest says: the plain dict of a
:class:`~deeplense_ray.train.worker_config.LoopConfig` handed to
:func:`~deeplense_ray.train.loop.train_loop_per_worker`; a run in one task or process starts from it too,
train/local.py), :func:`build_trainer` (a Ray Train V2 ``TorchTrainer``: scaling, datasets, failure
handling and :func:`checkpoint_config`, which keeps the best checkpoints by the task's score,
:func:`run_score`, and the latest) and :func:`best_checkpoint` (the best of a fit's kept checkpoints).
A whole tracked run around it is train/run.py's :func:`~deeplense_ray.train.run.run_training`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deeplense_ray.config import DatasetInfo, TrainConfig
from deeplense_ray.ranking import checkpoint_key, task_score

# RUN_STATE_FILE: defined in train/prepare.py; re-exported here for deeplense_ray/study/runner.py's import
from deeplense_ray.train.prepare import RUN_STATE_FILE, default_run_name
from deeplense_ray.train.worker_config import LoopConfig, LoopHooks

SCORE_ATTRIBUTE = "val_auc_macro"
SCORE_MODE = "max"


def loop_config(cfg: TrainConfig, info: DatasetInfo) -> dict[str, Any]:
    """The dict handed to :func:`train_loop_per_worker` (``LoopConfig.to_dict()``'s keys): the config plus
    what the manifest says."""
    from deeplense_ray.train.ingest import read_block_rows

    d = cfg.to_dict()
    d.update(
        image_shape=list(info.image_shape),
        class_names=list(info.class_names),
        pixel_scale=info.pixel_scale,
        train_rows=int(info.split_rows["train"]),
        train_shard_rows=list(info.train_shard_rows),
        train_block_rows=read_block_rows(info.image_shape),
        ingest_mode=cfg.ingest_mode(info),
    )
    if info.sim_preset is not None:  # online simulation: the resolved preset travels to the workers
        d["sim_preset"] = dict(info.sim_preset)
    if cfg.inference:  # targets, the task's classes, standardisation and prior (train/regression.py)
        from deeplense_ray.train.regression import inference_fields

        d.update(inference_fields(cfg, info))
    return d


def run_score(cfg: TrainConfig) -> tuple[str, str]:
    """(metric, mode) that picks a run's best checkpoint: :func:`deeplense_ray.ranking.task_score`."""
    return task_score(cfg.task)


def build_trainer(
    cfg: TrainConfig,
    *,
    run_config_callbacks: Sequence[Any] = (),
    run_name: str | None = None,
    extra_loop_config: Mapping[str, Any] | None = None,
    info: DatasetInfo | None = None,
    score_metric: str | None = None,
    score_mode: str | None = None,
    hooks: LoopHooks | None = None,
):
    """A Ray Train V2 ``TorchTrainer`` running :func:`train_loop_per_worker` on ``cfg``.

    Validates ``cfg`` first (unless ``info`` from an earlier ``cfg.validate()`` is passed). Datasets: the
    ``train`` split from :func:`deeplense_ray.data.read_split`, split across workers (with
    ``ingest="per_rank"`` or ``"memory"``, see :meth:`TrainConfig.ingest_mode`, none: each rank reads shards
    itself); the val split is read by the ranks
    themselves, each shard by one rank (see the loop). Checkpoints: :func:`checkpoint_config`, the
    ``num_to_keep`` best by ``score_metric`` (``score_mode`` 'max' or 'min'; a search passes its own metric)
    plus the latest. ``run_config_callbacks`` go to ``RunConfig(callbacks=...)`` (e.g. Tune's
    ``TuneReportCallback()``); ``extra_loop_config``: :class:`LoopConfig` fields set on top (e.g. ``mlflow``;
    an unknown key is a ValueError); ``hooks``: the tests' :class:`LoopHooks`, bound to the loop function.
    """
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from deeplense_ray.data import read_split
    from deeplense_ray.train.loop import train_loop_per_worker

    cfg = cfg.resolved()
    if info is None:
        info = cfg.validate()
    if score_metric is None:  # the task's (SCORE_ATTRIBUTE / SCORE_MODE for classification)
        score_metric, score_mode = run_score(cfg)
    name = run_name or cfg.run_name or default_run_name(cfg)
    resources = {"CPU": float(cfg.cpus_per_worker)}
    if cfg.use_gpu:
        resources["GPU"] = float(cfg.gpus_per_worker)
    run_dir = str(Path(cfg.storage_path) / name)  # a resume reads a one-process segment's checkpoints there
    config = LoopConfig.from_dict(
        {**loop_config(cfg, info), "run_dir": run_dir, **dict(extra_loop_config or {})}
    )
    datasets = {}
    if config.ingest_mode == "split":  # else every rank reads its own shards or renders
        # training images travel as stored (float16 stays float16) and become float32 on the device
        datasets["train"] = read_split(
            info.data_dir, "train", image_dtype="stored", block_rows=config.train_block_rows
        )
    return TorchTrainer(
        train_loop_per_worker if hooks is None else functools.partial(train_loop_per_worker, hooks=hooks),
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=cfg.storage_path,
            checkpoint_config=checkpoint_config(cfg.num_to_keep, score_metric, score_mode),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(run_config_callbacks),
        ),
        datasets=datasets or None,
        dataset_config=DataConfig(datasets_to_split=list(datasets)),
    )


def checkpoint_config(num_to_keep: int, metric: str = SCORE_ATTRIBUTE, mode: str = SCORE_MODE):
    """Ray Train's ``CheckpointConfig``: the ``num_to_keep`` best checkpoints by the reported ``metric``
    (``mode`` 'max' or 'min'; an epoch whose metric is NaN ranks last) are kept, and the latest one."""
    from ray.train import CheckpointConfig

    if mode not in ("max", "min"):
        raise ValueError(f"checkpoint score mode must be 'max' or 'min', got {mode!r}")
    return CheckpointConfig(
        num_to_keep=num_to_keep, checkpoint_score_attribute=metric, checkpoint_score_order=mode
    )


def best_checkpoint(
    result: Any, metric: str = SCORE_ATTRIBUTE, mode: str = SCORE_MODE, run_dir: str | Path | None = None
) -> tuple[Any, dict[str, Any]]:
    """(Checkpoint, metrics) with the best ``metric`` (``mode`` 'max' or 'min') among the kept checkpoints,
    by :func:`deeplense_ray.ranking.checkpoint_key` (ties: lower val_loss, then the earlier epoch).
    ``run_dir``: the run's directory, whose checkpoints written in one process (an earlier segment of a
    resumed run) are candidates too."""
    candidates = list(result.best_checkpoints or [])
    if run_dir is not None:
        from ray.train import Checkpoint

        from deeplense_ray.train.checkpoint import LOCAL_CHECKPOINT_PREFIX, metrics_of, run_checkpoints

        seen = {Path(c.path).resolve() for c, _ in candidates if c is not None}
        candidates += [
            (Checkpoint.from_directory(str(p)), metrics_of(p))
            for p in run_checkpoints(run_dir, LOCAL_CHECKPOINT_PREFIX)
            if p.resolve() not in seen
        ]
    if not candidates:
        if result.checkpoint is None:
            raise RuntimeError("training reported no checkpoint")
        return result.checkpoint, dict(result.metrics or {})
    ckpt, metrics = min(candidates, key=lambda cm: checkpoint_key(cm[1] or {}, metric, mode))
    return ckpt, dict(metrics)


__all__ = [
    "RUN_STATE_FILE",
    "SCORE_ATTRIBUTE",
    "SCORE_MODE",
    "best_checkpoint",
    "build_trainer",
    "checkpoint_config",
    "loop_config",
    "run_score",
]
