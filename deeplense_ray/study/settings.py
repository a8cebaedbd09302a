"""What a study runs: models x seeds on one dataset with one training recipe, and the published protocols.

``StudySettings.validate()`` checks everything that needs no cluster (model names, timm availability,
per-model configs, the recipe as a ``TrainConfig``, the task and its targets: with ``simulate``, a couple of
CPU-rendered images of the preset show that every target exists) and names the bad value;
``train_fields()`` gives the ``TrainConfig`` fields of one (model, seed).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: ``--protocol lensiformer``: the Real-Galaxy-Tiny study of the Lensiformer paper: no_sub vs cdm, 1000
#: training and 1000 test images, ~13M-parameter models with 2 transformer blocks, AdamW at lr 5e-7. The paper
#: trained 3000 epochs; epochs stay a flag and are recorded with the results.
LENSIFORMER_PROTOCOL: dict[str, Any] = {
    "preset": "real_galaxy_tiny",
    # 500 + 25 + 500 per class: 1000 training and 1000 test images in all, 50 validation images for selection
    "num_per_class": 1025,
    "splits": {"train": 500 / 1025, "val": 25 / 1025, "test": 500 / 1025},
    "models": ("ViT", "ViTSD", "CvT", "CaiT", "Lensiformer"),
    "model_size": "comparable",
    "train": {"optimizer": "adamw", "lr": 5e-7, "scheduler": "none", "batch_size": 32},
    "published_epochs": 3000,
}
PROTOCOLS: Mapping[str, Mapping[str, Any]] = {"lensiformer": LENSIFORMER_PROTOCOL}

#: TrainConfig fields a study sets itself for every run (a per-model --config cannot change them).
STUDY_OWNED = ("model", "data_dir", "seed", "epochs", "storage_path", "run_name", "resume", "experiment",
               "tracking_uri", "simulate", "sim_overrides", "images_per_epoch",
               "task", "targets")  # fmt: skip


def slug(model: str) -> str:
    """A model name as a file / run-name part (``timm:densenet201`` -> ``timm-densenet201``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model)


def run_key(model: str, seed: int) -> str:
    """The name of one (model, seed) run's result files under ``RUNS_DIR``."""
    return f"{slug(model)}-s{seed}"


#: the study directory's folder of per-run results (``<run_key>.json`` / ``.npz``)
RUNS_DIR = "runs"


@dataclass
class StudyResult:
    """What :func:`deeplense_ray.study.run_study` returns: the table, the runs and where they are."""

    name: str
    output_dir: str
    parent_run_id: str
    experiment_id: str
    data_dir: str
    table: list[dict[str, Any]]
    markdown: str
    runs: list[dict[str, Any]]
    artifacts: list[str] = field(default_factory=list)
    ran_now: list[str] = field(default_factory=list)


