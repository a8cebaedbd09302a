"""What the training loop reads, typed: :class:`LoopConfig`; and the tests' hooks into it: :class:`LoopHooks`.

A :class:`LoopConfig` holds the run's :class:`~deeplense_ray.config.TrainConfig`, the facts of its data (the
manifest's, or online the resolved preset's), the task 'inference' fields (train/regression.py
``inference_fields``) and the MLflow run rank 0 logs to. Ray Train and Tune hand the loop a plain dict:
:meth:`LoopConfig.to_dict` (flat: the TrainConfig's fields beside these) and :meth:`LoopConfig.from_dict`,
which refuses a key it does not know, convert at that boundary and nowhere else. The tests' hooks (an
injected failure, recorded inputs) are no config keys: the loop takes them as an argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deeplense_ray.config import TrainConfig

#: Where ``LoopHooks.fail_at_epoch`` raises: as the epoch starts, after its checkpoint is written but before
#: it is reported, or after the report but before the epoch is logged to MLflow.
FAIL_POINTS = ("start", "before_report", "after_report")


@dataclass(frozen=True)
class LoopHooks:
    """Tests' hooks, passed to ``train_loop_per_worker(config, session, hooks)``: an injected failure (each
    rank raises in epoch ``fail_at_epoch`` at ``fail_point``, :meth:`check`) and ``record_inputs``, a folder
    where every rank records what it trained and validated on (train/seeding.py ``record_inputs``)."""

    fail_at_epoch: int | None = None
    fail_point: str = "start"
    record_inputs: str | None = None

    def __post_init__(self) -> None:
        if self.fail_point not in FAIL_POINTS:
            raise ValueError(f"fail_point must be one of {list(FAIL_POINTS)}, got {self.fail_point!r}")

    def check(self, point: str, epoch: int, start_epoch: int) -> None:
        """Raise at ``point`` of ``epoch`` if asked; at "start" and "before_report" only if this attempt did
        not start at that epoch (restored from the checkpoint just before it): each failure fires once."""
        if self.fail_at_epoch == epoch and self.fail_point == point:
            if point == "after_report" or start_epoch < epoch:
                raise RuntimeError(f"injected failure at epoch {epoch}, {point} (fault injection for tests)")


@dataclass(frozen=True)
class MlflowTarget:
    """The MLflow run rank 0 logs every epoch to."""

    tracking_uri: str
    run_id: str


@dataclass(frozen=True)
class LoopConfig:
    """Every setting :func:`~deeplense_ray.train.loop.train_loop_per_worker` reads (module docstring)."""

    train: TrainConfig
    image_shape: tuple[int, int, int]  # [C, H, W]
    class_names: tuple[str, ...]  # the model's classes (task 'inference': the task's)
    pixel_scale: float | None  # arcsec / pixel
    ingest_mode: str  # split | per_rank | memory | simulate (TrainConfig.ingest_mode)
    train_rows: int  # rows of the train split (online: images_per_epoch)
    train_block_rows: int  # Ray Data block rows of the train split (train/ingest.py read_block_rows)
    train_shard_rows: tuple[int, ...] = ()  # rows of each train shard, in manifest order
    sim_preset: dict[str, Any] | None = None  # online simulation: the resolved preset
    mlflow: MlflowTarget | None = None
    run_dir: str | None = None  # the run's directory (its checkpoints; train/checkpoint.py)
    # task 'inference' (train/regression.py inference_fields): the classes of the stored splits, the label ids
    # of the task's classes, and per target its standardisation (loc, scale), training prior and prior std
    data_class_names: tuple[str, ...] = ()
    keep_labels: tuple[int, ...] = ()
    target_loc: tuple[float, ...] = ()
    target_scale: tuple[float, ...] = ()
    target_prior: tuple[tuple[Any, ...], ...] = ()  # (kind, low, high[, mean, std]) per target
    prior_std: tuple[float, ...] = ()
    # validation (train/validation.py): batch size, and the largest val share [MiB] a rank keeps in memory
    eval_batch_size: int = 256
    val_cache_mb: float = 512.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self)[1:]:  # lists (JSON, a Ray config) -> tuples, nested ones too
            v = getattr(self, f.name)
            if isinstance(v, (list, tuple)):
                object.__setattr__(self, f.name, tuple(tuple(x) if isinstance(x, list) else x for x in v))
        if isinstance(self.mlflow, Mapping):
            object.__setattr__(self, "mlflow", MlflowTarget(**self.mlflow))

    @property
    def arch(self) -> dict[str, Any]:
        """The architecture dict (train/modules.py ``arch_of``): what builds the model and what its
        checkpoints' meta.json stores."""
        from deeplense_ray.train.modules import arch_of

        return arch_of(self.to_dict())

    @property
    def targets_config(self) -> dict[str, Any]:
        """Task 'inference': the mapping train/regression.py and train/online.py read (the targets, their
        standardisation, prior and prior std, the label ids of the task's classes)."""
        d = self.to_dict()
        return {k: d[k] for k in ("targets", "target_loc", "target_scale", "target_prior", "prior_std",
                                  "keep_labels")}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The flat plain dict (``TrainConfig.to_dict()`` and the other fields) Ray Train and Tune pass."""
        out = self.train.to_dict()
        for f in dataclasses.fields(self)[1:]:
            v = getattr(self, f.name)
            out[f.name] = [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
        out["mlflow"] = None if self.mlflow is None else dataclasses.asdict(self.mlflow)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoopConfig:
        """Inverse of :meth:`to_dict`. ValueError naming any key that is neither a TrainConfig field nor one
        of these (no hidden keys), or a missing one."""
        train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
        own = {f.name: f for f in dataclasses.fields(cls)[1:]}
        unknown = sorted(set(data) - train_keys - set(own))
        if unknown:
            raise ValueError(f"unknown loop config keys {unknown}; valid: TrainConfig's and {sorted(own)}")
        if missing := [k for k, f in own.items() if f.default is dataclasses.MISSING and k not in data]:
            raise ValueError(f"loop config lacks {missing}")
        train = TrainConfig.from_dict({k: v for k, v in data.items() if k in train_keys})
        return cls(train, **{k: v for k, v in data.items() if k in own})
