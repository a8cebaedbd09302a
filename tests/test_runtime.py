"""How the jobs reach Ray (deeplense_ray/runtime.py): a dead cluster is found in seconds, a local runtime
listens on loopback with explicit token auth and enough logical CPUs, a joined cluster without room for the
Ray Data readers is refused before training.

Each scenario runs in a fresh interpreter (the session runtime of conftest.py would otherwise be reused), with
its own Ray temp dir (RAY_TMPDIR) and HOME, so the ``ray_current_cluster`` record written here is private.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from deeplense_ray.runtime import DATA_RESERVE_CPUS, check_cpu_room

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import importlib.util, json, os, socket, sys, time
sys.path.insert(0, sys.argv[1])
spec = importlib.util.spec_from_file_location("train_job", os.path.join(sys.argv[1], "jobs", "train.py"))
train_job = importlib.util.module_from_spec(spec); spec.loader.exec_module(train_job)
from deeplense_ray.config import TrainConfig
from deeplense_ray.runtime import RayConnectError
import ray

cfg = TrainConfig(model="ResNetSimple", data_dir="unused", num_workers=int(sys.argv[3]), cpus_per_worker=1.0)
out = {}
t0 = time.perf_counter()
try:
    out["how"] = train_job.connect_for(cfg, None if sys.argv[2] == "-" else sys.argv[2])
except (RayConnectError, ValueError) as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
out["seconds"] = time.perf_counter() - t0
out["auth_mode"] = os.environ.get("RAY_AUTH_MODE")
if ray.is_initialized():
    import psutil
    node = ray._private.worker.global_worker.node
    out["gcs_address"] = node.gcs_address
    out["cpus"] = ray.cluster_resources().get("CPU", 0)
    gcs = [p for p in psutil.Process().children(recursive=True) if p.name() == "gcs_server"]
    out["gcs_listen"] = sorted({c.laddr.ip for p in gcs for c in p.net_connections("tcp")
                                if c.status == "LISTEN"})
    # what a Ray process of the runtime (e.g. Ray Train's controller) reads as its worker poll interval
    poll = ray.remote(lambda: os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"))
    out["train_poll_s"] = ray.get(poll.options(num_cpus=0).remote())
    ray.shutdown()
print("RESULT " + json.dumps(out))
"""


def _run(address: str, num_workers: int, *, record: str | None = None, env: dict | None = None) -> dict:
    """Run the train job's connect helper in a fresh interpreter; its result as a dict."""
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        (tmp / "ray").mkdir()
        (tmp / "home").mkdir()
        if record is not None:
            (tmp / "ray" / "ray_current_cluster").write_text(record)
        e = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
        e.update(RAY_TMPDIR=str(tmp), HOME=str(tmp / "home"), RAY_USAGE_STATS_ENABLED="0", **(env or {}))
        proc = subprocess.run(
            [sys.executable, "-c", _SCRIPT, str(REPO), address, str(num_workers)],
            capture_output=True, text=True, timeout=120, env=e, cwd=REPO,
        )
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
        res = json.loads(lines[-1][len("RESULT "):])
        res["token_file_written"] = (tmp / "home" / ".ray" / "auth_token").exists()
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_cpu_room_check_names_the_request_and_the_fix():
    check_cpu_room({"CPU": 3.0}, 2.0, what="training", detail="d", fix="f")  # 2 + 1 reserve fit in 3
    with pytest.raises(ValueError, match=r"training needs 2 CPUs \(2 x 1\) plus 1 free for its Ray Data "
                                         r"readers, but the Ray cluster has 2 CPUs; lower it"):
        check_cpu_room({"CPU": 2.0}, 2.0, what="training", detail="2 x 1", fix="lower it")
    assert DATA_RESERVE_CPUS == 1.0


@pytest.mark.slow
def test_dead_recorded_cluster_is_skipped_and_the_local_runtime_is_loopback_with_token_auth(closed_port):
    # A `ray_current_cluster` record left by a killed cluster: ray.init(address="auto") retried it > 10 min
    # (_run's subprocess timeout catches that; no wall-clock bound on a shared machine)
    dead = f"127.0.0.1:{closed_port}"
    res = _run("-", 2, record=dead)
    assert "error" not in res, res
    assert f"({dead}) does not answer" in res["how"] and "started a local Ray runtime" in res["how"], res
    # loopback only: the GCS address handed out and every socket the GCS listens on
    assert res["gcs_address"].startswith("127.0.0.1:"), res
    assert res["gcs_listen"] and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in res["gcs_listen"]), res
    # explicit token auth with a private token (never written to ~/.ray/auth_token)
    assert res["auth_mode"] == "token" and "auth token" in res["how"], res
    assert not res["token_file_written"], res
    # 2 training workers x 1 CPU + 1 CPU for the Ray Data readers, whatever the machine's core count
    assert res["cpus"] >= 3, res
    assert res["train_poll_s"] == "0.25", res  # Ray Train notices a run's end within 0.25 s, not 2 s


def test_dead_explicit_address_fails_without_retrying_naming_it(closed_port):
    dead = f"127.0.0.1:{closed_port}"
    res = _run(dead, 1)  # a retrying connect runs into _run's subprocess timeout
    assert res["error"].startswith("RayConnectError") and f"no Ray cluster answers at {dead} (--address)" in \
        res["error"], res
    assert "gcs_address" not in res  # nothing was started
    res = _run("-", 1, env={"RAY_ADDRESS": dead})
    assert f"no Ray cluster answers at {dead} (RAY_ADDRESS)" in res.get("error", ""), res


def test_tune_and_simulate_refuse_a_dead_address(tmp_path, closed_port):
    dead = f"127.0.0.1:{closed_port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    sim = subprocess.run(
        [sys.executable, "jobs/simulate.py", "--num-per-class", "10", "--out", str(tmp_path / "d"),
         "--address", dead], capture_output=True, text=True, timeout=180, env=env, cwd=REPO,
    )
    assert sim.returncode == 2 and f"no Ray cluster answers at {dead}" in sim.stderr, sim.stderr[-2000:]
    tune = subprocess.run(
        [sys.executable, "jobs/tune.py", "--model", "ResNetSimple", "--storage-path", str(tmp_path / "t"),
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], capture_output=True, text=True,
        timeout=180, env=dict(env, RAY_ADDRESS=dead), cwd=REPO,
    )
    assert tune.returncode == 2, tune.stderr[-2000:]
    assert f"error: no Ray cluster answers at {dead} (RAY_ADDRESS)" in tune.stderr, tune.stderr[-2000:]


@pytest.mark.slow
def test_train_refuses_a_joined_cluster_without_cpus_for_the_data_readers(ray_session):
    # The session runtime has 4 CPUs: 4 training workers x 1 CPU leave none for the Ray Data read tasks.
    address = ray_session.get_runtime_context().gcs_address
    insecure = {"RAY_AUTH_MODE": "disabled", "DEEPLENSE_ALLOW_INSECURE_RAY": "1"}  # a routable GCS address
    res = _run(address, 4, env=insecure)
    assert res.get("how") is None, res
    assert "training needs 4 CPUs (--num-workers 4 x --cpus-per-worker 1) plus 1 free" in res["error"], res
    assert "has 4 CPUs; lower --num-workers or --cpus-per-worker" in res["error"], res
    res = _run(address, 3, env=insecure)
    assert "error" not in res and res["how"].startswith(f"joined {address} (--address, auth disabled)"), res