def parse_models(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"ViT,CvT"`` (or a list) -> canonical names, in order; ValueError naming an unknown or repeated name
    (``timm:<arch>`` is checked against timm, which must be importable)."""
    from deeplense_ray.models import get_spec

    items = text.split(",") if isinstance(text, str) else list(text)
    names = [str(m).strip() for m in items if str(m).strip()]
    if not names:
        raise ValueError(f"models: give at least one model name, got {text!r}")
    out: list[str] = []
    for n in names:
        canon = get_spec(n).name  # ValueError: unknown model, or timm not importable / unknown architecture
        if canon.lower() in (o.lower() for o in out):
            raise ValueError(f"models: {canon!r} is given twice in {text!r}")
        out.append(canon)
    return tuple(out)


def parse_targets(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``"sigma_sub,theta_E"`` (or a list) -> a tuple of names (checked with the task:
    ``check_task_options``)."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(str(t).strip() for t in items if str(t).strip())


def load_model_config(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """A tune search's ``best_config.yaml`` -> (model, its TrainConfig fields without the study-owned ones).

    Also accepts a plain YAML mapping with ``model`` and TrainConfig fields. ValueError naming the file."""
    from deeplense_ray.config import TrainConfig
    from deeplense_ray.yamlio import yaml_load

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {str(p)!r} does not exist")
    doc = yaml_load(p.read_text())
    if not isinstance(doc, Mapping) or "model" not in doc:
        raise ValueError(f"--config {str(p)!r}: expected a mapping with 'model' (a best_config.yaml)")
    fields = dict(doc.get("train_config", {k: v for k, v in doc.items() if k != "model"}))
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - valid)
    if unknown:
        raise ValueError(f"--config {str(p)!r}: unknown TrainConfig keys {unknown}")
    for k in STUDY_OWNED:
        fields.pop(k, None)
    return str(doc["model"]), fields


@dataclass
class StudySettings:
    """One study.

    Attributes:
        models: model names (``list_models()`` or ``timm:<arch>``), comma-separated text or a list.
        data_dir: dataset directory (train / val / test), or None with ``simulate``.
        simulate: preset name: build a dataset of it (``num_per_class`` images per class, ``data_seed``)
            under ``<storage_path>/<name>/dataset`` first.
        online: with ``simulate``, train online (``TrainConfig.simulate``: every run renders fresh training
            images on its device, ``images_per_epoch`` per epoch); the built dataset then holds only the fixed
            val and test splits every run is selected and evaluated on.
        seeds: runs per model (seeds 0 .. seeds-1).
        epochs: epochs of every run.
        model_size: ``build_model`` size of every model ('default' or 'comparable').
        model_configs: model -> TrainConfig fields for that model (from ``--config best_config.yaml``).
        train: TrainConfig fields of every run (lr, batch_size, precision, ...), under the per-model configs.
        gpus_per_run, cpus_per_run: resources of each run's single Ray Train worker (fractional GPUs pack
            runs on a GPU; None: 0.25 GPU when the cluster has GPUs, and CPUs leaving one for the readers).
        max_concurrent: runs at once (None: what the cluster holds).
        task: 'classification' (the default: accuracy, AUC, ROC curves) or 'inference' (per-lens Gaussian
            posteriors of ``targets``: RMSE, NLL, coverage, calibration curves; docs/parameter_inference.md).
        targets: task 'inference': the per-image scalars to infer (``theta_E``, ``sigma_sub``, ...), a comma
            list or a list; the task's classes default to those every target exists on (a ``train`` field
            ``classes`` picks others).
        protocol: None or a key of :data:`PROTOCOLS` (sets preset, data size, models, size and optimiser).
        name: study name (a directory under storage_path); resume: continue it without redoing finished runs.
    """

    models: Any = ("ViT", "CvT", "Lensiformer", "ResNet18")
    data_dir: str | None = None
    simulate: str | None = None
    num_per_class: int = 1000
    splits: dict[str, float] | None = None
    preset_overrides: dict[str, Any] = field(default_factory=dict)
    data_seed: int = 0
    online: bool = False
    images_per_epoch: int = 8192
    seeds: int = 3
    epochs: int = 10
    model_size: str = "default"
    model_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    gpus_per_run: float | None = None
    cpus_per_run: float | None = None
    max_concurrent: int | None = None
    task: str = "classification"
    targets: Any = ()
    protocol: str | None = None
    experiment: str = "deeplense-study"
    tracking_uri: str | None = None
    storage_path: str = "study_results"
    name: str | None = None
    resume: bool = False
    #: test hook: (model, seed) pairs whose run raises before training (an interrupted study)
    fail_runs: tuple[tuple[str, int], ...] = ()

    def with_protocol(self, explicit: set[str] = frozenset()) -> StudySettings:
        """A copy with the protocol's preset, data size, models, size and optimiser, except the fields named
        in ``explicit`` (given on the command line). ValueError for an unknown protocol."""
        if self.protocol is None:
            return self
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r}; valid: {', '.join(PROTOCOLS)}")
        p = PROTOCOLS[self.protocol]
        kw: dict[str, Any] = {}
        if "data_dir" not in explicit and "simulate" not in explicit:
            kw["simulate"] = p["preset"]
        for key in ("num_per_class", "splits", "models", "model_size"):
            if key not in explicit:
                kw[key] = p[key]
        kw["train"] = {**p["train"], **self.train}
        return dataclasses.replace(self, **kw)

    def validate(self) -> StudySettings:
        """Check every option (no cluster work); ValueError naming the value. Returns a normalised copy."""
        from deeplense_ray.config import TrainConfig
        from deeplense_ray.train.targets import check_task_options

        s = dataclasses.replace(self, models=parse_models(self.models), targets=parse_targets(self.targets))
        check_task_options(s.task, s.targets, None)
        if (s.data_dir is None) == (s.simulate is None):
            raise ValueError("give exactly one of data_dir (--data) and simulate (--simulate PRESET)")
        if s.online and s.simulate is None:
            raise ValueError("online training needs simulate (--simulate PRESET --online)")
        for key, lo in (("seeds", 1), ("epochs", 1), ("num_per_class", 1), ("images_per_epoch", 1)):
            v = getattr(s, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{key} must be an integer >= {lo}, got {v!r}")
        if s.max_concurrent is not None and (not isinstance(s.max_concurrent, int) or s.max_concurrent < 1):
            raise ValueError(f"max_concurrent must be an integer >= 1, got {s.max_concurrent!r}")
        for key in ("gpus_per_run", "cpus_per_run"):
            v = getattr(s, key)
            if v is not None and (
                not isinstance(v, (int, float)) or v < 0 or (key == "cpus_per_run" and v == 0)
            ):
                raise ValueError(f"{key} must be a positive number, got {v!r}")
        if s.gpus_per_run is not None and s.gpus_per_run > 1 and float(s.gpus_per_run) != int(s.gpus_per_run):
            raise ValueError(f"gpus_per_run above 1 must be whole, got {s.gpus_per_run!r}")
        if s.name is not None and (not s.name or "/" in s.name or s.name in (".", "..")):
            raise ValueError(f"name must be a plain directory name, got {s.name!r}")
        owned = sorted(set(s.train) & set(STUDY_OWNED))
        if owned:
            raise ValueError(f"train fields {owned} are set by the study itself (use its own options)")
        configs = {}
        for model, fields in s.model_configs.items():
            canon = parse_models([model])[0]
            if canon not in s.models:
                raise ValueError(f"--config for model {canon!r}, which is not in models {list(s.models)}")
            configs[canon] = dict(fields)
        s.model_configs = configs
        if s.simulate is not None:
            self.dataset_config(s).validate()
        # every run's TrainConfig, options only (the data is checked once it exists)
        for model in s.models:
            TrainConfig(**self.train_fields(s, model, seed=0, data_dir=s.data_dir or ".")).validate_options()
        if s.task == "inference" and s.simulate is not None:
            # the dataset is built once Ray runs: its preset shows now that the targets exist and every model
            # takes the images with the posterior head (TrainConfig's online check: a few CPU images)
            for model in s.models:
                fields = dict(self.train_fields(s, model, seed=0, data_dir="."), data_dir=None,
                              simulate=s.simulate, sim_overrides=dict(s.preset_overrides))  # fmt: skip
                TrainConfig(**fields).validate()
        return s

    @staticmethod
    def dataset_config(s: StudySettings):
        from deeplense_ray.data import DatasetConfig
        from deeplense_ray.data.config import DEFAULT_SPLITS

        kw: dict[str, Any] = {}
        if s.splits is not None:
            kw["splits"] = dict(s.splits)
        if s.online:  # training images are rendered by each run: only the fixed val and test splits
            f = dict(s.splits or DEFAULT_SPLITS)
            kw["splits"] = {k: f[k] / (f["val"] + f["test"]) for k in ("val", "test")}
        return DatasetConfig(
            preset=s.simulate or "", preset_overrides=dict(s.preset_overrides), num_per_class=s.num_per_class,
            seed=s.data_seed, **kw,
        )  # fmt: skip

    @staticmethod
    def train_fields(s: StudySettings, model: str, *, seed: int, data_dir: str) -> dict[str, Any]:
        """TrainConfig fields of one run: the recipe, the model's --config, then the study-owned fields."""
        fields: dict[str, Any] = {"model_size": s.model_size, "num_workers": 1}
        fields.update(s.train)
        fields.update(s.model_configs.get(model, {}))
        fields.update(model=model, data_dir=data_dir, seed=seed, epochs=s.epochs, experiment=s.experiment)
        if s.task != "classification" or s.targets:
            fields.update(task=s.task, targets=tuple(s.targets))
        if s.online:
            fields.update(simulate=s.simulate, sim_overrides=dict(s.preset_overrides),
                          images_per_epoch=s.images_per_epoch)  # fmt: skip
        if s.gpus_per_run is not None:
            fields["gpus_per_worker"] = float(s.gpus_per_run)
        if s.cpus_per_run is not None:
            fields["cpus_per_worker"] = float(s.cpus_per_run)
        fields["num_workers"] = 1  # one worker per run: runs are packed instead of split
        return fields
