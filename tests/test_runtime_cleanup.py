"""Placement groups that Ray leaves reserved after a driver is killed, and their removal
(:func:`deeplense_ray.runtime.remove_orphaned_placement_groups`), on the tests' real Ray runtime."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from deeplense_ray.runtime import remove_orphaned_placement_groups

# A driver whose actor asks for placement groups without pause (as a Ray Train controller does once, when it
# starts its worker group): requests in flight when the driver is SIGKILLed reach the GCS after it has cleaned
# up the ended job, and Ray never removes those groups. (With CPU bundles the thousands of groups exhausted
# the test cluster's CPUs, and a group still being placed at the kill kept 0.001 CPU in one CI run.)
SPINNER = textwrap.dedent(
    """
    import threading, time
    import ray
    from ray.util.placement_group import placement_group

    ray.init()

    @ray.remote(num_cpus=0)
    class Spinner:
        def spin(self):
            def loop():  # 1-byte memory bundles: thousands of groups without exhausting the CPUs
                while True:
                    placement_group([{"memory": 1}])
            for _ in range(4):
                threading.Thread(target=loop, daemon=True).start()

    s = Spinner.remote()
    ray.get(s.spin.remote())
    print(ray.get_runtime_context().get_job_id(), flush=True)
    time.sleep(300)
    """
)

# A driver that leaves a detached actor holding a placement group it created, then exits: the job has ended,
# the group's creator is alive, so the group is in use and must stay.
DETACHED = textwrap.dedent(
    """
    import ray
    from ray.util.placement_group import placement_group

    ray.init(namespace="orphan-test")

    @ray.remote(num_cpus=0)
    class Holder:
        def __init__(self):
            self.pg = placement_group([{"CPU": 0.001}], name="kept-by-detached")
            ray.get(self.pg.ready())

        def ready(self):
            return True

    h = Holder.options(name="holder", lifetime="detached").remote()
    ray.get(h.ready.remote())
    print(ray.get_runtime_context().get_job_id(), flush=True)
    """
)


def _groups(name: str = "", job: str = "") -> list:
    """The placement groups not removed, by name or by creator job (hex)."""
    from ray._private import state as ray_state
    from ray.core.generated import gcs_pb2

    table = gcs_pb2.PlacementGroupTableData
    acc = ray_state.state._connect_and_get_accessor()
    out = [table.FromString(raw) for raw in acc.get_placement_group_table()]
    out = [g for g in out if g.state != table.REMOVED]
    return [g for g in out if g.name == name] if name else [g for g in out if g.creator_job_id.hex() == job]


def _job_dead(job_hex: str, timeout: float = 60.0) -> None:
    from ray._private import state as ray_state

    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(j["JobID"] == job_hex and j["IsDead"] for j in ray_state.jobs()):
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job_hex} not marked dead after {timeout} s")


def _driver(ray_session, code: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    p = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )
    job = p.stdout.readline().strip()
    assert job, "the driver did not start"
    return p, job


def test_groups_left_by_a_killed_driver_are_removed_and_groups_in_use_are_kept(ray_session):
    # a group of this (live) job and one held by a detached actor of an ended job: both must stay
    from ray.util.placement_group import placement_group, remove_placement_group

    free_before = ray_session.available_resources().get("CPU", 0.0)
    mine = placement_group([{"CPU": 0.001}], name="kept-by-live-job")
    ray_session.get(mine.ready())
    p, detached_job = _driver(ray_session, DETACHED)
    p.wait(timeout=60)
    _job_dead(detached_job)

    leaked = []
    for _ in range(3):  # the race is hit within one try here (4 of 4 in-flight requests); retried to be sure
        p, job = _driver(ray_session, SPINNER)
        time.sleep(1.0)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        _job_dead(job)
        time.sleep(3.0)  # Ray's own clean-up of the ended job and its actor is done by now
        leaked = _groups(job=job)
        if leaked:
            break
    # the leak needs Ray's race (a group registered while its job dies): when it is not hit, the groups in
    # use are still checked below and the test ends as a visible skip, never as a pass
    if leaked:
        assert remove_orphaned_placement_groups() >= len(leaked)
        t0 = time.time()
        while _groups(job=job) and time.time() - t0 < 30:
            time.sleep(0.2)
        assert _groups(job=job) == []
    assert len(_groups("kept-by-live-job")) == 1 and len(_groups("kept-by-detached")) == 1
    assert remove_orphaned_placement_groups() == 0  # nothing else is an orphan

    remove_placement_group(mine)
    ray_session.kill(ray_session.get_actor("holder", namespace="orphan-test"))
    t0 = time.time()  # Ray removes the detached actor's group with it (creator job and creator actor ended)
    while _groups("kept-by-detached") and time.time() - t0 < 30:
        time.sleep(0.2)
    assert _groups("kept-by-detached") == []
    t0 = time.time()  # the raylet returns removed groups' CPUs shortly after the GCS removes them
    while ray_session.available_resources().get("CPU", 0.0) < free_before - 1e-6 and time.time() - t0 < 30:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0.0) == pytest.approx(free_before, abs=1e-6)
    if not leaked:
        pytest.skip("Ray's placement-group race did not occur in 3 tries: removing a leak is unchecked")
    # (Not asserted: that the spinner's 1-byte memory bundles all come back. In one CI run one byte stayed
    # reserved on the raylet although no group of the job was left in the GCS table: a group still being
    # placed when it was removed. A driver can neither see nor undo that; the GCS-level leak is checked.)
