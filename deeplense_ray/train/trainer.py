"""TorchTrainer wiring and one complete, tracked training run.

``run_training(cfg)``: validate (before Ray) -> one MLflow run -> ``TorchTrainer.fit`` (per-epoch metrics and
checkpoints; the best kept by val_auc_macro, the latest for resume) -> the test split evaluated ONCE with the
best checkpoint -> plots, metrics JSON and the model logged to the same MLflow run.

Resume: a run lives in ``<storage_path>/<run_name>/`` (Ray Train's run directory) with ``deeplense_run.json``
beside Ray's files (the MLflow run id, the dataset hash, the config). ``resume=True`` re-creates the trainer
with the same name and storage path: Ray Train V2 reloads its checkpoint manager snapshot from there and
``ray.train.get_checkpoint()`` in the loop returns the latest checkpoint (model, optimizer, scheduler, epoch);
metrics keep going to the same MLflow run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deeplense_ray.config import DatasetInfo, TrainConfig
from deeplense_ray.io import atomic_write_json
from deeplense_ray.ranking import checkpoint_key, task_score
from deeplense_ray.train.checkpoint import (
    STATE_FILE,
    check_checkpoints,
    load_model_from_checkpoint,
    load_tensors,
    read_meta,
)
from deeplense_ray.train.metrics import bootstrap_auc_ci, classification_metrics, flatten_metrics
from deeplense_ray.train.timeline import Timeline

RUN_STATE_FILE = "deeplense_run.json"
TIMELINE_FILE = "timeline.json"  # MLflow artifact: the job's phases (train/timeline.py)
SCORE_ATTRIBUTE = "val_auc_macro"
SCORE_MODE = "max"
MODEL_ARTIFACT = "model"


@dataclass
class TrainResult:
    """What one training run produced (paths absolute; metrics of the test split evaluated once)."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    run_name: str
    run_dir: str
    best_checkpoint: str
    best_epoch: int
    best_val: dict[str, float]
    test_metrics: dict[str, Any]
    history: list[dict[str, float]]
    model_uri: str
    artifacts: list[str] = field(default_factory=list)
    ray_result: Any = field(default=None, repr=False)
    timeline: dict[str, Any] = field(default_factory=dict)  # train/timeline.py: Timeline.summary()
    timeline_line: str = ""
    #: the test split's labels and class probabilities ({"y_true", "probs"}, numpy) of the one evaluation
    test_predictions: dict[str, Any] = field(default_factory=dict, repr=False)


