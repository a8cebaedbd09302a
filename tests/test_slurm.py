"""`sbatch jobscript.sh` on a real one-node SLURM cluster (munged + slurmctld + slurmd started here).

The job starts its own Ray head (ports from a free block, its own temp dir, token auth), simulates a tiny
dataset and runs a tiny ASHA + Optuna search; the test checks the dataset and the MLflow runs it wrote, that
Ray is gone afterwards, that `scancel` stops Ray too, and that bad settings fail before Ray starts.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _slurm_cluster import free_port_block, missing_binaries, start_slurm_cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MISSING = missing_binaries()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"SLURM/munge not installed (missing {MISSING}); "
                       "Debian: apt-get install slurmctld slurmd slurm-client munge (.ci/run does)"),
    pytest.mark.skipif(not (REPO / ".venv" / "bin" / "activate").exists(),
                       reason="jobscript.sh activates <submit dir>/.venv, which does not exist"),
]
NUM_PER_CLASS = 8
NUM_SAMPLES = 2
# CvT (the jobscript's default model) shrunk to run in seconds on a CPU.
TINY_CVT = ("--fix batch_size=8 --fix s1_emb_dim=16 --fix s2_emb_dim=24 --fix s3_emb_dim=48 "
            "--fix s2_depth=1 --fix s3_depth=1")


@pytest.fixture(scope="module")
def slurm():
    cluster = start_slurm_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def job_dir():
    # Short path under /tmp: Ray's unix sockets live below RAY_TEMP_DIR (108-byte limit).
    d = Path(tempfile.mkdtemp(prefix="sb-", dir="/tmp"))
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def _exports(job_dir: Path, **extra: object) -> str:
    tiny = job_dir / "tiny.yaml"
    tiny.write_text("preset: model_ii\nnum_pix: 32\n")
    env = {
        "RUN_DIR": job_dir / "run",
        "RAY_TEMP_DIR": job_dir / "r",
        "RAY_PORT_BASE": free_port_block(200),
        "NUM_PER_CLASS": NUM_PER_CLASS,
        "SHARD_SIZE": 8,
        "SIMULATE_ARGS": f"--no-preview --config {tiny}",
        "NUM_SAMPLES": NUM_SAMPLES,
        "MAX_EPOCHS": 1,
        "GRACE_PERIOD": 1,
        "MAX_CONCURRENT": 1,
        "TUNE_ARGS": TINY_CVT,
        "EXPERIMENT": "slurm-test",
        "RAY_AUTH_MODE": "token",  # conftest exports RAY_AUTH_MODE=disabled, which --export=ALL would pass on
        **extra,
    }
    for k, v in env.items():
        assert "," not in str(v), f"--export cannot carry commas: {k}={v}"
    return "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items())


def _job_pids(cluster, job_id: int) -> list[int]:
    """Processes still alive that this job started (its environment names the job id and this cluster)."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_CONF={cluster.conf}".encode()}
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = set((d / "environ").read_bytes().split(b"\0"))
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if want <= env and state != "Z":
            pids.append(int(d.name))
    return pids


def _wait_no_pids(cluster, job_id: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while (pids := _job_pids(cluster, job_id)) and time.monotonic() < deadline:
        time.sleep(1)
    return pids


def _log(info: dict) -> str:
    p = Path(info["StdOut"])
    return p.read_text(errors="replace") if p.exists() else f"(no output file {p})"


def test_sbatch_simulate_then_tune(slurm, job_dir):
    out = job_dir / "slurm-%j.out"
    job_id = slurm.sbatch(REPO / "jobscript.sh", _exports(job_dir), f"--output={out}", cwd=REPO)
    info = slurm.wait_job(job_id, timeout=900)
    log = _log(info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-6000:]}"
    assert "Ray cluster up: 1 node(s)" in log, log[-3000:]
    assert "(auth token)" in log, log[:2000]
    assert "Ray stopped" in log, log[-3000:]
    assert not _wait_no_pids(slurm, job_id), "Ray processes of the finished job are still running"

    run = job_dir / "run"
    token = run / "ray_auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    assert "SIMULATE=1" in (run / "job_settings.env").read_text()

    from deeplense_ray.data import load_manifest, verify_dataset

    data = run / "data"
    assert verify_dataset(data) == []
    manifest = load_manifest(data)
    assert manifest["image_shape"] == [1, 32, 32]
    assert sum(s["rows"] for s in manifest["splits"].values()) == 3 * NUM_PER_CLASS
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            assert (data / shard["path"]).is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    exp = client.get_experiment_by_name("slurm-test")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == NUM_SAMPLES
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert any(k.startswith("test_") for k in parents[0].data.metrics), parents[0].data.metrics
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_auc_macro")
        assert len(history) == 1
        assert all(0.0 <= m.value <= 1.0 for m in history)


