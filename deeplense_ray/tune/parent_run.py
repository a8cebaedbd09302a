"""The search's MLflow parent run, written by the driver: opened before ``Tuner.fit``, completed after it.

Opened by :func:`start_parent_run` (the experiment is created here, once: concurrent trials creating it raced)
with the search's settings as ``search.*`` params, or reopened by :func:`reopen_parent_run` on resume. The
trials' child runs are :class:`~deeplense_ray.tune.mlflow_runs.TrialRunsCallback`'s. When the search ends:
:func:`log_search_outcome` (the best trial's params, metric and test metrics, counts, the summary files),
:func:`log_trial_curves` (each child run's best epoch and curves plot) and :func:`log_best_model` (the best
checkpoint's test plots, its chance-level warning and the model).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from deeplense_ray.io import atomic_write_json
from deeplense_ray.tune.mlflow_runs import STARTUP_KEY, TAG_PROCESS, TAG_ROLE, TAG_SEARCH
from deeplense_ray.tune.report import BEST_CONFIG_FILE, SUMMARY_FILE
from deeplense_ray.tune.results import TrialSummary, as_metric
from deeplense_ray.tune.settings import TuneSettings

if TYPE_CHECKING:
    from deeplense_ray.tune.plan import SearchPlan


def search_params(settings: TuneSettings, plan: SearchPlan) -> dict[str, str]:
    """The parent run's params: every setting (``search.<field>``) and what the plan resolved."""
    d = settings.to_dict()
    d.update(
        data_dir=plan.data_dir, max_concurrent_resolved=plan.concurrency, gpus_per_trial_resolved=plan.gpus
    )
    return {f"search.{k}": str(v)[:500] for k, v in d.items()}


def start_parent_run(client, settings: TuneSettings, plan: SearchPlan) -> tuple[str, str]:
    """Create the experiment (if new) and the search's parent run; returns (experiment id, run id)."""
    from deeplense_ray.config import TrainConfig
    from deeplense_ray.tracking import get_or_create_experiment
    from deeplense_ray.train.prepare import log_run_inputs

    experiment_id = str(get_or_create_experiment(settings.experiment, plan.tracking_uri))
    parent = client.create_run(
        experiment_id,
        run_name=plan.name,
        tags={TAG_ROLE: "search", TAG_SEARCH: plan.name, "deeplense.model": settings.model},
    )
    run_id = parent.info.run_id
    for k, v in search_params(settings, plan).items():
        client.log_param(run_id, k, v)
    log_run_inputs(client, run_id, TrainConfig(**plan.base_train))
    return experiment_id, run_id


def reopen_parent_run(client, run_id: str) -> None:
    """A resumed search's parent run: running again, tagged ``tune.resumed``."""
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "tune.resumed", "true")


def log_search_outcome(
    client,
    run_id: str,
    best_doc: Mapping[str, Any],
    best: TrialSummary,
    trials: list[TrialSummary],
    output_dir: str,
    curves: str,
) -> None:
    """The parent run's record of the finished search (``best_doc``: what ``best_config.yaml`` holds): the
    best trial (``best.*`` params, ``best_<metric>``, ``best_epoch``, tags), its checkpoint's test metrics
    (``test_*``), trial counts and the summary files."""
    checkpoint = best_doc["best_checkpoint"]
    for k, v in best.config.items():
        client.log_param(run_id, f"best.{k}", str(v)[:500])
    client.log_metric(run_id, f"best_{best_doc['metric']}", best.best_metric)
    client.log_metric(run_id, "best_epoch", best.best_epoch)
    # the epoch the test metrics are of
    client.log_metric(run_id, "test_checkpoint_epoch", best_doc["checkpoint_epoch"])
    for k, v in best_doc["test_metrics"].items():
        client.log_metric(run_id, f"test_{k}", v)
    client.set_tag(run_id, "tune.best_trial_id", best.trial_id)
    client.set_tag(run_id, "tune.best_child_run_id", str(best.child_run_id))
    client.set_tag(run_id, "tune.best_checkpoint", str(checkpoint))
    client.log_metric(run_id, "trials", len(trials))
    client.log_metric(run_id, "trials_stopped_early", sum(t.outcome.startswith("stopped") for t in trials))
    client.log_metric(run_id, "epochs_total", sum(t.epochs_run for t in trials))
    for f in (BEST_CONFIG_FILE, SUMMARY_FILE):
        client.log_artifact(run_id, os.path.join(output_dir, f))
    client.log_artifact(run_id, curves)


