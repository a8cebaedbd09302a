"""Checkpoint layout: one directory per epoch, written by rank 0, the same files whichever runner trains.

``model.pt``: state_dict of the :class:`NormalizedClassifier`; ``train_state.pt``: epoch, optimizer,
scheduler, grad-scaler state and the per-epoch history; ``meta.json``: the architecture (so the model can be
rebuilt without the run's config), the epoch and its reported metrics.

A run's checkpoints live in its run directory (``<storage_path>/<run name>``) as ``checkpoint_*``: Ray Train
persists its own there (``checkpoint_<time>``, listed in its checkpoint-manager snapshot) and a run trained
in one process writes ``checkpoint_epoch_NNNNN`` (train/local.py). A run resumes from the checkpoint of the
highest epoch, whichever runner wrote it (:func:`latest_checkpoint`), so it can continue with either.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deeplense_ray.io import atomic_path, atomic_write_text
from deeplense_ray.ranking import checkpoint_key
from deeplense_ray.train.modules import NormalizedClassifier, arch_of, build_classifier

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
CHECKPOINT_FORMAT = 1
#: every checkpoint directory of a run starts with this; a run trained in one process names its own
#: ``checkpoint_epoch_NNNNN`` (LOCAL_CHECKPOINT_PREFIX)
CHECKPOINT_PREFIX = "checkpoint_"
LOCAL_CHECKPOINT_PREFIX = "checkpoint_epoch_"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as tensors and plain data (the message names the file)."""


def load_tensors(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, numbers, strings, lists and dicts only,
    never an arbitrary pickle. :class:`CheckpointError` (one line, naming the file and, where the file asks
    for one, the class refused) when the file holds anything else or is not a torch file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        why = f"it asks for {found.group(1)}" if found else "it holds more than tensors and plain data"
        raise CheckpointError(
            f"checkpoint file {path} refused by weights_only loading: {why} (loading it could run code)"
        ) from exc
    except (RuntimeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint file {path} is not a readable torch file: {first}") from exc


def load_weights(arch: Mapping[str, Any], weights: str | os.PathLike[str]) -> NormalizedClassifier:
    """The module of ``arch`` (keys :data:`ARCH_KEYS`) with the state_dict in file ``weights`` (read by
    :func:`load_tensors`), eval mode, CPU. CheckpointError naming the file when they do not fit."""
    model = build_classifier(arch)
    state = load_tensors(weights)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint file {weights} does not fit model {arch.get('model')!r}: {first}"
        ) from exc
    return model.eval()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path, fsync=True) as tmp:  # file and directory on disk before the checkpoint is reported
        torch.save(obj, tmp)


def _plain(x: Any) -> Any:
    """``x`` with only tensors, Python scalars, strings, None, lists, tuples and dicts inside (numpy scalars
    and arrays converted), so that ``torch.load(..., weights_only=True)`` reads it back."""
    if isinstance(x, torch.Tensor) or x is None or type(x) in (bool, int, float, str):
        return x
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return (tuple if isinstance(x, tuple) else list)(_plain(v) for v in x)
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # a numpy scalar
        return x.item()
    if hasattr(x, "__array__"):  # a numpy array
        return torch.as_tensor(x)
    for t in (bool, int, float, str):  # subclasses, e.g. an IntEnum
        if isinstance(x, t):
            return t(x)
    raise TypeError(f"training state holds a {type(x).__name__}, which weights_only loading refuses")