def test_scancel_stops_ray(slurm, job_dir):
    out = job_dir / "slurm-%j.out"
    # A dataset big enough that the job is still simulating when it is cancelled.
    job_id = slurm.sbatch(REPO / "jobscript.sh", _exports(job_dir, NUM_PER_CLASS=20000, TUNE=0),
                          f"--output={out}", cwd=REPO)
    log_path = Path(str(out).replace("%j", str(job_id)))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if log_path.exists() and "step simulate:" in log_path.read_text(errors="replace"):
            break
        info = slurm.job_info(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING"), f"{info}\n{_log(info)[-4000:]}"
        time.sleep(1)
    else:
        pytest.fail(f"job {job_id} did not reach the simulate step:\n{log_path.read_text()[-4000:]}")
    assert _job_pids(slurm, job_id), "the job's Ray processes should be running now"
    slurm.run("scancel", str(job_id))
    info = slurm.wait_job(job_id, timeout=120)
    assert info["JobState"] == "CANCELLED", info
    left = _wait_no_pids(slurm, job_id, timeout=30)
    assert not left, f"processes left after scancel: {left}"
    log = log_path.read_text(errors="replace")
    assert "Ray stopped" in log or "[ray_node] head" in log, log[-3000:]


def test_bad_settings_fail_before_ray(slurm, job_dir):
    out = job_dir / "slurm-%j.out"
    missing = job_dir / "no-such-dataset"
    job_id = slurm.sbatch(REPO / "jobscript.sh", _exports(job_dir, SIMULATE=0, DATA_DIR=missing),
                          f"--output={out}", cwd=REPO)
    info = slurm.wait_job(job_id, timeout=120)
    log = _log(info)
    assert info["JobState"] == "FAILED", info
    assert f"SIMULATE=0 but DATA_DIR={missing} has no manifest.json" in log, log
    assert "Ray cluster up" not in log and not os.path.exists(job_dir / "r")


def _dry_run(slurm, job_dir: Path, name: str, **env: str) -> str:
    """DRY_RUN=1 (all three steps) with ``env`` in the submitting environment; the job's log."""
    out = job_dir / f"{name}-%j.out"
    gpu_vars = ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE")
    submit_env = {k: v for k, v in slurm.env.items() if k not in gpu_vars}
    submit_env.update(env)
    options = [_exports(job_dir, DRY_RUN=1, TRAIN=1), f"--output={out}"]
    job_id = int(slurm.run("sbatch", "--parsable", *options, str(REPO / "jobscript.sh"), cwd=REPO,
                           env=submit_env).stdout.strip().split(";")[0])
    info = slurm.wait_job(job_id, timeout=120)
    log = _log(info)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    assert "dry run: nothing started" in log and "Ray cluster up" not in log, log
    assert not (job_dir / "r").exists(), "a dry run must not start Ray"
    return log


def _step(log: str, name: str) -> str:
    lines = [x for x in log.splitlines() if f"dry run: step {name}: " in x]
    assert len(lines) == 1, log
    return lines[0].split(f"dry run: step {name}: ", 1)[1]


def test_dry_run_steps_request_the_allocations_gpus(slurm, job_dir):
    """The commands the job runs take the allocation's GPUs: the Ray node advertises them and the train step
    asks for one worker per GPU (it used to train on CPU on GPU nodes)."""
    log = _dry_run(slurm, job_dir, "cvd", CUDA_VISIBLE_DEVICES="0,1")
    assert "dry run: Ray head on " in log and ": gpus=2" in log, log
    train = _step(log, "train")
    assert "--num-workers 2 --gpus-per-worker 1" in train, train
    assert "jobs/train.py --address " in train and "jobs/tune.py --address " in _step(log, "tune")

    log = _dry_run(slurm, job_dir, "sgon", SLURM_GPUS_ON_NODE="4")
    assert ": gpus=4" in log and "--num-workers 4 --gpus-per-worker 1" in _step(log, "train"), log

    log = _dry_run(slurm, job_dir, "cpu")  # no GPUs in the allocation: one CPU worker
    assert ": gpus=0" in log and "--num-workers 1 --gpus-per-worker 0" in _step(log, "train"), log
