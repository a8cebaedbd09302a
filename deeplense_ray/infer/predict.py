"""Class probabilities of a trained model over a set of images, written as CSV or Parquet.

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
from deeplense_ray.infer.model import PREDICT_BATCH_SIZE, LoadedModel, class_probabilities

OUTPUT_SUFFIXES = (".csv", ".parquet")
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
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {out}: the file must end in .csv or .parquet")
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
    columns = read_units(plan.units, model.image_shape)  # every image read and checked before any work
    if progress:
        print(f"predict: {len(columns['image'])} images read and checked; predicting", file=sys.stderr)
    probs = class_probabilities(model.module, columns.pop("image"), batch_size=batch_size)
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

    def __init__(self, model_ref: list[Any], batch_size: int):
        import ray

        from deeplense_ray.infer.model import default_device

        module = model_ref[0]
        self.module = ray.get(module) if isinstance(module, ray.ObjectRef) else module
        self.device = default_device()
        self.module = self.module.to(self.device).eval()
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        batch["probs"] = class_probabilities(
            self.module, images, device=self.device, batch_size=self.batch_size
        )
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
        fn_constructor_kwargs={"model_ref": [ray.put(model.module)], "batch_size": batch_size},
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
    from mlflow.tracking import MlflowClient

    from deeplense_ray.infer.model import arch_params
    from deeplense_ray.io import atomic_write_json
    from deeplense_ray.tracking import (
        get_or_create_experiment,
        log_metrics,
        log_params,
        plot_confusion_matrix,
        plot_roc_curves,
    )
    from deeplense_ray.train.metrics import flatten_metrics

    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = get_or_create_experiment(experiment, tracking_uri)
    run = client.create_run(
        exp_id,
        run_name=f"predict-{out.stem}",
        tags={"deeplense.role": "predict", "deeplense.model_uri": model.uri},
    )
    run_id = run.info.run_id
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
    plan = plan_inputs(
        source,
        image_shape=model.image_shape,
        class_names=model.class_names,
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
