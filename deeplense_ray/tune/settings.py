"""Typed, validated settings of one hyperparameter search (what jobs/tune.py fills from argv).

Validation is split in two so that every bad option fails before any trial starts:
:meth:`TuneSettings.validate` checks what needs no cluster (names, ranges, data directory), and
:func:`check_cluster_resources` checks the per-trial request against the resources of the Ray runtime
right after ``ray.init`` and before ``Tuner.fit``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deeplense_ray.cli import count_arg
from deeplense_ray.config import DEFAULT_DATA_PRESET, flag_field
from deeplense_ray.runtime import DATA_RESERVE_CPUS, check_cpu_room

#: Metrics the training loop reports every epoch that a search may optimise, with their natural mode.
METRIC_MODES: dict[str, str] = {
    "val_auc_macro": "max",
    "val_auc_micro": "max",
    "val_acc": "max",
    "val_loss": "min",
    "val_nll": "min",  # task 'inference' (train_overrides task=inference): the Gaussian NLL per lens
}
#: Metrics of the classification task only (an inference run reports no class metrics).
CLASSIFICATION_METRICS: tuple[str, ...] = ("val_auc_macro", "val_auc_micro", "val_acc")
SEARCH_ALGORITHMS: tuple[str, ...] = ("optuna", "random")
SCHEDULERS: tuple[str, ...] = ("asha", "fifo")
#: CPUs held by each trial's function beyond its training worker's (with a trainer it only builds the
#: TorchTrainer, calls fit and waits; in its actor it also trains, on the trial's --cpus-per-trial).
DRIVER_CPUS: float = 0.1
#: How a trial trains (TuneSettings.trial_runner; resolved by :meth:`TuneSettings.resolved_trial_runner`).
TRIAL_RUNNERS: tuple[str, ...] = ("auto", "actor", "trainer")


#: The data of a search given no dataset (:data:`deeplense_ray.config.DEFAULT_DATA_PRESET`).
DEFAULT_PRESET = DEFAULT_DATA_PRESET


@dataclass
class TuneSettings:
    """Everything one search needs; plain data (YAML/JSON-safe except ``space``).

    Attributes:
        model: model name as in ``deeplense_ray.models.list_models()`` (case-insensitive).
        num_samples: number of trials (>= 1).
        data_dir: dataset directory (``manifest.json`` inside); None simulates a small ``preset`` dataset
            into ``<storage_path>/datasets/`` first (or reuses one with the same config there).
        preset, num_per_class, preset_overrides, data_seed: the auto-simulated dataset (unused with
            data_dir).
        simulate: online simulation (train/online.py) in every trial: training images rendered on the
            trial's workers from ``preset`` + ``preset_overrides`` (no dataset written); val/test from
            ``data_dir``'s splits if given, else fixed simulated sets (``train_overrides`` may set
            images_per_epoch, val_size, test_size, sim_chunk_batches).
        max_epochs: epochs of a trial that ASHA never stops (ASHA ``max_t``).
        grace_period: epochs every trial runs before ASHA may stop it.
        reduction_factor: ASHA halving rate (keeps the top 1/reduction_factor at each rung).
        gpus_per_trial: GPUs of each training worker of a trial (fractions pack trials on one GPU);
            None = 0.25 when the cluster has GPUs, else 0.
        cpus_per_trial: CPUs of each training worker of a trial; None = 1, or less on a small cluster so that
            one CPU stays free for the Ray Data readers (which otherwise never get scheduled: a hang).
        workers_per_trial: Ray Train workers (DDP ranks) per trial.
        max_concurrent: trials running at once; None = as many as the cluster holds.
        metric, mode: the per-epoch validation metric ASHA and the searcher optimise; mode None = natural.
        search: 'optuna' (seeded TPE) or 'random' (seeded random sampling).
        seed: seeds the searcher and every trial's training.
        experiment: MLflow experiment name; tracking_uri: MLflow URI (None = the train default).
        storage_path: root of all outputs; the search lives in ``<storage_path>/<name>``.
        name: search name; None = ``tune-<model>-<timestamp>`` (with resume: the newest of that model).
        resume: continue an interrupted search instead of starting one.
        train_overrides: extra TrainConfig fields for every trial (optimizer, scheduler, precision, ...).
        space: entries replacing / adding to the model's search space (Tune domains or constants).
        model_size: the ``size`` passed to ``build_model`` for every trial.
        scheduler: 'asha' (early stopping) or 'fifo' (every trial runs max_epochs; for baselines).
        points_to_evaluate: configurations (search-space keys -> values) the searcher tries first.
        verbose: Ray's own output as well (Tune's status tables and per-trial config boxes, the workers'
            logs and Ray Data progress bars); default off: one line per trial start, epoch and end.
        keep_checkpoints: what stays on disk after the search: 'best' (the best trial's best checkpoint
            only) or 'trials' (each trial's best checkpoint). While a trial runs it keeps its best and its
            latest (for resume); an ended trial keeps its best only.
        trial_runner: how a trial trains: 'actor' (in the trial's own Tune actor, which Tune reuses for the
            next trial: no new processes after the first trial; one worker per trial only), 'trainer' (a
            Ray Train ``TorchTrainer`` per trial: a controller and ``workers_per_trial`` worker processes)
            or 'auto' (actor with one worker per trial, else trainer). See tune/actor_trial.py.
    """

    model: str
    num_samples: int = flag_field(10, "trials", aliases=("--num_samples",))
    data_dir: str | None = None
    preset: str = flag_field(
        DEFAULT_PRESET,
        "preset of the simulated dataset when --data is not given (the default: the demo's data; "
        "model_ii and the other physical presets are realistic)",
    )
    num_per_class: int = flag_field(300, "images per class of the simulated dataset", type=count_arg)
    preset_overrides: dict[str, Any] = field(default_factory=dict)
    data_seed: int = 0
    max_epochs: int = flag_field(10, "epochs of a trial ASHA does not stop")
    grace_period: int = flag_field(1, "epochs before ASHA may stop a trial")
    reduction_factor: int = flag_field(2, "ASHA reduction factor", type=float)
    gpus_per_trial: float | None = flag_field(
        None, "GPUs per training worker, fractions pack trials on a GPU (default 0.25 with GPUs, else 0)"
    )
    cpus_per_trial: float | None = flag_field(
        None, "CPUs per training worker (default 1, less on a small cluster: one CPU stays free for data)"
    )
    workers_per_trial: int = flag_field(1, "Ray Train workers (DDP ranks) per trial")
    max_concurrent: int | None = flag_field(None, "trials at once (default: what the cluster holds)")
    metric: str = flag_field(
        "val_auc_macro", f"metric to optimise: {', '.join(METRIC_MODES)} (--task inference: val_nll)"
    )
    mode: str | None = flag_field(None, "default: the metric's natural mode", choices=("max", "min"))
    search: str = flag_field("optuna", f"search algorithm: {', '.join(SEARCH_ALGORITHMS)}")
    seed: int = flag_field(0, "seeds the searcher and every trial")
    experiment: str = flag_field("deeplense-tune", "MLflow experiment")
    tracking_uri: str | None = None
    storage_path: str = flag_field("tune_results", "root of all outputs")
    name: str | None = flag_field(None, "search name (default tune-<model>-<time>; with --resume the newest)")
    resume: bool = flag_field(
        False, "continue an interrupted search without redoing finished trials", action="store_true"
    )
    train_overrides: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)
    model_size: str = "default"
    scheduler: str = flag_field(
        "asha",
        "asha (early stopping) or fifo (every trial runs --max-epochs); the learning-rate schedule is "
        "--train-override scheduler=...",
        flag="--trial-scheduler",
    )
    points_to_evaluate: list[dict[str, Any]] | None = None
    verbose: bool = flag_field(
        False, "Ray's own output too (Tune tables, worker logs, progress bars)", action="store_true"
    )
    keep_checkpoints: str = flag_field(
        "best",
        "after the search keep the best trial's best checkpoint (best) or each trial's best",
        choices=("best", "trials"),
    )
    simulate: bool = False
    trial_runner: str = flag_field(
        "auto",
        "actor: a trial trains in its own Tune actor, reused by the next trial (no new processes); "
        "trainer: a Ray Train TorchTrainer per trial; auto: actor with one worker per trial",
    )

    @property
    def resolved_mode(self) -> str:
        """The optimisation mode ('max' or 'min'): explicit or the metric's natural one."""
        return self.mode if self.mode is not None else METRIC_MODES.get(self.metric, "max")

    @property
    def resolved_trial_runner(self) -> str:
        """'actor' or 'trainer': 'auto' is actor with one worker per trial, else trainer."""
        if self.trial_runner == "auto":
            return "actor" if self.workers_per_trial == 1 else "trainer"
        return self.trial_runner

    def validate(self) -> TuneSettings:
        """Check every option that needs no cluster; raise ValueError naming the option and the value.

        Returns self, with ``model`` replaced by its canonical name.
        """
        from deeplense_ray.models import list_models

        models = list_models()
        canon = {m.lower(): m for m in models}
        if not isinstance(self.model, str) or self.model.lower() not in canon:
            raise ValueError(f"unknown model {self.model!r}; valid models: {', '.join(models)}")
        self.model = canon[self.model.lower()]
        _check_int("num_samples", self.num_samples, 1)
        _check_int("workers_per_trial", self.workers_per_trial, 1)
        from deeplense_ray.tune.spaces import search_space

        search_space(self.model, overrides=self.space, num_workers=self.workers_per_trial)  # keys and values
        _check_int("max_epochs", self.max_epochs, 1)
        _check_int("grace_period", self.grace_period, 1)
        if self.grace_period > self.max_epochs:
            raise ValueError(
                f"grace_period={self.grace_period} exceeds max_epochs={self.max_epochs}; "
                "ASHA needs 1 <= grace_period <= max_epochs"
            )
        if not isinstance(self.reduction_factor, (int, float)) or self.reduction_factor <= 1:
            raise ValueError(f"reduction_factor={self.reduction_factor!r} must be > 1")
        _check_int("workers_per_trial", self.workers_per_trial, 1)
        if self.trial_runner not in TRIAL_RUNNERS:
            raise ValueError(f"trial_runner={self.trial_runner!r}: choose one of {', '.join(TRIAL_RUNNERS)}")
        if self.trial_runner == "actor" and self.workers_per_trial != 1:
            raise ValueError(
                f"trial_runner='actor' trains in one process: workers_per_trial={self.workers_per_trial} "
                "needs trial_runner='trainer' (or 'auto')"
            )
        _check_int("num_per_class", self.num_per_class, 1)
        if self.max_concurrent is not None:
            _check_int("max_concurrent", self.max_concurrent, 1)
        if self.cpus_per_trial is not None and (not _finite(self.cpus_per_trial) or self.cpus_per_trial <= 0):
            raise ValueError(f"cpus_per_trial={self.cpus_per_trial!r} must be a number > 0")
        if self.gpus_per_trial is not None:
            g = self.gpus_per_trial
            if not _finite(g) or g < 0:
                raise ValueError(f"gpus_per_trial={g!r} must be a number >= 0")
            if g > 1 and float(g) != int(g):
                raise ValueError(f"gpus_per_trial={g!r}: above 1 GPU per worker it must be a whole number")
        task = (
            self.train_overrides.get("task", "classification")
            if isinstance(self.train_overrides, Mapping)
            else None
        )
        if task == "inference" and self.metric == "val_auc_macro":  # the default: the task's own
            from deeplense_ray.ranking import task_score

            self.metric = task_score(task)[0]
        if task == "inference" and self.metric in CLASSIFICATION_METRICS:
            raise ValueError(
                f"metric {self.metric!r} is a classification metric; task 'inference' reports val_nll"
            )
        if task == "classification" and self.metric == "val_nll":
            raise ValueError(
                "metric 'val_nll' is reported by task 'inference' (--task inference --targets ...)"
            )
        if self.metric not in METRIC_MODES:
            raise ValueError(
                f"unknown metric {self.metric!r}; valid metrics (reported every epoch): "
                f"{', '.join(METRIC_MODES)}"
            )
        if self.mode is not None and self.mode not in ("max", "min"):
            raise ValueError(f"mode={self.mode!r} must be 'max' or 'min'")
        if self.mode is not None and self.mode != METRIC_MODES[self.metric]:
            raise ValueError(
                f"mode={self.mode!r} contradicts metric {self.metric!r}, which is optimised with "
                f"mode={METRIC_MODES[self.metric]!r}"
            )
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        if self.points_to_evaluate is not None and (
            not isinstance(self.points_to_evaluate, list)
            or not all(isinstance(p, Mapping) for p in self.points_to_evaluate)
        ):
            raise ValueError("points_to_evaluate must be a list of mappings (search-space key -> value)")
        from deeplense_ray.tune.disk import KEEP_CHOICES

        if self.keep_checkpoints not in KEEP_CHOICES:
            raise ValueError(
                f"keep_checkpoints={self.keep_checkpoints!r} must be one of {', '.join(KEEP_CHOICES)}"
            )
        if self.search not in SEARCH_ALGORITHMS:
            raise ValueError(f"unknown search {self.search!r}; valid: {', '.join(SEARCH_ALGORITHMS)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**31:
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**31)")
        if not self.experiment or not isinstance(self.experiment, str):
            raise ValueError(f"experiment={self.experiment!r} must be a non-empty string")
        from deeplense_ray.models import SIZES

        if self.model_size not in SIZES:
            raise ValueError(f"model_size={self.model_size!r} must be one of {list(SIZES)}")
        if self.name is not None and (not self.name or os.sep in self.name or self.name in (".", "..")):
            raise ValueError(f"name={self.name!r} must be a plain directory name")
        if self.data_dir is not None:
            manifest = os.path.join(self.data_dir, "manifest.json")
            if not os.path.isdir(self.data_dir):
                raise ValueError(f"data_dir {self.data_dir!r} does not exist or is not a directory")
            if not os.path.isfile(manifest):
                raise ValueError(f"data_dir {self.data_dir!r} has no manifest.json (not a dataset directory)")
        if self.data_dir is None or self.simulate:
            from deeplense_ray.sim.presets import list_presets

            if self.preset not in list_presets():
                raise ValueError(
                    f"unknown preset {self.preset!r}; valid presets: {', '.join(list_presets())}"
                )
        if self.simulate:  # the preset and its overrides, before any cluster work
            from deeplense_ray.train.online import resolve_sim_preset

            resolve_sim_preset(self.preset, self.preset_overrides)
        if not isinstance(self.train_overrides, Mapping):
            raise ValueError("train_overrides must be a mapping of TrainConfig fields")
        reserved = {
            "model",
            "data_dir",
            "epochs",
            "lr",
            "weight_decay",
            "batch_size",
            "seed",
            "num_workers",
            "gpus_per_worker",
            "cpus_per_worker",
            "experiment",
            "tracking_uri",
            "storage_path",
            "resume",
            "run_name",
            "model_size",
            "simulate",
            "sim_overrides",
        }
        clash = sorted(reserved & set(self.train_overrides))
        if clash:
            raise ValueError(f"train_overrides may not set {clash}: they are search settings or searched")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (``space`` rendered with ``repr`` since Tune domains are not YAML)."""
        d = dataclasses.asdict(self)
        d["space"] = {k: repr(v) for k, v in self.space.items()}
        return d


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def resolve_gpus_per_trial(settings: TuneSettings, cluster: Mapping[str, float]) -> float:
    """GPUs per training worker: the explicit value, else 0.25 when the cluster has GPUs, else 0."""
    if settings.gpus_per_trial is not None:
        return float(settings.gpus_per_trial)
    return 0.25 if float(cluster.get("GPU", 0.0)) > 0 else 0.0


def resolve_cpus_per_trial(settings: TuneSettings, cluster: Mapping[str, float]) -> float:
    """CPUs per training worker: the explicit value, else 1 or what leaves one CPU for the data readers."""
    if settings.cpus_per_trial is not None:
        return float(settings.cpus_per_trial)
    room = (float(cluster.get("CPU", 0.0)) - DATA_RESERVE_CPUS - DRIVER_CPUS) / settings.workers_per_trial
    return max(0.25, min(1.0, math.floor(room * 4) / 4))


def check_cluster_resources(settings: TuneSettings, cluster: Mapping[str, float]) -> int:
    """Check one trial fits the cluster; return how many trials can run at once.

    A trial holds its driver function (``DRIVER_CPUS``) plus ``workers_per_trial`` workers of
    ``cpus_per_trial`` CPUs and ``gpus_per_trial`` GPUs each; ``DATA_RESERVE_CPUS`` stay free for the Ray Data
    readers when more than one trial fits. Raises ValueError naming the request and what the cluster has when
    a single trial cannot fit.

    Args:
        cluster: ``ray.cluster_resources()`` (keys 'CPU', 'GPU', ...).
    """
    cpus = float(cluster.get("CPU", 0.0))
    gpus = float(cluster.get("GPU", 0.0))
    g = resolve_gpus_per_trial(settings, cluster)
    k = settings.workers_per_trial
    c = resolve_cpus_per_trial(settings, cluster)
    if g * k > gpus + 1e-9:
        raise ValueError(
            f"gpus_per_trial={g:g} x workers_per_trial={k} = {g * k:g} GPUs per trial, but the Ray "
            f"cluster has {gpus:g} GPUs"
        )
    need_cpu = DRIVER_CPUS + c * k
    check_cpu_room(
        cluster,
        need_cpu,
        what="a trial",
        detail=f"{DRIVER_CPUS:g} for its driver + cpus_per_trial={c:g} x workers_per_trial={k}",
        fix="lower cpus_per_trial (fractions are allowed) or workers_per_trial",
    )
    fit = max(1, math.floor((cpus - DATA_RESERVE_CPUS + 1e-9) / need_cpu))
    if g > 0:
        fit = min(fit, math.floor((gpus + 1e-9) / (g * k)))
    fit = max(1, min(fit, settings.num_samples))
    if settings.max_concurrent is not None:
        fit = min(fit, settings.max_concurrent)
    return fit
