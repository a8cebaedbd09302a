"""`ray job submit` with token authentication (what docs/deployment.md and cluster.yaml prescribe) against a
real head started with `ray start --head`: the API refuses clients without the token, and a tiny
simulate -> train pipeline submitted with it succeeds and leaves a dataset and an MLflow run.

tests/test_simulate_job.py (data helper) covers `ray job submit` of jobs/simulate.py with auth disabled;
this file covers the token-auth path and a two-step pipeline.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _slurm_cluster import free_port_block  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.slow


def _env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(HOME=str(root / "home"), RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def token_head():
    """`ray start --head --block` on 127.0.0.1 with token auth, free ports and its own temp dir; stopped by
    SIGTERM to that process (Ray then stops every process it started), never by `ray stop`."""
    root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's unix sockets live below it
    (root / "home").mkdir()
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    base = free_port_block(200)
    env = _env(root, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={base}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={base + 1}", f"--node-manager-port={base + 3}",
           f"--object-manager-port={base + 4}", f"--dashboard-agent-grpc-port={base + 5}",
           f"--dashboard-agent-listen-port={base + 6}", f"--metrics-export-port={base + 7}",
           f"--runtime-env-agent-port={base + 8}", f"--min-worker-port={base + 20}",
           f"--max-worker-port={base + 199}", "--num-cpus=4", f"--temp-dir={root / 'r'}",
           "--disable-usage-stats"]
    log = open(root / "head.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dash = f"http://127.0.0.1:{base + 1}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}:\n{(root / 'head.log').read_text()}")
            try:
                urllib.request.urlopen(f"{dash}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:  # 401: up, and asking for the token
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dashboard not up:\n{(root / 'head.log').read_text()}") from None
                time.sleep(1)
        yield {"root": root, "token": token, "dashboard": dash, "env": env}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _get(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_job_api_requires_the_token(token_head):
    url = f"{token_head['dashboard']}/api/jobs/"
    assert _get(url, None) == 401
    assert _get(url, "0" * 64) in (401, 403)
    assert _get(url, token_head["token"].read_text()) == 200
    # The CLI without the token (auth mode unset, no ~/.ray/auth_token in this HOME) is refused too.
    res = subprocess.run([RAY, "job", "list", "--address", token_head["dashboard"]],
                         env=_env(token_head["root"]), capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "401" in res.stdout + res.stderr or "nauthori" in res.stdout + res.stderr, res.stderr[-2000:]


def test_submit_simulate_then_train_with_token(token_head, tmp_path):
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("preset: model_ii\nnum_pix: 32\n")
    data, db, store = tmp_path / "data", tmp_path / "mlflow.db", tmp_path / "ray_results"
    py = sys.executable  # the project's interpreter (a bare `python` may be another one on PATH)
    pipeline = (
        f"{py} jobs/simulate.py --config {tiny} --num-per-class 8 --shard-size 8 --out {data} --no-preview"
        f" && {py} jobs/train.py --model ResNetSimple --data {data} --epochs 1 --batch-size 8"
        f" --num-workers 1 --experiment submit-test --tracking-uri sqlite:///{db} --storage-path {store}"
    )
    env = _env(token_head["root"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_head["token"]))
    res = subprocess.run(
        [RAY, "job", "submit", "--address", token_head["dashboard"], "--working-dir", ".", "--",
         "bash", "-c", pipeline],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "succeeded" in out.lower(), out[-5000:]

    from deeplense_ray.data import load_manifest, verify_dataset

    assert verify_dataset(data) == []
    assert sum(s["rows"] for s in load_manifest(data)["splits"].values()) == 3 * 8

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("submit-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_auc_macro")] == [1]
