"""The terminal lines of a search: a trial's start, one line per epoch and its end, and a heartbeat.

Printed by the driver (a Tune callback), in the same format as a training run's epoch lines
(``deeplense_ray.tracking.console``), so a log of a long search stays readable without Ray's status tables.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from ray.tune import Callback

from deeplense_ray import ranking
from deeplense_ray.tracking.console import EPOCH_KEYS, HEARTBEAT_S, epoch_line, fmt_num, hms
from deeplense_ray.tune.mlflow_runs import DIVERGED_VALUE, STARTUP_KEY, outcome, trial_startup


class SearchConsole(Callback):
    """Driver-side Tune callback: trial start, one line per epoch, trial end; a heartbeat when quiet.

    The trial-end line and the running "best so far" use the best epoch of each trial by ``metric``
    (``mode``), the same definition as the search's summary table and its MLflow tags.
    """

    def __init__(
        self,
        *,
        metric: str,
        mode: str,
        max_epochs: int,
        num_samples: int,
        stream: TextIO | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.metric = metric
        self.mode = mode
        self.max_epochs = int(max_epochs)
        self.num_samples = int(num_samples)
        self.stream = stream
        self.heartbeat_s = float(heartbeat_s)
        self.started: dict[str, float] = {}
        self.best: dict[str, tuple[float, int]] = {}
        self.epochs: dict[str, int] = {}
        self.diverged: dict[str, int] = {}
        self.ended = 0
        self.t0 = time.time()
        self.last_print = self.t0

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["stream"] = None
        return d

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)
        self.last_print = time.time()

    def best_overall(self) -> tuple[str, float, int] | None:
        """(trial id, best metric, its epoch) over all trials so far, or None; ties go to the smaller trial
        id, as in the search's summary (:func:`deeplense_ray.tune.best.pick_best`, by
        :mod:`deeplense_ray.ranking`)."""
        found = ranking.best(self.best.items(), lambda kv: kv[1][0], self.mode, tie_of=lambda kv: str(kv[0]))
        return (found[0], *found[1]) if found is not None else None

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started[trial.trial_id] = time.time()
        n = len(self.started)
        sampled = {k: v for k, v in trial.config.items() if k != "_search"}
        text = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sampled.items())
        self._print(f"[trial {trial.trial_id}] start ({n}/{self.num_samples}): {text}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        tid = trial.trial_id
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        self.epochs[tid] = max(epoch, self.epochs.get(tid, 0))
        if result.get("diverged") == 1:
            self.diverged.setdefault(tid, epoch)
        # a diverged epoch reports a finite stand-in (+-1e30) for the metric: shown as nan
        result = {
            k: math.nan if isinstance(v, (int, float)) and abs(float(v)) >= DIVERGED_VALUE else v
            for k, v in result.items()
        }
        v = result.get(self.metric)
        v = float(v) if isinstance(v, (int, float)) else math.nan
        prev = self.best.get(tid)  # a trial's best epoch as its curve's: the metric, then the earlier epoch
        if prev is None or ranking.epoch_key(v, epoch, self.mode) < ranking.epoch_key(*prev, self.mode):
            self.best[tid] = (v, epoch)
        elapsed = time.time() - self.started.get(tid, self.t0)
        keys = tuple(dict.fromkeys((*EPOCH_KEYS, self.metric)))
        line = epoch_line(
            result, max_epochs=self.max_epochs, elapsed=elapsed, prefix=f"[trial {tid}] ", keys=keys
        )
        startup = trial_startup(result, self.started.get(tid))  # the first report of a worker-group start
        if startup:
            line += f"  (first batch {startup[STARTUP_KEY]:.1f} s after the trial started)"
        self._print(line)

    def _end_line(self, trial, how: str) -> None:
        self.ended += 1
        tid = trial.trial_id
        v, e = self.best.get(tid, (math.nan, 0))
        elapsed = time.time() - self.started.get(tid, self.t0)
        overall = self.best_overall()
        lead = (
            f"; best so far: trial {overall[0]} {self.metric} {fmt_num(overall[1])} (epoch {overall[2]})"
            if overall is not None and math.isfinite(overall[1])
            else ""
        )
        self._print(
            f"[trial {tid}] end ({self.ended}/{self.num_samples}): {how} after {self.epochs.get(tid, 0)} "
            f"epoch(s), best {self.metric} {fmt_num(v)} at epoch {e}, {hms(elapsed)}{lead}"
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        tid = trial.trial_id
        text, _ = outcome(self.epochs.get(tid, 0), self.max_epochs, diverged_at=self.diverged.get(tid))
        self._end_line(trial, text)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        where = getattr(trial, "path", None) or ""
        self._end_line(trial, f"FAILED (error log under {where})")

    def on_step_begin(self, iteration, trials, **info) -> None:
        now = time.time()
        if now - self.last_print < self.heartbeat_s:
            return
        running = [t.trial_id for t in trials if t.status == "RUNNING"]
        pending = sum(t.status == "PENDING" for t in trials)
        self._print(
            f"[search] {hms(now - self.t0)} elapsed: {len(running)} running "
            f"({', '.join(running) or '-'}), {pending} pending, {self.ended}/{self.num_samples} ended; "
            "waiting for the next epoch"
        )
