"""A checkpoint evaluated on a run's test split, the one evaluation a run's best checkpoint gets.

:func:`evaluate_test` picks the evaluation for the run's config: :func:`evaluate_checkpoint` (a checkpoint's
model on a whole split of a dataset; also ``deeplense_ray.train.evaluate_checkpoint``), the fixed simulated
test set of an online run (train/online.py :func:`~deeplense_ray.train.online.evaluate_simulated`) or task
'inference' (train/regression.py :func:`~deeplense_ray.train.regression.evaluate_inference`).
"""

from __future__ import annotations

import os
from typing import Any

from deeplense_ray.train.checkpoint import load_model_from_checkpoint, read_meta
from deeplense_ray.train.metrics import bootstrap_auc_ci, classification_metrics


def evaluate_checkpoint(
    checkpoint_dir: Any,
    data_dir: str | os.PathLike[str],
    split: str = "test",
    *,
    batch_size: int = 256,
    device: str | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Metrics of a checkpoint's model on a whole split (fp32; device default cuda if available, else cpu).

    ``checkpoint_dir``: a checkpoint directory or ``ray.train.Checkpoint``. Returns
    :func:`classification_metrics` of the split, plus ``y_true`` and ``probs`` arrays if
    ``return_predictions``. ValueError if the dataset's classes differ from the checkpoint's.
    """
    import torch

    from deeplense_ray.config import describe_dataset
    from deeplense_ray.data import LensShardDataset
    from deeplense_ray.train.steps import predict_batches, probabilities

    info = describe_dataset(data_dir)
    arch = read_meta(checkpoint_dir)["arch"]
    if list(arch["class_names"]) != list(info.class_names):
        raise ValueError(
            f"checkpoint classes {arch['class_names']} differ from dataset {info.data_dir} classes "
            f"{list(info.class_names)}"
        )
    if list(arch["image_shape"]) != list(info.image_shape):
        raise ValueError(
            f"checkpoint image shape {arch['image_shape']} differs from dataset {info.data_dir} "
            f"image shape {list(info.image_shape)}"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model_from_checkpoint(checkpoint_dir).to(dev)
    loader = torch.utils.data.DataLoader(
        LensShardDataset(info.data_dir, split, normalize="none"), batch_size=batch_size
    )
    logits, labels = predict_batches(model, ({"image": x, "label": y} for x, y in loader), device=dev)
    probs = probabilities(logits)
    out = classification_metrics(labels, probs, info.class_names)
    out["auc_macro_ci"] = list(bootstrap_auc_ci(labels, probs))  # 95% bootstrap interval: is it chance?
    out["split"] = split
    if return_predictions:
        out["y_true"] = labels
        out["probs"] = probs
    return out


def evaluate_test(checkpoint: Any, cfg: Any, *, device: str | None = None) -> dict[str, Any]:
    """The test metrics (with ``y_true`` and ``probs``) of a checkpoint of a run of ``cfg`` (a TrainConfig):
    its dataset's test split, or with ``simulate`` and no data_dir the fixed simulated test set. Task
    'inference': train/regression.py's :func:`~deeplense_ray.train.regression.evaluate_inference` (metrics
    with the per-lens posteriors)."""
    if getattr(cfg, "inference", False):
        from deeplense_ray.train.regression import evaluate_inference

        return evaluate_inference(checkpoint, cfg, device=device)
    if cfg.simulate is not None and cfg.data_dir is None:
        from deeplense_ray.train.online import evaluate_simulated

        preset = cfg.simulated_info().sim_preset
        return evaluate_simulated(
            checkpoint, preset, "test", seed=cfg.seed, size=cfg.test_size, device=device,
            return_predictions=True,
        )  # fmt: skip
    return evaluate_checkpoint(checkpoint, cfg.data_dir, "test", device=device, return_predictions=True)
