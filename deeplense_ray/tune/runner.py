"""Ray Tune search over the training loop: ASHA + Optuna, nested MLflow runs, resume.

:func:`run_search` is the recipe; each step lives in a module of this package named by its concern:

1. ``plan``: settings, search space and search directory checked before Ray; then, with Ray up, the
   per-trial request against the cluster, the dataset (``dataset``: simulated once, then reused) and the
   base TrainConfig. Anything wrong raises SearchSetupError, before any trial.
2. ``parent_run``: the search's MLflow parent run, opened by the driver (the trials' child runs are written
   by a driver-side callback, ``mlflow_runs``).
3. ``tuner``: ``Tuner.fit`` (ASHA + Optuna, or restored) over ``trial.train_trial`` (one
   ``TorchTrainer.fit()`` per trial).
4. ``results`` and ``best``: the trials read back, the best trial, its best checkpoint on the test split.
5. ``report`` and ``parent_run``: the files, the parent run's record and model; ``disk``: the other trials'
   checkpoints removed.

Layout of a search (``<storage_path>/<name>/``): Tune's experiment state, ``trainers/<trial_id>/`` (each
trial's Ray Train run and checkpoints), ``search_state.json`` (settings + MLflow ids, for ``resume``),
``best_config.yaml``, ``best_checkpoint.txt``, ``summary.txt``, ``val_curves.png``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from deeplense_ray.tune.best import best_checkpoint_of, best_train_fields, evaluate_best, pick_best
from deeplense_ray.tune.parent_run import (
    log_best_model,
    log_search_outcome,
    log_trial_curves,
    log_trial_startup,
    log_trial_time,
    reopen_parent_run,
    start_parent_run,
)
from deeplense_ray.tune.plan import (
    SearchPlan,
    plan_search,
    prepare_cluster_work,
    setup_errors,
    write_search_state,
)
from deeplense_ray.tune.report import best_config_doc, format_summary, write_search_files
from deeplense_ray.tune.results import SearchResult, trial_summaries
from deeplense_ray.tune.settings import TuneSettings
from deeplense_ray.tune.trial import DivergedStopper, train_trial
from deeplense_ray.tune.tuner import make_tuner, trial_name

# Searches saved before the split pickled DivergedStopper and trial_name by this module's path (in Tune's
# experiment state): they stay importable here so that `jobs/tune.py --resume` of such a search restores.
__all__ = ["DivergedStopper", "connect_ray", "run_search", "trial_name"]


#: How a search joins or starts Ray (:func:`deeplense_ray.runtime.connect`): a given address or $RAY_ADDRESS,
#: else a fresh local runtime (never the cluster recorded by `ray start`), with the dashboard on 127.0.0.1
#: and Ray's logging left as the job set it.
SEARCH_RAY: dict = {"join_running": False, "dashboard": True, "configure_logging": False}


def connect_ray(address: str | None = None, *, verbose: bool = False) -> str:
    """Connect to (or start) Ray for a search or a study: :func:`deeplense_ray.runtime.connect` with the
    search's settings (:data:`SEARCH_RAY`), quiet unless ``verbose``."""
    from deeplense_ray.runtime import connect
    from deeplense_ray.tracking.console import quiet_ray

    return connect(address, **SEARCH_RAY, **quiet_ray(verbose))


