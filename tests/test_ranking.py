"""deeplense_ray.ranking: the one rule that names the best checkpoint, trial and epoch (fast, no Ray)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from deeplense_ray import ranking

NAN_LIKE = [math.nan, None, math.inf, -math.inf, "0.9", True, 1e30, -1e30, 2e31]


@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("bad", NAN_LIKE)
def test_a_nan_like_value_never_beats_a_finite_one(mode, bad):
    for good in (-1e6, 0.0, 0.5, 1e29):
        assert ranking.is_better(good, bad, mode) and not ranking.is_better(bad, good, mode)
        assert ranking.rank_key(good, mode) < ranking.rank_key(bad, mode)
    assert not ranking.is_better(bad, math.nan, mode) and not ranking.is_better(math.nan, bad, mode)
    assert math.isnan(ranking.as_metric(bad)) and ranking.rank(bad, mode) == math.inf


def test_modes_and_a_bad_mode():
    assert ranking.is_better(0.9, 0.8, "max") and not ranking.is_better(0.9, 0.8, "min")
    assert ranking.is_better(0.1, 0.2, "min") and not ranking.is_better(0.2, 0.2, "min")
    assert ranking.best([0.3, 0.1, 0.2], lambda v: v, "max") == 0.3
    assert ranking.best([0.3, 0.1, 0.2], lambda v: v, "min") == 0.1
    assert ranking.best([], lambda v: v, "max") is None
    assert ranking.worst_value("max") == -math.inf and ranking.worst_value("min") == math.inf
    for call in (
        lambda: ranking.rank(0.5, "best"),
        lambda: ranking.is_better(0.5, 0.4, "MAX"),
        lambda: ranking.best([], lambda v: v, "maximize"),
        lambda: ranking.worst_value(""),
    ):
        with pytest.raises(ValueError, match="'max' or 'min'"):
            call()


def test_ties_go_to_the_tie_keys_then_the_first_item():
    items = [("b", 0.8), ("a", 0.8), ("c", math.nan), ("d", 0.7)]
    assert ranking.best(items, lambda kv: kv[1], "max", tie_of=lambda kv: kv[0]) == ("a", 0.8)
    assert ranking.best(items, lambda kv: kv[1], "max") == ("b", 0.8)  # no tie keys: the first
    assert ranking.best(items, lambda kv: kv[1], "min", tie_of=lambda kv: (kv[0],)) == ("d", 0.7)
    all_nan = [("y", None), ("x", math.nan)]
    assert ranking.best(all_nan, lambda kv: kv[1], "max", tie_of=lambda kv: kv[0]) == ("x", math.nan)
    assert sorted([3, 1, 2], key=lambda e: ranking.rank_key(0.5, "max", e)) == [1, 2, 3]


def test_the_documented_rule_for_checkpoints_trials_and_epochs():
    key = lambda m: ranking.checkpoint_key(m, "val_auc_macro", "max")  # noqa: E731
    a = {"epoch": 1, "val_auc_macro": 0.9, "val_loss": 0.5}
    b = {"epoch": 2, "val_auc_macro": 0.9, "val_loss": 0.3}
    c = {"epoch": 3, "val_auc_macro": 0.9}  # no val_loss: worst
    d = {"epoch": 4, "val_auc_macro": 0.9, "val_loss": math.nan}
    e = {"epoch": 5, "val_auc_macro": 0.95, "val_loss": 9.0}
    assert sorted([a, b, c, d], key=key) == [b, a, c, d]
    assert min([a, b, e], key=key) is e  # the metric first
    same = {**a, "epoch": 7}
    assert min([same, a], key=key) is a  # then the earlier epoch
    diverged = {"epoch": 1, "val_loss": 1e30}  # a diverged epoch under metric val_loss ('min')
    assert min([diverged, {"epoch": 2, "val_loss": 5.0}], key=lambda m: ranking.checkpoint_key(
        m, "val_loss", "min"))["epoch"] == 2
    # trials: the best-epoch metric, then the smaller trial id; NaN (a diverged trial) last
    trials = [("t3", 0.8), ("t1", math.nan), ("t2", 0.8)]
    assert sorted(trials, key=lambda t: ranking.trial_key(t[1], t[0], "max")) == [
        ("t2", 0.8), ("t3", 0.8), ("t1", math.nan)
    ]
    # a curve's best epoch: the metric, then the earlier epoch
    curve = [(1, math.nan), (2, 0.4), (3, 0.4), (4, -1e30)]
    assert min(curve, key=lambda ev: ranking.epoch_key(ev[1], ev[0], "max")) == (2, 0.4)


def test_diverged_value_is_the_one_tune_reports():
    from deeplense_ray.tune.mlflow_runs import DIVERGED_VALUE
    from deeplense_ray.tune.trial import diverged_value

    assert ranking.DIVERGED_VALUE == DIVERGED_VALUE
    for mode in ranking.MODES:
        assert math.isnan(ranking.as_metric(diverged_value(mode)))
        assert ranking.is_better(0.0, diverged_value(mode), mode)


def _real_checkpoint(directory, epoch: int, metrics: dict):
    """A checkpoint as the training loop writes one (train.checkpoint.save_checkpoint)."""
    import torch

    from deeplense_ray.train.checkpoint import save_checkpoint

    model = torch.nn.Linear(2, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return save_checkpoint(
        directory, model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1),
        scaler=None, epoch=epoch, config={"seed": 0}, metrics={"epoch": epoch, **metrics}, history=[],
    )  # fmt: skip


def test_a_ray_train_run_and_a_local_run_pick_the_same_checkpoint_on_tied_metrics(tmp_path):
    """Tied metric, different val_loss: Ray Train's kept checkpoints (trainer.best_checkpoint) and a run
    trained in this process (local.ranked_checkpoints, its persist/prune) name the same best checkpoint,
    the lower val_loss, not the earlier epoch."""
    from deeplense_ray.train.local import (
        LocalRunSession,
        checkpoint_name,
        ranked_checkpoints,
        run_checkpoints,
    )
    from deeplense_ray.train.trainer import best_checkpoint

    metric, mode = "val_auc_macro", "max"
    epochs = {
        1: {metric: 0.9, "val_loss": 0.5},
        2: {metric: 0.9, "val_loss": 0.3},  # the best: tied metric, lower val_loss
        3: {metric: 0.8, "val_loss": 0.1},
        4: {metric: math.nan, "val_loss": math.nan},  # the latest, diverged
    }
    run = tmp_path / "run"
    session = LocalRunSession(run, metric=metric, mode=mode, num_to_keep=2)
    for e, m in epochs.items():
        session.persist(_real_checkpoint(tmp_path / f"src{e}", e, m), e)
    # the 2 best (epochs 2 and 1) and the latest (4) stay
    assert [p.name for p in run_checkpoints(run)] == [checkpoint_name(e) for e in (1, 2, 4)]
    ranked = ranked_checkpoints(run, metric, mode)
    assert ranked[0].name == checkpoint_name(2)

    # what Ray Train's Result holds: every checkpoint it kept with its epoch's reported metrics
    kept = [(str(tmp_path / f"src{e}"), {"epoch": e, **m}) for e, m in epochs.items()]
    result = SimpleNamespace(best_checkpoints=kept, checkpoint=kept[-1][0], metrics=kept[-1][1])
    ckpt, metrics = best_checkpoint(result, metric, mode)
    assert ckpt == str(tmp_path / "src2") and metrics["epoch"] == 2
    assert metrics["epoch"] == int(ranked[0].name.rsplit("_", 1)[1])
    # in any order
    ckpt, _ = best_checkpoint(SimpleNamespace(best_checkpoints=kept[::-1], checkpoint=None, metrics={}),
                              metric, mode)  # fmt: skip
    assert ckpt == str(tmp_path / "src2")
    # without kept checkpoints: the latest
    assert best_checkpoint(SimpleNamespace(best_checkpoints=[], checkpoint="x", metrics={"a": 1}))[0] == "x"


def test_the_search_names_the_trial_and_epoch_by_the_same_rule():
    from deeplense_ray.tune.best import pick_best, rank_key
    from deeplense_ray.tune.results import TrialSummary, as_metric, is_better, worst_value

    def trial(tid, m):
        return TrialSummary(tid, {}, 3, m, 1, "completed", None)

    trials = [trial("c", 0.7), trial("b", math.nan), trial("a", 0.7), trial("d", 0.6)]
    assert pick_best(trials, "max").trial_id == "a" and pick_best(trials, "min").trial_id == "d"
    assert [t.trial_id for t in sorted(trials, key=lambda t: rank_key(t, "max"))] == ["a", "c", "d", "b"]
    with pytest.raises(ValueError):
        pick_best([], "max")
    assert is_better is ranking.is_better and worst_value is ranking.worst_value
    assert as_metric is ranking.as_metric