def _json_safe(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and x != x:
        return None
    if hasattr(x, "item") and callable(x.item):
        return x.item()
    return x


def save_checkpoint(
    directory: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    epoch: int,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    confusion: Any = None,
) -> Path:
    """Write the three checkpoint files into ``directory`` (each to a temporary name, fsynced, then
    os.replace and an fsync of the directory)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_torch_save(state_dict, directory / MODEL_FILE)
    _atomic_torch_save(
        _plain({
            "format": CHECKPOINT_FORMAT,
            "epoch": int(epoch),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "history": [dict(h) for h in history],
            "seed": int(config["seed"]),
        }),
        directory / STATE_FILE,
    )
    meta = {
        "format": CHECKPOINT_FORMAT,
        "epoch": int(epoch),
        "arch": arch_of(config),
        "metrics": dict(metrics),
        "val_confusion_matrix": confusion,
    }
    atomic_write_text(directory / META_FILE, json.dumps(_json_safe(meta), indent=2, sort_keys=True) + "\n",
                      fsync=True)  # fmt: skip
    return directory


def _as_dir(checkpoint: Any):
    """A context manager yielding a local directory for a path or a ``ray.train.Checkpoint``."""
    from contextlib import nullcontext

    if hasattr(checkpoint, "as_directory"):  # a ray.train.Checkpoint (it refuses os.fspath)
        return checkpoint.as_directory()
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if not (path / MODEL_FILE).is_file() or not (path / META_FILE).is_file():
            raise FileNotFoundError(
                f"{path} is not a training checkpoint (needs {MODEL_FILE} and {META_FILE})"
            )
        return nullcontext(str(path))
    raise TypeError(
        f"expected a checkpoint directory or ray.train.Checkpoint, got {type(checkpoint).__name__}"
    )


def read_meta(checkpoint: Any) -> dict[str, Any]:
    """meta.json of a checkpoint (path or ray.train.Checkpoint)."""
    with _as_dir(checkpoint) as d:
        return json.loads((Path(d) / META_FILE).read_text())


def load_training_state(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """{"model": state_dict, "epoch", "optimizer", "scheduler", "scaler", "history"} (tensors on CPU).

    Both files are read with ``weights_only=True``: tensors and plain data only, never arbitrary pickles
    (:class:`CheckpointError` naming the file otherwise)."""
    d = Path(checkpoint_dir)
    state = load_tensors(d / STATE_FILE)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {d / STATE_FILE} holds a {type(state).__name__}, not a dict")
    state["model"] = load_tensors(d / MODEL_FILE)
    return state


def load_model_from_checkpoint(checkpoint_dir: Any) -> NormalizedClassifier:
    """Rebuild the trained module (eval mode, CPU) from a checkpoint directory or ``ray.train.Checkpoint``."""
    with _as_dir(checkpoint_dir) as d:
        meta = json.loads((Path(d) / META_FILE).read_text())
        return load_weights(meta["arch"], Path(d) / MODEL_FILE)


def checkpoint_name(epoch: int) -> str:
    """The directory name of a run's epoch-``epoch`` checkpoint written in one process."""
    return f"{LOCAL_CHECKPOINT_PREFIX}{int(epoch):05d}"


def metrics_of(checkpoint_dir: Path) -> dict[str, Any]:
    """The epoch's metrics recorded in a checkpoint's meta.json, with its ``epoch`` ({} if unreadable)."""
    try:
        meta = json.loads((Path(checkpoint_dir) / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    metrics = meta.get("metrics") if isinstance(meta, dict) else None
    out = dict(metrics) if isinstance(metrics, dict) else {}
    try:
        out["epoch"] = int(meta.get("epoch", 0))
    except (TypeError, ValueError):
        out["epoch"] = 0
    return out


def run_checkpoints(run_dir: str | os.PathLike[str], prefix: str = CHECKPOINT_PREFIX) -> list[Path]:
    """A run's checkpoint directories (``prefix``: every runner's, or :data:`LOCAL_CHECKPOINT_PREFIX`)."""
    d = Path(run_dir)
    return sorted(p for p in d.glob(f"{prefix}*") if p.is_dir()) if d.is_dir() else []


def ranked_checkpoints(
    run_dir: str | os.PathLike[str], metric: str, mode: str, prefix: str = CHECKPOINT_PREFIX
) -> list[Path]:
    """A run's checkpoints, best first by :func:`deeplense_ray.ranking.checkpoint_key` (``metric`` under
    ``mode`` 'max' or 'min', NaN last; ties: lower val_loss, then the earlier epoch), as
    :func:`deeplense_ray.train.trainer.best_checkpoint` ranks a Ray Train run's."""
    return sorted(run_checkpoints(run_dir, prefix), key=lambda p: checkpoint_key(metrics_of(p), metric, mode))


def latest_checkpoint(run_dir: str | os.PathLike[str], prefix: str = CHECKPOINT_PREFIX) -> Path | None:
    """The run's checkpoint of the highest epoch (the one a resumed run continues from), or None."""
    found = [(int(metrics_of(p).get("epoch", 0)), p.name, p) for p in run_checkpoints(run_dir, prefix)]
    return max(found)[2] if found else None


def check_checkpoints(run_dir: str | os.PathLike[str]) -> int:
    """Read every checkpoint under ``run_dir`` (each directory holding :data:`MODEL_FILE`) as a resume would:
    :class:`CheckpointError` naming the first file weights_only loading refuses; how many were read."""
    dirs = sorted({p.parent for p in Path(run_dir).rglob(MODEL_FILE)})
    for d in dirs:
        load_tensors(d / MODEL_FILE)
        if (d / STATE_FILE).is_file():
            load_tensors(d / STATE_FILE)
    return len(dirs)
