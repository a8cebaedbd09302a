"""The ``Tuner`` of a search: ASHA (or FIFO) + Optuna (or seeded random), the driver-side callbacks, resume.

``ASHAScheduler`` stops trials on the *current* epoch's validation metric (``time_attr='epoch'``),
``OptunaSearch`` proposes configs (seeded). A trial's actor holds the trial's CPUs and GPU share when it
trains itself (trial_runner 'actor'), else only ``DRIVER_CPUS`` and the trainer reserves its own workers
(:func:`trial_resources`); concurrency is capped to what the cluster holds (``plan.concurrency``). A resumed
search first drops Tune state files a killed driver left unreadable (:func:`drop_unreadable_state`).
Driver-side callbacks: the MLflow child runs (passed in), one console line per trial start, epoch and end,
and an ended trial's checkpoints pruned to its best.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from deeplense_ray.tracking.console import tune_verbosity
from deeplense_ray.tune.settings import DRIVER_CPUS, TuneSettings
from deeplense_ray.tune.trial import DivergedStopper, param_space

if TYPE_CHECKING:
    from ray.tune import Callback, Tuner

    from deeplense_ray.tune.plan import SearchPlan


def trial_name(trial) -> str:
    """Trial names and directory names: ``trial_<trial_id>`` (the sampled values go to params, not paths)."""
    return f"trial_{trial.trial_id}"


def console_callbacks(settings: TuneSettings, trainer_storage: str) -> list:
    """The driver-side callbacks of what a researcher sees and keeps: one line per trial start, epoch and
    end (:class:`~deeplense_ray.tune.console.SearchConsole`), and an ended trial's checkpoints pruned to
    its best (:class:`~deeplense_ray.tune.disk.CheckpointPruner`)."""
    from deeplense_ray.tune.console import SearchConsole
    from deeplense_ray.tune.disk import CheckpointPruner

    mode = settings.resolved_mode
    return [
        SearchConsole(
            metric=settings.metric,
            mode=mode,
            max_epochs=settings.max_epochs,
            num_samples=settings.num_samples,
        ),
        CheckpointPruner(trainer_storage, settings.metric, mode),
    ]


def make_tuner(settings: TuneSettings, plan: SearchPlan, *, trainable: Callable, callback: Callback) -> Tuner:
    """The search's Tuner: restored from ``plan.output_dir`` with ``settings.resume`` when Tune saved one
    (finished trials are not redone, errored ones restart), else a new one (:func:`build_tuner`)."""
    from ray import tune

    if settings.resume and tune.Tuner.can_restore(plan.output_dir):
        drop_unreadable_state(plan.output_dir)
        return tune.Tuner.restore(
            plan.output_dir,
            tune.with_resources(trainable, trial_resources(settings, plan)),
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=True,
        )
    return build_tuner(settings, plan, trainable=trainable, callback=callback)


def trial_resources(settings: TuneSettings, plan: SearchPlan) -> dict[str, float]:
    """What Tune reserves for a trial's actor. trial_runner 'actor': the actor trains, so it holds the trial's
    CPUs and GPU share itself, and Tune hands it to the next trial (no process started after the first;
    tune/actor_trial.py). 'trainer': it only drives a TorchTrainer whose worker processes hold them."""
    if settings.resolved_trial_runner == "actor":
        return {"cpu": DRIVER_CPUS + plan.cpus, "gpu": plan.gpus}
    return {"cpu": DRIVER_CPUS}


def drop_unreadable_state(output_dir: str) -> list[str]:
    """Delete the search's pickled Tune states (callback and searcher) that cannot be read back.

    Tune writes them atomically in its staging directory, then copies them into the search's directory; a
    driver killed during that copy leaves a truncated file, and ``Tuner.restore`` then fails with an EOFError
    ("Failed to restore the run state") and the search cannot be resumed at all. Without them the resumed
    search still has every trial (``experiment_state-*.json``); the MLflow child runs are found by tag
    (mlflow_runs.py), and the searcher starts from the restored trials' configurations without its own
    notes. Returns the deleted paths (each is also logged as a warning)."""
    import glob
    import logging

    import ray.cloudpickle as cloudpickle

    dropped = []
    for path in sorted(glob.glob(os.path.join(output_dir, "*-state*.pkl"))):
        try:
            with open(path, "rb") as f:
                cloudpickle.load(f)
        except Exception as exc:  # truncated or corrupt: EOFError, UnpicklingError, ...
            logging.getLogger(__name__).warning(
                "dropping the unreadable Tune state %s (%s: the driver was probably killed while it was "
                "being written); the search resumes without it",
                path,
                type(exc).__name__,
            )
            os.remove(path)
            dropped.append(path)
    return dropped


def build_tuner(
    settings: TuneSettings, plan: SearchPlan, *, trainable: Callable, callback: Callback
) -> Tuner:
    """A new Tuner over ``trainable`` (one :func:`~deeplense_ray.tune.trial.param_space` per trial)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = param_space(settings, plan)
    mode = settings.resolved_mode
    if settings.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=settings.max_epochs,
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        )
    else:
        from ray.tune.schedulers import FIFOScheduler

        scheduler = FIFOScheduler()
    points = [dict(p) for p in settings.points_to_evaluate] if settings.points_to_evaluate else None
    from ray.tune.search.sample import Domain

    searched = any(isinstance(v, Domain) for k, v in space.items() if k != "_search")
    if settings.search == "optuna" and searched:  # Optuna refuses a space without a single domain
        from deeplense_ray.tune.optuna_search import ResumableOptunaSearch

        search_alg = ResumableOptunaSearch(seed=settings.seed, points_to_evaluate=points)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores max_concurrent_trials for a search_alg that is not a Searcher: cap it here
        search_alg = BasicVariantGenerator(
            random_state=settings.seed, points_to_evaluate=points, max_concurrent=plan.concurrency
        )
    in_actor = settings.resolved_trial_runner == "actor"  # reused by the next trial (trial_resources)
    return tune.Tuner(
        tune.with_resources(trainable, trial_resources(settings, plan)),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=mode,
            num_samples=settings.num_samples,
            scheduler=scheduler,
            search_alg=search_alg,
            max_concurrent_trials=plan.concurrency,
            reuse_actors=in_actor,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=plan.storage_path,
            callbacks=[callback, *console_callbacks(settings, plan.trainer_storage)],
            stop=DivergedStopper(),
            verbose=tune_verbosity(settings.verbose),
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