def run_search(
    settings: TuneSettings, *, address: str | None = None, trainable: Callable | None = None
) -> SearchResult:
    """Run (or with ``settings.resume`` continue) one hyperparameter search; see the module docstring.

    Order of work: validate settings and search space (no cluster) -> join/start Ray -> check the per-trial
    request against the cluster -> simulate/reuse the dataset -> validate the base TrainConfig -> MLflow
    experiment (created once, here) and parent run -> ``Tuner.fit`` -> summary, the best checkpoint's test
    metrics, files. Anything wrong before ``Tuner.fit`` raises
    :class:`~deeplense_ray.tune.plan.SearchSetupError` (a ValueError).

    Args:
        settings: the search.
        address: Ray address to join (default $RAY_ADDRESS, else a new local runtime); unused if Ray is up.
        trainable: the function trainable (default :func:`~deeplense_ray.tune.trial.train_trial`); for tests
            of the wiring only.
    """
    import ray
    from mlflow.tracking import MlflowClient

    from deeplense_ray.runtime import connect
    from deeplense_ray.tracking.console import quiet_ray
    from deeplense_ray.tune.mlflow_runs import TrialRunsCallback

    with setup_errors():
        plan = plan_search(settings)
    # a dead address fails within seconds (RayConnectError); a local runtime listens on 127.0.0.1 with auth;
    # not verbose: the workers' output stays in their log files
    connect(address, **SEARCH_RAY, **quiet_ray(settings.verbose))
    with setup_errors():
        plan = prepare_cluster_work(settings, plan, ray.cluster_resources())

    client = MlflowClient(tracking_uri=plan.tracking_uri)
    if plan.state is None:
        experiment_id, parent_run_id = start_parent_run(client, settings, plan)
        write_search_state(settings, plan, experiment_id=experiment_id, parent_run_id=parent_run_id)
    else:
        experiment_id, parent_run_id = plan.state["experiment_id"], plan.state["parent_run_id"]
        reopen_parent_run(client, parent_run_id)

    callback = TrialRunsCallback(
        tracking_uri=plan.tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        max_epochs=settings.max_epochs,
        param_keys=plan.param_keys,
        search_name=plan.name,
        trainer_storage=plan.trainer_storage,
        train_config=plan.base_train,
    )
    try:
        tuner = make_tuner(settings, plan, trainable=trainable or train_trial, callback=callback)
        results = tuner.fit()
    except BaseException:
        client.set_terminated(parent_run_id, status="FAILED")
        raise
    return _finish(
        settings,
        results,
        plan=plan,
        client=client,
        callback=callback,
        parent_run_id=parent_run_id,
        experiment_id=experiment_id,
    )


def _finish(
    settings: TuneSettings, results, *, plan: SearchPlan, client, callback, parent_run_id, experiment_id
) -> SearchResult:
    """After ``Tuner.fit``: summarise the trials, test the best checkpoint, write and log the report."""
    from deeplense_ray.tracking.console import dir_size
    from deeplense_ray.tune.disk import prune_to_best_trial
    from deeplense_ray.tune.mlflow_runs import child_run_ids, close_lost_trial_runs

    metric, mode = settings.metric, settings.resolved_mode
    # the callback object Tune used may be the restored one; read child-run ids from MLflow by tag
    callback.run_ids.update(child_run_ids(client, experiment_id, parent_run_id))
    trials = trial_summaries(results, settings, plan.param_keys, callback.run_ids)
    close_lost_trial_runs(client, experiment_id, parent_run_id, [t.trial_id for t in trials])
    ok = [t for t in trials if math.isfinite(t.best_metric)]
    if not ok:
        client.set_terminated(parent_run_id, status="FAILED")
        raise RuntimeError(
            f"no trial of search {plan.name!r} reported a finite {metric}; see {plan.output_dir}"
        )

    best = pick_best(ok, mode)
    best_res = next(r for r, t in zip(results, trials) if t is best)
    ckpt, ckpt_epoch = best_checkpoint_of(best_res, metric, mode)
    test_metrics, predictions = evaluate_best(ckpt, plan.base_train)

    table = format_summary(trials, metric, mode)
    for log_lines in (log_trial_startup, log_trial_time):  # the trials' start-up, where their seconds went
        line = log_lines(client, parent_run_id, trials)
        table += f"\n\n{line}" if line else ""
    best_cfg = best_train_fields(best, best_res, plan.base_train)
    best_doc = best_config_doc(settings, plan.name, best, best_cfg, (ckpt, ckpt_epoch), test_metrics)
    curves = write_search_files(plan.output_dir, best_doc, table, trials, metric)
    log_search_outcome(client, parent_run_id, best_doc, best, trials, plan.output_dir, curves)
    log_trial_curves(client, results, trials, metric)
    model_uri, warnings = None, []
    if ckpt is not None:
        model_uri, warnings = log_best_model(
            client, parent_run_id, ckpt, test_metrics, predictions, plan.tracking_uri, plan.base_train
        )
    if settings.keep_checkpoints == "best":
        prune_to_best_trial(plan.trainer_storage, best.trial_id)
    disk = dir_size(plan.output_dir)
    client.log_metric(parent_run_id, "disk_bytes", disk)
    client.set_terminated(parent_run_id, status="FINISHED")
    return SearchResult(
        name=plan.name,
        output_dir=plan.output_dir,
        metric=metric,
        mode=mode,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        best_trial_id=best.trial_id,
        best_config=best_doc,
        best_metric=best.best_metric,
        best_epoch=best.best_epoch,
        best_checkpoint=ckpt,
        test_metrics=test_metrics,
        trials=trials,
        summary_table=table,
        tracking_uri=plan.tracking_uri,
        data_dir=plan.data_dir,
        model_uri=model_uri,
        disk_bytes=disk,
        warnings=warnings,
    )