def log_trial_curves(client, results, trials: list[TrialSummary], metric: str) -> None:
    """Every trial's child run: its loss and validation curves (``curves.png``), and its best epoch by the
    search metric (metric ``best_<metric>``, ``best_epoch``; tag ``tune.best_epoch``), the same "best" as the
    summary table and the parent run."""
    import tempfile

    from deeplense_ray.tracking import plot_curves as plot_run_curves

    for r, t in zip(results, trials):
        if not t.child_run_id:
            continue
        if math.isfinite(t.best_metric):
            client.log_metric(t.child_run_id, f"best_{metric}", t.best_metric)
        client.log_metric(t.child_run_id, "best_epoch", t.best_epoch)
        client.set_tag(t.child_run_id, "tune.best_epoch", str(t.best_epoch))
        df = r.metrics_dataframe
        if df is None or not len(df) or "epoch" not in df:
            continue
        history = [
            {k: as_metric(v) for k, v in row.items() if isinstance(v, (int, float))}
            for row in df.to_dict("records")
        ]
        with tempfile.TemporaryDirectory(prefix="dlr-trial-") as tmp:
            path = plot_run_curves(history, os.path.join(tmp, "curves.png"))
            client.log_artifact(t.child_run_id, str(path))


def log_best_model(
    client,
    run_id: str,
    checkpoint: str,
    test_metrics: Mapping[str, Any],
    predictions: Mapping[str, Any],
    tracking_uri: str,
    base_train: Mapping[str, Any],
) -> tuple[str, list[str]]:
    """The best checkpoint into the parent run: its test AUC interval, a warning when that interval holds
    chance level (tag ``warning.chance``), its test plots (:func:`log_test_plots`) and the model (tag
    ``tune.best_model_uri``). Returns (model URI, warnings)."""
    from deeplense_ray.config import TrainConfig
    from deeplense_ray.tracking.console import chance_warning
    from deeplense_ray.tracking.models import log_checkpoint_model
    from deeplense_ray.train.online import example_input

    warnings: list[str] = []
    ci = test_metrics.get("auc_macro_ci")
    if ci is not None:
        client.log_metric(run_id, "test_auc_macro_ci_low", float(ci[0]))
        client.log_metric(run_id, "test_auc_macro_ci_high", float(ci[1]))
    w = chance_warning("test AUC (macro)", test_metrics.get("auc_macro", math.nan), ci)
    if w:
        warnings.append(w)
        client.set_tag(run_id, "warning.chance", w)
    log_test_plots(client, run_id, test_metrics, predictions, checkpoint)
    model_uri = log_checkpoint_model(
        checkpoint, tracking_uri, run_id, input_example=example_input(TrainConfig(**base_train))
    )
    client.set_tag(run_id, "tune.best_model_uri", model_uri)
    return model_uri, warnings


def log_test_plots(
    client, run_id: str, test: Mapping[str, Any], predictions: Mapping[str, Any], ckpt
) -> None:
    """The best checkpoint on the test split, into the search's parent run: ``roc_test.png``,
    ``confusion_test.png``, ``curves.png`` (its trial's loss and metric curves) and ``metrics_test.json``."""
    import tempfile

    from deeplense_ray.tracking import plot_confusion_matrix, plot_roc_curves
    from deeplense_ray.train.checkpoint import load_training_state

    names = list(test.get("class_names", []))
    with tempfile.TemporaryDirectory(prefix="dlr-search-") as tmp:
        if "y_true" in predictions and names:
            plot_roc_curves(
                predictions["y_true"],
                predictions["probs"],
                names,
                os.path.join(tmp, "roc_test.png"),
                title="ROC, test split (best trial)",
            )
        if "confusion_matrix" in test and names:
            plot_confusion_matrix(
                test["confusion_matrix"],
                names,
                os.path.join(tmp, "confusion_test.png"),
                title="confusion matrix, test (best trial)",
            )
        try:
            history = load_training_state(ckpt).get("history", [])
        except (OSError, KeyError, RuntimeError):
            history = []
        if history:
            from deeplense_ray.tracking import plot_curves as plot_run_curves

            plot_run_curves(history, os.path.join(tmp, "curves.png"))
        atomic_write_json(os.path.join(tmp, "metrics_test.json"), dict(test))
        client.log_artifacts(run_id, tmp)


