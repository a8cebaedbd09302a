"""jobs/simulate.py: bad flags fail before Ray; plain `python` and `ray job submit` against a real head."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ports  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "simulate.py"
VENV_BIN = str(Path(sys.executable).parent)


#: The test head's token: its GCS listens beyond loopback (jobs are handed the node's routable address), so
#: the head and every client use token auth, as a real cluster must (auth disabled is refused there).
_TOKEN = secrets.token_hex(16)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _TOKEN, "RAY_USAGE_STATS_ENABLED": "0",
         "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    )
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


_BAD_FLAGS_SCRIPT = r"""
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import importlib.util
spec = importlib.util.spec_from_file_location("simulate_job", sys.argv[2])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
results = []
for argv in json.loads(sys.argv[3]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = mod.main(argv)
        except SystemExit as exc:
            rc = exc.code
    results.append([rc, err.getvalue()])
print(json.dumps({"results": results, "ray_imported": "ray" in sys.modules}))
"""


def test_bad_flags_fail_before_ray_starts(tmp_path):
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "something.txt").write_text("x")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("preset: model_ii\nnum_pixx: 32\n")
    fresh = tmp_path / "fresh"
    base = ["--num-per-class", "10", "--out", str(fresh)]
    cases = [
        (["--preset", "model_iv", *base], "model_iv"),
        (["--preset", "model_ii", "--num-per-class", "-5", "--out", str(fresh)], "-5"),
        (["--preset", "model_ii", "--splits", "train=0.8,val=0.3", *base], "sum to 1"),
        (["--preset", "model_ii", "--splits", "train=0.8,val=x", *base], "'x'"),
        (["--preset", "model_ii", "--num-per-class", "10", "--out", str(nonempty)], str(nonempty)),
        (["--config", str(bad_yaml), *base], "num_pixx"),
        (["--config", str(tmp_path / "missing.yaml"), *base], "missing.yaml"),
        (["--preset", "model_ii", "--dtype", "float64", *base], "float64"),
        (["--preset", "model_ii", "--shard-size", "0", *base], "shard_size"),
        (["--preset", "model_ii", "--workers", "0", *base], "--workers"),
        (["--preset", "model_ii", "--resume", "--overwrite", *base], "--resume"),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _BAD_FLAGS_SCRIPT, str(REPO), str(JOB), json.dumps([c[0] for c in cases])],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for (argv, needle), (rc, err) in zip(cases, report["results"]):
        assert rc == 2, (argv, rc, err)
        assert needle in err, (argv, err)
    assert report["ray_imported"] is False  # every check ran before Ray was even imported
    assert not fresh.exists()


def _pids_using(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop one head started by this module: its process group, then any process naming its temp dir."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    time.sleep(1)
    for pid in _pids_using(temp_dir):  # daemons of this head that left its process group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start_head(log_path: Path) -> tuple[subprocess.Popen, str, dict[str, str]]:
    temp_dir = tempfile.mkdtemp(prefix="dlrd-", dir="/tmp")
    # One block of ports below the ephemeral range, never handed out before in this process (_ports.py):
    # nine for the head's servers, the rest for its workers. A retry of the fixture draws a new block.
    base = _ports.free_port_block(110)
    gcs, dash, client, node_mgr, obj_mgr, agent_listen, agent_grpc, runtime_env, metrics = range(
        base, base + 9
    )
    wlo, whi = base + 10, base + 109
    cmd = [
        os.path.join(VENV_BIN, "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--ray-client-server-port", str(client), "--node-manager-port", str(node_mgr),
        "--object-manager-port", str(obj_mgr), "--dashboard-agent-listen-port", str(agent_listen),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
        "--metrics-export-port", str(metrics),
        "--min-worker-port", str(wlo), "--max-worker-port", str(whi),
        "--num-cpus", "3", "--temp-dir", temp_dir, "--disable-usage-stats",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        # A loaded 2-core machine can take minutes to register the raylet (default deadline 60 s).
        env = _env(RAY_raylet_start_wait_time_s="300")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, temp_dir, {"dashboard": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}"}


def _head_ready(proc: subprocess.Popen, log_path: Path, url: str, timeout: float) -> bool:
    """True once `ray start` reports success and the dashboard answers; False if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if "Ray runtime started" in log_path.read_text(errors="replace"):
            try:
                auth = {"Authorization": f"Bearer {_TOKEN}"}
                req = urllib.request.Request(f"{url}/api/version", headers=auth)
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
        time.sleep(1)
    return False


@pytest.fixture
def ray_head(tmp_path):
    """A real head (`ray start --head --block`) on 127.0.0.1 with free ports and its own temp dir.

    `ray stop` would stop every Ray on this machine, so only this head's process group (and any process
    naming its temp dir) is stopped at the end. On an overloaded machine the raylet can miss its start-up
    deadline: one more attempt is made, with fresh ports, before failing; a head that could not bind a port
    (taken by another process since it was checked free) gets a third."""
    log_path = tmp_path / "ray_head.log"
    for attempt in range(1, 4):
        proc, temp_dir, addr = _start_head(log_path)
        if _head_ready(proc, log_path, addr["dashboard"], timeout=330):
            break
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        log = log_path.read_text(errors="replace")
        if attempt == 3 or (attempt == 2 and not _ports.address_in_use(log)):
            raise RuntimeError(f"ray head did not come up: {log[-3000:]}")
    try:
        yield addr
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_plain_python_and_ray_job_submit(ray_head, tmp_path):
    # 1) `ray job submit --working-dir .`: the job joins the cluster through RAY_ADDRESS (default --address).
    out_job = tmp_path / "job_ds"
    submit = [
        os.path.join(VENV_BIN, "ray"),
        "job",
        "submit",
        "--address",
        ray_head["dashboard"],
        "--working-dir",
        ".",
        "--",
        "python",
        "jobs/simulate.py",
        "--preset",
        "model_ii",
        "--num-per-class",
        "5",
        "--splits",
        "train=0.6,val=0.2,test=0.2",
        "--shard-size",
        "8",
        "--out",
        str(out_job),
        "--seed",
        "3",
        "--no-progress",
    ]
    for _ in range(10):  # the head's job agent may need a few more seconds than its dashboard
        proc = subprocess.run(submit, cwd=REPO, capture_output=True, text=True, timeout=400, env=_env())
        text = proc.stdout + proc.stderr
        if "No available agent" not in text and "Failed to connect to Ray" not in text:
            break
        time.sleep(3)
    head_log = (tmp_path / "ray_head.log").read_text(errors="replace")[-3000:]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:] + "\nHEAD LOG:\n" + head_log
    assert "succeeded" in proc.stdout + proc.stderr
    assert "joined " in proc.stdout and "(RAY_ADDRESS, auth token)" in proc.stdout
    manifest = json.loads((out_job / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 9 and manifest["config"]["seed"] == 3

    # 2) plain python with --address and a YAML config, 2 workers, float16 storage; then --verify.
    cfg = tmp_path / "preset.yaml"
    cfg.write_text("preset: model_ii\nnum_pix: 32\n")
    out_plain = tmp_path / "plain_ds"
    plain = [
        sys.executable,
        str(JOB),
        "--config",
        str(cfg),
        "--num-per-class",
        "4",
        "--splits",
        "train=0.5,test=0.5",
        "--shard-size",
        "4",
        "--workers",
        "2",
        "--dtype",
        "float16",
        "--out",
        str(out_plain),
        "--address",
        ray_head["gcs"],
        "--no-progress",
    ]
    proc = subprocess.run(plain, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=_env())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["images"] == 12 and summary["shards_written"] == 4
    manifest = json.loads((out_plain / "manifest.json").read_text())
    assert manifest["image_shape"] == [1, 32, 32] and manifest["image_dtype"] == "float16"
    assert manifest["config"]["preset_resolved"]["num_pix"] == 32

    ok = subprocess.run(
        [sys.executable, str(JOB), "--verify", str(out_plain)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = out_plain / "test" / "shard-00001.h5"
    bad.write_bytes(bad.read_bytes()[:-10])
    ko = subprocess.run(
        [sys.executable, str(JOB), "--verify", str(out_plain)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert ko.returncode == 1 and str(bad) in ko.stderr
