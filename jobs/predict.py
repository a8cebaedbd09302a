#!/usr/bin/env python
"""Class probabilities of a trained model over images: HDF5 datasets, .npy, FITS (thin CLI).

    python jobs/predict.py --model-uri models:/lens-cvt@champion --input data/model_ii --split test \
        --out predictions.csv
    python jobs/predict.py --model-uri runs:/<run id>/model --input deeplense/model_i/test --out p.parquet
    python jobs/predict.py --model-uri ray_results/<run>/checkpoint_000004 --input 'images/**/*.fits' \
        --out p.csv

One row per image (source file, index in it), one probability column per class, the predicted class. With
labels (a dataset, or class folders axion/ cdm/ no_sub/) the metrics, ROC and confusion plots go to an MLflow
run of their own.

A model of task 'inference' (jobs/train.py --task inference) gives per-lens posteriors instead: with --out
*.npz a posterior file (deeplense_ray/infer/posteriors.py: mean and covariance in physical units, the truth
where a dataset stores it, the training prior, ids, the model URI; what jobs/population.py reads), else a
table with mean_<target>, std_<target> (and true_<target>) per image of the model's classes.

A bad model URI, output name, or an image of the wrong size is refused before any work, with status 2 and a
message naming it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplense_ray.infer.model import PREDICT_BATCH_SIZE  # noqa: E402
from deeplense_ray.infer.predict import DEFAULT_EXPERIMENT, DEFAULT_RAY_THRESHOLD  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--model-uri",
        required=True,
        help="runs:/RUN_ID/model, models:/NAME@ALIAS (or models:/NAME/VERSION), or a checkpoint directory",
    )
    p.add_argument(
        "--input",
        required=True,
        help="dataset directory (manifest.json), .npy or FITS file or folder (class folders give labels), "
        "or a quoted glob",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output table, .csv or .parquet (written atomically); a model of task 'inference' also takes\n"
        ".npz: its per-lens posteriors as a posterior file",
    )
    p.add_argument(
        "--stack-axis0",
        action="store_true",
        help="for a 1-channel model, read an [N, H, W] array as a stack of N images (without this flag it is "
        "an error: the first axis could as well be N channels of one image)",
    )
    p.add_argument(
        "--split", action="append", default=None, help="dataset split(s) to predict (default: all)"
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store of the model and the metrics run (default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///<abs cwd>/mlflow.db)",
    )
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment of the metrics run")
    p.add_argument("--no-mlflow", action="store_true", help="do not log a metrics run even with labels")
    p.add_argument(
        "--ray-threshold",
        type=int,
        default=DEFAULT_RAY_THRESHOLD,
        help="inputs with more images go through Ray Data (actor pool); 0 = always",
    )
    p.add_argument("--batch-size", type=int, default=PREDICT_BATCH_SIZE)
    p.add_argument(
        "--actors", type=int, default=None, help="Ray predictor actors (default: one per GPU, else 1)"
    )
    p.add_argument(
        "--gpus-per-actor", type=float, default=None, help="default 1 when the cluster has GPUs, else 0"
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray address for large inputs; 'local' starts a fresh runtime (default: $RAY_ADDRESS, else the "
        "cluster `ray start` recorded on this machine if it answers, else a local runtime)",
    )
    p.add_argument(
        "--trust-pickled-model",
        action="store_true",
        help="load a model logged in the pickle format (MLflow pytorch flavor): unpickling it runs\n"
        "code stored in the tracking store, so trust everyone who can write to that store (the models\n"
        "train and tune log are a spec and weights, loaded without running code from the store)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    """The job; a failure the user causes (a bad file, an MLflow store that refuses) exits 2 with one line."""
    from deeplense_ray.cli import run_main

    return run_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from deeplense_ray.infer.predict import run_prediction
    from deeplense_ray.runtime import RayConnectError
    from deeplense_ray.tracking.mlflow_utils import check_tracking_reachable

    try:
        if not args.no_mlflow or args.model_uri.startswith(("models:/", "runs:/")):
            check_tracking_reachable(args.tracking_uri)  # before Ray starts and --out is written
        result = run_prediction(
            args.model_uri,
            args.input,
            args.out,
            tracking_uri=args.tracking_uri,
            splits=args.split,
            ray_threshold=args.ray_threshold,
            batch_size=args.batch_size,
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
            address=args.address,
            experiment=args.experiment,
            log_mlflow=not args.no_mlflow,
            overwrite=args.overwrite,
            progress=not args.quiet,
            stack_axis0=args.stack_axis0,
            trust_pickled_model=args.trust_pickled_model,
        )
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError, RayConnectError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "out": result.out,
        "images": result.num_images,
        "mode": result.mode,
        "seconds": round(result.seconds, 3),
        "images_per_s": round(result.images_per_s, 1),
        "classes": result.class_names,
        "labelled": result.labelled,
        "mlflow_run_id": result.run_id,
    }
    if result.metrics is not None:
        keys = ("n", "nll", "rmse", "bias", "coverage_68", "coverage_95", "calibrated")
        if "accuracy" in result.metrics:
            keys = ("n", "accuracy", "auc_macro", "auc", "loss")
        summary["metrics"] = {k: result.metrics[k] for k in keys}
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
