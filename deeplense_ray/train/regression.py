"""Task 'inference' in the one training loop: targets in the batches, the Gaussian loss, evaluation.

The loop (train/loop.py) stays the one loop; where the task changes what happens it calls these helpers:

* :func:`inference_fields`: the loop-config entries of an inference run (targets, the task's classes and
  their label ids in the data, the standardisation and training prior of every target), computed before Ray
  starts (they also check that the targets exist in the data);
* inputs: every batch carries ``"target"`` [B, T], the standardised targets, next to ``"image"`` and
  ``"label"``: :func:`load_memory_split` (a stored train split in device memory, only the task's classes),
  :func:`shard_target_batches` (a val / test shard), and online rendering (train/online.py,
  ``render(..., targets=...)``);
* :func:`predict_outputs`: head outputs and truths of a split (merged in shard order by
  train/validation.py's ``merge_shard_predictions``);
* :func:`evaluate_inference`: the test split (stored or simulated) with a checkpoint, metrics and per-lens
  posteriors in physical units (train/gaussian.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deeplense_ray.train.gaussian import regression_metrics
from deeplense_ray.train.targets import (
    SAMPLE_IMAGES,
    class_label_ids,
    needs_sample,
    stored_param,
    target_spec,
    target_values,
)

_SAMPLE_CACHE: dict[str, Any] = {}


def _preset_sample(preset: Mapping[str, Any], targets: Sequence[str], n: int) -> np.ndarray:
    """[n, T] target values of ``n`` images of a resolved preset (CPU, seed 0; cached per process)."""
    key = json.dumps({"p": dict(preset), "t": list(targets), "n": n}, sort_keys=True, default=str)
    if key not in _SAMPLE_CACHE:
        from deeplense_ray.sim import simulate

        res = simulate(dict(preset), int(n), 0, "cpu")
        _SAMPLE_CACHE[key] = target_values({k: v.numpy() for k, v in res.params.items()}, targets)
    return _SAMPLE_CACHE[key]


def _dataset_preset(data_dir: str) -> dict[str, Any] | None:
    from deeplense_ray.data.manifest import load_manifest

    conf = load_manifest(data_dir).get("config", {})
    resolved = conf.get("preset_resolved") or conf.get("preset")
    return dict(resolved) if isinstance(resolved, Mapping) else None


def _split_targets(data_dir: str, split: str, targets: Sequence[str], keep: Sequence[int]) -> np.ndarray:
    """[N, T] target values of a stored split's rows of the label ids ``keep`` (KeyError naming a missing
    parameter and the shard)."""
    from deeplense_ray.data.manifest import load_manifest, shard_paths
    from deeplense_ray.data.shards import read_shard

    names = sorted({stored_param(t) for t in targets})
    parts = []
    for path in shard_paths(data_dir, split, load_manifest(data_dir)):
        try:
            part = read_shard(path, params=names)
        except KeyError as exc:
            raise ValueError(
                f"dataset {data_dir}, shard {path}: {exc.args[0]} (targets {list(targets)})"
            ) from None
        mask = np.isin(part["labels"], list(keep))
        parts.append(target_values({k: v[mask] for k, v in part["params"].items()}, targets))
    return np.concatenate(parts) if parts else np.zeros((0, len(targets)))


def inference_fields(cfg: Any, info: Any) -> dict[str, Any]:
    """The loop-config entries of an inference run of ``cfg`` (a TrainConfig) on ``info`` (its DatasetInfo):
    ``task``, ``targets``, ``class_names`` (the task's classes: the model's), ``data_class_names`` (the
    classes of the stored splits it reads, whose labels index them), ``keep_labels`` (their ids of the task's
    classes), ``target_loc``, ``target_scale``, ``target_prior`` (``targets.preset_prior``) and ``prior_std``.
    ValueError naming a target that is not in the data or cannot be standardised."""
    targets = list(cfg.targets)
    online = info.sim_preset is not None
    if online:
        preset = dict(info.sim_preset)
        classes = tuple(info.class_names)  # already the task's (TrainConfig.simulated_info)
        data_classes = classes
        if cfg.data_dir is not None:
            from deeplense_ray.config import describe_dataset

            data_classes = describe_dataset(cfg.data_dir).class_names
        # a few images (all of them for a target without a preset prior) check the targets exist
        n = SAMPLE_IMAGES if needs_sample(targets, preset) else 2
        try:
            sample = _preset_sample(preset, targets, n)
        except KeyError as exc:
            raise ValueError(f"preset {preset.get('name')!r}: {exc.args[0]}") from None
    else:
        preset = _dataset_preset(info.data_dir)
        data_classes = tuple(info.class_names)
        classes = cfg.task_classes(data_classes)
        keep = class_label_ids(classes, data_classes)
        sample = _split_targets(info.data_dir, "train", targets, keep)
        if len(sample) == 0:
            raise ValueError(f"dataset {info.data_dir} has no train images of classes {list(classes)}")
    spec = target_spec(targets, preset, sample)
    return {
        "task": "inference",
        **spec,
        "class_names": list(classes),
        "data_class_names": list(data_classes),
        "keep_labels": class_label_ids(classes, data_classes),
    }


# ---------------------------------------------------------------------------------------------- inputs
def standardized(values: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """Physical target values [N, T] -> standardised float32, on their device."""
    loc = torch.as_tensor(config["target_loc"], dtype=torch.float64, device=values.device)
    scale = torch.as_tensor(config["target_scale"], dtype=torch.float64, device=values.device)
    return ((values.double() - loc) / scale).float()


def load_memory_split(
    data_dir: str, split: str, device: torch.device, config: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images as stored, labels, standardised targets) of the rows of the task's classes of a stored split,
    on ``device`` (``ingest="memory"`` of an inference run)."""
    from deeplense_ray.data.manifest import load_manifest, shard_paths
    from deeplense_ray.data.shards import read_shard

    names = sorted({stored_param(t) for t in config["targets"]})
    keep = list(config["keep_labels"])
    images, labels, values = [], [], []
    for path in shard_paths(data_dir, split, load_manifest(data_dir)):
        part = read_shard(path, as_float32=False, params=names)
        mask = np.isin(part["labels"], keep)
        images.append(torch.from_numpy(np.ascontiguousarray(part["images"][mask])).to(device))
        labels.append(torch.from_numpy(part["labels"][mask]).to(device))
        params = {k: torch.from_numpy(np.asarray(v[mask])) for k, v in part["params"].items()}
        values.append(standardized(target_values(params, config["targets"]), config).to(device))
    return torch.cat(images), torch.cat(labels), torch.cat(values)


