"""classification_metrics against values computed by hand (pairs counted on paper, ties count 1/2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deeplense_ray.train.metrics import classification_metrics, flatten_metrics, softmax

CLASSES3 = ("no_sub", "axion", "cdm")
Y3 = [0, 0, 1, 1, 2, 2]
P3 = [
    [0.7, 0.2, 0.1],  # pred 0 (right)
    [0.4, 0.5, 0.1],  # pred 1 (wrong)
    [0.2, 0.6, 0.2],  # pred 1 (right)
    [0.3, 0.3, 0.4],  # pred 2 (wrong)
    [0.1, 0.2, 0.7],  # pred 2 (right)
    [0.5, 0.1, 0.4],  # pred 0 (wrong)
]


def test_three_class_hand_computed():
    m = classification_metrics(Y3, P3, CLASSES3)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    # class 0: positives .7,.4 vs negatives .2,.3,.1,.5 -> 4 + 3 of 8 pairs
    assert m["auc"]["no_sub"] == pytest.approx(7 / 8)
    # class 1: positives .6,.3 vs .2,.5,.2,.1 -> 4 + 3 of 8
    assert m["auc"]["axion"] == pytest.approx(7 / 8)
    # class 2: positives .7,.4 vs .1,.1,.2,.4 -> 4 + 3.5 (one tie) of 8
    assert m["auc"]["cdm"] == pytest.approx(7.5 / 8)
    assert m["auc_macro"] == pytest.approx((7 / 8 + 7 / 8 + 7.5 / 8) / 3)
    # micro: 6 positives (.7,.4,.6,.3,.7,.4) vs 12 negatives (.1 x4, .2 x4, .3, .4, .5 x2)
    # -> 12 + 9.5 + 12 + 8.5 + 12 + 9.5 = 63.5 of 72 pairs
    assert m["auc_micro"] == pytest.approx(63.5 / 72)
    # each class: 1 TP, 1 FP, 1 FN -> F1 = 0.5
    assert m["f1"] == pytest.approx({"no_sub": 0.5, "axion": 0.5, "cdm": 0.5})
    assert m["f1_macro"] == pytest.approx(0.5)
    true_p = [0.7, 0.4, 0.6, 0.3, 0.7, 0.4]
    assert m["loss"] == pytest.approx(-np.mean(np.log(true_p)))
    assert m["class_names"] == list(CLASSES3)


def test_binary_hand_computed():
    y = [0, 0, 0, 1, 1]
    p1 = np.array([0.1, 0.4, 0.6, 0.8, 0.3])
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(y, probs, ("no_sub", "cdm"))
    assert m["accuracy"] == pytest.approx(3 / 5)  # predictions 0,0,1,1,0
    assert m["confusion_matrix"] == [[2, 1], [1, 1]]
    # class 1: positives .8,.3 vs negatives .1,.4,.6 -> 3 + 1 of 6 pairs
    assert m["auc"]["cdm"] == pytest.approx(4 / 6)
    assert m["auc"]["no_sub"] == pytest.approx(4 / 6)
    # micro: positives .9,.6,.4,.8,.3 vs negatives .1,.4,.6,.2,.7 -> 5+3.5+2.5+5+2 = 18 of 25
    assert m["auc_micro"] == pytest.approx(18 / 25)
    assert m["f1"]["no_sub"] == pytest.approx(2 / 3)  # TP 2, FP 1, FN 1
    assert m["f1"]["cdm"] == pytest.approx(1 / 2)  # TP 1, FP 1, FN 1
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.6, 0.4, 0.8, 0.3])))


def test_loss_matches_torch_cross_entropy_and_override():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 3))
    y = rng.integers(0, 3, size=50)
    m = classification_metrics(y, softmax(logits), CLASSES3)
    ce = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(y)).item()
    assert m["loss"] == pytest.approx(ce, rel=1e-9)
    assert classification_metrics(y, softmax(logits), CLASSES3, loss=1.25)["loss"] == 1.25


def test_undefined_auc_is_nan_and_left_out_of_macro():
    y = [0, 0, 1, 1]  # class 2 absent: its one-vs-rest AUC is undefined
    probs = [[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.5, 0.2]]
    m = classification_metrics(y, probs, CLASSES3)
    assert math.isnan(m["auc"]["cdm"])
    assert m["auc"]["no_sub"] == pytest.approx(1.0)
    assert m["auc_macro"] == pytest.approx(1.0)
    assert m["confusion_matrix"][2] == [0, 0, 0]


def test_logits_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="softmax"):
        classification_metrics([0, 1], [[2.0, -1.0], [0.5, 3.0]], ("a", "b"))
    with pytest.raises(ValueError, match="sum to 1"):
        classification_metrics([0, 1], [[0.5, 0.2], [0.5, 0.2]], ("a", "b"))
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        classification_metrics([0, 1], [[0.5, 0.5], [0.5, 0.5]], CLASSES3)
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 3], [[0.5, 0.5, 0], [0.5, 0.5, 0]], CLASSES3)
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], np.zeros((0, 2)), ("a", "b"))


def test_flatten_metrics_keys():
    flat = flatten_metrics(classification_metrics(Y3, P3, CLASSES3), "val")
    assert flat["val_acc"] == pytest.approx(0.5)
    assert flat["val_auc_cdm"] == pytest.approx(7.5 / 8)
    assert flat["val_f1_axion"] == pytest.approx(0.5)
    assert {"val_loss", "val_auc_macro", "val_auc_micro", "val_f1_macro"} <= set(flat)
    assert all(isinstance(v, float) for v in flat.values())


def test_diverged_probabilities_give_flagged_metrics_not_an_error():
    # a diverged model: rows 1 and 4 are NaN / inf (e.g. NaN logits through softmax)
    nan, inf = math.nan, math.inf
    probs = [list(r) for r in P3]
    probs[1] = [nan, nan, nan]  # true 0, was a wrong prediction
    probs[4] = [0.1, inf, 0.0]  # true 2, was a right prediction
    m = classification_metrics(Y3, probs, CLASSES3)
    assert m["diverged"] == 1 and m["n_nonfinite"] == 2 and m["n"] == 6
    assert math.isnan(m["loss"])
    assert all(math.isnan(v) for v in m["auc"].values())
    assert math.isnan(m["auc_macro"]) and math.isnan(m["auc_micro"])
    # predictions 0, -, 1, 2, -, 0: right on rows 0 and 2 only
    assert m["accuracy"] == pytest.approx(2 / 6)
    # non-finite rows are absent from the confusion matrix (no predicted class)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
    # no_sub: TP 1, FP 1, FN 1 -> 1/2; axion: TP 1, FP 0, FN 1 -> 2/3; cdm: TP 0 -> 0
    assert m["f1"] == pytest.approx({"no_sub": 0.5, "axion": 2 / 3, "cdm": 0.0})
    flat = flatten_metrics(m, "val")
    assert flat["val_diverged"] == 1.0 and math.isnan(flat["val_auc_macro"])
    assert flat["val_acc"] == pytest.approx(2 / 6)


def test_all_nan_and_nonfinite_loss_are_flagged():
    m = classification_metrics([0, 1, 1], np.full((3, 2), np.nan), ("a", "b"))
    assert m["diverged"] == 1 and m["accuracy"] == 0.0 and math.isnan(m["auc_macro"])
    assert m["confusion_matrix"] == [[0, 0], [0, 0]]
    # finite probabilities but a non-finite loss from the caller: flagged, AUCs still computed
    m = classification_metrics(Y3, P3, CLASSES3, loss=math.inf)
    assert m["diverged"] == 1 and m["loss"] == math.inf
    assert m["auc"]["cdm"] == pytest.approx(7.5 / 8)
    assert classification_metrics(Y3, P3, CLASSES3)["diverged"] == 0
    # logits are still refused even when some rows are NaN
    with pytest.raises(ValueError, match="softmax"):
        classification_metrics([0, 1], [[np.nan, np.nan], [0.5, 3.0]], ("a", "b"))


def test_bootstrap_interval_equals_sklearn_on_the_same_resamples():
    """The bootstrap's weighted Mann-Whitney AUC against sklearn's roc_auc_score on explicitly resampled
    arrays (ties in the scores included, a class missing from some resamples of a small set)."""
    import math

    from sklearn.metrics import roc_auc_score

    from deeplense_ray.train.metrics import bootstrap_auc_ci

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 40)
    y[:2] = 2  # class 2 rare: absent from some resamples
    y[2:] = rng.integers(0, 2, 38)
    p = np.round(rng.random((40, 3)), 1) + 0.01  # coarse: many ties
    p /= p.sum(1, keepdims=True)
    ref_rng, values = np.random.default_rng(0), []
    for _ in range(200):
        idx = ref_rng.integers(0, 40, 40)
        aucs = [roc_auc_score(y[idx] == k, p[idx, k]) for k in range(3) if 0 < (y[idx] == k).sum() < 40]
        values.append(float(np.mean(aucs)))
    want = np.percentile(values, [2.5, 97.5])
    got = bootstrap_auc_ci(y, p, n_boot=200, seed=0)
    assert not any(math.isnan(v) for v in got)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
