"""Ray Tune search over the training loop: ASHA + Optuna, nested MLflow runs, resume.

The Ray Train V2 pattern: each trial is a Tune *function trainable* (:func:`train_trial`) that builds the
training issue's ``TorchTrainer`` with :func:`deeplense_ray.train.build_trainer` and calls ``.fit()``; a
``TuneReportCallback`` in the trainer's ``RunConfig`` forwards rank 0's per-epoch metrics to Tune. Each
trial's config carries everything it needs (no state shared between trials). ``ASHAScheduler`` stops trials on
the *current* epoch's validation metric (``time_attr='epoch'``), ``OptunaSearch`` proposes configs (seeded).
Tune only accounts for the driver function's resources (``DRIVER_CPUS``); the trainer reserves its own workers
(``cpus_per_trial`` / fractional ``gpus_per_trial`` each), so concurrency is capped to what the cluster holds.

Layout of a search (``<storage_path>/<name>/``): Tune's experiment state, ``trainers/<trial_id>/`` (each
trial's Ray Train run and checkpoints), ``search_state.json`` (settings + MLflow ids, for ``resume``),
``best_config.yaml``, ``best_checkpoint.txt``, ``summary.txt``, ``val_curves.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Stopper

from deeplense_ray.io import atomic_path, atomic_write_json, atomic_write_text
from deeplense_ray.tracking.console import tune_verbosity
from deeplense_ray.tune.mlflow_runs import DIVERGED_KEY, DIVERGED_VALUE
from deeplense_ray.tune.settings import (
    DRIVER_CPUS,
    TuneSettings,
    check_cluster_resources,
    resolve_cpus_per_trial,
    resolve_gpus_per_trial,
)

STATE_FILE = "search_state.json"
BEST_CONFIG_FILE = "best_config.yaml"
BEST_CHECKPOINT_FILE = "best_checkpoint.txt"
SUMMARY_FILE = "summary.txt"
CURVES_FILE = "val_curves.png"
CHECKPOINT_PATH_KEY = "checkpoint_path"


# ----------------------------------------------------------------------------------------------- results
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
    """What :func:`run_search` returns (also written to the search's output directory)."""

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


# ----------------------------------------------------------------------------------------------- helpers
def is_better(a: float, b: float, mode: str) -> bool:
    """True if metric value ``a`` beats ``b`` under ``mode`` (NaN never beats anything)."""
    if a is None or not math.isfinite(a):
        return False
    if b is None or not math.isfinite(b):
        return True
    return a > b if mode == "max" else a < b


def worst_value(mode: str) -> float:
    """The value every real metric value beats under ``mode`` (-inf for 'max', +inf for 'min')."""
    return -math.inf if mode == "max" else math.inf


def diverged_value(mode: str) -> float:
    """What a diverged trial reports to Tune instead of a NaN/inf metric: ``-+DIVERGED_VALUE``.

    Finite on purpose: ASHA's rung cutoff interpolates a percentile of the recorded values, and with
    -inf among them the interpolation yields NaN (inf - inf); Optuna marks a NaN trial failed and learns
    nothing from it. Every real value beats it (AUC/accuracy lie in [0, 1]; a loss stays far below 1e30).
    """
    return -DIVERGED_VALUE if mode == "max" else DIVERGED_VALUE


def as_metric(v: float) -> float:
    """A reported metric value for summaries: NaN for a diverged report (``|v| >= DIVERGED_VALUE``)."""
    v = float(v)
    return math.nan if not math.isfinite(v) or abs(v) >= DIVERGED_VALUE else v


def default_search_name(model: str) -> str:
    return f"tune-{model.lower()}-{time.strftime('%Y%m%d-%H%M%S')}"


def find_latest_search(storage_path: str, model: str) -> str | None:
    """Newest ``tune-<model>-*`` search directory under ``storage_path`` holding a search state, or None."""
    if not os.path.isdir(storage_path):
        return None
    prefix = f"tune-{model.lower()}-"
    found = [
        d
        for d in os.listdir(storage_path)
        if d.startswith(prefix) and os.path.isfile(os.path.join(storage_path, d, STATE_FILE))
    ]
    return (
        max(found, key=lambda d: os.path.getmtime(os.path.join(storage_path, d, STATE_FILE)))
        if found
        else None
    )


def dataset_dir_for(settings: TuneSettings, storage_path: str) -> str:
    """Directory of the auto-simulated dataset: one per distinct dataset config, so it is reused."""
    key = json.dumps(
        {
            "preset": settings.preset,
            "overrides": settings.preset_overrides,
            "n": settings.num_per_class,
            "seed": settings.data_seed,
        },
        sort_keys=True,
    )
    h = hashlib.sha256(key.encode()).hexdigest()[:10]
    return os.path.join(storage_path, "datasets", f"{settings.preset}-n{settings.num_per_class}-{h}")


@contextmanager
def dataset_lock(data_dir: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<data_dir>.lock`` (``fcntl.flock``; the kernel releases it if the process
    dies). Searches without data_dir share one auto-simulated dataset per config: under this lock one of
    them builds it and the others wait, then reuse it, instead of building into the same directory at once
    and deleting each other's temporary files."""
    import fcntl

    os.makedirs(os.path.dirname(data_dir), exist_ok=True)
    with open(f"{data_dir}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another search building the dataset {data_dir}", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_dataset(settings: TuneSettings, storage_path: str) -> str:
    """``settings.data_dir``, or a small simulated ``settings.preset`` dataset (built once, then reused; a
    search finding another one building it waits for it, see :func:`dataset_lock`)."""
    if settings.data_dir is not None:
        return os.path.abspath(settings.data_dir)
    from deeplense_ray.data import DatasetConfig, build_dataset, verify_dataset

    out = dataset_dir_for(settings, storage_path)
    cfg = DatasetConfig(
        preset=settings.preset,
        preset_overrides=dict(settings.preset_overrides),
        num_per_class=settings.num_per_class,
        seed=settings.data_seed,
    )
    cfg.validate()
    with dataset_lock(out):
        if os.path.isfile(os.path.join(out, "manifest.json")) and not verify_dataset(out):
            return out
        n = settings.num_per_class * 3
        print(f"[search] simulating a {settings.preset} dataset ({settings.num_per_class} images per class) "
              f"into {out} ...", flush=True)
        t0 = time.time()
        build_dataset(cfg, out, resume=os.path.isdir(out), progress=False)
        print(f"[search] dataset ready ({n} images, {time.time() - t0:.0f} s)", flush=True)
    return out


# ----------------------------------------------------------------------------------------------- trial
def sanitize_result(metrics: Mapping[str, Any], metric: str, mode: str) -> dict[str, Any]:
    """One epoch's report as Tune should see it: a diverged epoch gets the worst finite ``metric``.

    The train loop reports a diverged epoch (non-finite loss or outputs) with ``diverged`` = 1 and NaN
    losses/AUCs instead of raising. Such a report, or one whose ``metric`` is not a finite number, gets
    ``metric`` = :func:`diverged_value` and ``diverged`` = 1: ASHA and the searcher rank it below every real
    trial, and :class:`DivergedStopper` ends the trial (its weights are NaN; more epochs cannot help).
    """
    out = dict(metrics)
    v = out.get(metric)
    bad_value = metric in out and (not isinstance(v, (int, float)) or not math.isfinite(float(v)))
    if bad_value or out.get(DIVERGED_KEY) == 1:
        out[metric] = diverged_value(mode)
        out[DIVERGED_KEY] = 1
    return out


def _sanitizing_report_callback(metric: str, mode: str):
    """A ``TuneReportCallback`` forwarding rank 0's reports through :func:`sanitize_result`."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _Report(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics:
                metrics = [sanitize_result(metrics[0], metric, mode)] + list(metrics[1:])
            super().after_report(run_context, metrics, checkpoint)

    return _Report()


class DivergedStopper(Stopper):
    """Tune stopper (``RunConfig(stop=...)``): ends a trial at its first diverged report."""

    def __call__(self, trial_id: str, result: dict) -> bool:
        return result.get(DIVERGED_KEY) == 1

    def stop_all(self) -> bool:
        return False


def make_train_config(config: Mapping[str, Any]):
    """The TrainConfig of one trial: the search's fixed fields + the trial's sampled values."""
    from deeplense_ray.config import TrainConfig
    from deeplense_ray.tune.spaces import split_trial_config

    fixed = config["_search"]
    train_kw, model_kw = split_trial_config(config, fixed["hparams"])
    kwargs = dict(fixed["train"])
    kwargs.update(train_kw)
    kwargs["model_overrides"] = {**kwargs.get("model_overrides", {}), **model_kw}
    return TrainConfig(**kwargs)


def train_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one trial = one ``TorchTrainer.fit()`` of the training loop.

    ``config`` holds the sampled hyperparameters (flat keys of the search space) and ``config['_search']``:
    the fixed TrainConfig fields ("train"), the model's hyperparameter defaults ("hparams"), "metric", "mode"
    and "trainer_storage" (where each trial's Ray Train run lives; named by the trial id, so a resumed trial
    finds its own checkpoints). The trial's checkpoints are kept by "metric" and "mode".
    """
    import ray.tune

    from deeplense_ray.train import build_trainer

    fixed = config["_search"]
    cfg = make_train_config(config)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg.storage_path = fixed["trainer_storage"]
    from deeplense_ray.tune.cleanup import make_recorder

    trainer = build_trainer(
        cfg,
        run_config_callbacks=[
            _sanitizing_report_callback(fixed["metric"], fixed["mode"]),
            make_recorder(fixed["trainer_storage"], str(trial_id)),
        ],
        run_name=str(trial_id),
        # keep the trial's best checkpoints by the search's own metric, so the epoch the search names as
        # best still has its checkpoint when the search evaluates it on the test split
        score_metric=fixed["metric"],
        score_mode=fixed["mode"],
    )
    trainer.fit()


# ----------------------------------------------------------------------------------------------- search
def _trial_summaries(results, settings: TuneSettings, param_keys, callback) -> list[TrialSummary]:
    from deeplense_ray.tune.mlflow_runs import outcome

    mode = settings.resolved_mode
    out = []
    for r in results:
        df = r.metrics_dataframe
        curve: list[tuple[int, float]] = []
        if df is not None and len(df) and settings.metric in df:
            ep = df["epoch"] if "epoch" in df else df["training_iteration"]
            curve = sorted({int(e): as_metric(v) for e, v in zip(ep, df[settings.metric])}.items())
        best_m, best_e = worst_value(mode), 0
        for e, v in curve:
            if is_better(v, best_m, mode) or best_e == 0:
                best_m, best_e = v, e
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
                child_run_id=callback.run_ids.get(str(tid)) if callback is not None else None,
                curve=curve,
            )
        )
    return out


def trial_name(trial) -> str:
    """Trial names and directory names: ``trial_<trial_id>`` (the sampled values go to params, not paths)."""
    return f"trial_{trial.trial_id}"


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


def pick_best(trials: list[TrialSummary], mode: str) -> TrialSummary:
    """The search's best trial: the best of the trials' best-epoch metrics; ties go to the smaller trial id
    (the same rule as the live console, so every place names the same trial)."""
    return min(trials, key=lambda t: _rank_key(t, mode))


def _rank_key(t: TrialSummary, mode: str) -> tuple[float, str]:
    v = t.best_metric
    return ((-v if mode == "max" else v) if math.isfinite(v) else math.inf), t.trial_id


def format_summary(trials: list[TrialSummary], metric: str, mode: str) -> str:
    """Plain-text table: trial, config, epochs run, best val metric, outcome (best trial first)."""
    order = sorted(trials, key=lambda t: _rank_key(t, mode))

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    rows = [
        (
            t.trial_id,
            " ".join(f"{k}={fmt(v)}" for k, v in t.config.items()),
            str(t.epochs_run),
            f"{t.best_metric:.4f}",
            t.outcome,
        )
        for t in order
    ]
    head = ("trial", "config", "epochs", f"best {metric}", "outcome")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *map(line, rows)])


