"""MLflow structure of a search: one parent run, one nested child run per trial, written from the driver.

The driver is the only MLflow writer of a search: the parent run is created before ``Tuner.fit`` and the
:class:`TrialRunsCallback` (a driver-side Tune callback) creates each trial's child run (tag
``mlflow.parentRunId``), logs its sampled hyperparameters as params, every per-epoch result as metrics
(step = epoch) and how the trial ended (tag ``tune.outcome``: ``completed``, ``stopped by ASHA at epoch k`` or
``diverged at epoch k`` (non-finite loss: reported as the worst metric, not a crash) or ``failed``; run status
FINISHED, KILLED or FAILED). One writer means no SQLite write contention between
trial processes, and a trial killed by ASHA still has its outcome recorded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ray.tune import Callback

# the finite worst value a diverged trial reports for its metric (logged to MLflow as NaN)
from deeplense_ray.ranking import DIVERGED_VALUE  # noqa: F401  (imported from here by tune and tracking)

#: Tag keys written on child runs.
TAG_PARENT = "mlflow.parentRunId"
TAG_TRIAL_ID = "tune.trial_id"
TAG_OUTCOME = "tune.outcome"
TAG_EPOCHS = "tune.epochs_run"
TAG_SEARCH = "tune.search_name"
TAG_ROLE = "tune.role"
#: "<hostname>:<pid>" of the process a trial trained in (Tune's own result keys): trials that share one reused
#: the process of an earlier trial (trial_runner 'actor'), the first of each had to start it
TAG_PROCESS = "tune.process"
#: Result key set to 1.0 on a report whose target metric was non-finite (the trial's training diverged).
DIVERGED_KEY = "diverged"
#: A trial's start-up, logged to its child run at the first report of each worker-group attempt: seconds from
#: Tune starting the trial to its training workers' loop start, and to its first training batch.
WORKERS_UP_KEY, STARTUP_KEY = "trial_workers_up_s", "trial_startup_s"


def trial_startup(result: Mapping[str, Any], started: float | None) -> dict[str, float]:
    """{WORKERS_UP_KEY, STARTUP_KEY} seconds of a trial started at ``started`` (Unix, the driver's clock)
    from ``result``, the first report of a worker-group attempt (``setup_s`` > 0, with ``t_epoch_start``
    and ``first_batch_s``, see train/loop.py); {} for any other report or an unknown start."""
    setup, t_epoch = result.get("setup_s"), result.get("t_epoch_start")
    if started is None or not isinstance(setup, (int, float)) or setup <= 0 or t_epoch is None:
        return {}
    t_epoch = float(t_epoch)
    return {
        WORKERS_UP_KEY: t_epoch - float(setup) - started,
        STARTUP_KEY: t_epoch + float(result.get("first_batch_s", 0.0)) - started,
    }

#: Result keys Tune adds itself; never logged as metrics.
_TUNE_KEYS = frozenset(
    {
        "training_iteration",
        "time_this_iter_s",
        "time_total_s",
        "timestamp",
        "time_since_restore",
        "iterations_since_restore",
        "timesteps_total",
        "episodes_total",
        "timesteps_since_restore",
        "pid",
        "done",
        "checkpoint_dir_name",
        "should_checkpoint",
        "trial_id",
        "node_ip",
        "date",
        "hostname",
        "experiment_tag",
        "warmup_time",
    }
)


def outcome(epochs_run: int, max_epochs: int, *, diverged_at: int | None = None) -> tuple[str, str]:
    """(tag text, MLflow run status) for a trial that ended without error after ``epochs_run`` epochs.

    ``diverged_at``: first epoch whose training went non-finite (reported as the worst metric):
    ``diverged at epoch k``, status KILLED.
    """
    if diverged_at is not None:
        return f"diverged at epoch {diverged_at}", "KILLED"
    if epochs_run >= max_epochs:
        return "completed", "FINISHED"
    return f"stopped by ASHA at epoch {epochs_run}", "KILLED"


def numeric_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-nan numeric entries of a trial result that are training metrics (not Tune's own keys).

    Non-finite values and a diverged trial's stand-in value (``|v| >= DIVERGED_VALUE``) become NaN.
    """
    out = {}
    for k, v in result.items():
        if k in _TUNE_KEYS or k.startswith("config") or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            f = float(v)
            out[k] = f if math.isfinite(f) and abs(f) < DIVERGED_VALUE else float("nan")
    return out


def _mlflow_param(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)[:500]


def child_run_ids(client, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """Trial id -> MLflow child run id of every child run of ``parent_run_id``, found by tag (so a resumed
    search also finds the runs of the trials it did not redo)."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'", max_results=10_000
    )
    return {r.data.tags.get(TAG_TRIAL_ID): r.info.run_id for r in runs}


#: Outcome of a child run whose trial Tune never recorded (its driver was killed in between).
LOST_OUTCOME = "lost: the search was interrupted before it recorded this trial; not resumed"


def close_lost_trial_runs(client, experiment_id: str, parent_run_id: str, trial_ids) -> list[str]:
    """End the child runs of trials that are not in the search: a trial whose child run was opened when it
    started, but that the search's saved state does not hold because the driver was killed in between (Tune
    saves it after the step). A resumed search does not know that trial and samples a new one; its run would
    stay RUNNING for ever. Marked KILLED with :data:`LOST_OUTCOME`; returns their trial ids."""
    keep = set(trial_ids)
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'", max_results=10_000
    )
    lost = []
    for r in runs:
        tid = r.data.tags.get(TAG_TRIAL_ID)
        if tid not in keep and r.info.status == "RUNNING":
            client.set_tag(r.info.run_id, TAG_OUTCOME, LOST_OUTCOME)
            client.set_terminated(r.info.run_id, status="KILLED")
            lost.append(tid)
    return lost


class TrialRunsCallback(Callback):
    """Driver-side Tune callback: one nested MLflow child run per trial under ``parent_run_id``.

    Args:
        tracking_uri: absolute MLflow tracking URI.
        experiment_id: the experiment the driver created (once) for the search.
        parent_run_id: the search's parent run.
        max_epochs: the epochs of an unstopped trial (to tell 'completed' from 'stopped by ASHA').
        param_keys: the searched keys, logged as each child's params.
        search_name: stored as a tag on every child run.
        trainer_storage: where trials record their worker placement groups; when given, those of ended
            trials are removed (see :mod:`deeplense_ray.tune.cleanup`).
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        max_epochs: int,
        param_keys: Iterable[str],
        search_name: str,
        trainer_storage: str | None = None,
        train_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.train_config = dict(train_config) if train_config is not None else None  # for the run's inputs
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.max_epochs = int(max_epochs)
        self.param_keys = tuple(param_keys)
        self.search_name = search_name
        self.run_ids: dict[str, str] = {}
        self.epochs: dict[str, int] = {}
        self.diverged: dict[str, int] = {}
        self.started: dict[str, float] = {}  # trial id -> when Tune started it (Unix seconds)
        self._client = None
        self.trainer_storage = trainer_storage
        self._reaper = None

    # -- pickling (Tune stores callbacks with the experiment; the client is rebuilt lazily) --
    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_client"] = None
        d["_reaper"] = None
        return d

    @property
    def reaper(self):
        if self._reaper is None and self.trainer_storage:
            from deeplense_ray.tune.cleanup import PlacementGroupReaper

            self._reaper = PlacementGroupReaper(self.trainer_storage)
        return self._reaper

    def _trial_ended(self, trial) -> None:
        if self.reaper is not None:
            self.reaper.trial_ended(trial.trial_id)

    def on_step_begin(self, iteration, trials, **info) -> None:
        if self.reaper is not None and self.reaper.pending:
            self.reaper.reap(trials)

    def on_experiment_end(self, trials, **info) -> None:
        if self.reaper is not None:
            for t in trials:
                if t.status in ("TERMINATED", "ERROR"):
                    self.reaper.trial_ended(t.trial_id)
            self.reaper.reap(trials, force=True)
        # groups Ray itself left reserved (a driver killed while a trial started, e.g. the interrupted run
        # this one resumes): by now every actor of such a job is gone
        from deeplense_ray.runtime import remove_orphaned_placement_groups

        remove_orphaned_placement_groups()

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def get_state(self) -> dict:
        return {"run_ids": dict(self.run_ids), "epochs": dict(self.epochs), "diverged": dict(self.diverged)}

    def set_state(self, state: dict) -> None:
        self.run_ids.update(state.get("run_ids", {}))
        self.epochs.update(state.get("epochs", {}))
        self.diverged.update(state.get("diverged", {}))

    # -- child runs --
    def _find_existing(self, trial_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.`{TAG_PARENT}` = '{self.parent_run_id}' and tags.`{TAG_TRIAL_ID}` = '{trial_id}'"
            ),
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def child_run_id(self, trial) -> str:
        """The trial's child run, created on first use (found again by tag after a resume)."""
        tid = trial.trial_id
        if tid in self.run_ids:
            return self.run_ids[tid]
        run_id = self._find_existing(tid)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=str(trial),
                tags={
                    TAG_PARENT: self.parent_run_id,
                    TAG_TRIAL_ID: tid,
                    TAG_SEARCH: self.search_name,
                    TAG_ROLE: "trial",
                },
            )
            run_id = run.info.run_id
            if self.train_config is not None:
                from deeplense_ray.config import TrainConfig
                from deeplense_ray.train.prepare import log_run_inputs

                log_run_inputs(self.client, run_id, TrainConfig(**self.train_config))
            for k in self.param_keys:
                if k in trial.config:
                    self.client.log_param(run_id, k, _mlflow_param(trial.config[k]))
        self.run_ids[tid] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        import time

        self.started[trial.trial_id] = time.time()
        run_id = self.child_run_id(trial)
        self.client.update_run(run_id, status="RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id = self.child_run_id(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        self.epochs[trial.trial_id] = max(epoch, self.epochs.get(trial.trial_id, 0))
        if result.get(DIVERGED_KEY) == 1.0:
            self.diverged.setdefault(trial.trial_id, epoch)
        metrics = numeric_metrics(result)
        metrics.pop("epoch", None)
        startup = trial_startup(result, self.started.get(trial.trial_id))
        metrics.update(startup)
        if startup and result.get("pid") is not None:
            self.client.set_tag(run_id, TAG_PROCESS, f"{result.get('hostname', '')}:{result['pid']}")
        if metrics:
            from mlflow.entities import Metric

            ts = int(1000 * float(result.get("timestamp", 0)))
            self.client.log_batch(run_id, metrics=[Metric(k, v, ts, epoch) for k, v in metrics.items()])

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id = self.child_run_id(trial)
        epochs_run = self.epochs.get(trial.trial_id, 0)
        text, status = outcome(epochs_run, self.max_epochs, diverged_at=self.diverged.get(trial.trial_id))
        self.client.set_tag(run_id, TAG_OUTCOME, text)
        self.client.set_tag(run_id, TAG_EPOCHS, str(epochs_run))
        self.client.set_terminated(run_id, status=status)
        self._trial_ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self.child_run_id(trial)
        epochs_run = self.epochs.get(trial.trial_id, 0)
        self.client.set_tag(run_id, TAG_OUTCOME, f"failed at epoch {epochs_run + 1}")
        self.client.set_tag(run_id, TAG_EPOCHS, str(epochs_run))
        self.client.set_terminated(run_id, status="FAILED")
        self._trial_ended(trial)
