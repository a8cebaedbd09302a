"""Where a run's training and its one test evaluation execute: the runners.

``runner`` (:data:`RUNNERS`): "trainer" fits a Ray Train ``TorchTrainer`` (train/trainer.py); "task" trains
and tests in one Ray task holding one worker's CPUs and GPU share (the loop of train/local.py in that task,
given a worker process warmed up while the run was prepared, :func:`warm_task_worker`); "process" trains
in this process, which already holds the run's resources. :func:`resolve_runner` and :func:`check_runner`
pick and check one before Ray starts; :func:`fit` trains the run with it;
:func:`evaluate_best_checkpoint` evaluates the test split once with the best checkpoint: where the run
trained, or where :func:`where_to_evaluate_test` says.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from deeplense_ray.config import DatasetInfo, TrainConfig
from deeplense_ray.train.prepare import RUN_STATE_FILE, find_resumable_run
from deeplense_ray.train.timeline import Timeline
from deeplense_ray.train.trainer import best_checkpoint, build_trainer, run_score
from deeplense_ray.train.worker_config import LoopHooks

#: Where a run's loop runs (``run_training(runner=...)``, jobs/train.py ``--runner``):
#: "trainer": a Ray Train ``TorchTrainer`` (its controller and worker processes; any number of workers);
#: "task": one Ray task holding one worker's CPUs and GPU share trains and tests (no Train processes);
#: "process": this process, which already holds the run's resources (a study's task, one worker).
RUNNERS = ("trainer", "task", "process")


def resolve_runner(runner: str, cfg: TrainConfig) -> str:
    """``runner`` itself, or for "auto" (jobs/train.py's default): for a resumed run the kind of runner its
    latest segment ran with (a run that does not record one was a Ray Train run), else "task" for one worker
    that reads its own input (not ingest 'split'), else "trainer". A resumed run may also name either runner:
    its checkpoints are laid out alike (train/checkpoint.py). ``cfg`` resolved (its storage path absolute)."""
    if runner != "auto":
        return runner
    single = cfg.num_workers == 1 and cfg.ingest != "split"
    if cfg.resume and single:
        try:
            name = cfg.run_name or find_resumable_run(cfg.storage_path, cfg.model, cfg.seed)
            state = json.loads((Path(cfg.storage_path) / name / RUN_STATE_FILE).read_text())
        except (OSError, ValueError):
            return "trainer"  # nothing to resume: run_training says so, naming the directory
        kind = state.get("runner") or ("task" if state.get("checkpoint_layout") == "local" else "trainer")
        return "trainer" if kind == "trainer" else "task"
    return "task" if single else "trainer"


def check_runner(runner: str, cfg: TrainConfig) -> None:
    """ValueError naming the value when ``runner`` cannot run ``cfg`` (before any Ray work)."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {list(RUNNERS)}, got {runner!r}")
    if runner != "trainer" and cfg.num_workers != 1:
        raise ValueError(
            f"runner {runner!r} trains one worker, got num_workers={cfg.num_workers} (use runner 'trainer')"
        )
    if runner != "trainer" and cfg.ingest == "split":
        raise ValueError(
            f"ingest 'split' (Ray Data's streaming_split) needs Ray Train: runner {runner!r} reads the train "
            "split itself (ingest auto, per_rank or memory), or use runner 'trainer'"
        )


#: worker (:func:`warm_task_worker`). Having every worker of the job's runtime pre-import them as Ray starts
#: it (``RAY_preload_python_modules``) was slower on one H200 (Ray starts 16 workers there, all
#: importing at once; the job's fixed cost 29-30 s against 21-23 s, its training 12k against 14-16k img/s).
#: The driver imports ``_RESULT_IMPORTS`` while the run trains, for logging its results.
_TRAIN_IMPORTS = (
    "torch", "torch._dynamo", "deeplense_ray.train.local", "deeplense_ray.train.metrics", "sklearn.metrics",
    "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
)  # fmt: skip
_RESULT_IMPORTS = ("matplotlib.figure", "matplotlib.backends.backend_agg", "deeplense_ray.tracking.models",
                   "mlflow.pyfunc", "mlflow.models")  # fmt: skip