def plot_curves(trials: list[TrialSummary], metric: str, path: str) -> str:
    """PNG of every trial's validation curve (dashed: stopped by ASHA). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in trials:
        if not t.curve:
            continue
        e, v = zip(*t.curve)
        ax.plot(e, v, marker="o", linestyle="-" if t.outcome == "completed" else "--", label=t.trial_id)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"validation {metric} per trial (dashed: stopped early)")
    if trials:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def best_checkpoint_of(result, metric: str, mode: str) -> tuple[str | None, int]:
    """Path of the best *still existing* checkpoint of one trial by ``metric`` (and its epoch)."""
    df = result.metrics_dataframe
    if df is None or CHECKPOINT_PATH_KEY not in df:
        return None, 0
    best, best_v, best_e = None, worst_value(mode), 0
    for _, row in df.iterrows():
        p = row.get(CHECKPOINT_PATH_KEY)
        if not isinstance(p, str) or not os.path.isdir(p):
            continue
        v = as_metric(row[metric])
        if best is None or is_better(v, best_v, mode):
            best, best_v, best_e = p, v, int(row.get("epoch", row.get("training_iteration", 0)))
    return best, best_e


def console_callbacks(settings: TuneSettings, storage_path: str, name: str) -> list:
    """The driver-side callbacks of what a researcher sees and keeps: one line per trial start, epoch and
    end (:class:`~deeplense_ray.tracking.console.SearchConsole`), and an ended trial's checkpoints pruned to
    its best (:class:`~deeplense_ray.tune.disk.CheckpointPruner`)."""
    from deeplense_ray.tracking.console import SearchConsole
    from deeplense_ray.tune.disk import CheckpointPruner

    mode = settings.resolved_mode
    return [
        SearchConsole(
            metric=settings.metric,
            mode=mode,
            max_epochs=settings.max_epochs,
            num_samples=settings.num_samples,
        ),
        CheckpointPruner(os.path.join(storage_path, name, "trainers"), settings.metric, mode),
    ]


def _build_tuner(settings, *, trainable, param_space, name, storage_path, concurrency, callback, resources):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

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

    searched = any(isinstance(v, Domain) for k, v in param_space.items() if k != "_search")
    if settings.search == "optuna" and searched:  # Optuna refuses a space without a single domain
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=settings.seed, points_to_evaluate=points)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores max_concurrent_trials for a search_alg that is not a Searcher: cap it here
        search_alg = BasicVariantGenerator(
            random_state=settings.seed, points_to_evaluate=points, max_concurrent=concurrency
        )
    return tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=mode,
            num_samples=settings.num_samples,
            scheduler=scheduler,
            search_alg=search_alg,
            max_concurrent_trials=concurrency,
            reuse_actors=False,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=[callback, *console_callbacks(settings, storage_path, name)],
            stop=DivergedStopper(),
            verbose=tune_verbosity(settings.verbose),
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


class SearchSetupError(ValueError):
    """A bad option or input found while preparing a search, before any trial started."""


@dataclass
class _Plan:
    """Everything :func:`run_search` decided before ``Tuner.fit``."""

    name: str
    output_dir: str
    storage_path: str
    state: dict[str, Any] | None
    hparams: dict[str, Any]
    space: dict[str, Any]
    param_keys: list[str]
    concurrency: int = 1
    gpus: float = 0.0
    cpus: float = 1.0
    data_dir: str = ""
    tracking_uri: str = ""
    base_train: dict[str, Any] = field(default_factory=dict)


def connect_ray(address: str | None = None, *, verbose: bool = False) -> None:
    """Join ``address`` / $RAY_ADDRESS, else start a local runtime with the dashboard (see RAY_NOTES).

    Through :func:`deeplense_ray.runtime.connect`: a dead address fails within seconds (RayConnectError), a
    local runtime listens on 127.0.0.1 with explicit auth. Not ``verbose``: the workers' output (Ray Data
    progress bars, Train's start-up messages) stays in their log files (:func:`~deeplense_ray.tracking.
    console.quiet_ray`).
    """
    from deeplense_ray.runtime import connect
    from deeplense_ray.tracking.console import quiet_ray

    connect(address, join_running=False, include_dashboard=True, dashboard_host="127.0.0.1",
            configure_logging=False, **quiet_ray(verbose))


def plan_search(settings: TuneSettings) -> _Plan:
    """Checks that need no cluster: settings, search space, TrainConfig overrides, the search directory."""
    from deeplense_ray.config import TrainConfig
    from deeplense_ray.models import model_hparams
    from deeplense_ray.tune.spaces import search_space

    settings.validate()
    hparams = dict(model_hparams(settings.model))
    space = search_space(
        settings.model, overrides=settings.space, hparams=hparams, num_workers=settings.workers_per_trial
    )
    for p in settings.points_to_evaluate or []:
        extra = sorted(set(p) - set(space))
        if extra:
            raise ValueError(
                f"points_to_evaluate keys {extra} are not in the search space ({', '.join(space)})"
            )
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings.train_overrides) - fields)
    if unknown:
        raise ValueError(f"train_overrides {unknown} are not TrainConfig fields: {', '.join(sorted(fields))}")
    storage_path = os.path.abspath(settings.storage_path)
    state: dict[str, Any] | None = None
    if settings.resume:
        name = settings.name or find_latest_search(storage_path, settings.model)
        if name is None:
            raise ValueError(f"resume: no search of model {settings.model} under {storage_path!r}")
        state_path = os.path.join(storage_path, name, STATE_FILE)
        if not os.path.isfile(state_path):
            raise ValueError(f"resume: {state_path!r} does not exist (no search named {name!r})")
        with open(state_path) as f:
            state = json.load(f)
    else:
        name = settings.name or default_search_name(settings.model)
        if os.path.exists(os.path.join(storage_path, name, STATE_FILE)):
            raise ValueError(
                f"search {name!r} already exists under {storage_path!r}: pass resume=True (--resume) "
                "or a new name"
            )
    return _Plan(
        name=name,
        output_dir=os.path.join(storage_path, name),
        storage_path=storage_path,
        state=state,
        hparams=hparams,
        space=space,
        param_keys=sorted(space),
    )


def prepare_cluster_work(settings: TuneSettings, plan: _Plan, cluster: Mapping[str, float]) -> _Plan:
    """Checks against the cluster, then the dataset (simulated if needed) and the base TrainConfig."""
    from deeplense_ray.config import TrainConfig
    from deeplense_ray.tracking import resolve_tracking_uri

    plan.concurrency = check_cluster_resources(settings, cluster)
    plan.gpus = resolve_gpus_per_trial(settings, cluster)
    plan.cpus = resolve_cpus_per_trial(settings, cluster)
    plan.tracking_uri = (
        plan.state["tracking_uri"] if plan.state else resolve_tracking_uri(settings.tracking_uri)
    )
    if plan.state:
        plan.data_dir = plan.state["data_dir"]
    elif settings.simulate:  # online: no dataset written; val/test from data_dir if given
        plan.data_dir = os.path.abspath(settings.data_dir) if settings.data_dir is not None else ""
    else:
        plan.data_dir = ensure_dataset(settings, plan.storage_path)
    online = {"simulate": settings.preset, "sim_overrides": dict(settings.preset_overrides)}
    plan.base_train = dict(
        settings.train_overrides,
        **(online if settings.simulate else {}),
        model=settings.model,
        data_dir=plan.data_dir or None,
        epochs=settings.max_epochs,
        seed=settings.seed,
        num_workers=settings.workers_per_trial,
        gpus_per_worker=plan.gpus,
        cpus_per_worker=plan.cpus,
        experiment=settings.experiment,
        tracking_uri=plan.tracking_uri,
        storage_path=os.path.join(plan.output_dir, "trainers"),
        model_size=settings.model_size,
    )
    # a running trial keeps its best checkpoint by the search metric and the latest (for resume)
    plan.base_train.setdefault("num_to_keep", 1)
    TrainConfig(**plan.base_train).validate()
    return plan


def run_search(
    settings: TuneSettings, *, address: str | None = None, trainable: Callable | None = None
) -> SearchResult:
    """Run (or with ``settings.resume`` continue) one hyperparameter search; see the module docstring.

    Order of work: validate settings and search space (no cluster) -> join/start Ray -> check the per-trial
    request against the cluster -> simulate/reuse the dataset -> validate the base TrainConfig -> MLflow
    experiment (created once, here) and parent run -> ``Tuner.fit`` -> summary, the best checkpoint's test
    metrics, files. Anything wrong before ``Tuner.fit`` raises :class:`SearchSetupError` (a ValueError).

    Args:
        settings: the search.
        address: Ray address to join (default $RAY_ADDRESS, else a new local runtime); unused if Ray is up.
        trainable: the function trainable (default :func:`train_trial`); for tests of the wiring only.
    """
    import ray

    try:
        plan = plan_search(settings)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise SearchSetupError(exc.args[0] if exc.args else str(exc)) from exc
    connect_ray(address, verbose=settings.verbose)
    try:
        plan = prepare_cluster_work(settings, plan, ray.cluster_resources())
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise SearchSetupError(exc.args[0] if exc.args else str(exc)) from exc

    from mlflow.tracking import MlflowClient

    from deeplense_ray.config import TrainConfig
    from deeplense_ray.tracking import get_or_create_experiment
    from deeplense_ray.train.trainer import log_run_inputs
    from deeplense_ray.tune.mlflow_runs import TAG_ROLE, TAG_SEARCH, TrialRunsCallback

    client = MlflowClient(tracking_uri=plan.tracking_uri)
    name, output_dir, state = plan.name, plan.output_dir, plan.state
    if state is None:
        experiment_id = str(get_or_create_experiment(settings.experiment, plan.tracking_uri))
        os.makedirs(output_dir, exist_ok=True)
        parent = client.create_run(
            experiment_id,
            run_name=name,
            tags={TAG_ROLE: "search", TAG_SEARCH: name, "deeplense.model": settings.model},
        )
        parent_run_id = parent.info.run_id
        for k, v in _settings_params(settings, plan).items():
            client.log_param(parent_run_id, k, v)
        log_run_inputs(client, parent_run_id, TrainConfig(**plan.base_train))
        state = {
            "name": name,
            "settings": settings.to_dict(),
            "data_dir": plan.data_dir,
            "tracking_uri": plan.tracking_uri,
            "experiment_id": experiment_id,
            "parent_run_id": parent_run_id,
            "param_keys": plan.param_keys,
        }
        text = json.dumps(state, indent=2, default=str)
        atomic_write_text(os.path.join(output_dir, STATE_FILE), text, fsync=False)
    else:
        experiment_id, parent_run_id = state["experiment_id"], state["parent_run_id"]
        client.update_run(parent_run_id, status="RUNNING")
        client.set_tag(parent_run_id, "tune.resumed", "true")

    callback = TrialRunsCallback(
        tracking_uri=plan.tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        max_epochs=settings.max_epochs,
        param_keys=plan.param_keys,
        search_name=name,
        trainer_storage=os.path.join(output_dir, "trainers"),
        train_config=plan.base_train,
    )
    param_space = dict(plan.space)
    param_space["_search"] = {
        "train": plan.base_train,
        "hparams": plan.hparams,
        "metric": settings.metric,
        "mode": settings.resolved_mode,
        "trainer_storage": os.path.join(output_dir, "trainers"),
    }
    trainable = trainable or train_trial
    resources = {"cpu": DRIVER_CPUS}
    from ray import tune

    try:
        if settings.resume and tune.Tuner.can_restore(output_dir):
            tuner = tune.Tuner.restore(
                output_dir,
                tune.with_resources(trainable, resources),
                resume_unfinished=True,
                resume_errored=False,
                restart_errored=True,
            )
        else:
            tuner = _build_tuner(
                settings,
                trainable=trainable,
                param_space=param_space,
                name=name,
                storage_path=plan.storage_path,
                concurrency=plan.concurrency,
                callback=callback,
                resources=resources,
            )
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


def _settings_params(settings: TuneSettings, plan: _Plan) -> dict[str, str]:
    d = settings.to_dict()
    d.update(
        data_dir=plan.data_dir, max_concurrent_resolved=plan.concurrency, gpus_per_trial_resolved=plan.gpus
    )
    return {f"search.{k}": str(v)[:500] for k, v in d.items()}


def _finish(
    settings, results, *, plan: _Plan, client, callback, parent_run_id, experiment_id
) -> SearchResult:
    import yaml

    output_dir, name, param_keys, data_dir = plan.output_dir, plan.name, plan.param_keys, plan.data_dir
    base_train = plan.base_train
    mode = settings.resolved_mode
    # the callback object Tune used may be the restored one; read child-run ids from MLflow by tag
    from deeplense_ray.tune.mlflow_runs import TAG_PARENT, TAG_TRIAL_ID

    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'", max_results=10_000
    )
    callback.run_ids.update({r.data.tags.get(TAG_TRIAL_ID): r.info.run_id for r in runs})
    trials = _trial_summaries(results, settings, param_keys, callback)
    ok = [t for t in trials if math.isfinite(t.best_metric)]
    if not ok:
        client.set_terminated(parent_run_id, status="FAILED")
        raise RuntimeError(
            f"no trial of search {name!r} reported a finite {settings.metric}; see {output_dir}"
        )
    best_t = pick_best(ok, mode)
    best_res = next(r for r, t in zip(results, trials) if t is best_t)
    ckpt, ckpt_epoch = best_checkpoint_of(best_res, settings.metric, mode)
    test_metrics: dict[str, Any] = {}
    if ckpt is not None:  # the dataset's test split, or an online search's fixed simulated test set
        from deeplense_ray.config import TrainConfig
        from deeplense_ray.train.online import evaluate_test

        test_metrics = dict(evaluate_test(ckpt, TrainConfig(**base_train)))
    predictions = {k: test_metrics.pop(k) for k in ("y_true", "probs") if k in test_metrics}
    table = format_summary(trials, settings.metric, mode)
    train_cfg = dict(base_train)
    from deeplense_ray.tune.spaces import split_trial_config

    tk, mk = split_trial_config(best_t.config, best_res.config["_search"]["hparams"])
    train_cfg.update(tk)
    train_cfg["model_overrides"] = {**train_cfg.get("model_overrides", {}), **mk}
    train_cfg.pop("storage_path", None)
    best_doc = {
        "search": name,
        "model": settings.model,
        "trial_id": best_t.trial_id,
        "metric": settings.metric,
        "mode": mode,
        "best_metric": best_t.best_metric,
        "best_epoch": best_t.best_epoch,
        "hparams": _plain(best_t.config),
        "train_config": _plain(train_cfg),
        "best_checkpoint": ckpt,
        "checkpoint_epoch": ckpt_epoch,
        "test_metrics": _plain(_scalar_metrics(test_metrics)),
        "test_auc_macro_ci": _plain(test_metrics.get("auc_macro_ci")),
    }
    for name, text in (
        (BEST_CONFIG_FILE, yaml.safe_dump(best_doc, sort_keys=False)),
        (BEST_CHECKPOINT_FILE, (ckpt or "") + "\n"),
        (SUMMARY_FILE, table + "\n"),
    ):
        atomic_write_text(os.path.join(output_dir, name), text, fsync=False)
    curves = plot_curves(trials, settings.metric, os.path.join(output_dir, CURVES_FILE))

    for k, v in best_t.config.items():
        client.log_param(parent_run_id, f"best.{k}", str(v)[:500])
    client.log_metric(parent_run_id, f"best_{settings.metric}", best_t.best_metric)
    client.log_metric(parent_run_id, "best_epoch", best_t.best_epoch)
    client.log_metric(parent_run_id, "test_checkpoint_epoch", ckpt_epoch)  # the epoch the test metrics are of
    for k, v in _scalar_metrics(test_metrics).items():
        client.log_metric(parent_run_id, f"test_{k}", v)
    client.set_tag(parent_run_id, "tune.best_trial_id", best_t.trial_id)
    client.set_tag(parent_run_id, "tune.best_child_run_id", str(best_t.child_run_id))
    client.set_tag(parent_run_id, "tune.best_checkpoint", str(ckpt))
    client.log_metric(parent_run_id, "trials", len(trials))
    client.log_metric(
        parent_run_id, "trials_stopped_early", sum(t.outcome.startswith("stopped") for t in trials)
    )
    client.log_metric(parent_run_id, "epochs_total", sum(t.epochs_run for t in trials))
    for f in (BEST_CONFIG_FILE, SUMMARY_FILE):
        client.log_artifact(parent_run_id, os.path.join(output_dir, f))
    client.log_artifact(parent_run_id, curves)
    _log_trial_curves(client, results, trials, settings.metric)
    warnings: list[str] = []
    model_uri = None
    if ckpt is not None:
        from deeplense_ray.tracking.console import chance_warning
        from deeplense_ray.tracking.models import log_checkpoint_model
        from deeplense_ray.train.online import example_input

        ci = test_metrics.get("auc_macro_ci")
        if ci is not None:
            client.log_metric(parent_run_id, "test_auc_macro_ci_low", float(ci[0]))
            client.log_metric(parent_run_id, "test_auc_macro_ci_high", float(ci[1]))
        w = chance_warning("test AUC (macro)", test_metrics.get("auc_macro", math.nan), ci)
        if w:
            warnings.append(w)
            client.set_tag(parent_run_id, "warning.chance", w)
        _log_test_plots(client, parent_run_id, test_metrics, predictions, ckpt)
        model_uri = log_checkpoint_model(ckpt, plan.tracking_uri, parent_run_id,
                                         input_example=example_input(TrainConfig(**base_train)))
        client.set_tag(parent_run_id, "tune.best_model_uri", model_uri)
    if settings.keep_checkpoints == "best":
        from deeplense_ray.tune.disk import prune_to_best_trial

        prune_to_best_trial(os.path.join(output_dir, "trainers"), best_t.trial_id)
    from deeplense_ray.tracking.console import dir_size

    disk = dir_size(output_dir)
    client.log_metric(parent_run_id, "disk_bytes", disk)
    client.set_terminated(parent_run_id, status="FINISHED")
    return SearchResult(
        name=name,
        output_dir=output_dir,
        metric=settings.metric,
        mode=mode,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        best_trial_id=best_t.trial_id,
        best_config=best_doc,
        best_metric=best_t.best_metric,
        best_epoch=best_t.best_epoch,
        best_checkpoint=ckpt,
        test_metrics=test_metrics,
        trials=trials,
        summary_table=table,
        tracking_uri=plan.tracking_uri,
        data_dir=data_dir,
        model_uri=model_uri,
        disk_bytes=disk,
        warnings=warnings,
    )


def _log_trial_curves(client, results, trials: list[TrialSummary], metric: str) -> None:
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
        history = [{k: as_metric(v) for k, v in row.items() if isinstance(v, (int, float))}
                   for row in df.to_dict("records")]
        with tempfile.TemporaryDirectory(prefix="dlr-trial-") as tmp:
            path = plot_run_curves(history, os.path.join(tmp, "curves.png"))
            client.log_artifact(t.child_run_id, str(path))


def _log_test_plots(
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
            plot_roc_curves(predictions["y_true"], predictions["probs"], names,
                            os.path.join(tmp, "roc_test.png"), title="ROC, test split (best trial)")
        if "confusion_matrix" in test and names:
            plot_confusion_matrix(test["confusion_matrix"], names, os.path.join(tmp, "confusion_test.png"),
                                  title="confusion matrix, test (best trial)")
        try:
            history = load_training_state(ckpt).get("history", [])
        except (OSError, KeyError, RuntimeError):
            history = []
        if history:
            from deeplense_ray.tracking import plot_curves as plot_run_curves

            plot_run_curves(history, os.path.join(tmp, "curves.png"))
        atomic_write_json(os.path.join(tmp, "metrics_test.json"), dict(test))
        client.log_artifacts(run_id, tmp)


def _scalar_metrics(m: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in m.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def _plain(x: Any) -> Any:
    """YAML-safe copy (numpy scalars -> python, tuples -> lists)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        return x.item()
    if dataclasses.is_dataclass(x):
        return _plain(dataclasses.asdict(x))
    return x
