"""Opening a run, before anything trains: its name, its directory's state file and its MLflow run.

A run lives in ``<storage_path>/<run_name>/`` (Ray Train's run directory, or train/local.py's checkpoints)
with :data:`RUN_STATE_FILE` beside the checkpoints: the MLflow run id, the experiment, the tracking URI, the
dataset hash, the config and the runner of its latest segment. :func:`prepare_run` creates it with a new
MLflow run (its params, :func:`log_run_inputs`) or, with ``resume``, reopens the newest matching run
(:func:`find_resumable_run`) after checking that it can be resumed (its dataset hash; changed params become
``resume.*`` tags; any runner may continue it, train/checkpoint.py). :func:`check_resume` checks the
checkpoints of a run to resume before Ray starts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from deeplense_ray.config import DatasetInfo, TrainConfig
from deeplense_ray.io import atomic_write_json
from deeplense_ray.train.checkpoint import check_checkpoints

RUN_STATE_FILE = "deeplense_run.json"


def default_run_name(cfg: TrainConfig) -> str:
    """``<model>-s<seed>-<YYYYmmdd-HHMMSS-mmm>``."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now * 1000) % 1000:03d}"
    return f"{cfg.model}-s{cfg.seed}-{stamp}"


def find_resumable_run(storage_path: str | os.PathLike[str], model: str, seed: int) -> str:
    """Name of the newest run of ``model`` with ``seed`` under ``storage_path`` (by its state file's mtime).

    ValueError naming the directory when there is none.
    """
    root = Path(storage_path)
    found: list[tuple[float, str]] = []
    if root.is_dir():
        for state_file in root.glob(f"*/{RUN_STATE_FILE}"):
            try:
                state = json.loads(state_file.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            conf = state.get("config", {})
            if str(conf.get("model", "")).lower() == model.lower() and conf.get("seed") == seed:
                found.append((state_file.stat().st_mtime, state_file.parent.name))
    if not found:
        raise ValueError(
            f"nothing to resume: no run of model {model!r} with seed {seed} under {root} "
            f"(no */{RUN_STATE_FILE}); pass run_name (--run-name) or start without resume"
        )
    return max(found)[1]


def check_resume(cfg: TrainConfig) -> None:
    """With ``cfg.resume`` (``cfg`` resolved): the run to resume exists and each of its checkpoints loads with
    weights_only, else ValueError / :class:`CheckpointError` naming the directory or file (before Ray starts:
    a refused file in a worker would end the run with a traceback)."""
    if cfg.resume:
        name = cfg.run_name or find_resumable_run(cfg.storage_path, cfg.model, cfg.seed)
        check_checkpoints(Path(cfg.storage_path) / name)


def prepare_run(cfg: TrainConfig, info: DatasetInfo, runner: str) -> tuple[str, dict[str, Any]]:
    """Run name and state (MLflow run id, experiment id, tracking URI, the runner of its latest segment);
    creates the MLflow run if new. A run resumes with any runner: every runner's checkpoints are laid out
    alike in the run directory (train/checkpoint.py)."""
    from mlflow.tracking import MlflowClient

    from deeplense_ray.tracking import get_or_create_experiment, log_params, run_params

    storage = Path(cfg.storage_path)
    if cfg.resume:
        name = cfg.run_name or find_resumable_run(storage, cfg.model, cfg.seed)
        state_file = storage / name / RUN_STATE_FILE
        if not state_file.is_file():
            raise ValueError(f"nothing to resume: {state_file} does not exist")
        state = json.loads(state_file.read_text())
        if state.get("manifest_hash") != info.manifest_hash:
            raise ValueError(
                f"cannot resume run {name!r} on dataset {info.data_dir}: its manifest hash "
                f"{info.manifest_hash[:12]} differs from the run's {str(state.get('manifest_hash'))[:12]}"
                + (" (an online run's hash covers its preset, overrides and sizes: resume with the same ones)"
                   if info.sim_preset is not None else "")
            )  # fmt: skip
        client = MlflowClient(tracking_uri=state["tracking_uri"])
        client.update_run(state["mlflow_run_id"], status="RUNNING")
        logged = run_params(state["mlflow_run_id"], state["tracking_uri"])
        new = {k: v for k, v in log_params_preview(cfg, info, name).items() if logged.get(k) != v}
        for key, value in new.items():  # MLflow refuses to change a logged param: record changes as tags
            client.set_tag(state["mlflow_run_id"], f"resume.{key}", value)
        client.set_tag(state["mlflow_run_id"], "resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        state["resumes"] = int(state.get("resumes", 0)) + 1
        state["runner"] = runner  # the runner of the latest segment (checkpoints: one layout for all)
    else:
        name = cfg.run_name or default_run_name(cfg)
        run_dir = storage / name
        if run_dir.exists():
            raise ValueError(
                f"run directory {run_dir} already exists: pass resume=True (--resume) to continue it, or "
                f"choose another run_name"
            )
        exp_id = get_or_create_experiment(cfg.experiment, cfg.tracking_uri)
        client = MlflowClient(tracking_uri=cfg.tracking_uri)
        run = client.create_run(exp_id, run_name=name, tags={"deeplense.model": cfg.model})
        log_params(cfg.tracking_uri, run.info.run_id, _run_params(cfg, info, name))
        log_run_inputs(client, run.info.run_id, cfg)
        state = {
            "mlflow_run_id": run.info.run_id,
            "experiment_id": exp_id,
            "tracking_uri": cfg.tracking_uri,
            "manifest_hash": info.manifest_hash,
            "config": cfg.to_dict(),
            "runner": runner,
            "status": "running",
        }
    atomic_write_json(storage / name / RUN_STATE_FILE, state)
    return name, state


def log_run_inputs(client, run_id: str, cfg: TrainConfig) -> None:
    """The run's datasets as MLflow inputs (the UI's Dataset column): the dataset directory it reads, and for
    an online run the simulation (preset, overrides, seed) its training images come from."""
    from deeplense_ray.tracking.datasets import dataset_entity, log_dataset_input, simulation_entity

    if cfg.simulate is not None:
        log_dataset_input(client, run_id, simulation_entity(cfg.simulate, cfg.sim_overrides, cfg.seed))
    if cfg.data_dir is not None:
        context = "evaluation" if cfg.simulate is not None else "training"
        log_dataset_input(client, run_id, dataset_entity(cfg.data_dir), context=context)


def log_params_preview(cfg: TrainConfig, info: DatasetInfo, name: str) -> dict[str, str]:
    """The flat params a run of ``cfg`` logs (used to spot changed values on resume)."""
    from deeplense_ray.tracking import flatten_params

    return flatten_params(_run_params(cfg, info, name))


def _simulation_params(cfg: TrainConfig, info: DatasetInfo) -> dict[str, Any]:
    """What an online run logs about its images so it can be repeated: preset, overrides, seeds, sizes."""
    from deeplense_ray.train.online import EVAL_CHUNK, STREAMS, steps_per_epoch

    steps = steps_per_epoch(cfg.images_per_epoch, cfg.batch_size)
    evaluate_on = cfg.data_dir or "simulated"
    return {
        "preset": cfg.simulate,
        "overrides": dict(cfg.sim_overrides),
        "seed": cfg.seed,
        "train_seeds": f"derive_seed(seed, {STREAMS['train']}, epoch, rank, chunk)",
        "val_test_seeds": (
            f"derive_seed(seed, {STREAMS['val']}|{STREAMS['test']}, chunk of {EVAL_CHUNK})"
            if cfg.data_dir is None
            else f"splits of {cfg.data_dir}"
        ),
        "evaluate_on": evaluate_on,
        "images_per_epoch": steps * cfg.batch_size,
        "images_total": steps * cfg.batch_size * cfg.epochs,
        "chunk_batches": cfg.sim_chunk_batches,
        # simulate(draws=...): on CUDA the parameters are drawn on the device, another random stream
        "parameter_draws": "device" if cfg.gpus_per_worker > 0 else "cpu",
        "preset_resolved": dict(info.sim_preset or {}),
    }


def _versions() -> dict[str, str]:
    import mlflow
    import ray
    import torch

    import deeplense_ray
    from deeplense_ray.tracking import git_commit

    return {
        "package_version": deeplense_ray.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "ray_version": ray.__version__,
        "mlflow_version": mlflow.__version__,
    }


def _run_params(cfg: TrainConfig, info: DatasetInfo, run_name: str) -> dict[str, Any]:
    sim = {"simulation": _simulation_params(cfg, info)} if cfg.simulate is not None else {}
    return {
        **sim,
        "config": cfg.to_dict(),
        "ingest_mode": cfg.ingest_mode(info),
        "dataset": {
            "manifest_hash": info.manifest_hash,
            "data_dir": info.data_dir,
            "image_shape": list(info.image_shape),
            "class_names": list(info.class_names),
            "pixel_scale": info.pixel_scale,
            "rows": dict(info.split_rows),
        },
        "ray_run_name": run_name,
        **_versions(),
    }
