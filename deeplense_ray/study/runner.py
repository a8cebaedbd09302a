"""Run a study: every model x seed as one tracked training (``run_training``), then one report.

Runs are parallel Ray tasks (:func:`study_run`, at most ``concurrency`` at once), each holding one run's CPUs
and GPU share (fractional GPUs pack small models on a GPU) and calling the project's
``deeplense_ray.train.run_training(runner="process")``: the run trains and is tested in the task's own process
(train/local.py), with no Ray Train controller or worker processes, and Ray reuses that process for a later
run (a GPU study of 15 runs started over 100 worker processes the Ray Train way and ran out of time). A
finished run writes ``runs/<model>-s<seed>.json`` (test metrics, parameter count, images/s) and ``.npz``
(test labels and probabilities for the ROC curves; task 'inference': the per-lens posterior ``mean`` [N, T],
``cov`` [N, T, T] and ``truth`` [N, T] in physical units for the calibration curves) atomically: that
directory is the study's state. A resumed study (``resume=True``) runs only the pairs without a result; a run
killed mid-training continues from its latest checkpoint (``run_training(resume=True)``), one killed after
training is only evaluated.

On disk (``<storage_path>/<name>/``): ``study_state.json`` (settings, dataset, MLflow ids), ``runs/``,
``trainers/`` (each run's directory and checkpoints), ``dataset/`` (with ``simulate``), and the
report (``study_table.md``, ``study_table.csv``, ``study_runs.csv``, and ``roc_study.png`` or, task
'inference', ``calibration_study.png``). MLflow: a parent run per study (tag ``study.role=study``) holding
the report, and the training runs nested under it (tag ``mlflow.parentRunId``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from deeplense_ray.io import atomic_path, atomic_write_json, atomic_write_text
from deeplense_ray.study.settings import RUNS_DIR, StudyResult, StudySettings, run_key

STATE_FILE = "study_state.json"
TRAINERS_DIR = "trainers"
TAG_PARENT = "mlflow.parentRunId"


class StudySetupError(ValueError):
    """A bad option or input found before any training started."""


class StudyIncomplete(RuntimeError):
    """Some runs failed; the finished ones are kept and ``resume=True`` runs only the rest."""


# ----------------------------------------------------------------------------------------------- trial
def _images_per_s(client, run_id: str) -> float:
    """Training images/s of a run: the median over epochs 2.. of its logged ``images_per_s`` (epoch 1 holds
    start-up), or epoch 1's with a single epoch."""
    import numpy as np

    hist = sorted(client.get_metric_history(run_id, "images_per_s"), key=lambda m: m.step)
    values = [m.value for m in hist if m.step >= 2] or [m.value for m in hist]
    return float(np.median(values)) if values else float("nan")


def inference_row(test: dict[str, Any]) -> dict[str, float]:
    """The scalar test metrics of an inference run (``flatten_regression`` without its prefix and the loss,
    which is the NLL): ``nll``, ``calibrated``, ``diverged`` and per target ``rmse_<t>``, ``bias_<t>``,
    ``std_<t>``, ``rmse_over_prior_<t>``, ``coverage68_<t>``, ``coverage95_<t>``."""
    from deeplense_ray.train.gaussian import flatten_regression

    flat = flatten_regression(test, "test")
    return {k.removeprefix("test_"): v for k, v in flat.items() if k != "test_loss"}


def progress_line(key: str, row: dict[str, Any], targets: list[str] | tuple[str, ...] = ()) -> str:
    """The line ``_run_all`` prints when a run is done: its test metrics."""
    if not targets:
        return f"study run {key}: test accuracy {row['accuracy']:.4f}, macro AUC {row['auc_macro']:.4f}"
    per = ", ".join(
        f"{t} RMSE {row[f'rmse_{t}']:.4g} ({row[f'rmse_over_prior_{t}']:.3f} x prior std)" for t in targets
    )
    return f"study run {key}: test NLL {row['nll']:.4f}, {per}"


