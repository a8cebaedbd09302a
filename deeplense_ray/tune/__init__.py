"""Hyperparameter search over the training loop with Ray Tune (ASHA + Optuna), tracked in MLflow.

Public API: :class:`TuneSettings`, :func:`run_search` -> :class:`SearchResult`, :func:`search_space`.
"""

from __future__ import annotations

from deeplense_ray.tune.runner import SearchResult, SearchSetupError, TrialSummary, run_search, train_trial
from deeplense_ray.tune.settings import METRIC_MODES, TuneSettings, check_cluster_resources
from deeplense_ray.tune.spaces import search_space

__all__ = [
    "METRIC_MODES",
    "SearchResult",
    "SearchSetupError",
    "TrialSummary",
    "TuneSettings",
    "check_cluster_resources",
    "run_search",
    "search_space",
    "train_trial",
]