def _import_modules(names: Sequence[str]) -> int:
    """Import ``names`` (an import that fails is left to the code that needs it, which then says why)."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 - a warm-up only; the real import reports the error
            continue
    return os.getpid()


def _task_options(cfg: TrainConfig) -> dict[str, Any]:
    """The Ray resources of a ``runner="task"`` run's task: one worker's CPUs and GPU share."""
    return {
        "num_cpus": float(cfg.cpus_per_worker),
        "num_gpus": min(1.0, float(cfg.gpus_per_worker)) if cfg.use_gpu else 0,
    }


def warm_task_worker(cfg: TrainConfig):
    """Start, while the driver prepares the MLflow run, a Ray worker process holding the run task's resources
    that imports what training needs (torch, torch._dynamo, which the first optimizer imports, scikit-learn
    for the first validation, MLflow for the first epoch's metrics, this package); returns its ObjectRef (the
    worker's pid). Once it returns, the run's task is given that idle worker (Ray reuses a job's idle worker
    whose resources match: a GPU task only a worker that ran one) instead of starting a process. CUDA is not
    touched: which GPU the run gets is set when its task starts."""
    import ray

    # max_calls=0: a GPU function's worker would otherwise exit after one call (Ray's default for GPU tasks)
    return ray.remote(max_calls=0, **_task_options(cfg))(_import_modules).remote(_TRAIN_IMPORTS)


def _wait_quietly(ref: Any) -> Any:
    """``ray.get(ref)`` of a warm-up task, None if it failed (not the run's failure: its own task reports)."""
    import ray

    try:
        return ray.get(ref)
    except Exception:  # noqa: BLE001 - see the docstring
        return None


def _fit_in_process(
    cfg: TrainConfig, info: DatasetInfo, run_dir: Path, extra: Mapping[str, Any], hooks: LoopHooks | None
):
    """The run's loop in this process (train/local.py); what ``TorchTrainer.fit()`` would return."""
    from deeplense_ray.train.local import LocalRunSession, fit_here, local_loop_config

    metric, mode = run_score(cfg)
    session = LocalRunSession(run_dir, metric=metric, mode=mode, num_to_keep=cfg.num_to_keep)
    return fit_here(session, local_loop_config(cfg, info, extra), hooks)


def _fit_and_test_in_task(
    cfg: TrainConfig, info: DatasetInfo, run_dir: Path, extra: Mapping[str, Any], hooks: LoopHooks | None
) -> tuple[Any, dict[str, Any], float, int]:
    """``runner="task"``: in a Ray task holding one worker's CPUs and GPU share, train (as
    :func:`_fit_in_process`) and evaluate the test split with the best checkpoint on the same device.
    Returns (the fit's result, the test metrics, the Unix time the fit ended, this worker's pid)."""
    result = _fit_in_process(cfg, info, run_dir, extra, hooks)
    fit_end = time.time()
    best, _ = best_checkpoint(result, *run_score(cfg))
    return result, _evaluate_remote(best, cfg), fit_end, os.getpid()


def fit(
    runner: str,
    cfg: TrainConfig,
    info: DatasetInfo,
    *,
    name: str,
    run_dir: Path,
    extra: Mapping[str, Any],
    warm: Any,
    run_config_callbacks: Iterable[Any],
    timeline: Timeline,
    client: Any,
    run_id: str,
    hooks: LoopHooks | None = None,
) -> tuple[Any, dict[str, Any] | None]:
    """Train the run with ``runner``: (what ``TorchTrainer.fit()`` returns, the test metrics its task
    evaluated for runner "task", else None). ``extra``: LoopConfig fields set on top of the run's (the
    MLflow run); ``hooks``: the tests' (train/worker_config.py); ``warm``: the warm-up
    task of :func:`warm_task_worker` (runner "task", or None); runner "task" marks "task worker ready" and
    "fit end" on ``timeline`` and tags the MLflow run ``run_id`` with the process its task ran in."""
    import ray

    test = None
    if runner == "process":
        result = _fit_in_process(cfg, info, run_dir, extra, hooks)
    elif runner == "task":
        warm_pid = None
        if warm is not None:
            warm_pid = _wait_quietly(warm)
            timeline.mark("task worker ready")
        task = ray.remote(
            **_task_options(cfg), max_retries=cfg.max_failures, retry_exceptions=cfg.max_failures > 0
        )(_fit_and_test_in_task)
        pending = task.remote(cfg, info, run_dir, extra, hooks)
        _import_modules(_RESULT_IMPORTS)  # what logging the results needs, while the run trains
        result, test, fit_end, task_pid = ray.get(pending)
        timeline.mark("fit end", at=fit_end)
        # "warmed": the task ran in the warm-up's process (see warm_task_worker); "new": Ray started
        # another one (a retry, or no idle worker fitted)
        client.set_tag(run_id, "task_worker", "warmed" if task_pid == warm_pid else "new")
    else:
        trainer = build_trainer(
            cfg, run_name=name, info=info, run_config_callbacks=list(run_config_callbacks),
            extra_loop_config=extra, hooks=hooks,
        )  # fmt: skip
        result = trainer.fit()
    return result, test


def _evaluate_remote(checkpoint: Any, cfg: TrainConfig, device: str | None = None) -> dict[str, Any]:
    from deeplense_ray.train.evaluation import evaluate_test

    return evaluate_test(checkpoint, cfg, device=device)


#: Where a run's test split is evaluated: "auto" (default), "driver" or "task"; see where_to_evaluate_test.
TEST_EVAL_ENV = "DEEPLENSE_TEST_EVAL"


def where_to_evaluate_test(cfg: TrainConfig) -> str:
    """ "driver" when Ray runs on the driver's machine alone (a local runtime or a one-node cluster) and the
    driver can use the run's device: the test split is then evaluated in this process, with no worker
    process to start (as a task it took ~5 s of the ~28 s fixed cost of a small CPU train job, mostly a new
    process importing torch); else "task". ``$DEEPLENSE_TEST_EVAL`` = driver | task overrides."""
    import ray
    import torch

    mode = os.environ.get(TEST_EVAL_ENV, "auto")
    if mode not in ("auto", "driver", "task"):
        raise ValueError(f"${TEST_EVAL_ENV} must be auto, driver or task, got {mode!r}")
    if mode != "auto":
        return mode
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.util.get_node_ip_address()
    same_machine = len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == here
    return "driver" if same_machine and (not cfg.use_gpu or torch.cuda.is_available()) else "task"


def evaluate_best_checkpoint(
    runner: str, cfg: TrainConfig, best: Any, test: dict[str, Any] | None
) -> tuple[str, Any]:
    """The test split, once, with the best checkpoint ``best``: where the run trained (runner task, whose
    task evaluated it already: ``test``, or process), else here when Ray runs on this machine alone, else in
    a task with one worker's resources (GPU if any). The dataset's split or the fixed simulated set.
    Returns (where it was evaluated, the test metrics)."""
    import ray

    if runner == "task":  # evaluated by the run's own task, above, on its device
        where = "task"
    elif runner == "process":  # on the device the run trained on
        where, test = "process", _evaluate_remote(best, cfg)
    elif (where := where_to_evaluate_test(cfg)) == "driver":
        test = _evaluate_remote(best, cfg, device="cuda" if cfg.use_gpu else "cpu")
    else:
        gpus = min(1.0, float(cfg.gpus_per_worker)) if cfg.use_gpu else 0
        task = ray.remote(num_cpus=float(cfg.cpus_per_worker), num_gpus=gpus)(_evaluate_remote)
        test = ray.get(task.remote(best, cfg))
    return where, test
