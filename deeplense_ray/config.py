"""Typed, validated training configuration shared by jobs/train.py, the trainer and the tune module.

:meth:`TrainConfig.validate` checks everything that can be checked without a cluster: option values, the data
directory and its manifest, the model name, and that the model accepts the dataset's image size, channels and
classes (it builds the model and runs one forward pass on a zero batch). It runs before Ray starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deeplense_ray.yamlio import yaml_load

#: The data of a run or search given no dataset: the published DeepLense Model II recipe, the demo's data (one
#: fixed macro lens, point-mass subhalos, no noise: substructure a classifier can see). The physical presets
#: (model_ii, ...) are realistic and weak: a small run on them ends near chance.
DEFAULT_DATA_PRESET = "deeplense_model_ii"
#: Images per class of that data, as the demo sizes it: on CPU, and with a GPU per worker.
DEFAULT_DATA_PER_CLASS: dict[str, int] = {"cpu": 500, "gpu": 5000}
OPTIMIZERS: tuple[str, ...] = ("adamw", "adam", "sgd")
SCHEDULERS: tuple[str, ...] = ("cosine", "step", "none")
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32")
#: How ranks get training data: ``auto`` (``memory`` for a train split up to :data:`MEMORY_INGEST_MAX_MB`,
#: else ``split``), one Ray Data stream split across ranks, one stream per rank, or the whole split read into
#: every rank's device memory once (train/ingest.py).
INGEST_MODES: tuple[str, ...] = ("auto", "split", "per_rank", "memory")
#: ``ingest="auto"`` reads a train split of at most this many MiB (as stored) into each rank's memory.
MEMORY_INGEST_MAX_MB: float = 2048.0
NORMALIZE_MODES: tuple[str, ...] = ("none", "per_image_minmax", "per_image_standard")
REQUIRED_SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Training tasks: class probabilities, or per-lens Gaussian posteriors of named targets (train/targets.py).
TASKS: tuple[str, ...] = ("classification", "inference")
_MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a dataset (read from its manifest)."""

    data_dir: str
    image_shape: tuple[int, int, int]  # [C, H, W]
    class_names: tuple[str, ...]
    pixel_scale: float | None  # arcsec / pixel (the preset's delta_pix)
    split_rows: dict[str, int]
    manifest_hash: str
    train_shard_rows: tuple[int, ...] = ()  # rows of each train shard, in manifest order
    image_dtype: str = "float32"  # as stored in the shards
    sim_preset: dict[str, Any] | None = None  # online simulation (--simulate): the resolved preset

    @property
    def in_channels(self) -> int:
        return int(self.image_shape[0])

    @property
    def image_size(self) -> int:
        return int(self.image_shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def describe_dataset(data_dir: str | os.PathLike[str]) -> DatasetInfo:
    """Read ``data_dir/manifest.json`` and check that each shard holds the rows it lists (HDF5 metadata only);
    FileNotFoundError / ValueError naming the directory or file."""
    from deeplense_ray.data.manifest import check_shard_rows, load_manifest, manifest_hash

    root = Path(data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"data directory {str(root)!r} does not exist (build one with jobs/simulate.py)"
        )
    if not root.is_dir():
        raise NotADirectoryError(f"data directory {str(root)!r} is not a directory")
    root = root.resolve()
    manifest = load_manifest(root)
    check_shard_rows(root, manifest)
    shape = tuple(int(v) for v in manifest["image_shape"])
    if len(shape) != 3:
        raise ValueError(f"dataset {root}: image_shape {list(shape)} is not [C, H, W]")
    splits = {name: int(info["rows"]) for name, info in manifest["splits"].items()}
    resolved = manifest.get("config", {}).get("preset_resolved") or manifest.get("config", {}).get("preset")
    pixel_scale = None
    if isinstance(resolved, Mapping) and resolved.get("delta_pix") is not None:
        pixel_scale = float(resolved["delta_pix"])
    return DatasetInfo(
        data_dir=str(root),
        image_shape=shape,  # type: ignore[arg-type]
        class_names=tuple(str(c) for c in manifest["class_names"]),
        pixel_scale=pixel_scale,
        split_rows=splits,
        manifest_hash=manifest_hash(root),
        train_shard_rows=tuple(
            int(sh["rows"]) for sh in manifest["splits"].get("train", {}).get("shards", [])
        ),
        image_dtype=str(manifest.get("image_dtype", "float32")),
    )


def check_model_fits(
    model: str,
    info: DatasetInfo,
    *,
    size: str = "default",
    overrides: Mapping[str, Any] | None = None,
    num_outputs: int | None = None,
) -> None:
    """Build ``model`` for the dataset and run one forward pass on a zero batch [2, C, H, W] (CPU, eval).

    Raises ValueError naming the model, the dataset directory, its image shape and classes when the model
    cannot be built for them or does not return logits [2, num_classes] (``num_outputs``: that many outputs
    instead, the head of task 'inference').
    """
    import torch

    from deeplense_ray.models import build_model, list_models, resolve_hparams

    names = {m.lower(): m for m in list_models()}
    if not isinstance(model, str) or (model.lower() not in names and not model.lower().startswith("timm:")):
        raise ValueError(f"unknown model {model!r}; valid models: {', '.join(list_models())}")
    c, h, w = info.image_shape
    what = (
        f"dataset {info.data_dir} (image shape [{c}, {h}, {w}], {info.num_classes} classes "
        f"{list(info.class_names)})"
    )
    if h != w:
        raise ValueError(f"model {model!r} needs square images; {what} is not square")
    resolve_hparams(model, size, **dict(overrides or {}))  # a bad override: its own message, not the data's
    outputs = info.num_classes if num_outputs is None else int(num_outputs)
    try:
        net = build_model(
            model, h, c, outputs, pixel_scale=info.pixel_scale, size=size, **dict(overrides or {})
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"model {model!r} cannot take {what}: {exc}") from exc
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, c, h, w))
    except Exception as exc:  # any failure of a forward pass means the model cannot take this data
        raise ValueError(f"model {model!r} cannot take {what}: forward pass failed: {exc}") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, outputs):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model {model!r} cannot take {what}: it returns {shape} for a batch of 2, "
            f"expected logits (2, {outputs})"
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


