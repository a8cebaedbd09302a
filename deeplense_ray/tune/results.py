"""What a search's trials produced, read back from Tune: per-trial summaries, trial ids and statuses.

:func:`trial_summaries` turns Tune's ``ResultGrid`` into :class:`TrialSummary` rows (curve, best epoch,
outcome); :func:`trial_statuses` reads the statuses from Tune's saved experiment state while a search runs.
A diverged report's finite stand-in (``|v| >= DIVERGED_VALUE``) reads back as NaN (:func:`as_metric`); a
trial's best epoch is the best of its curve by :mod:`deeplense_ray.ranking` (ties: the earlier epoch).
:func:`is_better`, :func:`worst_value` and :func:`as_metric` are :mod:`deeplense_ray.ranking`'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deeplense_ray.ranking import as_metric as as_metric
from deeplense_ray.ranking import epoch_key
from deeplense_ray.ranking import is_better as is_better
from deeplense_ray.ranking import worst_value as worst_value
from deeplense_ray.tune.mlflow_runs import DIVERGED_KEY
from deeplense_ray.tune.settings import TuneSettings


@dataclass
class TrialSummary:
    """One trial of a finished search."""

    trial_id: str
    config: dict[str, Any]
    epochs_run: int
    best_metric: float
    best_epoch: int
    outcome: str
    child_run_id: str | None
    curve: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SearchResult:
    """What :func:`~deeplense_ray.tune.runner.run_search` returns (also written to the search's output
    directory)."""

    name: str
    output_dir: str
    metric: str
    mode: str
    experiment_id: str
    parent_run_id: str
    best_trial_id: str
    best_config: dict[str, Any]
    best_metric: float
    best_epoch: int
    best_checkpoint: str | None
    test_metrics: dict[str, Any]
    trials: list[TrialSummary]
    summary_table: str
    tracking_uri: str = ""
    data_dir: str = ""
    model_uri: str | None = None
    disk_bytes: int = 0
    warnings: list[str] = field(default_factory=list)


def trial_id_of(result) -> str:
    """Tune trial id of a ``ray.tune.Result`` (from its metrics, else its ``trial_<id>`` directory name)."""
    if result.metrics and result.metrics.get("trial_id"):
        return str(result.metrics["trial_id"])
    return os.path.basename(result.path).removeprefix("trial_")


def trial_statuses(output_dir: str) -> dict[str, str]:
    """Trial id -> Tune status (PENDING/RUNNING/TERMINATED/ERROR) from the newest saved experiment state
    ({} while there is none or it is being rewritten)."""
    import glob

    files = sorted(glob.glob(os.path.join(output_dir, "experiment_state-*.json")))
    if not files:
        return {}
    try:
        with open(files[-1]) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError):  # Tune rewrites the file in place; caught mid-write
        return {}
    out = {}
    for trial_json, _meta in state.get("trial_data", []):
        t = json.loads(trial_json)
        out[str(t["trial_id"])] = str(t["status"])
    return out


def trial_summaries(
    results, settings: TuneSettings, param_keys: Iterable[str], run_ids: Mapping[str, str] | None
) -> list[TrialSummary]:
    """One :class:`TrialSummary` per result of ``Tuner.fit`` (same order); ``run_ids``: trial id -> its
    MLflow child run."""
    from deeplense_ray.tune.mlflow_runs import outcome

    mode = settings.resolved_mode
    out = []
    for r in results:
        df = r.metrics_dataframe
        curve: list[tuple[int, float]] = []
        if df is not None and len(df) and settings.metric in df:
            ep = df["epoch"] if "epoch" in df else df["training_iteration"]
            curve = sorted({int(e): as_metric(v) for e, v in zip(ep, df[settings.metric])}.items())
        # an empty curve: no epoch (0) and the worst value
        best_e, best_m = min(
            curve, key=lambda ev: epoch_key(ev[1], ev[0], mode), default=(0, worst_value(mode))
        )
        epochs = max((e for e, _ in curve), default=0)
        tid = trial_id_of(r)
        diverged_at = None
        if df is not None and DIVERGED_KEY in df and "epoch" in df:
            bad = df[df[DIVERGED_KEY] == 1.0]
            diverged_at = int(bad["epoch"].min()) if len(bad) else None
        text = (
            outcome(epochs, settings.max_epochs, diverged_at=diverged_at)[0]
            if r.error is None
            else f"failed: {type(r.error).__name__}"
        )
        out.append(
            TrialSummary(
                trial_id=str(tid),
                config={k: r.config.get(k) for k in param_keys if k in r.config},
                epochs_run=epochs,
                best_metric=best_m,
                best_epoch=best_e,
                outcome=text,
                child_run_id=run_ids.get(str(tid)) if run_ids is not None else None,
                curve=curve,
            )
        )
    return out
