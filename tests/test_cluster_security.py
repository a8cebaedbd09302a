"""Clusters: Ray without authentication only on loopback unless the user says otherwise, batch-job Ray ports
below the ephemeral range and free, and the MLflow admin password that follows a rotated cluster token."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from deeplense_ray.runtime import INSECURE_ENV, busy_ports, ephemeral_port_low, pick_port_base

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _slurm_cluster import missing_binaries, start_slurm_cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MISSING = missing_binaries()
needs_slurm = pytest.mark.skipif(
    bool(MISSING) or not (REPO / ".venv" / "bin" / "activate").exists(),
    reason=f"SLURM/munge not installed (missing {MISSING}) or no .venv; .ci/run installs them",
)


def _listen(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("", port))
    s.listen()
    return s


def test_port_block_is_below_the_ephemeral_range_and_skips_a_port_in_use():
    low = ephemeral_port_low()
    bases = {pick_port_base(job) for job in (0, 1, 249, 250, 113, 10**7 + 3)}
    assert all(10000 <= b and b + 199 < low for b in bases), bases
    for job in range(40):  # a block of this job id that is free now
        base = pick_port_base(job)
        try:
            held = _listen(base + 57)  # a port of the block in use (e.g. another job's worker)
            break
        except OSError:
            continue
    try:
        assert busy_ports(base) == [base + 57]
        moved = pick_port_base(job)
        assert moved != base and not busy_ports(moved) and moved + 199 < low
    finally:
        held.close()


_JOIN = r"""
import sys
from deeplense_ray.runtime import RayConnectError, connect
try:
    print("JOINED", connect(sys.argv[1]))
except RayConnectError as exc:
    print("REFUSED", exc)