@dataclass
class TrainConfig:
    """One training run.

    Attributes:
        model: model name (``deeplense_ray.models.list_models()``, case-insensitive).
        data_dir: dataset directory holding ``manifest.json`` with splits train, val and test.
        epochs: total epochs (a resumed run continues up to this number).
        batch_size: GLOBAL batch size; each of the ``num_workers`` workers takes ``batch_size // num_workers``
            (must divide), so the optimisation is the same on any number of workers.
        lr: peak learning rate; weight_decay: decoupled (adamw) or L2 (adam, sgd) weight decay.
        optimizer: 'adamw' | 'adam' | 'sgd' (momentum ``momentum``, Nesterov).
        scheduler: 'cosine' (to 0 at the last epoch) | 'step' (x ``step_gamma`` every ``step_size`` epochs,
            default epochs // 3) | 'none'; after ``warmup_epochs`` of linear warm-up. Stepped once per epoch.
        num_workers: Ray Train workers (DDP ranks); gpus_per_worker: GPUs each (0 = CPU training with gloo;
            fractions share a GPU); cpus_per_worker: CPUs each.
        precision: 'bf16' | 'fp16' (autocast; fp16 with a gradient scaler) | 'fp32'. On CPU always fp32.
        seed: seeds model init, data order, augmentation and dropout (per epoch and rank).
        experiment: MLflow experiment name; tracking_uri: MLflow URI (None: $MLFLOW_TRACKING_URI, else
            ``sqlite:///<abs cwd>/mlflow.db``); made absolute.
        storage_path: Ray Train storage root (checkpoints); None = ``<abs cwd>/ray_results``. Must be shared
            storage on a multi-node cluster.
        resume: continue the run ``run_name`` (default: the newest run of this model and seed under
            storage_path) from its latest checkpoint.
        run_name: Ray Train run name (a directory under storage_path); None = ``<model>-s<seed>-<time>``.
        model_size: 'default' | 'comparable' (see deeplense_ray.models.build_model); model_overrides: model
            hyperparameters (keys of ``model_hparams(model)`` and e.g. patch_size).
        augment: random dihedral augmentation of training images on the worker device (rot90 + flips,
            optionally ``augment_free_rotation``); normalize: per-image normalisation applied inside the model
            (so the logged model takes raw images).
        label_smoothing: cross-entropy label smoothing of the training loss (validation loss is plain CE).
        max_failures: worker-group restarts Ray Train makes after a worker failure (FailureConfig).
        num_to_keep: checkpoints kept by val_auc_macro (the latest is always kept as well, for resume).
        shuffle_buffer: rows of the per-worker local shuffle buffer of the training stream (0 = off).
        ingest: 'split' (one Ray Data stream of the train split, split across ranks by Ray Train),
            'per_rank' (every rank streams its own shards through its own Ray Data execution; the shards
            are dealt anew each epoch and every rank takes the same number of rows), 'memory' (every rank
            reads the whole train split into its device memory once, no Ray Data; each epoch one global
            permutation, rank r taking every world-th row of it) or 'auto' (default: 'memory' when the
            split as stored is at most MEMORY_INGEST_MAX_MB, else 'split'; :meth:`ingest_mode`). See
            train/ingest.py.
        simulate: online simulation (train/online.py): a preset name; every rank renders fresh training
            images on its own device each epoch (``images_per_epoch`` in all, rounded down to whole global
            batches, at least one), in chunks of ``sim_chunk_batches`` per-worker batches (the next one
            rendered on a background thread if ``sim_prefetch``). Validation and test: ``val_size`` /
            ``test_size`` images rendered once from their own seeds, or the val/test splits of ``data_dir``
            when it is given. ``sim_overrides``: preset fields (e.g. num_pix) on top of the preset. None:
            train on ``data_dir``.
        compile: ``torch.compile`` the model on every worker (in place, ``nn.Module.compile``, so checkpoints
            and the logged model keep plain parameter names); the first step's seconds, compilation
            included, are reported as ``compile_s``. Backend: $DEEPLENSE_COMPILE_BACKEND, default inductor.
        bn_recal_images: "precise BatchNorm": before each validation, the running statistics of every
            BatchNorm layer are recomputed with the epoch's final weights over the last ``bn_recal_images``
            training inputs each rank saw (averaged over ranks), so evaluation, checkpoints and the logged
            model never use running averages that lag the weights (on images of one fixed macro lens they
            collapsed eval-mode predictions to one class). 0 = off; models without BatchNorm are unaffected.
        task: 'classification' (the default: class probabilities, cross-entropy) or 'inference' (per-lens
            Gaussian posteriors over ``targets``: docs/parameter_inference.md, train/targets.py).
        targets: task 'inference': the per-image scalars to infer (``sigma_sub``, ``log10_m_axion``,
            ``theta_E`` or any stored per-image parameter by name).
        classes: task 'inference': the classes whose images are used (None: those every target exists on,
            e.g. cdm for ``sigma_sub``, else all); online runs render only these.
    """

    model: str
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    num_workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    precision: str = "bf16"
    seed: int = 0
    experiment: str = "deeplense"
    tracking_uri: str | None = None
    storage_path: str | None = None
    resume: bool = False
    run_name: str | None = None
    model_size: str = "default"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    augment: bool = True
    augment_free_rotation: bool = False
    normalize: str = "per_image_standard"
    momentum: float = 0.9
    step_size: int | None = None
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    max_failures: int = 0
    num_to_keep: int = 2
    shuffle_buffer: int = 2048
    ingest: str = "auto"
    simulate: str | None = None
    sim_overrides: dict[str, Any] = field(default_factory=dict)
    images_per_epoch: int = 8192
    val_size: int = 1024
    test_size: int = 1024
    sim_chunk_batches: int = 16
    sim_prefetch: bool = True
    compile: bool = False
    bn_recal_images: int = 4096
    task: str = "classification"
    targets: tuple[str, ...] = ()
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # a comma list or a list (JSON, YAML) -> a tuple, so configs compare and hash alike
        for name in ("targets", "classes"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = tuple(x.strip() for x in v.split(",") if x.strip())
            elif isinstance(v, list):
                v = tuple(v)
            setattr(self, name, v)

    # ------------------------------------------------------------------ validation
    def validate_options(self) -> TrainConfig:
        """Check every option value (no file access); ValueError naming the field and value. Returns self."""
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a model name, got {self.model!r}")
        if self.simulate is not None:
            self._validate_simulate_options()
        elif not isinstance(self.data_dir, (str, os.PathLike)) or not str(self.data_dir):
            raise ValueError(f"data_dir must be a directory path, got {self.data_dir!r}")
        for name, lo in (("epochs", 1), ("batch_size", 1), ("num_workers", 1), ("num_to_keep", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        for name in ("warmup_epochs", "max_failures", "shuffle_buffer", "bn_recal_images"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be < epochs={self.epochs}")
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size={self.batch_size} (global) must be divisible by num_workers={self.num_workers}"
            )
        if not _is_num(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("weight_decay", "gpus_per_worker", "label_smoothing"):
            v = getattr(self, name)
            if not _is_num(v) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.gpus_per_worker > 1 and float(self.gpus_per_worker) != int(self.gpus_per_worker):
            raise ValueError(f"gpus_per_worker above 1 must be a whole number, got {self.gpus_per_worker!r}")
        if not _is_num(self.cpus_per_worker) or self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be a positive number, got {self.cpus_per_worker!r}")
        if not _is_num(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not _is_num(self.step_gamma) or not 0 < self.step_gamma <= 1:
            raise ValueError(f"step_gamma must be in (0, 1], got {self.step_gamma!r}")
        if self.step_size is not None and (not _is_int(self.step_size) or self.step_size < 1):
            raise ValueError(f"step_size must be an integer >= 1 or None, got {self.step_size!r}")
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("scheduler", SCHEDULERS),
            ("precision", PRECISIONS),
            ("normalize", NORMALIZE_MODES),
            ("ingest", INGEST_MODES),
        ):
            v = getattr(self, name)
            if v not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {v!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**63-1], got {self.seed!r}")
        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise ValueError(f"experiment must be a non-empty name, got {self.experiment!r}")
        if self.run_name is not None and (
            not isinstance(self.run_name, str)
            or not self.run_name
            or "/" in self.run_name
            or self.run_name in (".", "..")
        ):
            raise ValueError(f"run_name must be a plain directory name, got {self.run_name!r}")
        if not isinstance(self.model_overrides, Mapping):
            raise ValueError(f"model_overrides must be a mapping, got {type(self.model_overrides).__name__}")
        for name in ("resume", "augment", "augment_free_rotation", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        from deeplense_ray.train.targets import check_task_options

        check_task_options(self.task, self.targets, self.classes)
        return self

    @property
    def inference(self) -> bool:
        """Task 'inference' (per-lens posteriors over ``targets``)."""
        return self.task == "inference"

    def task_classes(self, available: Iterable[str]) -> tuple[str, ...]:
        """Task 'inference': the classes whose images are used (``classes`` or the default of the targets,
        train/targets.py), each checked against ``available``; ValueError naming them."""
        from deeplense_ray.train.targets import default_classes

        avail = tuple(available)
        if self.classes is None:
            return default_classes(self.targets, avail)
        missing = [c for c in self.classes if c not in avail]
        if missing:
            raise ValueError(f"classes {missing} are not in the data's classes {list(avail)}")
        return tuple(self.classes)

    def _validate_simulate_options(self) -> None:
        if not isinstance(self.simulate, str) or not self.simulate:
            raise ValueError(f"simulate must be a preset name, got {self.simulate!r}")
        if self.data_dir is not None and (
            not isinstance(self.data_dir, (str, os.PathLike)) or not str(self.data_dir)
        ):
            raise ValueError(f"data_dir must be a directory path or None, got {self.data_dir!r}")
        if not isinstance(self.sim_overrides, Mapping):
            raise ValueError(f"sim_overrides must be a mapping, got {type(self.sim_overrides).__name__}")
        for name in ("images_per_epoch", "val_size", "test_size", "sim_chunk_batches"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.sim_prefetch, bool):
            raise ValueError(f"sim_prefetch must be true or false, got {self.sim_prefetch!r}")

    def simulated_info(self) -> DatasetInfo:
        """The 'dataset' of an online run (``simulate``): the resolved preset's image shape and classes, the
        rows of an epoch and of the fixed val/test sets (or of ``data_dir``'s, which must match the preset),
        and a hash of all that (resume refuses another). ValueError naming a bad preset name or override."""
        from deeplense_ray.train.online import resolve_sim_preset, sim_hash

        overrides = dict(self.sim_overrides)
        if self.inference:  # render only the images the targets exist on
            base = resolve_sim_preset(str(self.simulate), overrides)
            overrides["class_names"] = list(self.task_classes(base.class_names))
        pre = resolve_sim_preset(str(self.simulate), overrides)
        preset = pre.to_dict()
        rows = {"train": int(self.images_per_epoch), "val": int(self.val_size), "test": int(self.test_size)}
        where, data_hash = f"simulate:{pre.name}", None
        if self.data_dir is not None:
            data = describe_dataset(self.data_dir)
            for split in ("val", "test"):
                if data.split_rows.get(split, 0) < 1:
                    raise ValueError(f"dataset {data.data_dir} has no {split!r} rows to evaluate on")
            same_classes = data.class_names == pre.class_names or (
                self.inference and set(pre.class_names) <= set(data.class_names)
            )
            if tuple(data.image_shape) != tuple(pre.image_shape) or not same_classes:
                raise ValueError(
                    f"dataset {data.data_dir} (image shape {list(data.image_shape)}, classes "
                    f"{list(data.class_names)}) does not match preset {pre.name!r} with overrides "
                    f"{dict(self.sim_overrides)} (image shape {list(pre.image_shape)}, classes "
                    f"{list(pre.class_names)}): its val/test splits cannot evaluate this run"
                )
            rows.update(val=data.split_rows["val"], test=data.split_rows["test"])
            where, data_hash = data.data_dir, data.manifest_hash
        return DatasetInfo(
            data_dir=where,
            image_shape=tuple(int(v) for v in pre.image_shape),  # type: ignore[arg-type]
            class_names=tuple(pre.class_names),
            pixel_scale=float(pre.delta_pix),
            split_rows=rows,
            manifest_hash=sim_hash(
                preset,
                images_per_epoch=self.images_per_epoch,
                sim_chunk_batches=self.sim_chunk_batches,
                val_size=rows["val"],
                test_size=rows["test"],
                data_manifest_hash=data_hash,
                # CUDA ranks draw the parameters on the device (another stream than CPU draws, see
                # train/online.py): a resume on the other kind of device is refused (CPU hashes unchanged)
                **({"draws": "device"} if self.gpus_per_worker > 0 else {}),
            ),
            sim_preset=preset,
        )

    def validate(self) -> DatasetInfo:
        """Check options, the dataset (dir, manifest, splits train/val/test non-empty) and that the model
        takes the dataset's images and classes. All before any Ray work. Returns the dataset description.
        With ``simulate``: the preset and its overrides instead (see :meth:`simulated_info`)."""
        self.validate_options()
        if self.simulate is not None:
            info = self.simulated_info()
            self._check_model(info)
            return info
        info = describe_dataset(self.data_dir)
        for split in REQUIRED_SPLITS:
            if info.split_rows.get(split, 0) < 1:
                raise ValueError(
                    f"dataset {info.data_dir} has no {split!r} split rows (splits: {info.split_rows}); "
                    f"training needs {list(REQUIRED_SPLITS)}"
                )
        if info.num_classes < 2 and not self.inference:
            raise ValueError(f"dataset {info.data_dir} has {info.num_classes} class(es); need >= 2")
        if info.split_rows["train"] < self.num_workers:
            raise ValueError(
                f"train split of {info.data_dir} has {info.split_rows['train']} rows, fewer than "
                f"num_workers={self.num_workers}"
            )
        if self.ingest == "per_rank" and len(info.train_shard_rows) < self.num_workers:
            raise ValueError(
                f"ingest='per_rank' needs at least one train shard per worker: {info.data_dir} has "
                f"{len(info.train_shard_rows)} train shard(s) for num_workers={self.num_workers} "
                "(use ingest='split' or a smaller --shard-size)"
            )
        if self.inference and self.ingest_mode(info) != "memory":
            raise ValueError(
                f"task 'inference' reads a stored train split into device memory (ingest 'memory'); "
                f"ingest={self.ingest!r} with {info.data_dir} ({info.split_rows['train']} train rows) would "
                f"stream it: use ingest 'auto' / 'memory' (a split of up to {MEMORY_INGEST_MAX_MB:g} MiB) or "
                "--simulate"
            )
        self._check_model(info)
        return info

    def _check_model(self, info: DatasetInfo) -> None:
        """The model takes the data; task 'inference': with the Gaussian head's outputs, and its targets
        and classes exist in the data (train/regression.py, before Ray starts)."""
        outputs = None
        if self.inference:
            from deeplense_ray.train.gaussian import num_outputs
            from deeplense_ray.train.regression import inference_fields

            inference_fields(self, info)  # targets, classes and their standardisation: errors name them
            outputs = num_outputs(len(self.targets))
        check_model_fits(
            self.model, info, size=self.model_size, overrides=self.model_overrides, num_outputs=outputs
        )

    # ------------------------------------------------------------------ conversion
    def resolved(self, base_dir: str | os.PathLike[str] | None = None) -> TrainConfig:
        """A copy with absolute data_dir, storage_path and tracking_uri and the canonical model name."""
        from deeplense_ray.models import list_models
        from deeplense_ray.tracking import resolve_tracking_uri

        base = Path(base_dir if base_dir is not None else os.getcwd()).resolve()
        names = {m.lower(): m for m in list_models()}
        data = Path(self.data_dir).expanduser() if self.data_dir is not None else None
        storage = Path(self.storage_path).expanduser() if self.storage_path else Path("ray_results")
        return dataclasses.replace(
            self,
            model=names.get(str(self.model).lower(), self.model),
            data_dir=None if data is None else str(data if data.is_absolute() else (base / data).resolve()),
            storage_path=str(storage if storage.is_absolute() else (base / storage).resolve()),
            tracking_uri=resolve_tracking_uri(self.tracking_uri, base_dir=base),
            model_overrides=dict(self.model_overrides),
            sim_overrides=dict(self.sim_overrides),
        )

    def ingest_mode(self, info: DatasetInfo) -> str:
        """The ingest this run uses: ``ingest`` itself, or for 'auto' 'memory' when the train split as stored
        (rows x C x H x W x the stored dtype's size) is at most :data:`MEMORY_INGEST_MAX_MB`, else 'split'.
        Online runs ('simulate') render their own training images; their mode is 'simulate'."""
        if self.simulate is not None:
            return "simulate"
        if self.ingest != "auto":
            return self.ingest
        import numpy as np

        c, h, w = info.image_shape
        nbytes = int(info.split_rows.get("train", 0)) * c * h * w * np.dtype(info.image_dtype).itemsize
        return "memory" if nbytes <= MEMORY_INGEST_MAX_MB * 2**20 else "split"

    @property
    def per_worker_batch_size(self) -> int:
        return self.batch_size // self.num_workers

    @property
    def use_gpu(self) -> bool:
        return float(self.gpus_per_worker) > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-safe dict of all fields."""
        d = dataclasses.asdict(self)
        d["model_overrides"] = dict(self.model_overrides)
        d["sim_overrides"] = dict(self.sim_overrides)
        d["targets"] = list(self.targets)
        d["classes"] = None if self.classes is None else list(self.classes)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a ValueError listing the valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**dict(data))


def parse_value(text: str) -> Any:
    """A command-line value typed as YAML: 3 -> int, 1e-1 / 0.1 -> float, true -> bool, [2, 2] -> (2, 2), a
    mapping -> dict; anything else (or text that is not valid YAML) stays the string. Empty text -> ''."""
    import yaml

    if not str(text).strip():
        return ""
    try:
        value = yaml_load(str(text))
    except yaml.YAMLError:
        return text
    return tuple(value) if isinstance(value, list) else value


def parse_override(text: str, flag: str = "override") -> tuple[str, Any]:
    """``"key=value"`` -> (key, :func:`parse_value` of value). ValueError naming ``flag`` and the text when it
    has no '=' or no key. The one KEY=VALUE parser of every job and benchmark."""
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"bad {flag} {text!r}: expected KEY=VALUE, e.g. depth=2")
    return key, parse_value(raw.strip())


def parse_overrides(items: Iterable[str], flag: str = "override") -> dict[str, Any]:
    """``["k=v", ...]`` -> {k: value} with :func:`parse_override`; a key given twice is a ValueError."""
    out: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item, flag)
        if key in out:
            raise ValueError(f"{flag} {key!r} is given twice")
        out[key] = value
    return out
