"""One complete, tracked training run: :func:`run_training`, top-down.

1. validate (before Ray starts): the config and its dataset or preset (``cfg.validate()``), the runner
   (train/runners.py :func:`~deeplense_ray.train.runners.check_runner`);
2. open the run (train/prepare.py): its directory's state file and its MLflow run, new or resumed;
3. launch (train/runners.py :func:`~deeplense_ray.train.runners.fit`): a Ray Train ``TorchTrainer``
   (train/trainer.py) or the loop in one Ray task or this process (train/local.py); per-epoch metrics and
   checkpoints (the best kept by the task's score, the latest for resume);
4. evaluate the test split ONCE with the best checkpoint (train/runners.py
   :func:`~deeplense_ray.train.runners.evaluate_best_checkpoint`);
5. finish (train/results.py): metrics, plots, metrics JSON and the model logged to the same MLflow run.

Resume: a run lives in ``<storage_path>/<run_name>/`` (Ray Train's run directory) with ``deeplense_run.json``
beside Ray's files (the MLflow run id, the dataset hash, the config). ``resume=True`` re-creates the trainer
with the same name and storage path: Ray Train V2 reloads its checkpoint manager snapshot from there and
``ray.train.get_checkpoint()`` in the loop returns the latest checkpoint (model, optimizer, scheduler, epoch);
metrics keep going to the same MLflow run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from deeplense_ray.config import TrainConfig
from deeplense_ray.io import atomic_write_json
from deeplense_ray.train.checkpoint import read_meta
from deeplense_ray.train.prepare import RUN_STATE_FILE, prepare_run
from deeplense_ray.train.results import PREDICTION_KEYS, TrainResult, finish_run, history_from_checkpoint
from deeplense_ray.train.runners import check_runner, evaluate_best_checkpoint, fit, warm_task_worker
from deeplense_ray.train.timeline import Timeline
from deeplense_ray.train.trainer import best_checkpoint, run_score
from deeplense_ray.train.worker_config import LoopHooks


def run_training(
    cfg: TrainConfig,
    *,
    extra_loop_config: Mapping[str, Any] | None = None,
    run_config_callbacks: Iterable[Any] = (),
    progress: bool = False,
    timeline: Timeline | None = None,
    runner: str = "trainer",
    hooks: LoopHooks | None = None,
) -> TrainResult:
    """Train ``cfg`` end to end (see the module docstring) and return what it produced.

    ``runner`` (:data:`~deeplense_ray.train.runners.RUNNERS`): "trainer" (default) fits a Ray Train
    ``TorchTrainer``; "task" runs the training loop (train/local.py) and the test evaluation in one Ray task
    holding one worker's CPUs and GPU share, with no Train controller or worker group to start (one worker;
    Ray retries the task up to ``max_failures`` times, resuming from the run's latest checkpoint); "process"
    runs them in this process, for a caller that already holds the run's resources in a Ray task or actor (a
    study run). A run resumes with either runner: every runner lays out its checkpoints alike in the run
    directory, and the run continues from the one of the highest epoch.

    ``progress``: print one line per epoch (loss, validation metrics, images/s, elapsed, ETA) while it trains
    (:class:`deeplense_ray.tracking.console.RunWatcher`, reading the epochs rank 0 logs to the MLflow run).

    Everything is validated before Ray starts (ValueError / FileNotFoundError naming the value or file).
    Uses the current Ray runtime if initialised, else :func:`deeplense_ray.runtime.connect` (the jobs' one
    way to join $RAY_ADDRESS, the cluster ``ray start`` recorded, or a new local runtime on loopback).

    ``timeline``: the job's :class:`~deeplense_ray.train.timeline.Timeline` (jobs/train.py starts it before
    Ray); default one started here. Its phases and this run's epochs are logged as ``timeline.json`` and
    returned in ``TrainResult.timeline``.

    ``extra_loop_config``: LoopConfig fields set on top of the run's (train/worker_config.py; an unknown key
    is a ValueError); ``hooks``: the tests' :class:`LoopHooks`, handed to the loop on every runner.
    """
    import ray
    from mlflow.tracking import MlflowClient

    # 1. validate
    timeline = timeline if timeline is not None else Timeline()
    cfg = cfg.resolved()
    info = cfg.validate()
    check_runner(runner, cfg)
    warm = warm_task_worker(cfg) if runner == "task" and ray.is_initialized() else None
    # 2. open the run
    name, state = prepare_run(cfg, info, runner)
    timeline.mark("run prepared")
    run_id, uri = state["mlflow_run_id"], state["tracking_uri"]
    client = MlflowClient(tracking_uri=uri)
    run_dir = Path(cfg.storage_path) / name
    try:
        if not ray.is_initialized():
            from deeplense_ray.runtime import connect

            connect()
        # 3. launch
        extra = {"mlflow": {"tracking_uri": uri, "run_id": run_id}, **dict(extra_loop_config or {})}
        timeline.mark("fit start")
        watch = nullcontext()
        if progress:
            from deeplense_ray.tracking.console import RunWatcher

            watch = RunWatcher(uri, run_id, max_epochs=cfg.epochs)
        with watch:
            result, test = fit(
                runner, cfg, info, name=name, run_dir=run_dir, extra=extra, warm=warm,
                run_config_callbacks=run_config_callbacks, timeline=timeline, client=client, run_id=run_id,
                hooks=hooks,
            )  # fmt: skip
        if runner != "task":
            timeline.mark("fit end")
        if result.error is not None:
            raise result.error
        best, best_metrics = best_checkpoint(result, *run_score(cfg), run_dir=run_dir)
        best_epoch = int(best_metrics.get("epoch", read_meta(best)["epoch"]))
        history = history_from_checkpoint(result.checkpoint)
        timeline.add_epochs(history)
        # 4. evaluate
        where, test = evaluate_best_checkpoint(runner, cfg, best, test)
        client.set_tag(run_id, "test_evaluated_in", where)
        client.set_tag(run_id, "runner", runner)
        timeline.mark("test evaluated")
        # 5. finish
        best_val, artifact_names, model_uri = finish_run(
            client, cfg, info, uri=uri, run_id=run_id, test=test, best=best, best_metrics=best_metrics,
            best_epoch=best_epoch, history=history, timeline=timeline,
        )  # fmt: skip
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        state["status"] = "failed"
        atomic_write_json(run_dir / RUN_STATE_FILE, state)
        raise
    state.update(
        status="finished", best_checkpoint=str(best.path), best_epoch=best_epoch, model_uri=model_uri
    )
    atomic_write_json(run_dir / RUN_STATE_FILE, state)
    return TrainResult(
        run_id=run_id,
        experiment_id=state["experiment_id"],
        tracking_uri=uri,
        run_name=name,
        run_dir=str(run_dir),
        best_checkpoint=str(best.path),
        best_epoch=best_epoch,
        best_val=best_val,
        test_metrics={k: v for k, v in test.items() if k not in PREDICTION_KEYS},
        history=history,
        model_uri=model_uri,
        artifacts=artifact_names,
        ray_result=result,
        timeline=timeline.summary(),
        timeline_line=timeline.line(),
        test_predictions={k: test[k] for k in PREDICTION_KEYS if k in test},
    )
