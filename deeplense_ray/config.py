"""Typed, validated training configuration shared by jobs/train.py, the trainer and the tune module.

:meth:`TrainConfig.validate` checks everything that can be checked without a cluster: option values, the data
directory and its manifest, the model name, and that the model accepts the dataset's image size, channels and
classes (it builds the model and runs one forward pass on a zero batch). It runs before Ray starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping
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

# ---------------------------------------------------------------------- command-line flags of the fields
#: Field metadata key holding a field's flag spec (:func:`flag_meta`); :func:`add_field_flags` reads it.
FLAG = "flag"


def flag_meta(help: str, **spec: Any) -> dict[str, Any]:
    """A field's metadata: its flag's help text and, where not derived from the field, its spec.

    Keys of ``spec``: ``flag`` (the option string, default ``--<name with dashes>``), ``aliases`` (more
    option strings), ``choices``, ``metavar``, ``type`` (an argparse type), ``action`` (``"append"``: a
    repeatable KEY=VALUE list, default []; ``"store_true"``), ``unset`` (True: the flag's default is None,
    meaning "not given", and the job applies the field's default, which the help shows)."""
    return {FLAG: {"help": help, **spec}}


def flag_field(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field with ``default`` (a type such as ``dict``: a fresh one per instance) and the
    metadata of its flag (:func:`flag_meta`)."""
    if isinstance(default, type):
        return field(default_factory=default, metadata=flag_meta(help, **spec))
    return field(default=default, metadata=flag_meta(help, **spec))


def names_arg(text: str) -> tuple[str, ...]:
    """A comma list of names (``--targets sigma_sub,log10_m_axion``) as a tuple."""
    return tuple(x.strip() for x in str(text).split(",") if x.strip())


#: Field type (as written in the dataclass) -> argparse type; ``X | None`` is typed as X.
_FLAG_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int, "float": float, "str": str, "tuple[str, ...]": names_arg,
}  # fmt: skip


def flag_args(cls: type, name: str) -> tuple[list[str], dict[str, Any]]:
    """The option strings and ``add_argument`` keywords of field ``name`` of dataclass ``cls``: type from
    the field's type, default from the field, help / choices / flag name from its metadata
    (:func:`flag_meta`). A bool is a ``--x / --no-x`` flag (BooleanOptionalAction). KeyError naming a
    field without a flag."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    spec = dict(f.metadata.get(FLAG) or {})
    if not spec:
        raise KeyError(f"{cls.__name__}.{name} has no flag metadata")
    default = f.default if f.default is not dataclasses.MISSING else None
    kind = str(f.type).removesuffix(" | None")
    help_ = spec.pop("help")
    opts = [spec.pop("flag", "--" + name.replace("_", "-")), *spec.pop("aliases", ())]
    kw: dict[str, Any] = {"dest": name, "help": help_}
    action = spec.pop("action", None)
    shown = default
    if spec.pop("unset", False):
        default = None
    if action == "append":
        kw.update(action="append", default=[])
    elif action == "store_true":
        kw.update(action="store_true", default=bool(default))
    elif kind == "bool":
        kw.update(action=argparse.BooleanOptionalAction, default=default)
    else:
        kw.update(type=spec.pop("type", None) or _FLAG_TYPES[kind], default=default)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kw["required"] = True
        elif shown is not None and shown != ():
            shown = repr(shown) if isinstance(shown, str) else f"{shown:g}"
            kw["help"] = f"{help_} (default {shown})"
    kw.update(spec)  # choices, metavar
    kw["help"] = kw["help"].replace("%", "%%")
    return opts, kw


def add_field_flags(parser: Any, cls: type, names: Iterable[str], **overrides: Any) -> None:
    """Add the flags of fields ``names`` of dataclass ``cls`` (:func:`flag_args`) to ``parser`` (an
    ArgumentParser or argument group); ``overrides``: ``add_argument`` keywords for every one of them."""
    for name in names:
        opts, kw = flag_args(cls, name)
        parser.add_argument(*opts, **{**kw, **overrides})


def unset_flag_fields(cls: type) -> frozenset[str]:
    """Fields of ``cls`` whose flag defaults to None, "not given" (``unset`` in :func:`flag_meta`): a job
    leaves such a field out of the dataclass it builds when the flag is None, so the field's default
    applies."""
    return frozenset(
        f.name for f in dataclasses.fields(cls) if (f.metadata.get(FLAG) or {}).get("unset", False)
    )


#: TrainConfig fields whose flags jobs/train.py, jobs/tune.py and jobs/study.py share (one name, default and
#: help text each): the ones each of these jobs has (tests/test_job_flags.py).
SHARED_FLAGS: dict[str, tuple[str, ...]] = {
    "train": (
        "model", "data_dir", "epochs", "model_size", "tracking_uri", "simulate", "images_per_epoch",
        "val_size", "test_size", "compile", "task", "targets", "classes",
    ),
    "tune": (
        "model", "data_dir", "model_size", "tracking_uri", "simulate", "images_per_epoch", "val_size",
        "test_size", "compile", "task", "targets", "classes",
    ),
    "study": ("data_dir", "epochs", "model_size", "tracking_uri", "images_per_epoch", "task", "targets"),
}  # fmt: skip


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

    model: str = field(metadata=flag_meta("model name (deeplense_ray.models.list_models(); any case)"))
    data_dir: str | None = flag_field(
        None,
        "dataset directory (manifest.json inside; built by jobs/simulate.py)",
        flag="--data",
        metavar="DIR",
    )
    epochs: int = flag_field(10, "training epochs (a resumed run continues up to this)")
    batch_size: int = flag_field(64, "GLOBAL batch, split over the workers")
    lr: float = flag_field(3e-4, "peak learning rate")
    weight_decay: float = flag_field(0.05, "decoupled (adamw) or L2 (adam, sgd) weight decay")
    optimizer: str = flag_field("adamw", "optimizer", choices=OPTIMIZERS)
    scheduler: str = flag_field(
        "cosine",
        "learning-rate schedule, stepped per epoch after the warm-up: cosine to 0, step (x --step-gamma "
        "every --step-size epochs) or none",
        choices=SCHEDULERS,
    )
    warmup_epochs: int = flag_field(0, "epochs of linear learning-rate warm-up")
    num_workers: int = flag_field(1, "Ray Train workers (DDP ranks)")
    gpus_per_worker: float = flag_field(
        0.0, "GPUs per training worker (0 = train on CPU; fractions share a GPU)"
    )
    cpus_per_worker: float = flag_field(1.0, "CPUs per training worker")
    precision: str = flag_field("bf16", "autocast on GPU; CPU is fp32", choices=PRECISIONS)
    seed: int = flag_field(0, "seeds model init, data order, augmentation and dropout")
    experiment: str = flag_field("deeplense", "MLflow experiment name")
    tracking_uri: str | None = flag_field(
        None,
        "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<abs cwd>/mlflow.db)",
    )
    storage_path: str | None = flag_field(None, "Ray Train storage root (default: ./ray_results)")
    resume: bool = flag_field(
        False,
        "continue --run-name (default: the newest run of this model and seed) from its latest checkpoint",
        action="store_true",
    )
    run_name: str | None = flag_field(None, "Ray Train run name (default: <model>-s<seed>-<time>)")
    model_size: str = flag_field(
        "default",
        "model size: 'default' or 'comparable' (~13M parameters, 2 blocks)",
        unset=True,
    )
    model_overrides: dict[str, Any] = flag_field(
        dict,
        "model hyperparameter (repeatable), e.g. --model-override depth=2 --model-override dim=64",
        flag="--model-override",
        action="append",
        metavar="KEY=VALUE",
    )
    augment: bool = flag_field(True, "random 90-degree rotations and flips of training images")
    augment_free_rotation: bool = flag_field(
        False,
        "with --augment: also rotate by a random angle (not only multiples of 90 degrees)",
    )
    normalize: str = flag_field(
        "per_image_standard",
        "per-image normalisation inside the model",
        choices=NORMALIZE_MODES,
    )
    momentum: float = flag_field(0.9, "sgd momentum (Nesterov)")
    step_size: int | None = flag_field(None, "'step' scheduler period in epochs (default epochs // 3)")
    step_gamma: float = flag_field(0.1, "'step' scheduler factor")
    label_smoothing: float = flag_field(0.0, "label smoothing of the training loss")
    max_failures: int = flag_field(0, "worker-group restarts after a worker failure (Ray FailureConfig)")
    num_to_keep: int = flag_field(
        2,
        "checkpoints kept by val_auc_macro (the latest is always kept too, for resume)",
    )
    shuffle_buffer: int = flag_field(2048, "rows of each worker's on-device shuffle buffer (0 = off)")
    ingest: str = flag_field(
        "auto",
        "'split': one Ray Data stream split across ranks; 'per_rank': each rank streams its own shards; "
        "'memory': each rank reads the train split into device memory; 'auto': memory for a small "
        "split, else split",
        choices=INGEST_MODES,
    )
    simulate: str | None = flag_field(
        None,
        "online simulation: render fresh training images from this preset on every worker, no dataset "
        "(val/test: the splits of --data if given, else simulated sets)",
        metavar="PRESET",
    )
    sim_overrides: dict[str, Any] = flag_field(
        dict,
        "preset field, e.g. num_pix=32 (repeatable; wins over --sim-config)",
        flag="--preset-override",
        aliases=("--sim-override",),
        action="append",
        metavar="KEY=VALUE",
    )
    images_per_epoch: int = flag_field(
        8192, "online simulation: training images rendered per epoch", unset=True
    )
    val_size: int = flag_field(1024, "online simulation without --data: simulated val images", unset=True)
    test_size: int = flag_field(1024, "online simulation without --data: simulated test images", unset=True)
    sim_chunk_batches: int = flag_field(
        16, "online simulation: per-worker batches rendered per simulate() call"
    )
    sim_prefetch: bool = flag_field(
        True,
        "online simulation: render the next chunk on a background thread while the current one trains",
    )
    compile: bool = flag_field(
        False, "torch.compile the model on every worker (compile seconds: metric compile_s)"
    )
    bn_recal_images: int = flag_field(
        4096,
        "before each validation, recompute BatchNorm statistics over each rank's last N training inputs "
        "with the final weights (0 = off)",
    )
    task: str = flag_field(
        "classification",
        "classification (class probabilities) or inference (per-lens Gaussian posteriors of --targets)",
        choices=TASKS,
    )
    targets: tuple[str, ...] = flag_field(
        (),
        "--task inference: sigma_sub, log10_m_axion, theta_E or any stored per-image parameter",
        metavar="T1[,T2...]",
    )
    classes: tuple[str, ...] | None = flag_field(
        None,
        "--task inference: the classes whose images are used (default: those every target exists on, "
        "e.g. cdm for sigma_sub, axion for log10_m_axion)",
        metavar="C1[,C2...]",
    )

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
