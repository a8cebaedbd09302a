"""Placement groups of stopped trials: record them in the trial, remove them from the driver.

When ASHA stops a trial, Tune ends the trial's actor; the Ray Train controller it owns dies with it, but the
placement group reserving the training workers belongs to the job and outlives the controller. Ray Train's
own ``PlacementGroupCleaner`` removes it through the state API (dashboard), which fails when the state API is
unreachable or, as on a shared machine, when several Ray instances run on one host ("Found multiple active Ray
instances"): the reserved CPUs/GPUs then leak and later trials wait forever for them.

So each trial records its worker placement groups (a Ray Train controller callback writes their ids next to
the trial's training run) and the driver removes those still alive once the trial's actor is gone, with the
job's own GCS connection (no state API).
"""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)

#: Seconds after a trial stops before its placement groups are removed (the trial actor exits first).
REAP_DELAY_S = 2.0


def pg_record_path(trainer_storage: str, trial_id: str) -> str:
    """File listing the hex ids of one trial's worker placement groups (one per line)."""
    return os.path.join(trainer_storage, f"{trial_id}.placement_groups")


def make_recorder(trainer_storage: str, trial_id: str):
    """A Ray Train (V2) callback that appends each worker group's placement-group id to the trial's record.

    Built on Ray Train's internal ``WorkerGroupCallback`` hook (the same one its PlacementGroupCleaner uses);
    Ray passes non-user callbacks of the RunConfig through to the controller for such workarounds.
    """
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    path = pg_record_path(trainer_storage, trial_id)

    class _RecordPlacementGroups(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            try:
                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "a") as f:
                    f.write(pg.id.hex() + "\n")
            except Exception as exc:  # never fail training over bookkeeping
                logger.warning("could not record the placement group of trial %s: %s", trial_id, exc)

    return _RecordPlacementGroups()


def recorded_placement_groups(trainer_storage: str, trial_id: str) -> list[str]:
    path = pg_record_path(trainer_storage, trial_id)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def remove_placement_groups(pg_ids: list[str]) -> int:
    """Remove the placement groups (hex ids) that still exist; returns how many were removed."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    removed = 0
    for h in pg_ids:
        try:
            pg = PlacementGroup(PlacementGroupID(bytes.fromhex(h)))
            state = placement_group_table(pg).get("state")
            if state in (None, "REMOVED"):
                continue
            remove_placement_group(pg)
            removed += 1
        except Exception as exc:
            logger.warning("could not remove placement group %s: %s", h, exc)
    return removed


class PlacementGroupReaper:
    """Driver-side: remove the recorded placement groups of trials that ended (see module docstring)."""

    def __init__(self, trainer_storage: str) -> None:
        self.trainer_storage = trainer_storage
        self.pending: dict[str, float] = {}
        self.removed = 0

    def trial_ended(self, trial_id: str) -> None:
        self.pending.setdefault(trial_id, time.monotonic())

    def reap(self, trials=(), *, force: bool = False) -> None:
        """Remove the placement groups of ended trials whose actor is gone (or all, with ``force``)."""
        alive = {t.trial_id for t in trials if getattr(t.temporary_state, "ray_actor", None) is not None}
        now = time.monotonic()
        for tid, t0 in list(self.pending.items()):
            if force or (tid not in alive and now - t0 >= REAP_DELAY_S):
                self.removed += remove_placement_groups(recorded_placement_groups(self.trainer_storage, tid))
                del self.pending[tid]