# ---------------------------------------------------------------------------------------------- helpers
def default_run_name(cfg: TrainConfig) -> str:
    """``<model>-s<seed>-<YYYYmmdd-HHMMSS-mmm>``."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now * 1000) % 1000:03d}"
    return f"{cfg.model}-s{cfg.seed}-{stamp}"


def loop_config(cfg: TrainConfig, info: DatasetInfo) -> dict[str, Any]:
    """The dict handed to :func:`train_loop_per_worker`: the config plus what the manifest says."""
    from deeplense_ray.train.ingest import read_block_rows

    d = cfg.to_dict()
    d.update(
        image_shape=list(info.image_shape),
        class_names=list(info.class_names),
        pixel_scale=info.pixel_scale,
        train_rows=int(info.split_rows["train"]),
        train_shard_rows=list(info.train_shard_rows),
        train_block_rows=read_block_rows(info.image_shape),
        manifest_hash=info.manifest_hash,
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


def build_trainer(
    cfg: TrainConfig,
    *,
    run_config_callbacks: Sequence[Any] = (),
    run_name: str | None = None,
    extra_loop_config: Mapping[str, Any] | None = None,
    info: DatasetInfo | None = None,
    score_metric: str | None = None,
    score_mode: str | None = None,
):
    """A Ray Train V2 ``TorchTrainer`` running :func:`train_loop_per_worker` on ``cfg``.

    Validates ``cfg`` first (unless ``info`` from an earlier ``cfg.validate()`` is passed). Datasets: the
    ``train`` split from :func:`deeplense_ray.data.read_split`, split across workers (with
    ``ingest="per_rank"`` or ``"memory"``, see :meth:`TrainConfig.ingest_mode`, none: each rank reads shards
    itself); the val split is read by the ranks
    themselves, each shard by one rank (see the loop). Checkpoints: :func:`checkpoint_config`, the
    ``num_to_keep`` best by ``score_metric`` (``score_mode`` 'max' or 'min'; a search passes its own metric)
    plus the latest. ``run_config_callbacks`` go to ``RunConfig(callbacks=...)`` (e.g. Tune's
    ``TuneReportCallback()``); ``extra_loop_config`` is merged into the loop config (e.g. ``mlflow``).
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
    config = loop_config(cfg, info)
    config.update(dict(extra_loop_config or {}))
    datasets = {}
    if config["ingest_mode"] == "split":  # else every rank reads its own shards or renders
        # training images travel as stored (float16 stays float16) and become float32 on the device
        datasets["train"] = read_split(
            info.data_dir, "train", image_dtype="stored", block_rows=config["train_block_rows"]
        )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
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


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_checkpoint(
    checkpoint_dir: Any,
    data_dir: str | os.PathLike[str],
    split: str = "test",
    *,
    batch_size: int = 256,
    device: str | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Metrics of a checkpoint's model on a whole split (fp32; device default cuda if available, else cpu).

    ``checkpoint_dir``: a checkpoint directory or ``ray.train.Checkpoint``. Returns
    :func:`classification_metrics` of the split, plus ``y_true`` and ``probs`` arrays if
    ``return_predictions``. ValueError if the dataset's classes differ from the checkpoint's.
    """
    import torch

    from deeplense_ray.config import describe_dataset
    from deeplense_ray.data import LensShardDataset
    from deeplense_ray.train.loop import predict_batches, probabilities

    info = describe_dataset(data_dir)
    arch = read_meta(checkpoint_dir)["arch"]
    if list(arch["class_names"]) != list(info.class_names):
        raise ValueError(
            f"checkpoint classes {arch['class_names']} differ from dataset {info.data_dir} classes "
            f"{list(info.class_names)}"
        )
    if list(arch["image_shape"]) != list(info.image_shape):
        raise ValueError(
            f"checkpoint image shape {arch['image_shape']} differs from dataset {info.data_dir} "
            f"image shape {list(info.image_shape)}"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model_from_checkpoint(checkpoint_dir).to(dev)
    loader = torch.utils.data.DataLoader(
        LensShardDataset(info.data_dir, split, normalize="none"), batch_size=batch_size
    )
    logits, labels = predict_batches(model, ({"image": x, "label": y} for x, y in loader), device=dev)
    probs = probabilities(logits)
    out = classification_metrics(labels, probs, info.class_names)
    out["auc_macro_ci"] = list(bootstrap_auc_ci(labels, probs))  # 95% bootstrap interval: is it chance?
    out["split"] = split
    if return_predictions:
        out["y_true"] = labels
        out["probs"] = probs
    return out


def _evaluate_remote(checkpoint: Any, cfg: TrainConfig, device: str | None = None) -> dict[str, Any]:
    from deeplense_ray.train.online import evaluate_test

    return evaluate_test(checkpoint, cfg, device=device)


#: Where a run's test split is evaluated: "auto" (default), "driver" or "task"; see where_to_evaluate_test.
TEST_EVAL_ENV = "DEEPLENSE_TEST_EVAL"


def where_to_evaluate_test(cfg: TrainConfig) -> str:
    """ "driver" when Ray runs on the driver's machine alone (a local runtime or a one-node cluster) and the
    driver can use the run's device: the test split is then evaluated in this process, with no worker
    process to start (as a task it took ~5 s of the ~28 s fixed cost of a small CPU train job, mostly a new
    process importing torch); else "task". ``$DEEPLENSE_TEST_EVAL`` = driver | task overrides."""
    import ray
    import torch

    mode = os.environ.get(TEST_EVAL_ENV, "auto")
    if mode not in ("auto", "driver", "task"):
        raise ValueError(f"${TEST_EVAL_ENV} must be auto, driver or task, got {mode!r}")
    if mode != "auto":
        return mode
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.util.get_node_ip_address()
    same_machine = len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == here
    return "driver" if same_machine and (not cfg.use_gpu or torch.cuda.is_available()) else "task"


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


def best_checkpoint(
    result: Any, metric: str = SCORE_ATTRIBUTE, mode: str = SCORE_MODE
) -> tuple[Any, dict[str, Any]]:
    """(Checkpoint, metrics) with the best ``metric`` (``mode`` 'max' or 'min') among the kept checkpoints,
    by :func:`deeplense_ray.ranking.checkpoint_key` (ties: lower val_loss, then the earlier epoch)."""
    candidates = list(result.best_checkpoints or [])
    if not candidates:
        if result.checkpoint is None:
            raise RuntimeError("training reported no checkpoint")
        return result.checkpoint, dict(result.metrics or {})
    ckpt, metrics = min(candidates, key=lambda cm: checkpoint_key(cm[1] or {}, metric, mode))
    return ckpt, dict(metrics)


# ---------------------------------------------------------------------------------------------- MLflow
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


def _log_model(tracking_uri: str, run_id: str, checkpoint: Any, cfg: TrainConfig) -> str:
    """The best checkpoint's model into the run: the pytorch flavor plus a pyfunc returning class
    probabilities, a signature, an input example from the data (an online run without data: one image of
    its preset) and the architecture in its metadata (deeplense_ray/tracking/models.py)."""
    from deeplense_ray.tracking.models import log_checkpoint_model
    from deeplense_ray.train.online import example_input

    return log_checkpoint_model(checkpoint, tracking_uri, run_id, input_example=example_input(cfg))


def _history_from_checkpoint(checkpoint: Any) -> list[dict[str, float]]:
    with checkpoint.as_directory() as d:
        state = load_tensors(Path(d) / STATE_FILE)
    return [dict(h) for h in state.get("history", [])]


def _write_artifacts(
    out_dir: Path,
    *,
    test: Mapping[str, Any],
    best_val: Mapping[str, Any],
    best_epoch: int,
    history: Sequence[Mapping[str, float]],
    cfg: TrainConfig,
    info: DatasetInfo,
) -> list[Path]:
    from deeplense_ray.tracking import plot_confusion_matrix, plot_curves, plot_roc_curves

    if cfg.inference:
        return _write_inference_artifacts(
            out_dir, test=test, best_val=best_val, best_epoch=best_epoch, history=history, cfg=cfg, info=info
        )
    names = list(info.class_names)
    paths = [
        plot_roc_curves(
            test["y_true"], test["probs"], names, out_dir / "roc_test.png", title="ROC, test split"
        ),
        plot_confusion_matrix(
            test["confusion_matrix"], names, out_dir / "confusion_test.png", title="confusion matrix, test"
        ),
        plot_curves(history, out_dir / "curves.png"),
    ]
    summary = {
        "best_epoch": best_epoch,
        "selection": f"max {SCORE_ATTRIBUTE} over epochs (val split only)",
        "best_val": dict(best_val),
        "test": {k: v for k, v in test.items() if k not in ("y_true", "probs")},
        "history": [dict(h) for h in history],
        "dataset_manifest_hash": info.manifest_hash,
    }
    paths.append(atomic_write_json(out_dir / "metrics.json", summary))
    paths.append(atomic_write_json(out_dir / "config.json", cfg.to_dict()))
    return paths


#: Per-lens arrays of a test evaluation (not metrics): classification's labels and probabilities, inference's
#: posteriors in physical units (train/gaussian.py) and lens ids.
_PREDICTION_KEYS = ("y_true", "probs", "mean", "cov", "truth", "ids")


def calibration_tag(test: Mapping[str, Any]) -> str:
    """The run tag ``calibration``: 'pass' or 'fail', and the observed 68 % / 95 % coverage per target (the
    check: within +-5 points of nominal, train/gaussian.py :func:`calibration_check`)."""
    cov = ", ".join(
        f"{t} {test['coverage_68'][t]:.3f}/{test['coverage_95'][t]:.3f}" for t in test["coverage_68"]
    )
    return f"{'pass' if test.get('calibrated') else 'fail'} (68%/95% coverage: {cov})"


def _write_inference_artifacts(
    out_dir: Path,
    *,
    test: Mapping[str, Any],
    best_val: Mapping[str, Any],
    best_epoch: int,
    history: Sequence[Mapping[str, float]],
    cfg: TrainConfig,
    info: DatasetInfo,
) -> list[Path]:
    """Task 'inference': the calibration plot (expected vs observed coverage), predicted vs true per target,
    the loss / metric curves, metrics.json (with the targets' standardisation) and config.json."""
    from deeplense_ray.tracking import plot_curves
    from deeplense_ray.tracking.plots import plot_calibration, plot_predicted_vs_true

    targets = list(cfg.targets)
    paths = [
        plot_calibration(test["calibration_curve"], targets, out_dir / "calibration_test.png",
                         title="calibration, test split"),
        plot_predicted_vs_true(test["mean"], test["cov"], test["truth"], targets,
                               out_dir / "pred_vs_true_test.png", title="posterior mean vs truth, test"),
        plot_curves(history, out_dir / "curves.png", metric_keys=[
            *(f"val_rmse_over_prior_{t}" for t in targets), *(f"val_coverage68_{t}" for t in targets)]),
    ]  # fmt: skip
    metric, mode = run_score(cfg)
    summary = {
        "best_epoch": best_epoch,
        "selection": f"{mode} {metric} over epochs (val split only)",
        "best_val": dict(best_val),
        "test": {k: v for k, v in test.items() if k not in _PREDICTION_KEYS},
        "history": [dict(h) for h in history],
        "dataset_manifest_hash": info.manifest_hash,
    }
    paths.append(atomic_write_json(out_dir / "metrics.json", summary))
    paths.append(atomic_write_json(out_dir / "config.json", cfg.to_dict()))
    return paths


# ---------------------------------------------------------------------------------------------- the run
def checkpoint_layout(runner: str) -> str:
    """How a runner lays out a run's checkpoints: "ray_train" (Ray Train's run directory) or "local"
    (train/local.py's ``checkpoint_epoch_NNNNN``); a run resumes only with a runner of its layout."""
    return "ray_train" if runner == "trainer" else "local"


def _prepare_run(cfg: TrainConfig, info: DatasetInfo, runner: str) -> tuple[str, dict[str, Any]]:
    """Run name and state (MLflow run id, experiment id, tracking URI, checkpoint layout); creates the MLflow
    run if new."""
    from mlflow.tracking import MlflowClient

    from deeplense_ray.tracking import get_or_create_experiment, log_params, run_params

    storage = Path(cfg.storage_path)
    if cfg.resume:
        name = cfg.run_name or find_resumable_run(storage, cfg.model, cfg.seed)
        state_file = storage / name / RUN_STATE_FILE
        if not state_file.is_file():
            raise ValueError(f"nothing to resume: {state_file} does not exist")
        state = json.loads(state_file.read_text())
        layout = state.get("checkpoint_layout")
        if layout is not None and layout != checkpoint_layout(runner):
            raise ValueError(
                f"cannot resume run {name!r} with runner {runner!r}: its checkpoints are laid out for "
                f"{'runner trainer' if layout == 'ray_train' else 'runner task'} ({state_file}); resume "
                "with that runner"
            )
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
            "checkpoint_layout": checkpoint_layout(runner),
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


def _fit_in_process(cfg: TrainConfig, info: DatasetInfo, run_dir: Path, extra: Mapping[str, Any]):
    """The run's loop in this process (train/local.py); what ``TorchTrainer.fit()`` would return."""
    from deeplense_ray.train.local import LocalRunSession, fit_here, local_loop_config

    loop = local_loop_config(cfg, info)
    loop.update(extra)
    metric, mode = run_score(cfg)
    session = LocalRunSession(run_dir, metric=metric, mode=mode, num_to_keep=cfg.num_to_keep)
    return fit_here(session, loop)


#: What a training process imports before its first batch, imported by a ``runner="task"`` run's warm-up
#: worker (:func:`_warm_task_worker`). Having every worker of the job's runtime pre-import them as Ray starts
#: it (``RAY_preload_python_modules``) was slower on one H200 (Ray starts 16 workers there, all
#: importing at once; the job's fixed cost 29-30 s against 21-23 s, its training 12k against 14-16k img/s).
#: The driver imports ``_RESULT_IMPORTS`` while the run trains, for logging its results.
_TRAIN_IMPORTS = (
    "torch", "torch._dynamo", "deeplense_ray.train.local", "deeplense_ray.train.metrics", "sklearn.metrics",
    "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
)  # fmt: skip
_RESULT_IMPORTS = ("matplotlib.figure", "matplotlib.backends.backend_agg", "deeplense_ray.tracking.models",
                   "mlflow.pyfunc", "mlflow.models")  # fmt: skip


def _import_modules(names: Sequence[str]) -> int:
    """Import ``names`` (an import that fails is left to the code that needs it, which then says why)."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 - a warm-up only; the real import reports the error
            continue
    return os.getpid()


def _task_options(cfg: TrainConfig) -> dict[str, Any]:
    """The Ray resources of a ``runner="task"`` run's task: one worker's CPUs and GPU share."""
    return {
        "num_cpus": float(cfg.cpus_per_worker),
        "num_gpus": min(1.0, float(cfg.gpus_per_worker)) if cfg.use_gpu else 0,
    }


def _warm_task_worker(cfg: TrainConfig):
    """Start, while the driver prepares the MLflow run, a Ray worker process holding the run task's resources
    that imports what training needs (torch, torch._dynamo, which the first optimizer imports, scikit-learn
    for the first validation, MLflow for the first epoch's metrics, this package); returns its ObjectRef (the
    worker's pid). Once it returns, the run's task is given that idle worker (Ray reuses a job's idle worker
    whose resources match: a GPU task only a worker that ran one) instead of starting a process. CUDA is not
    touched: which GPU the run gets is set when its task starts."""
    import ray

    # max_calls=0: a GPU function's worker would otherwise exit after one call (Ray's default for GPU tasks)
    return ray.remote(max_calls=0, **_task_options(cfg))(_import_modules).remote(_TRAIN_IMPORTS)


def _wait_quietly(ref: Any) -> Any:
    """``ray.get(ref)`` of a warm-up task, None if it failed (not the run's failure: its own task reports)."""
    import ray

    try:
        return ray.get(ref)
    except Exception:  # noqa: BLE001 - see the docstring
        return None


def _fit_and_test_in_task(
    cfg: TrainConfig, info: DatasetInfo, run_dir: Path, extra: Mapping[str, Any]
) -> tuple[Any, dict[str, Any], float, int]:
    """``runner="task"``: in a Ray task holding one worker's CPUs and GPU share, train (as
    :func:`_fit_in_process`) and evaluate the test split with the best checkpoint on the same device.
    Returns (the fit's result, the test metrics, the Unix time the fit ended, this worker's pid)."""
    result = _fit_in_process(cfg, info, run_dir, extra)
    fit_end = time.time()
    best, _ = best_checkpoint(result, *run_score(cfg))
    return result, _evaluate_remote(best, cfg), fit_end, os.getpid()


#: Where a run's loop runs (``run_training(runner=...)``, jobs/train.py ``--runner``):
#: "trainer": a Ray Train ``TorchTrainer`` (its controller and worker processes; any number of workers);
#: "task": one Ray task holding one worker's CPUs and GPU share trains and tests (no Train processes);
#: "process": this process, which already holds the run's resources (a study's task, one worker).
RUNNERS = ("trainer", "task", "process")


def resolve_runner(runner: str, cfg: TrainConfig) -> str:
    """``runner`` itself, or for "auto" (jobs/train.py's default): a resumed run's own kind (by its checkpoint
    layout; a run without one was a Ray Train run), else "task" for one worker that reads its own input (not
    ingest 'split'), else "trainer". ``cfg`` resolved (its storage path absolute)."""
    if runner != "auto":
        return runner
    if cfg.resume:
        try:
            name = cfg.run_name or find_resumable_run(cfg.storage_path, cfg.model, cfg.seed)
            state = json.loads((Path(cfg.storage_path) / name / RUN_STATE_FILE).read_text())
        except (OSError, ValueError):
            return "trainer"  # nothing to resume: run_training says so, naming the directory
        return "task" if state.get("checkpoint_layout") == "local" else "trainer"
    return "task" if cfg.num_workers == 1 and cfg.ingest != "split" else "trainer"


def check_resume(cfg: TrainConfig) -> None:
    """With ``cfg.resume`` (``cfg`` resolved): the run to resume exists and each of its checkpoints loads with
    weights_only, else ValueError / :class:`CheckpointError` naming the directory or file (before Ray starts:
    a refused file in a worker would end the run with a traceback)."""
    if cfg.resume:
        name = cfg.run_name or find_resumable_run(cfg.storage_path, cfg.model, cfg.seed)
        check_checkpoints(Path(cfg.storage_path) / name)


def check_runner(runner: str, cfg: TrainConfig) -> None:
    """ValueError naming the value when ``runner`` cannot run ``cfg`` (before any Ray work)."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {list(RUNNERS)}, got {runner!r}")
    if runner != "trainer" and cfg.num_workers != 1:
        raise ValueError(
            f"runner {runner!r} trains one worker, got num_workers={cfg.num_workers} (use runner 'trainer')"
        )
    if runner != "trainer" and cfg.ingest == "split":
        raise ValueError(
            f"ingest 'split' (Ray Data's streaming_split) needs Ray Train: runner {runner!r} reads the train "
            "split itself (ingest auto, per_rank or memory), or use runner 'trainer'"
        )


def run_training(
    cfg: TrainConfig,
    *,
    extra_loop_config: Mapping[str, Any] | None = None,
    run_config_callbacks: Iterable[Any] = (),
    progress: bool = False,
    timeline: Timeline | None = None,
    runner: str = "trainer",
) -> TrainResult:
    """Train ``cfg`` end to end (see the module docstring) and return what it produced.

    ``runner`` (:data:`RUNNERS`): "trainer" (default) fits a Ray Train ``TorchTrainer``; "task" runs the
    training loop (train/local.py) and the test evaluation in one Ray task holding one worker's CPUs and GPU
    share, with no Train controller or worker group to start (one worker; Ray retries the task up to
    ``max_failures`` times, resuming from the run's latest checkpoint); "process" runs them in this process,
    for a caller that already holds the run's resources in a Ray task or actor (a study run). A run is
    resumed with the runner it started with (its checkpoints are laid out by it).

    ``progress``: print one line per epoch (loss, validation metrics, images/s, elapsed, ETA) while it trains
    (:class:`deeplense_ray.tracking.console.RunWatcher`, reading the epochs rank 0 logs to the MLflow run).

    Everything is validated before Ray starts (ValueError / FileNotFoundError naming the value or file).
    Uses the current Ray runtime if initialised, else ``ray.init()`` (which joins RAY_ADDRESS if set).

    ``timeline``: the job's :class:`~deeplense_ray.train.timeline.Timeline` (jobs/train.py starts it before
    Ray); default one started here. Its phases and this run's epochs are logged as ``timeline.json`` and
    returned in ``TrainResult.timeline``.
    """
    import ray
    from mlflow.tracking import MlflowClient

    timeline = timeline if timeline is not None else Timeline()
    cfg = cfg.resolved()
    info = cfg.validate()
    check_runner(runner, cfg)
    warm = _warm_task_worker(cfg) if runner == "task" and ray.is_initialized() else None
    name, state = _prepare_run(cfg, info, runner)
    timeline.mark("run prepared")
    run_id, uri = state["mlflow_run_id"], state["tracking_uri"]
    client = MlflowClient(tracking_uri=uri)
    run_dir = Path(cfg.storage_path) / name
    try:
        if not ray.is_initialized():
            ray.init()
        extra = {"mlflow": {"tracking_uri": uri, "run_id": run_id}, **dict(extra_loop_config or {})}
        timeline.mark("fit start")
        watch = nullcontext()
        if progress:
            from deeplense_ray.tracking.console import RunWatcher

            watch = RunWatcher(uri, run_id, max_epochs=cfg.epochs)
        with watch:
            test = None
            if runner == "process":
                result = _fit_in_process(cfg, info, run_dir, extra)
            elif runner == "task":
                warm_pid = None
                if warm is not None:
                    warm_pid = _wait_quietly(warm)
                    timeline.mark("task worker ready")
                task = ray.remote(
                    **_task_options(cfg), max_retries=cfg.max_failures, retry_exceptions=cfg.max_failures > 0
                )(_fit_and_test_in_task)
                pending = task.remote(cfg, info, run_dir, extra)
                _import_modules(_RESULT_IMPORTS)  # what logging the results needs, while the run trains
                result, test, fit_end, task_pid = ray.get(pending)
                timeline.mark("fit end", at=fit_end)
                # "warmed": the task ran in the warm-up's process (see _warm_task_worker); "new": Ray started
                # another one (a retry, or no idle worker fitted)
                client.set_tag(run_id, "task_worker", "warmed" if task_pid == warm_pid else "new")
            else:
                trainer = build_trainer(
                    cfg, run_name=name, info=info, run_config_callbacks=list(run_config_callbacks),
                    extra_loop_config=extra,
                )  # fmt: skip
                result = trainer.fit()
        if runner != "task":
            timeline.mark("fit end")
        if result.error is not None:
            raise result.error
        best, best_metrics = best_checkpoint(result, *run_score(cfg))
        best_epoch = int(best_metrics.get("epoch", read_meta(best)["epoch"]))
        history = _history_from_checkpoint(result.checkpoint)
        timeline.add_epochs(history)

        # The test split, once, with the best checkpoint: where the run trained (runner task or process), else
        # here when Ray runs on this machine alone, else in a task with one worker's resources (GPU if any).
        # The dataset's split or the fixed simulated set.
        if runner == "task":  # evaluated by the run's own task, above, on its device
            where = "task"
        elif runner == "process":  # on the device the run trained on
            where, test = "process", _evaluate_remote(best, cfg)
        elif (where := where_to_evaluate_test(cfg)) == "driver":
            test = _evaluate_remote(best, cfg, device="cuda" if cfg.use_gpu else "cpu")
        else:
            gpus = min(1.0, float(cfg.gpus_per_worker)) if cfg.use_gpu else 0
            task = ray.remote(num_cpus=float(cfg.cpus_per_worker), num_gpus=gpus)(_evaluate_remote)
            test = ray.get(task.remote(best, cfg))
        client.set_tag(run_id, "test_evaluated_in", where)
        client.set_tag(run_id, "runner", runner)
        timeline.mark("test evaluated")

        if cfg.inference:
            from deeplense_ray.train.gaussian import flatten_regression

            flat_test = flatten_regression(test, "test")
            client.set_tag(run_id, "calibration", calibration_tag(test))
        else:
            flat_test = flatten_metrics(test, "test")
        best_val = {k: float(v) for k, v in best_metrics.items() if k.startswith("val_")}
        from deeplense_ray.tracking import log_metrics

        log_metrics(
            uri,
            run_id,
            {**flat_test, "best_epoch": best_epoch, **{f"best_{k}": v for k, v in best_val.items()}},
            step=best_epoch,
        )
        from deeplense_ray.tracking.console import chance_warning

        warning = None
        if not cfg.inference:
            warning = chance_warning("test AUC (macro)", test.get("auc_macro"), test.get("auc_macro_ci"))
        if warning:  # the interval includes 0.5: say so where the result is read
            client.set_tag(run_id, "warning.chance", warning)
        with tempfile.TemporaryDirectory(prefix="dlr-artifacts-") as tmp:
            paths = _write_artifacts(
                Path(tmp),
                test=test,
                best_val=best_val,
                best_epoch=best_epoch,
                history=history,
                cfg=cfg,
                info=info,
            )
            client.log_artifacts(run_id, tmp)
            artifact_names = [p.name for p in paths]
        timeline.mark("artifacts logged")
        model_uri = _log_model(uri, run_id, best, cfg)
        timeline.mark("model logged")
        client.set_tag(run_id, "best_checkpoint", str(best.path))
        timeline.mark("end")
        client.log_dict(run_id, timeline.summary(), TIMELINE_FILE)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        state["status"] = "failed"
        atomic_write_json(run_dir / RUN_STATE_FILE, state)
        raise
    state.update(
        status="finished", best_checkpoint=str(best.path), best_epoch=best_epoch, model_uri=model_uri
    )
    atomic_write_json(run_dir / RUN_STATE_FILE, state)
    return TrainResult(
        run_id=run_id,
        experiment_id=state["experiment_id"],
        tracking_uri=uri,
        run_name=name,
        run_dir=str(run_dir),
        best_checkpoint=str(best.path),
        best_epoch=best_epoch,
        best_val=best_val,
        test_metrics={k: v for k, v in test.items() if k not in _PREDICTION_KEYS},
        history=history,
        model_uri=model_uri,
        artifacts=artifact_names,
        ray_result=result,
        timeline=timeline.summary(),
        timeline_line=timeline.line(),
        test_predictions={k: test[k] for k in _PREDICTION_KEYS if k in test},
    )


__all__ = [
    "RUNNERS",
    "RUN_STATE_FILE",
    "TrainResult",
    "best_checkpoint",
    "build_trainer",
    "checkpoint_config",
    "default_run_name",
    "evaluate_checkpoint",
    "find_resumable_run",
    "load_model_from_checkpoint",
    "loop_config",
    "run_training",
]