def shard_target_batches(
    path: str, rows: int, batch_size: int, config: Mapping[str, Any]
) -> Iterator[dict[str, torch.Tensor]]:
    """``{"image", "label", "target"}`` batches (host memory) of the task's rows of one stored shard, in row
    order (a batch may hold fewer rows than ``batch_size``; none is empty)."""
    from deeplense_ray.data.shards import read_shard

    names = sorted({stored_param(t) for t in config["targets"]})
    keep = list(config["keep_labels"])
    for start in range(0, int(rows), int(batch_size)):
        part = read_shard(path, start=start, stop=min(start + int(batch_size), int(rows)), params=names)
        mask = np.isin(part["labels"], keep)
        if not mask.any():
            continue
        params = {k: torch.from_numpy(np.asarray(v[mask])) for k, v in part["params"].items()}
        yield {
            "image": torch.from_numpy(np.ascontiguousarray(part["images"][mask])),
            "label": torch.from_numpy(part["labels"][mask]),
            "target": standardized(target_values(params, config["targets"]), config),
        }


# ---------------------------------------------------------------------------------------------- evaluation
def predict_outputs(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Head outputs (float32 [N, P]) and standardised targets ([N, T]) of every batch, in order."""
    from deeplense_ray.train.steps import predict_batches

    return predict_batches(model, batches, device=device, amp_dtype=amp_dtype, truth="target")


def metrics_of(outputs: np.ndarray, truth_std: np.ndarray, config: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`~deeplense_ray.train.gaussian.regression_metrics` with a run's targets and standardisation."""
    return regression_metrics(
        outputs, truth_std, config["targets"], config["target_loc"], config["target_scale"],
        prior_std=config.get("prior_std"),
    )  # fmt: skip


def evaluate_inference(
    checkpoint: Any,
    cfg: Any,
    *,
    device: str | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Metrics and posteriors of a checkpoint of an inference run of ``cfg`` (a TrainConfig) on its test set:
    the dataset's test split (the task's classes) or, online without data, the fixed simulated test set.
    Returns :func:`metrics_of` (with the per-lens ``mean``, ``cov``, ``truth`` in physical units) plus
    ``split``, ``ids`` (shard file:row or ``sim:test:i``)."""
    from deeplense_ray.train.checkpoint import load_model_from_checkpoint, read_meta

    arch = read_meta(checkpoint)["arch"]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model_from_checkpoint(checkpoint).to(dev)
    ids: list[str] = []
    if cfg.simulate is not None and cfg.data_dir is None:
        from deeplense_ray.train.online import eval_batches, eval_chunks

        preset = cfg.simulated_info().sim_preset
        chunks = eval_batches(
            preset, "test", seed=cfg.seed, size=cfg.test_size,
            positions=range(len(eval_chunks(cfg.test_size))), device=dev, batch_size=batch_size, targets=arch,
        )  # fmt: skip
        outputs, truth = predict_outputs(model, (b for i in sorted(chunks) for b in chunks[i]), device=dev)
        ids = [f"sim:test:{i}" for i in range(len(truth))]
    else:
        from deeplense_ray.data.manifest import load_manifest, shard_paths

        data_dir = str(cfg.resolved().data_dir)
        config = dict(arch)
        config["keep_labels"] = _keep_labels(arch, data_dir)
        outs, truths = [], []
        for path, sh in zip(
            shard_paths(data_dir, "test"), load_manifest(data_dir)["splits"]["test"]["shards"]
        ):
            labels = _shard_labels(path)
            rows = np.flatnonzero(np.isin(labels, config["keep_labels"]))
            ids += [f"{Path(path).name}:{r}" for r in rows]
            o, t = predict_outputs(
                model, shard_target_batches(str(path), int(sh["rows"]), batch_size, config), device=dev
            )
            if len(t):
                outs.append(o)
                truths.append(t)
        outputs, truth = np.concatenate(outs), np.concatenate(truths)
    out = metrics_of(outputs, truth, {**arch, "prior_std": _prior_std(arch)})
    out.update(split="test", ids=ids)
    return out


def _prior_std(arch: Mapping[str, Any]) -> list[float]:
    from deeplense_ray.train.targets import prior_std_of

    return prior_std_of(arch["target_prior"])


def _keep_labels(arch: Mapping[str, Any], data_dir: str) -> list[int]:
    from deeplense_ray.config import describe_dataset

    return class_label_ids(arch["class_names"], describe_dataset(data_dir).class_names)


def _shard_labels(path: Any) -> np.ndarray:
    import h5py

    with h5py.File(str(path), "r") as f:
        return np.asarray(f["labels"][:])


__all__ = [
    "evaluate_inference",
    "inference_fields",
    "load_memory_split",
    "metrics_of",
    "predict_outputs",
    "shard_target_batches",
    "standardized",
]
