"""Finishing a run: the test metrics, plots, metrics JSON and best model logged to its MLflow run.

:func:`finish_run` logs the one test evaluation's metrics next to the best epoch's validation metrics, tags
the run (a test AUC whose interval includes chance, the calibration of task 'inference', the best
checkpoint), writes its artifacts (ROC and confusion plots or calibration plots, the curves,
``metrics.json``, ``config.json``, the job's timeline) and logs the best checkpoint's model, then marks the
run FINISHED. :class:`TrainResult` is what ``run_training`` returns.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deeplense_ray.config import DatasetInfo, TrainConfig
from deeplense_ray.io import atomic_write_json
from deeplense_ray.train.checkpoint import STATE_FILE, load_tensors
from deeplense_ray.train.metrics import flatten_metrics
from deeplense_ray.train.timeline import Timeline
from deeplense_ray.train.trainer import SCORE_ATTRIBUTE, run_score

TIMELINE_FILE = "timeline.json"  # MLflow artifact: the job's phases (train/timeline.py)


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


#: Per-lens arrays of a test evaluation (not metrics): classification's labels and probabilities, inference's
#: posteriors in physical units (train/gaussian.py) and lens ids.
PREDICTION_KEYS = ("y_true", "probs", "mean", "cov", "truth", "ids")


def history_from_checkpoint(checkpoint: Any) -> list[dict[str, float]]:
    with checkpoint.as_directory() as d:
        state = load_tensors(Path(d) / STATE_FILE)
    return [dict(h) for h in state.get("history", [])]


def finish_run(
    client: Any,
    cfg: TrainConfig,
    info: DatasetInfo,
    *,
    uri: str,
    run_id: str,
    test: dict[str, Any],
    best: Any,
    best_metrics: Mapping[str, Any],
    best_epoch: int,
    history: list[dict[str, float]],
    timeline: Timeline,
) -> tuple[dict[str, float], list[str], str]:
    """Log the run's results (see the module docstring) and mark it FINISHED; returns (the best epoch's
    val_* metrics, the artifact names, the logged model's URI)."""
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
    return best_val, artifact_names, model_uri


def calibration_tag(test: Mapping[str, Any]) -> str:
    """The run tag ``calibration``: 'pass' or 'fail', and the observed 68 % / 95 % coverage per target (the
    check: within +-5 points of nominal, train/gaussian.py :func:`calibration_check`)."""
    cov = ", ".join(
        f"{t} {test['coverage_68'][t]:.3f}/{test['coverage_95'][t]:.3f}" for t in test["coverage_68"]
    )
    return f"{'pass' if test.get('calibrated') else 'fail'} (68%/95% coverage: {cov})"


def _log_model(tracking_uri: str, run_id: str, checkpoint: Any, cfg: TrainConfig) -> str:
    """The best checkpoint's model into the run: the pytorch flavor plus a pyfunc returning class
    probabilities, a signature, an input example from the data (an online run without data: one image of
    its preset) and the architecture in its metadata (deeplense_ray/tracking/models.py)."""
    from deeplense_ray.tracking.models import log_checkpoint_model
    from deeplense_ray.train.online import example_input

    return log_checkpoint_model(checkpoint, tracking_uri, run_id, input_example=example_input(cfg))


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
        "test": {k: v for k, v in test.items() if k not in PREDICTION_KEYS},
        "history": [dict(h) for h in history],
        "dataset_manifest_hash": info.manifest_hash,
    }
    paths.append(atomic_write_json(out_dir / "metrics.json", summary))
    paths.append(atomic_write_json(out_dir / "config.json", cfg.to_dict()))
    return paths
