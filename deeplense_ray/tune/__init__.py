"""Hyperparameter search over the training loop with Ray Tune (ASHA + Optuna), tracked in MLflow.

Public API: :class:`TuneSettings`, :func:`run_search` -> :class:`SearchResult`, :func:`search_space`.
"""

from __future__ import annotations

from deeplense_ray.tune.plan import SearchSetupError
from deeplense_ray.tune.results import SearchResult, TrialSummary
from deeplense_ray.tune.runner import run_search
from deeplense_ray.tune.settings import METRIC_MODES, TuneSettings, check_cluster_resources
from deeplense_ray.tune.spaces import search_space
from deeplense_ray.tune.trial import train_trial

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