def log_trial_time(client, parent_run_id: str, trials: list[TrialSummary]) -> str:
    """Where the trials' seconds went, summed over the trials (from their child runs): each trial's wall
    (child run start -> end), its start-up (``STARTUP_KEY``), its epochs' training and validation seconds
    (``train_seconds``, ``val_seconds``) and the rest (checkpoints, reports, MLflow); one line for the
    summary, and the parent run gets ``trial_time_{total,startup,train,val,other}_s`` ('' if no trial
    ended)."""
    sums = {"total": 0.0, "startup": 0.0, "train": 0.0, "val": 0.0}
    n = 0
    for t in trials:
        if not t.child_run_id:
            continue
        run = client.get_run(t.child_run_id)
        if not run.info.end_time:
            continue
        n += 1
        sums["total"] += (run.info.end_time - run.info.start_time) / 1000.0
        sums["startup"] += float(run.data.metrics.get(STARTUP_KEY, 0.0))
        history = {k: sorted(client.get_metric_history(t.child_run_id, k), key=lambda m: m.step)
                   for k in ("train_seconds", "val_seconds", "first_batch_s")}  # fmt: skip
        train = sum(m.value for m in history["train_seconds"])
        # the start-up ends at the first batch, which the first epoch's training seconds include: count the
        # wait for it once, as start-up
        if history["first_batch_s"] and STARTUP_KEY in run.data.metrics:
            train -= min(history["first_batch_s"][0].value, train)
        sums["train"] += train
        sums["val"] += sum(m.value for m in history["val_seconds"])
    if not n:
        return ""
    # the rest of the trials' wall; not below 0 (the child run's times come from the driver's clock)
    sums["other"] = max(0.0, sums["total"] - sums["startup"] - sums["train"] - sums["val"])
    for k, v in sums.items():
        client.log_metric(parent_run_id, f"trial_time_{k}_s", v)
    return (
        f"trial time (summed over {n} trials): {sums['total']:.0f} s = start-up {sums['startup']:.0f} s + "
        f"training {sums['train']:.0f} s + validation {sums['val']:.0f} s + other {sums['other']:.0f} s "
        "(checkpoints, reports, MLflow)"
    )


def log_trial_startup(client, parent_run_id: str, trials: list[TrialSummary]) -> str:
    """The trials' start-up (Tune starting a trial -> its first training batch, read from the child runs),
    in start order, as one line for the summary; the parent run gets ``trial_startup_first_s`` and the
    median and max of the later trials; where the child runs name their process (``TAG_PROCESS``), also of
    the trials that started their process (the first in each) and of those that reused one ('' if no trial
    recorded its start-up)."""
    import statistics

    rows = []
    for t in trials:
        if not t.child_run_id:
            continue
        run = client.get_run(t.child_run_id)
        if STARTUP_KEY in run.data.metrics:
            process = run.data.tags.get(TAG_PROCESS)
            rows.append((run.info.start_time, t.trial_id, float(run.data.metrics[STARTUP_KEY]), process))
    if not rows:
        return ""
    rows.sort()
    first, later = rows[0][2], [r[2] for r in rows[1:]]
    metrics = {"trial_startup_first_s": first}
    text = f"trial start-up (trial started -> first training batch): first trial {first:.1f} s"
    if later:
        median = statistics.median(later)
        metrics |= {"trial_startup_later_median_s": median, "trial_startup_later_max_s": max(later)}
        text += f", the {len(later)} later: median {median:.1f} s, max {max(later):.1f} s"
    if all(r[3] for r in rows):
        seen: set[str] = set()
        groups: dict[str, list[float]] = {"new": [], "reused": []}
        for _, _, seconds, process in rows:
            groups["reused" if process in seen else "new"].append(seconds)
            seen.add(process)
        parts = []
        for key, what in (("new", "that started their process"), ("reused", "in a reused process")):
            if groups[key]:
                v = groups[key]
                metrics |= {f"trial_startup_{key}_median_s": statistics.median(v),
                            f"trial_startup_{key}_max_s": max(v)}  # fmt: skip
                parts.append(f"{len(v)} {what}: median {statistics.median(v):.1f} s, max {max(v):.1f} s")
        text += "; " + "; ".join(parts)
    for k, v in metrics.items():
        client.log_metric(parent_run_id, k, v)
    return text
