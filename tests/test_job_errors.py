"""Failures a user causes end a job with status 2 and one line naming the value or file, fast and before
Ray starts where they can be known then: an MLflow server that does not answer, a bad file read inside a Ray
task, an MLflow error; bugs keep their traceback."""

from __future__ import annotations

import importlib.util
import shlex
import time
from pathlib import Path

import numpy as np
import pytest

from deeplense_ray.cli import error_message, run_main

ROOT = Path(__file__).resolve().parents[1]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job_errors", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _argv(job: str, uri: str, tmp_path: Path) -> list[str]:
    return {
        "train": ["--model", "ResNetSimple", "--simulate", "model_ii", "--tracking-uri", uri,
                  "--storage-path", str(tmp_path / "runs")],
        "tune": ["--model", "ResNetSimple", "--num-samples", "1", "--tracking-uri", uri,
                 "--storage-path", str(tmp_path / "tune")],
        "study": ["--models", "ResNetSimple", "--simulate", "model_ii", "--num-per-class", "10",
                  "--seeds", "1", "--epochs", "1", "--tracking-uri", uri,
                  "--storage-path", str(tmp_path / "study")],
        "predict": ["--model-uri", "models:/lens@champion", "--input", str(tmp_path / "x.npy"),
                    "--out", str(tmp_path / "p.csv"), "--tracking-uri", uri],
    }[job]


@pytest.mark.parametrize("job", ["train", "tune", "study", "predict"])
@pytest.mark.parametrize("host", ["closed-port", "unresolvable"])
def test_unreachable_tracking_server_exits_2_before_ray(job, host, tmp_path, no_ray, capsys, closed_port):
    np.save(tmp_path / "x.npy", np.zeros((2, 32, 32), np.float32))
    uri = f"http://127.0.0.1:{closed_port}" if host == "closed-port" else "http://no-such-host.invalid:5000"
    mod = _job(job)
    t0 = time.perf_counter()
    rc = mod.main(_argv(job, uri, tmp_path))
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2, err
    assert elapsed < 60, elapsed  # no HTTP retries (MLflow's own back off for minutes); loose: a shared CPU
    assert f"MLflow tracking server {uri} does not answer" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "p.csv").exists()


def test_local_stores_need_no_server(tmp_path):
    from deeplense_ray.tracking.mlflow_utils import check_tracking_reachable

    assert check_tracking_reachable(str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"


def test_errors_raised_in_ray_tasks_are_unwrapped_and_bugs_keep_their_traceback(ray_session, tmp_path):
    """A shard that is not HDF5, read inside a real Ray task: one line naming the file; an MLflow error from a
    real store: its message; an AttributeError in a task: not a user error (run_main re-raises it)."""
    from mlflow.tracking import MlflowClient

    from deeplense_ray.data.shards import read_shard

    bad = tmp_path / "shard-00000.h5"
    bad.write_bytes(b"not an HDF5 file" * 64)

    @ray_session.remote(num_cpus=0)
    def read(path):
        return read_shard(path)

    with pytest.raises(Exception) as info:
        ray_session.get(read.remote(str(bad)))
    assert "RayTaskError" in type(info.value).__name__
    message = error_message(info.value)
    assert message is not None and str(bad) in message and "\n" not in message, message
    assert "Traceback" not in message and "ray::" not in message, message

    @ray_session.remote(num_cpus=0)
    def buggy():
        return None.shape  # a bug

    with pytest.raises(Exception) as info:
        ray_session.get(buggy.remote())
    assert error_message(info.value) is None

    def main(argv):
        ray_session.get(buggy.remote())

    with pytest.raises(AttributeError):
        run_main(main)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(Exception) as info:
        client.get_run("0" * 32)
    assert error_message(info.value) == f"Run with id={'0' * 32} not found"

    def main2(argv):
        client.get_run("0" * 32)

    assert run_main(main2) == 2


def test_sqlite_store_in_a_directory_with_uri_characters(tmp_path):
    """A real MLflow store (runs, metrics, an artifact) in a directory named with space, %, #, ?: the URI
    reaches the file there, and the printed `mlflow ui` command splits back into the same words."""
    from mlflow.tracking import MlflowClient

    from deeplense_ray.tracking.console import mlflow_ui_command
    from deeplense_ray.tracking.mlflow_utils import (
        get_or_create_experiment,
        resolve_tracking_uri,
        sqlite_path,
    )

    store = tmp_path / "a b%c#d?e"
    uri = resolve_tracking_uri(str(store))
    assert resolve_tracking_uri(f"sqlite:///{store}/mlflow.db") == uri  # a raw path in a sqlite URI too
    assert sqlite_path(uri) == store / "mlflow.db"
    exp = get_or_create_experiment("x", uri)
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "m", 1.5)
    (tmp_path / "note.txt").write_text("hi")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)
    assert (store / "mlflow.db").is_file()
    assert list((store / "mlartifacts").rglob("note.txt")), sorted(p.name for p in store.rglob("*"))
    assert MlflowClient(tracking_uri=uri).get_run(run.info.run_id).data.metrics == {"m": 1.5}

    words = shlex.split(mlflow_ui_command(uri))
    assert words[words.index("--backend-store-uri") + 1] == uri
    assert words[words.index("--artifacts-destination") + 1] == str(store / "mlartifacts")
