"""Class probabilities of a trained model over a set of images, written as CSV or Parquet; for a model of
task 'inference' the per-lens posteriors of its targets (:func:`run_prediction`, module ``posteriors.py``).

``run_prediction(model_uri, source, out)``: load the model and its preprocessing (``infer/model.py``) -> find
the images and check their shapes against the model (``infer/inputs.py``; a bad file fails here, naming it,
before any work) -> predict -> write the table atomically (temporary name, then ``os.replace``) -> when the
labels are known, the metrics of the training runs (accuracy, AUCs, F1, confusion matrix; ROC and confusion
plots) logged as an MLflow run of its own.

Small inputs (at most ``ray_threshold`` images) are read whole, checked (non-finite values included) and
predicted in this process. Larger ones stream through Ray Data: read tasks (one per ~1024 images) feed an
actor pool of predictors (one GPU each when the cluster has GPUs; ``gpus_per_actor`` fractions share one),
with Ray Data's progress bars; a file that fails to read or holds non-finite values stops the job with an
error naming it, and no output is written.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deeplense_ray.infer.inputs import InputPlan, chunk_units, read_units, units_from_json, units_to_json
from deeplense_ray.infer.model import PREDICT_BATCH_SIZE, LoadedModel, class_probabilities, is_inference

OUTPUT_SUFFIXES = (".csv", ".parquet")
#: A model of task 'inference' also writes its posteriors as a posterior file (infer/posteriors.py).
POSTERIOR_SUFFIX = ".npz"
#: Inputs with more images than this go through Ray Data (``--ray-threshold``).
DEFAULT_RAY_THRESHOLD = 10_000
DEFAULT_EXPERIMENT = "deeplense-predict"
#: Prediction tables up to this size are attached to the MLflow run as well.
MAX_LOGGED_TABLE_BYTES = 50 << 20
PROB_PREFIX = "prob_"


@dataclass
class PredictResult:
    out: str
    num_images: int
    class_names: list[str]
    labelled: bool
    mode: str  # "in-process" | "ray"
    seconds: float
    metrics: dict[str, Any] | None = None
    run_id: str | None = None
    input: str = ""
    table: Any = field(default=None, repr=False)

    @property
    def images_per_s(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else math.nan


def check_output_path(out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """The output path, absolute; ValueError naming it for a wrong suffix or an existing file."""
    path = Path(out).expanduser().resolve()
    if path.suffix.lower() not in (*OUTPUT_SUFFIXES, POSTERIOR_SUFFIX):
        raise ValueError(f"--out {out}: the file must end in .csv or .parquet (or .npz: posteriors)")
    if path.is_dir():
        raise ValueError(f"--out {path} is a directory; name a .csv or .parquet file")
    if path.exists() and not overwrite:
        raise ValueError(f"--out {path} exists; pass --overwrite to replace it")
    return path


# ---------------------------------------------------------------------------------------------- the table
def build_table(
    columns: Mapping[str, np.ndarray], probs: np.ndarray, class_names: Sequence[str], labelled: bool
):
    """One row per image: source, index, [true_class], prob_<class>..., predicted."""
    import pandas as pd

    names = list(class_names)
    table = {"source": columns["source"].astype(str), "index": columns["index"].astype(np.int64)}
    if labelled:
        table["true_class"] = np.asarray(names, dtype=object)[columns["label"]]
    for k, name in enumerate(names):
        table[f"{PROB_PREFIX}{name}"] = probs[:, k]
    table["predicted"] = np.asarray(names, dtype=object)[np.argmax(probs, axis=1)] if len(probs) else []
    return pd.DataFrame(table)


def write_table_atomic(table: Any, path: Path) -> Path:
    """CSV or Parquet (by suffix) to a temporary name in the same folder, then ``os.replace``."""
    from deeplense_ray.io import atomic_path

    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)
    return path


# ---------------------------------------------------------------------------------------------- in process
def _predict_in_process(
    model: LoadedModel, plan: InputPlan, *, batch_size: int, progress: bool
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    from deeplense_ray.infer.model import head_outputs

    columns = read_units(plan.units, model.image_shape)  # every image read and checked before any work
    if progress:
        print(f"predict: {len(columns['image'])} images read and checked; predicting", file=sys.stderr)
    predict = head_outputs if is_inference(model.arch) else class_probabilities
    probs = predict(model.module, columns.pop("image"), batch_size=batch_size)
    return columns, probs


# ---------------------------------------------------------------------------------------------- Ray Data
def _read_chunks(batch: dict[str, np.ndarray], image_shape: Sequence[int]) -> dict[str, np.ndarray]:
    """Ray Data task: rows of unit lists (JSON) -> the images and row ids of those units."""
    parts = []
    for text, offset in zip(batch["units"], batch["offset"]):
        cols = read_units(units_from_json(str(text)), image_shape)
        cols["pos"] = int(offset) + np.arange(len(cols["index"]), dtype=np.int64)
        parts.append(cols)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class _Predictor:
    """Ray Data actor: the model on this actor's device (GPU when it holds one); image -> probs."""

    def __init__(self, model_ref: list[Any], batch_size: int, raw: bool = False):
        import ray

        from deeplense_ray.infer.model import default_device

        module = model_ref[0]
        self.module = ray.get(module) if isinstance(module, ray.ObjectRef) else module
        self.device = default_device()
        self.module = self.module.to(self.device).eval()
        self.batch_size = batch_size
        self.raw = raw  # a model of task 'inference': the head's raw outputs (the driver de-standardises)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from deeplense_ray.infer.model import head_outputs

        images = batch.pop("image")
        predict = head_outputs if self.raw else class_probabilities
        batch["probs"] = predict(self.module, images, device=self.device, batch_size=self.batch_size)
        return batch