"""


def test_connect_refuses_auth_disabled_on_a_routable_address(ray_session):
    """The session runtime's GCS listens on the machine's routable address (as `ray start` does): joining it
    with RAY_AUTH_MODE=disabled is refused unless DEEPLENSE_ALLOW_INSECURE_RAY=1."""
    address = ray_session.get_runtime_context().gcs_address
    host = address.rpartition(":")[0]
    if host.startswith("127."):
        pytest.skip(f"the session runtime listens on {host} only")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", INSECURE_ENV)}
    env["RAY_AUTH_MODE"] = "disabled"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _JOIN, address], capture_output=True, text=True, timeout=120,
                         env=env, cwd=REPO)
    assert f"REFUSED refusing RAY_AUTH_MODE=disabled for the Ray cluster at {address}" in res.stdout, (
        res.stdout + res.stderr[-2000:])
    assert INSECURE_ENV in res.stdout and time.perf_counter() - t0 < 60
    res = subprocess.run([sys.executable, "-c", _JOIN, address], capture_output=True, text=True, timeout=120,
                         env={**env, INSECURE_ENV: "1"}, cwd=REPO)
    assert f"JOINED joined {address}" in res.stdout, res.stdout + res.stderr[-2000:]


@pytest.fixture(scope="module")
def slurm():
    cluster = start_slurm_cluster()
    yield cluster
    cluster.stop()


def _dry_run(slurm, **env: object) -> tuple[str, str]:
    """``sbatch jobscript.sh`` with DRY_RUN=1 and ``env``; (job state, log)."""
    d = Path(tempfile.mkdtemp(prefix="sc-", dir="/tmp"))
    try:
        exports = {"RUN_DIR": d / "run", "RAY_TEMP_DIR": d / "r", "DRY_RUN": 1, "RAY_AUTH_MODE": "token"}
        exports.update(env)
        options = "--export=ALL," + ",".join(f"{k}={v}" for k, v in exports.items())
        job_id = slurm.sbatch(REPO / "jobscript.sh", options, f"--output={d / 'out-%j.log'}", cwd=REPO)
        info = slurm.wait_job(job_id, timeout=120)
        log = Path(info["StdOut"]).read_text(errors="replace") if Path(info["StdOut"]).exists() else ""
        assert not (d / "r").exists(), "a dry run must not start Ray"
        return info["JobState"], log
    finally:
        shutil.rmtree(d, ignore_errors=True)


@needs_slurm
def test_jobscript_refuses_auth_disabled_on_a_routable_head(slurm):
    state, log = _dry_run(slurm, RAY_AUTH_MODE="disabled", RAY_HEAD_IP="192.0.2.10")
    assert state == "FAILED", log
    assert "RAY_AUTH_MODE=disabled with the Ray head on 192.0.2.10, a routable address" in log, log
    assert "DEEPLENSE_ALLOW_INSECURE_RAY=1" in log and "dry run: nothing started" not in log, log
    state, log = _dry_run(slurm, RAY_AUTH_MODE="disabled", RAY_HEAD_IP="192.0.2.10",
                          DEEPLENSE_ALLOW_INSECURE_RAY=1)
    assert state == "COMPLETED" and "dry run: nothing started" in log, log
    state, log = _dry_run(slurm, RAY_AUTH_MODE="disabled", RAY_HEAD_IP="127.0.0.1")
    assert state == "COMPLETED", log


@needs_slurm
def test_jobscript_ports_are_free_and_below_the_ephemeral_range(slurm):
    state, log = _dry_run(slurm)
    assert state == "COMPLETED", log
    line = next(x for x in log.splitlines() if "dry run: Ray ports " in x)
    first, last = (int(v) for v in line.split("dry run: Ray ports ")[1].split()[0].split(".."))
    assert 10000 <= first and last < ephemeral_port_low() and last - first == 199, line

    base = pick_port_base(7)
    held = _listen(base + 4)  # the object manager port of that block
    try:
        state, log = _dry_run(slurm, RAY_PORT_BASE=base)
    finally:
        held.close()
    assert state == "FAILED", log
    assert f"RAY_PORT_BASE={base}: port(s) in use on" in log and str(base + 4) in log, log


def _basic_auth_server(cwd: Path, port: int, password: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    mlflow = Path(sys.executable).with_name("mlflow")
    return subprocess.Popen(
        [str(mlflow), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{cwd / 'mlflow.db'}", "--workers", "1"],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def test_rotated_cluster_token_becomes_the_mlflow_admin_password(tmp_path, monkeypatch):
    """cluster.yaml's head start commands, run for real with HOME in a temporary directory: the auth store was
    made with token A; after a rotation to token B the reset command runs, then MLflow's basic-auth server
    (started as cluster.yaml does, on 127.0.0.1 here) accepts admin/B and refuses admin/A."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth]")
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    from deeplense_ray.tracking.mlflow_utils import TrackingServerError, check_tracking_reachable

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / "mlflow").mkdir()
    (home / "venv" / "bin").mkdir(parents=True)
    python = home / "venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    token_a, token_b = secrets.token_hex(32), secrets.token_hex(32)
    store = SqlAlchemyStore()  # the auth app's first start with token A
    store.init_db(f"sqlite:///{home / 'mlflow' / 'basic_auth.db'}")
    store.create_user("admin", token_a, is_admin=True)
    (home / ".ray" / "deeplense_auth_token").write_text(token_b)  # the rotation

    commands = yaml.safe_load((REPO / "cluster.yaml").read_text())["head_start_ray_commands"]
    server_at = next(i for i, c in enumerate(commands) if "mlflow server" in c)
    for cmd in commands[:server_at]:
        if "ray stop" in cmd or "mlflow-server.pid" in cmd:
            continue
        res = subprocess.run(["bash", "-c", cmd], env={**os.environ, "HOME": str(home)}, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, (cmd, res.stderr[-2000:])

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _basic_auth_server(home / "mlflow", port, token_b)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core machine took over 90 s
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", token_b)
        while True:
            try:
                check_tracking_reachable(uri)
                break
            except TrackingServerError as exc:
                if "does not answer" not in str(exc) or time.monotonic() > deadline:
                    raise
                assert server.poll() is None, "the MLflow server exited"
                time.sleep(1)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", token_a)
        with pytest.raises(TrackingServerError, match=rf"{uri} not authorised \(HTTP 401"):
            check_tracking_reachable(uri)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
