"""The search's Optuna searcher: Ray's ``OptunaSearch``, tolerant of trials it never suggested.

A driver killed after Tune saved a new trial in the experiment state but before it saved the searcher
leaves, on resume, a trial the restored searcher has no note of; Ray's ``OptunaSearch`` then fails the whole
search with a KeyError when that trial reports. Here its results are ignored by the searcher (they do not
inform later suggestions; a warning says so) and the search goes on.
"""

from __future__ import annotations

import logging

from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)


class ResumableOptunaSearch(OptunaSearch):
    def _unknown(self, trial_id: str) -> bool:
        if trial_id in self._ot_trials:
            return False
        logger.warning(
            "trial %s is not in the restored searcher's notes (it started after its state was saved): "
            "its result does not inform later suggestions",
            trial_id,
        )
        return True

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._unknown(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if not self._unknown(trial_id):
            super().on_trial_complete(trial_id, result=result, error=error)


__all__ = ["ResumableOptunaSearch"]
