"""Classification metrics over a whole split, in one place (sklearn where it has them).

Every number here is computed from the predictions of the *whole* split at once (never averaged per batch),
and AUCs are computed from softmax *probabilities* (never raw logits). A class whose one-vs-rest AUC is
undefined in a split (no positive or no negative example) gets ``nan`` and is left out of the macro mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Largest tolerated deviation of a probability row sum from 1 (float32 softmax rounding is ~1e-7).
PROB_SUM_ATOL = 1e-3


def _check_inputs(y_true: Any, probs: Any, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    c = len(class_names)
    if c < 2:
        raise ValueError(f"need at least 2 classes, got class_names={list(class_names)!r}")
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D (one label per example), got shape {y.shape}")
    if p.ndim != 2 or p.shape[1] != c:
        raise ValueError(f"probs must have shape [N, {c}] for classes {list(class_names)}, got {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} labels but probs has {p.shape[0]} rows")
    if y.shape[0] == 0:
        raise ValueError("cannot compute metrics of an empty split (0 examples)")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"y_true holds labels outside [0, {c - 1}]: min {y.min()}, max {y.max()}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs holds non-finite values")
    if p.min() < 0.0 or p.max() > 1.0 + PROB_SUM_ATOL:
        raise ValueError(
            f"probs must be probabilities in [0, 1] (apply softmax to logits first); got range "
            f"[{p.min():.4g}, {p.max():.4g}]"
        )
    sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > PROB_SUM_ATOL:
        raise ValueError(
            f"probs rows must sum to 1 (softmax probabilities, not logits); row {worst} sums to "
            f"{sums[worst]:.6g}"
        )
    return y.astype(np.int64), p


def softmax(logits: Any) -> np.ndarray:
    """Numerically stable softmax over the last axis (float64)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def one_vs_rest_auc(y_true: np.ndarray, scores: np.ndarray, positive: int) -> float:
    """ROC AUC of class ``positive`` against the rest from its probability column; nan if undefined."""
    from sklearn.metrics import roc_auc_score

    target = (y_true == positive).astype(np.int64)
    if target.min() == target.max():
        return math.nan
    return float(roc_auc_score(target, scores))


def classification_metrics(
    y_true: Any,
    probs: Any,
    class_names: Sequence[str],
    *,
    loss: float | None = None,
) -> dict[str, Any]:
    """All classification metrics of one split from its labels and softmax probabilities.

    Args:
        y_true: int labels [N] (class indices into ``class_names``).
        probs: softmax probabilities [N, C] (rows sum to 1; logits are refused with a ValueError).
        class_names: the C class names, in label order.
        loss: mean loss over the split if the caller computed it (e.g. with label smoothing); default the mean
            cross-entropy ``-mean(log p[y])`` computed here from ``probs`` (probabilities clipped at 1e-15).

    Returns:
        dict with ``n`` (examples), ``accuracy``, ``loss``, ``auc`` {class: one-vs-rest ROC AUC or nan},
        ``auc_macro`` (mean of the defined per-class AUCs; nan if none), ``auc_micro`` (ROC AUC of all
        one-hot targets against all probabilities flattened; nan if undefined), ``f1`` {class: F1},
        ``f1_macro``, ``confusion_matrix`` (C x C list of ints, rows = true class, columns = predicted),
        ``class_names`` (list).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    y, p = _check_inputs(y_true, probs, class_names)
    c = len(class_names)
    labels = list(range(c))
    pred = p.argmax(axis=1)

    auc = {name: one_vs_rest_auc(y, p[:, k], k) for k, name in enumerate(class_names)}
    defined = [v for v in auc.values() if not math.isnan(v)]
    auc_macro = float(np.mean(defined)) if defined else math.nan

    onehot = np.eye(c, dtype=np.int64)[y]
    flat = onehot.ravel()
    auc_micro = float(roc_auc_score(flat, p.ravel())) if flat.min() != flat.max() else math.nan

    f1 = f1_score(y, pred, labels=labels, average=None, zero_division=0.0)
    if loss is None:
        loss = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1.0))))
    return {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "loss": float(loss),
        "auc": auc,
        "auc_macro": auc_macro,
        "auc_micro": auc_micro,
        "f1": {name: float(v) for name, v in zip(class_names, f1)},
        "f1_macro": float(np.mean(f1)),
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).astype(int).tolist(),
        "class_names": list(class_names),
    }


def flatten_metrics(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Scalar view of :func:`classification_metrics` for reports and MLflow.

    ``prefix`` 'val' gives val_loss, val_acc, val_auc_macro, val_auc_micro, val_f1_macro, val_auc_<class>,
    val_f1_<class>. The confusion matrix is left out (it is logged as an image and in the metrics JSON).
    """
    out = {
        f"{prefix}_loss": float(metrics["loss"]),
        f"{prefix}_acc": float(metrics["accuracy"]),
        f"{prefix}_auc_macro": float(metrics["auc_macro"]),
        f"{prefix}_auc_micro": float(metrics["auc_micro"]),
        f"{prefix}_f1_macro": float(metrics["f1_macro"]),
    }
    for name, value in metrics["auc"].items():
        out[f"{prefix}_auc_{name}"] = float(value)
    for name, value in metrics["f1"].items():
        out[f"{prefix}_f1_{name}"] = float(value)
    return out
