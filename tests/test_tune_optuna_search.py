"""The search's Optuna searcher on resume: a trial it never suggested reports without failing the search."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("optuna")
from ray import tune  # noqa: E402

from deeplense_ray.tune.optuna_search import ResumableOptunaSearch  # noqa: E402


def _searcher() -> ResumableOptunaSearch:
    s = ResumableOptunaSearch(space={"lr": tune.uniform(1e-4, 1e-2)}, metric="val_loss", mode="min", seed=0)
    return s


def test_unknown_trial_is_ignored_with_a_warning(caplog):
    s = _searcher()
    with caplog.at_level(logging.WARNING):
        s.on_trial_result("ghost", {"val_loss": 1.0, "training_iteration": 1})
        s.on_trial_complete("ghost", result={"val_loss": 1.0, "training_iteration": 1})
    assert "ghost" in caplog.text and "not in the restored searcher" in caplog.text
    # Ray's own searcher fails the search on the same call
    from ray.tune.search.optuna import OptunaSearch

    plain = OptunaSearch(space={"lr": tune.uniform(1e-4, 1e-2)}, metric="val_loss", mode="min", seed=0)
    with pytest.raises(KeyError):
        plain.on_trial_complete("ghost", result={"val_loss": 1.0, "training_iteration": 1})


def test_known_trials_still_inform_the_study():
    s = _searcher()
    cfg = s.suggest("t1")
    assert 1e-4 <= cfg["lr"] <= 1e-2
    s.on_trial_result("t1", {"val_loss": 0.5, "training_iteration": 1})
    s.on_trial_complete("t1", result={"val_loss": 0.5, "training_iteration": 1})
    trials = s._ot_study.get_trials()
    assert len(trials) == 1 and trials[0].value == 0.5