def study_run(job: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
    """One (model, seed) of the study, trained by ``run_training`` (or continued / only evaluated when an
    earlier attempt got that far), then its result files written; returns its result row."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from deeplense_ray.config import TrainConfig
    from deeplense_ray.models import count_parameters
    from deeplense_ray.train import evaluate_checkpoint, load_model_from_checkpoint, run_training
    from deeplense_ray.train.trainer import RUN_STATE_FILE

    model, seed = job["model"], int(job["seed"])
    key = run_key(model, seed)
    if [model, seed] in [list(x) for x in fixed["fail_runs"]]:
        raise RuntimeError(f"injected failure of run {key} (StudySettings.fail_runs)")
    storage = Path(fixed["trainer_storage"])
    fields = dict(fixed["train"][model], seed=seed, storage_path=str(storage), run_name=key,
                  tracking_uri=fixed["tracking_uri"])  # fmt: skip
    state_file = storage / key / RUN_STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else None
    inference = fields.get("task") == "inference"
    if state is not None and state.get("status") == "finished":  # trained; its result was not written
        run_id, best = state["mlflow_run_id"], state["best_checkpoint"]
        if inference:
            from deeplense_ray.train.regression import evaluate_inference

            test = evaluate_inference(best, TrainConfig(**fields))
        else:
            test = evaluate_checkpoint(best, fixed["data_dir"], "test", return_predictions=True)
    else:
        if state is None and (storage / key).exists():  # nothing recorded yet: start it over
            shutil.rmtree(storage / key)
        # trained here, in this task (which holds the run's CPUs and GPU share): no Ray Train processes; its
        # one test evaluation (the dataset's test split, best checkpoint) gives the row and the ROC curves
        result = run_training(TrainConfig(**fields, resume=state is not None), runner="process")
        run_id, best = result.run_id, result.best_checkpoint
        test = {**result.test_metrics, **result.test_predictions}
    client = MlflowClient(tracking_uri=fixed["tracking_uri"])
    client.set_tag(run_id, TAG_PARENT, fixed["parent_run_id"])
    client.set_tag(run_id, "study.name", fixed["name"])
    client.set_tag(run_id, "study.run", key)
    params = count_parameters(load_model_from_checkpoint(best))
    out = Path(fixed["runs_dir"])
    with atomic_path(out / f"{key}.npz") as tmp, open(tmp, "wb") as fh:  # a file: savez adds no suffix
        if inference:  # per-lens posteriors in physical units
            np.savez(fh, **{k: np.asarray(test[k], np.float64) for k in ("mean", "cov", "truth")})
        else:
            np.savez(fh, y_true=np.asarray(test["y_true"]), probs=np.asarray(test["probs"]))
    row = {
        "model": model,
        "seed": seed,
        "run_id": run_id,
        "checkpoint": str(best),
        "params": int(params),
        "images_per_s": _images_per_s(client, run_id),
        "epochs": int(fields["epochs"]),
    }
    if inference:
        row.update(inference_row(test), n_test=int(test["n"]))
    else:
        row.update(accuracy=float(test["accuracy"]), auc_macro=float(test["auc_macro"]),
                   **{f"auc_{c}": float(v) for c, v in test["auc"].items()})  # fmt: skip
    atomic_write_json(out / f"{key}.json", row)  # last: its presence marks the run finished
    return row


# ----------------------------------------------------------------------------------------------- study
def _resources(s: StudySettings, cluster: dict[str, float], pending: int) -> tuple[float, float, int]:
    """(GPUs, CPUs) per run and runs at once; ValueError when one run cannot fit the cluster."""
    from deeplense_ray.runtime import DATA_RESERVE_CPUS, check_cpu_room
    from deeplense_ray.tune.settings import DRIVER_CPUS

    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    g = float(s.gpus_per_run) if s.gpus_per_run is not None else (0.25 if gpus > 0 else 0.0)
    if g > gpus + 1e-9:
        raise ValueError(f"gpus_per_run={g:g}, but the Ray cluster has {gpus:g} GPUs")
    room = cpus - DATA_RESERVE_CPUS - DRIVER_CPUS
    c = float(s.cpus_per_run) if s.cpus_per_run is not None else max(0.25, min(1.0, math.floor(room * 4) / 4))
    check_cpu_room(cluster, DRIVER_CPUS + c, what="a run", detail=f"{DRIVER_CPUS:g} + cpus_per_run={c:g}",
                   fix="lower cpus_per_run (fractions are allowed)")  # fmt: skip
    fit = max(1, math.floor((cpus - DATA_RESERVE_CPUS + 1e-9) / (DRIVER_CPUS + c)))
    if g > 0:
        fit = min(fit, math.floor((gpus + 1e-9) / g))
    fit = max(1, min(fit, pending))
    if s.max_concurrent is not None:
        fit = min(fit, s.max_concurrent)
    return g, c, fit


def _newest_study(storage: Path) -> str:
    found = sorted((p.stat().st_mtime, p.parent.name) for p in storage.glob(f"*/{STATE_FILE}"))
    if not found:
        raise ValueError(f"nothing to resume: no */{STATE_FILE} under {storage}")
    return found[-1][1]


def _prepare(settings: StudySettings) -> tuple[StudySettings, Path, dict[str, Any] | None]:
    """Validated settings, the study directory and its saved state (resume). No cluster work."""
    storage = Path(settings.storage_path).expanduser().resolve()
    if settings.resume:
        name = settings.name or _newest_study(storage)
        state_file = storage / name / STATE_FILE
        if not state_file.is_file():
            raise ValueError(f"nothing to resume: {state_file} does not exist")
        state = json.loads(state_file.read_text())
        saved = dict(state["settings"], resume=True, name=name, fail_runs=settings.fail_runs)
        saved["models"] = tuple(saved["models"])
        s = StudySettings(**saved).validate()
        return s, storage / name, state
    s = settings.validate()
    name = s.name or time.strftime("study-%Y%m%d-%H%M%S")
    out = storage / name
    if out.exists():
        raise ValueError(f"study directory {out} already exists: pass resume=True (--resume) or another name")
    if s.data_dir is not None:
        _check_data(s, str(Path(s.data_dir).expanduser().resolve()))
    return dataclasses.replace(s, name=name), out, None


def _check_data(s: StudySettings, data_dir: str) -> None:
    """Every model's TrainConfig against the dataset (exists, splits, the model takes its images)."""
    from deeplense_ray.config import TrainConfig

    for model in s.models:
        TrainConfig(**StudySettings.train_fields(s, model, seed=0, data_dir=data_dir)).validate()


def _ensure_dataset(s: StudySettings, out: Path) -> str:
    if s.data_dir is not None:
        return str(Path(s.data_dir).expanduser().resolve())
    from deeplense_ray.data import build_dataset, verify_dataset
    from deeplense_ray.tune.dataset import dataset_lock

    data = out / "dataset"
    with dataset_lock(str(data)):
        if not ((data / "manifest.json").is_file() and not verify_dataset(data)):
            build_dataset(StudySettings.dataset_config(s).validate(), str(data), resume=data.is_dir(),
                          progress=False)  # fmt: skip
    return str(data)


def _run_all(
    pending: list[tuple[str, int]], fixed: dict[str, Any], concurrency: int, gpus: float, cpus: float
) -> dict[str, str]:
    """Every pending (model, seed) as a Ray task holding one run's ``cpus`` (+ 0.1) and ``gpus``, which trains
    it in its own process (Ray reuses the process for a later run), at most ``concurrency`` at once; returns
    failures by key (a failed run is reported and the others go on)."""
    import sys

    import ray

    from deeplense_ray.tune.settings import DRIVER_CPUS

    task = ray.remote(num_cpus=DRIVER_CPUS + cpus, num_gpus=gpus, max_retries=0)(study_run)
    todo, running, failed = list(pending), {}, {}
    while todo or running:
        while todo and len(running) < concurrency:
            m, seed = todo.pop(0)
            running[task.remote({"model": m, "seed": seed}, fixed)] = run_key(m, seed)
        ready, _ = ray.wait(list(running), num_returns=1)
        key = running.pop(ready[0])
        try:
            row = ray.get(ready[0])
            print(progress_line(key, row, fixed.get("targets", ())), file=sys.stderr, flush=True)
        except Exception as exc:  # one failed run does not stop the others
            failed[key] = f"{type(exc).__name__}: {exc}"
            print(f"study run {key} failed: {failed[key][:2000]}", file=sys.stderr, flush=True)
    return failed


def run_study(settings: StudySettings, *, address: str | None = None) -> StudyResult:
    """Run (or resume) a study and write its report; see the module docstring.

    Raises StudySetupError (a ValueError naming the value) before any training for bad options, models or
    data; StudyIncomplete after the grid when some runs failed (the finished ones are kept)."""
    import ray
    from mlflow.tracking import MlflowClient

    from deeplense_ray.tracking import get_or_create_experiment, log_params, resolve_tracking_uri
    from deeplense_ray.tune.runner import connect_ray

    try:
        s, out, state = _prepare(settings)
        if s.data_dir is None:  # the dataset to simulate fits on disk and its build plan in memory
            from deeplense_ray.data.room import check_dataset_room

            check_dataset_room(StudySettings.dataset_config(s).validate(), out / "dataset")
    except (ValueError, FileNotFoundError) as exc:
        raise StudySetupError(str(exc)) from exc
    connect_ray(address)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUNS_DIR).mkdir(exist_ok=True)
    data_dir = _ensure_dataset(s, out)
    try:
        _check_data(s, data_dir)
        pending = [(m, seed) for m in s.models for seed in range(s.seeds)
                   if not (out / RUNS_DIR / f"{run_key(m, seed)}.json").is_file()]  # fmt: skip
        gpus, cpus, concurrency = _resources(s, ray.cluster_resources(), max(1, len(pending)))
    except (ValueError, FileNotFoundError) as exc:
        raise StudySetupError(str(exc)) from exc

    uri = state["tracking_uri"] if state else resolve_tracking_uri(s.tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    if state is None:
        exp_id = get_or_create_experiment(s.experiment, uri)
        parent = client.create_run(exp_id, run_name=s.name, tags={"study.role": "study"}).info.run_id
        settings_doc = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("fail_runs", "resume")}
        settings_doc["models"] = list(s.models)
        if s.task == "classification":  # the default: a classification study's settings as they always were
            settings_doc.pop("task")
            settings_doc.pop("targets")
        else:
            settings_doc["targets"] = list(s.targets)
        log_params(uri, parent, {"study": {k: v for k, v in settings_doc.items() if k != "model_configs"},
                                 "dataset": {"data_dir": data_dir}})  # fmt: skip
        state = {"settings": settings_doc, "tracking_uri": uri, "experiment_id": exp_id,
                 "parent_run_id": parent, "data_dir": data_dir, "attempts": 0}  # fmt: skip
    else:
        client.update_run(state["parent_run_id"], status="RUNNING")
    state["attempts"] = int(state.get("attempts", 0)) + 1
    atomic_write_text(out / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n", fsync=False)

    if pending:
        train = {}
        for m in s.models:
            f = StudySettings.train_fields(s, m, seed=0, data_dir=data_dir)
            f.update(gpus_per_worker=gpus, cpus_per_worker=cpus)
            f.pop("seed")
            train[m] = f
        fixed = {
            "train": train, "tracking_uri": uri, "parent_run_id": state["parent_run_id"], "name": s.name,
            "data_dir": data_dir, "trainer_storage": str(out / TRAINERS_DIR), "runs_dir": str(out / RUNS_DIR),
            "fail_runs": [list(x) for x in s.fail_runs],
        }  # fmt: skip
        if s.task == "inference":
            fixed["targets"] = list(s.targets)
        _run_all(pending, fixed, concurrency, gpus, cpus)
    missing = [run_key(m, seed) for m in s.models for seed in range(s.seeds)
               if not (out / RUNS_DIR / f"{run_key(m, seed)}.json").is_file()]  # fmt: skip
    if missing:
        client.set_terminated(state["parent_run_id"], status="FAILED")
        raise StudyIncomplete(
            f"study {s.name!r}: runs {missing} did not finish (see {out}); the others are kept: continue "
            f"with resume=True (--resume --name {s.name} --storage-path {out.parent})"
        )
    from deeplense_ray.study.report import write_report

    result = write_report(s, out, client=client, state=state)
    result.ran_now = [run_key(m, seed) for m, seed in pending]
    client.set_terminated(state["parent_run_id"], status="FINISHED")
    return result
