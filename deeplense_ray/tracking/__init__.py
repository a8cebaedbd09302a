"""MLflow setup (absolute URIs, experiments created once by the driver), run parameters and plots."""

from __future__ import annotations

from deeplense_ray.tracking.mlflow_utils import (
    default_artifact_location,
    flatten_params,
    get_or_create_experiment,
    git_commit,
    log_metrics,
    log_params,
    metric_history,
    resolve_tracking_uri,
    run_params,
    use_tracking_uri,
)
from deeplense_ray.tracking.plots import (
    plot_confusion_matrix,
    plot_curves,
    plot_roc_curves,
)

__all__ = [
    "default_artifact_location",
    "flatten_params",
    "get_or_create_experiment",
    "git_commit",
    "log_metrics",
    "log_params",
    "metric_history",
    "plot_confusion_matrix",
    "plot_curves",
    "plot_roc_curves",
    "resolve_tracking_uri",
    "run_params",
    "use_tracking_uri",
]