def _predict_with_ray(
    model: LoadedModel,
    plan: InputPlan,
    *,
    batch_size: int,
    actors: int | None,
    gpus_per_actor: float | None,
    address: str | None,
    progress: bool,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    import ray

    from deeplense_ray.data.pipeline import map_batches_on_actors
    from deeplense_ray.runtime import connect

    connect(address, log_to_driver=False)  # joins $RAY_ADDRESS / a running cluster, else starts one
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if actors is None:
        actors = max(1, int(gpus // gpus_per_actor)) if gpus_per_actor > 0 else 1
    rows, offset = [], 0
    for chunk in chunk_units(plan.units):
        rows.append({"units": units_to_json(chunk), "offset": offset})
        offset += sum(u.rows for u in chunk)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(_read_chunks, batch_size=1, fn_kwargs={"image_shape": list(model.image_shape)})
    ds = map_batches_on_actors(
        ds,
        _Predictor,
        fn_constructor_kwargs={
            "model_ref": [ray.put(model.module)],
            "batch_size": batch_size,
            "raw": is_inference(model.arch),
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=int(actors)),
        num_gpus=float(gpus_per_actor),
    )
    ctx = ray.data.DataContext.get_current()
    shown, ctx.enable_progress_bars = ctx.enable_progress_bars, bool(progress)
    try:
        parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    finally:
        ctx.enable_progress_bars = shown
    columns = {k: np.concatenate([p[k] for p in parts]) for k in ("source", "index", "label", "probs", "pos")}
    order = np.argsort(columns.pop("pos"), kind="stable")
    columns = {k: v[order] for k, v in columns.items()}
    if len(order) != plan.num_images:
        raise RuntimeError(f"Ray Data returned {len(order)} predictions for {plan.num_images} images")
    return columns, columns.pop("probs").astype(np.float64)


# ---------------------------------------------------------------------------------------------- MLflow

def _open_predict_run(tracking_uri: str, experiment: str, out: Path, model: Any) -> tuple[Any, str]:
    """The MLflow client and a new run (``predict-<out stem>``, tagged with the model URI) of a prediction."""
    from mlflow.tracking import MlflowClient

    from deeplense_ray.tracking import get_or_create_experiment

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.create_run(
        get_or_create_experiment(experiment, tracking_uri),
        run_name=f"predict-{out.stem}",
        tags={"deeplense.role": "predict", "deeplense.model_uri": model.uri},
    )
    return client, run.info.run_id

def log_prediction_run(
    *,
    tracking_uri: str,
    experiment: str,
    model: LoadedModel,
    plan: InputPlan,
    out: Path,
    labels: np.ndarray,
    probs: np.ndarray,
    metrics: Mapping[str, Any],
    seconds: float,
) -> str:
    """One MLflow run: the model and input as params, the metrics, ROC / confusion plots, metrics JSON and
    (when small) the prediction table. Returns the run id."""

    from deeplense_ray.infer.model import arch_params
    from deeplense_ray.io import atomic_write_json
    from deeplense_ray.tracking import (
        log_metrics,
        log_params,
        plot_confusion_matrix,
        plot_roc_curves,
    )
    from deeplense_ray.train.metrics import flatten_metrics

    client, run_id = _open_predict_run(tracking_uri, experiment, out, model)
    try:
        log_params(
            tracking_uri,
            run_id,
            {
                **arch_params(model),
                "input": {"source": plan.description, "images": plan.num_images},
                "output": str(out),
            },
        )
        flat = flatten_metrics(metrics, "predict")
        log_metrics(tracking_uri, run_id, {**flat, "images_per_s": plan.num_images / max(seconds, 1e-9)})
        names = list(metrics["class_names"])
        with tempfile.TemporaryDirectory(prefix="dlr-predict-") as tmp:
            plot_roc_curves(labels, probs, names, Path(tmp) / "roc.png", title=f"ROC, {out.name}")
            plot_confusion_matrix(metrics["confusion_matrix"], names, Path(tmp) / "confusion.png")
            atomic_write_json(Path(tmp) / "metrics.json", dict(metrics))
            client.log_artifacts(run_id, tmp)
        if out.stat().st_size <= MAX_LOGGED_TABLE_BYTES:
            client.log_artifact(run_id, str(out))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


# ---------------------------------------------------------------------------------------------- the job
def run_prediction(
    model_uri: str,
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    tracking_uri: str | None = None,
    splits: Sequence[str] | None = None,
    ray_threshold: int = DEFAULT_RAY_THRESHOLD,
    batch_size: int = PREDICT_BATCH_SIZE,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    address: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    log_mlflow: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    stack_axis0: bool = False,
    trust_pickled_model: bool = False,
) -> PredictResult:
    """Predict every image of ``source`` with the model at ``model_uri`` into ``out`` (see module docstring).

    Errors before any work (ValueError / FileNotFoundError naming the value or file): a bad ``out``, a model
    that does not load, an input that does not exist or holds an image of another shape than the model's.
    ``stack_axis0``: an [N, H, W] array for a 1-channel model is N images (else an error: it could be one
    image of N channels). ``trust_pickled_model``: load a model logged in the pickle format, running the
    code the tracking store holds for it (see :func:`~deeplense_ray.infer.model.load_classifier`).
    """
    from deeplense_ray.infer.inputs import plan_inputs
    from deeplense_ray.infer.model import load_classifier
    from deeplense_ray.tracking import resolve_tracking_uri

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(ray_threshold, bool) or not isinstance(ray_threshold, int) or ray_threshold < 0:
        raise ValueError(f"ray_threshold must be an integer >= 0, got {ray_threshold!r}")
    if actors is not None and (not isinstance(actors, int) or actors < 1):
        raise ValueError(f"actors must be an integer >= 1, got {actors!r}")
    if gpus_per_actor is not None and not (0 <= float(gpus_per_actor) <= 8):
        raise ValueError(f"gpus_per_actor must be in [0, 8], got {gpus_per_actor!r}")
    out_path = check_output_path(out, overwrite=overwrite)
    uri = resolve_tracking_uri(tracking_uri)
    model = load_classifier(model_uri, uri, trust_pickled_model=trust_pickled_model)
    inference = is_inference(model.arch)
    if out_path.suffix.lower() == POSTERIOR_SUFFIX and not inference:
        raise ValueError(f"--out {out_path}: a .npz posterior file needs a model of task 'inference'")
    plan = plan_inputs(
        source,
        image_shape=model.image_shape,
        class_names=_input_classes(model, source) if inference else model.class_names,
        splits=splits,
        stack_axis0=stack_axis0,
    )
    if plan.num_images == 0:
        raise ValueError(f"{plan.description}: no images to predict")

    t0 = time.perf_counter()
    if plan.num_images <= ray_threshold:
        mode = "in-process"
        columns, probs = _predict_in_process(model, plan, batch_size=batch_size, progress=progress)
    else:
        mode = "ray"
        columns, probs = _predict_with_ray(
            model,
            plan,
            batch_size=batch_size,
            actors=actors,
            gpus_per_actor=gpus_per_actor,
            address=address,
            progress=progress,
        )
    seconds = time.perf_counter() - t0
    if inference:
        return _finish_inference(
            model, plan, columns, probs, out_path, seconds=seconds, mode=mode, tracking_uri=uri,
            experiment=experiment, log_mlflow=log_mlflow, source=source,
        )  # fmt: skip
    table = build_table(columns, probs, model.class_names, plan.labelled)
    write_table_atomic(table, out_path)

    result = PredictResult(
        out=str(out_path),
        num_images=plan.num_images,
        class_names=model.class_names,
        labelled=plan.labelled,
        mode=mode,
        seconds=seconds,
        input=plan.description,
        table=table,
    )
    if plan.labelled:
        from deeplense_ray.train.metrics import classification_metrics

        result.metrics = classification_metrics(columns["label"], probs, model.class_names)
        if log_mlflow:
            result.run_id = log_prediction_run(
                tracking_uri=uri,
                experiment=experiment,
                model=model,
                plan=plan,
                out=out_path,
                labels=columns["label"],
                probs=probs,
                metrics=result.metrics,
                seconds=seconds,
            )
    return result


# ---------------------------------------------------------------------------------------------- inference
def _input_classes(model: LoadedModel, source: Any) -> list[str]:
    """The classes an input of a model of task 'inference' is labelled with: a dataset's own classes (its
    rows of other classes than the model's are left out of the output), else the model's."""
    path = Path(str(source)).expanduser()
    if (path / "manifest.json").is_file():
        from deeplense_ray.data.manifest import load_manifest

        return [str(c) for c in load_manifest(path)["class_names"]]
    return model.class_names


def _truth(columns: Mapping[str, np.ndarray], targets: Sequence[str]) -> np.ndarray | None:
    """[n, T] true target values of HDF5 rows (from the shards' per-image parameters), None when any row
    is not from a shard holding them."""
    import h5py

    from deeplense_ray.train.targets import stored_param, target_values

    names = sorted({stored_param(t) for t in targets})
    out = np.full((len(columns["index"]), len(targets)), np.nan)
    for src in np.unique(columns["source"]):
        rows = np.flatnonzero(columns["source"] == src)
        try:
            with h5py.File(str(src), "r") as f:
                params = {k: np.asarray(f["params"][k][:])[columns["index"][rows]] for k in names}
        except (OSError, KeyError):
            return None
        out[rows] = target_values(params, targets)
    return out


def _finish_inference(
    model: LoadedModel,
    plan: InputPlan,
    columns: dict[str, np.ndarray],
    outputs: np.ndarray,
    out_path: Path,
    *,
    seconds: float,
    mode: str,
    tracking_uri: str,
    experiment: str,
    log_mlflow: bool,
    source: Any,
) -> PredictResult:
    """A model of task 'inference': the posteriors (mean, covariance, physical units) of the images of its
    classes; a posterior file (.npz, infer/posteriors.py: with the truth where the input has it, the
    training prior, ids, the model URI) or a table (mean_<t>, std_<t>, true_<t>); with the truth, the
    metrics (RMSE, bias, NLL, coverage) in the result and in an MLflow run of its own."""
    import pandas as pd

    from deeplense_ray.infer.posteriors import gaussian_posteriors, write_posteriors
    from deeplense_ray.train.gaussian import head_to_gaussian, standardize, to_physical

    arch = model.arch
    targets = [str(t) for t in arch["targets"]]
    if plan.labelled:  # only the images of the model's classes (a dataset's other classes are left out)
        names = _input_classes(model, source)
        keep_ids = [k for k, c in enumerate(names) if c in model.class_names]
        keep = np.isin(columns["label"], keep_ids)
        columns = {k: v[keep] for k, v in columns.items()}
        outputs = outputs[keep]
    if len(outputs) == 0:
        raise ValueError(f"{plan.description}: no image of the model's classes {model.class_names}")
    mean, cov = to_physical(
        *head_to_gaussian(outputs, len(targets)), arch["target_loc"], arch["target_scale"]
    )
    truth = _truth(columns, targets) if plan.labelled else None
    ids = [f"{Path(str(s)).name}:{int(i)}" for s, i in zip(columns["source"], columns["index"])]
    prior = [tuple(p) for p in arch["target_prior"]]
    if out_path.suffix.lower() == POSTERIOR_SUFFIX:
        post = gaussian_posteriors(
            targets, mean, cov, prior, truth=truth, ids=tuple(ids), model_uri=model.uri
        )
        write_posteriors(out_path, post)
        table = None
    else:
        sd = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
        cols: dict[str, Any] = {"source": columns["source"].astype(str), "index": columns["index"]}
        for k, t in enumerate(targets):
            cols[f"mean_{t}"] = mean[:, k]
            cols[f"std_{t}"] = sd[:, k]
            if truth is not None:
                cols[f"true_{t}"] = truth[:, k]
        table = pd.DataFrame(cols)
        write_table_atomic(table, out_path)
    result = PredictResult(
        out=str(out_path), num_images=len(mean), class_names=model.class_names, labelled=truth is not None,
        mode=mode, seconds=seconds, input=plan.description, table=table,
    )  # fmt: skip
    if truth is not None:
        from deeplense_ray.train.gaussian import regression_metrics
        from deeplense_ray.train.targets import prior_std_of

        z = standardize(truth, arch["target_loc"], arch["target_scale"])
        metrics = regression_metrics(
            outputs, z, targets, arch["target_loc"], arch["target_scale"], prior_std=prior_std_of(prior)
        )
        result.metrics = {k: v for k, v in metrics.items() if k not in ("mean", "cov", "truth")}
        if log_mlflow:
            result.run_id = _log_inference_run(
                tracking_uri, experiment, model, plan, out_path, metrics, len(mean) / max(seconds, 1e-9)
            )
    return result


def _log_inference_run(
    tracking_uri: str,
    experiment: str,
    model: LoadedModel,
    plan: InputPlan,
    out: Path,
    metrics: Mapping[str, Any],
    images_per_s: float,
) -> str:
    """One MLflow run of a prediction with known truths: metrics, calibration and predicted-vs-true plots."""

    from deeplense_ray.infer.model import arch_params
    from deeplense_ray.io import atomic_write_json
    from deeplense_ray.tracking import log_metrics, log_params
    from deeplense_ray.tracking.plots import plot_calibration, plot_predicted_vs_true
    from deeplense_ray.train.gaussian import flatten_regression

    client, run_id = _open_predict_run(tracking_uri, experiment, out, model)
    try:
        log_params(tracking_uri, run_id, {**arch_params(model),
                                          "input": {"source": plan.description, "images": plan.num_images},
                                          "output": str(out)})  # fmt: skip
        log_metrics(
            tracking_uri, run_id, {**flatten_regression(metrics, "predict"), "images_per_s": images_per_s}
        )
        targets = list(metrics["targets"])
        with tempfile.TemporaryDirectory(prefix="dlr-predict-") as tmp:
            plot_calibration(metrics["calibration_curve"], targets, Path(tmp) / "calibration.png")
            plot_predicted_vs_true(metrics["mean"], metrics["cov"], metrics["truth"], targets,
                                   Path(tmp) / "pred_vs_true.png")  # fmt: skip
            summary = {k: v for k, v in metrics.items() if k not in ("mean", "cov", "truth")}
            atomic_write_json(Path(tmp) / "metrics.json", summary)
            client.log_artifacts(run_id, tmp)
        if out.stat().st_size <= MAX_LOGGED_TABLE_BYTES:
            client.log_artifact(run_id, str(out))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
