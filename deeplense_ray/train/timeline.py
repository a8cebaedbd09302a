"""Where a training job's wall time goes: phase timestamps on the driver plus rank 0's per-epoch times.

The driver marks its own phases (job start, Ray connected, run prepared, fit start, fit end, test evaluation,
artifacts and model logged, end) in a :class:`Timeline`; after the fit, :meth:`Timeline.add_epochs` adds each
epoch of this run from rank 0's history (the per-epoch report keys ``t_epoch_start`` (Unix seconds),
``setup_s``, ``first_batch_s``, ``train_seconds``, ``val_seconds``): workers up (the loop's start), first
batch (the input's start-up: with streaming Ray Data, the dataset is ready when its first batch arrives),
and every epoch's start, end of training and end of validation. :meth:`Timeline.summary` gives the wall time,
the sum of train and validation seconds and their difference (the fixed cost), and the seconds between
consecutive phases; :meth:`Timeline.line` prints it on one line; the trainer logs it as ``timeline.json``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any


class Timeline:
    """Named instants (Unix seconds) of one job, in the order they happened."""

    def __init__(self, start: float | None = None) -> None:
        self.events: list[tuple[str, float]] = [("start", time.time() if start is None else float(start))]
        self._epochs: list[Mapping[str, Any]] = []

    @property
    def start(self) -> float:
        return self.events[0][1]

    def mark(self, name: str, at: float | None = None) -> float:
        """Record ``name`` now (or at Unix time ``at``); returns the time."""
        t = time.time() if at is None else float(at)
        self.events.append((name, t))
        return t

    def add_epochs(self, history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """Add the epochs of ``history`` that ran in this job (``t_epoch_start`` after the timeline's start;
        a resumed run's earlier epochs are left out): per attempt ``workers_up`` and ``first_batch``, per
        epoch ``epoch N start``, ``epoch N train end``, ``epoch N val end``. Returns those epochs."""
        mine = [h for h in history if float(h.get("t_epoch_start", 0.0)) >= self.start]
        for h in mine:
            e, t0 = int(h["epoch"]), float(h["t_epoch_start"])
            if float(h.get("setup_s", 0.0)) > 0:  # the first epoch of a worker-group attempt
                self.mark("workers_up", t0 - float(h["setup_s"]))
            self.mark(f"epoch {e} start", t0)
            if e == int(mine[0]["epoch"]):
                self.mark("first_batch", t0 + float(h.get("first_batch_s", 0.0)))
            t_train = t0 + float(h.get("train_seconds", 0.0))
            self.mark(f"epoch {e} train end", t_train)
            self.mark(f"epoch {e} val end", t_train + float(h.get("val_seconds", 0.0)))
        self._epochs = list(mine)
        return mine

    def summary(self) -> dict[str, Any]:
        """Wall seconds, train and validation seconds of this job's epochs, ``overhead_s`` = wall minus
        both, the phases in time order (seconds since start and since the previous phase)."""
        events = sorted(self.events, key=lambda ev: ev[1])
        epochs = self._epochs
        train_s = sum(float(h.get("train_seconds", 0.0)) for h in epochs)
        val_s = sum(float(h.get("val_seconds", 0.0)) for h in epochs)
        wall = events[-1][1] - self.start
        phases, prev = [], self.start
        for name, t in events:
            at, since = round(t - self.start, 3), round(t - prev, 3)
            phases.append({"phase": name, "at_s": at, "since_prev_s": since})
            prev = t
        return {
            "start_unix": self.start,
            "wall_s": wall,
            "epochs": len(epochs),
            "train_s": train_s,
            "val_s": val_s,
            "overhead_s": wall - train_s - val_s,
            "first_val_s": float(epochs[0].get("val_seconds", 0.0)) if epochs else None,
            "compile_s": sum(float(h.get("compile_s", 0.0)) for h in epochs),
            "phases": phases,
        }

    def line(self) -> str:
        """One line: wall = train + val + overhead, then each phase's seconds since the previous one shown
        (the phases of the epochs between the first and the last are left out)."""
        s = self.summary()
        ends = {int(self._epochs[0]["epoch"]), int(self._epochs[-1]["epoch"])} if self._epochs else set()
        shown = [p for p in s["phases"][1:] if not p["phase"].startswith("epoch ") or _epoch(p) in ends]
        steps, prev = [], 0.0
        for p in shown:
            steps.append(f"{p['phase']} +{p['at_s'] - prev:.1f}")
            prev = p["at_s"]
        return (
            f"timeline: wall {s['wall_s']:.1f} s = train {s['train_s']:.1f} + val {s['val_s']:.1f} + "
            f"overhead {s['overhead_s']:.1f} s | " + ", ".join(steps)
        )


def _epoch(phase: Mapping[str, Any]) -> int:
    return int(str(phase["phase"]).split()[1])
