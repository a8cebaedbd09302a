"""Tracking helpers against a real SQLite MLflow store and real PNG/JSON files (no Ray)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from deeplense_ray.tracking import (
    default_artifact_location,
    flatten_params,
    get_or_create_experiment,
    git_commit,
    log_metrics,
    log_params,
    metric_history,
    plot_confusion_matrix,
    plot_curves,
    plot_roc_curves,
    resolve_tracking_uri,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_resolve_tracking_uri_is_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri(base_dir=tmp_path / "b") == f"sqlite:///{tmp_path.resolve()}/b/mlflow.db"
    assert resolve_tracking_uri("sqlite:///runs/x.db") == f"sqlite:///{tmp_path.resolve()}/runs/x.db"
    assert (tmp_path / "runs").is_dir()  # the database's directory is created
    assert resolve_tracking_uri(f"sqlite:///{tmp_path}/y.db") == f"sqlite:///{tmp_path.resolve()}/y.db"
    assert resolve_tracking_uri("store") == f"sqlite:///{tmp_path.resolve()}/store/mlflow.db"
    assert resolve_tracking_uri("z.db") == f"sqlite:///{tmp_path.resolve()}/z.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("file:mlruns") == (tmp_path.resolve() / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/env.db"
    with pytest.raises(ValueError, match="unsupported tracking URI scheme 'ftp'"):
        resolve_tracking_uri("ftp://host/x")


@pytest.mark.slow
def test_experiment_created_once_with_artifacts_beside_db(tmp_path):
    uri = resolve_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    assert default_artifact_location(uri) == (tmp_path.resolve() / "mlartifacts").as_uri()
    first = get_or_create_experiment("exp-a", uri)
    assert get_or_create_experiment("exp-a", uri) == first
    assert get_or_create_experiment("exp-b", uri) != first
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment(first).artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    run = client.create_run(first)
    logged = log_params(uri, run.info.run_id, {"config": {"lr": 0.001, "model": "ViT"}, "x": [1, 2]})
    assert logged == {"config.lr": "0.001", "config.model": "ViT", "x": "[1, 2]"}
    log_metrics(uri, run.info.run_id, {"val_acc": 0.5, "flag": True, "name": "skip"}, step=1)
    log_metrics(uri, run.info.run_id, {"val_acc": 0.75}, step=2)
    assert metric_history(uri, run.info.run_id, ["val_acc"]) == {"val_acc": [(1, 0.5), (2, 0.75)]}
    assert set(client.get_run(run.info.run_id).data.metrics) == {"val_acc"}
    client.delete_experiment(get_or_create_experiment("exp-b", uri))
    with pytest.raises(ValueError, match="exp-b.*deleted"):
        get_or_create_experiment("exp-b", uri)


def test_flatten_params_truncates_long_values():
    flat = flatten_params({"a": {"b": {"c": 1}}, "long": "x" * 7000, "empty": {}})
    assert flat["a.b.c"] == "1"
    assert flat["empty"] == "{}"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...")


def test_git_commit_of_a_checkout_and_outside(tmp_path):
    repo, plain = tmp_path / "repo", tmp_path / "plain"
    repo.mkdir()
    plain.mkdir()

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)
        return out.stdout.strip()

    git("init", "-q")
    (repo / "f.txt").write_text("a")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "c")
    head = git("rev-parse", "HEAD")
    assert len(head) == 40 and git_commit(repo) == head
    (repo / "f.txt").write_text("b")
    assert git_commit(repo) == head + "-dirty"
    assert git_commit(plain) == "unknown"
    if (Path(__file__).resolve().parents[1] / ".git").exists():  # this package, from its checkout
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", git_commit()), git_commit()


def test_plots_are_png_and_written_atomically(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    logits = rng.normal(size=(30, 3)) + 2 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = ["no_sub", "axion", "cdm"]
    paths = [
        plot_roc_curves(y, probs, names, tmp_path / "roc.png"),
        plot_confusion_matrix([[5, 3, 2], [1, 8, 1], [0, 0, 10]], names, tmp_path / "cm.png"),
        plot_curves(
            [{"epoch": 1, "train_loss": 1.1, "val_loss": 1.0, "val_auc_macro": 0.6},
             {"epoch": 2, "train_loss": 0.9, "val_loss": float("nan"), "val_auc_macro": 0.7}],
            tmp_path / "sub" / "curves.png",
        ),
    ]  # fmt: skip
    for p in paths:
        assert Path(p).read_bytes()[:8] == PNG_MAGIC
        assert Path(p).stat().st_size > 5000
    assert sorted(f.name for f in tmp_path.rglob("*")) == ["cm.png", "curves.png", "roc.png", "sub"]


def test_atomic_write_json_maps_nan_to_null(tmp_path):
    from deeplense_ray.io import atomic_write_json

    out = atomic_write_json(tmp_path / "m.json", {"a": math.nan, "b": np.float32(1.5), "c": np.arange(2)})
    assert json.loads(out.read_text()) == {"a": None, "b": 1.5, "c": [0, 1]}
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"]


def test_roc_plot_of_a_diverged_model_is_written_not_raised(tmp_path):
    y = np.array([0, 1, 1, 0])
    probs = np.full((4, 2), np.nan)
    out = plot_roc_curves(y, probs, ["no_sub", "cdm"], tmp_path / "roc.png")
    assert Path(out).read_bytes()[:8] == PNG_MAGIC


def test_runs_logging_the_same_new_dataset_at_once_all_record_it(tmp_path):
    """A study's parallel trainings log one dataset as input at the same moment: MLflow's SQL store looks it
    up, then inserts it, so all but one insert hit the unique (experiment, name, digest) constraint (12 of 40
    calls here without the retry). Each run must end up listing it."""
    import threading

    from mlflow.entities import Dataset
    from mlflow.tracking import MlflowClient

    from deeplense_ray.tracking.datasets import log_dataset_input

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = MlflowClient(tracking_uri=uri).create_experiment("race")
    errors, run_ids = [], []

    def log(barrier, ds):
        client = MlflowClient(tracking_uri=uri)
        run_id = client.create_run(exp).info.run_id
        run_ids.append(run_id)
        barrier.wait()
        try:
            log_dataset_input(client, run_id, ds)
        except Exception as exc:  # noqa: BLE001 - the test reports every failure
            errors.append(repr(exc)[:200])

    for k in range(3):
        ds = Dataset(name=f"data{k}", digest="0123456789abcdef", source_type="local", source=str(tmp_path))
        barrier = threading.Barrier(8)
        threads = [threading.Thread(target=log, args=(barrier, ds)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    client = MlflowClient(tracking_uri=uri)
    assert all(len(client.get_run(r).inputs.dataset_inputs) == 1 for r in run_ids)


def test_logging_a_model_checks_its_example_on_the_cpu_unless_the_user_chose(tmp_path, monkeypatch):
    """MLflow checks a logged model's input example by loading it and predicting, on CUDA where one is seen;
    log_classifier_model asks for the CPU (a driver holding no GPU must not open a CUDA context on one), only
    for that check, and a user's MLFLOW_DEFAULT_PREDICTION_DEVICE wins."""
    from mlflow.tracking import MlflowClient

    from deeplense_ray.tracking import models
    from deeplense_ray.tracking.models import log_classifier_model
    from deeplense_ray.train.modules import ARCH_KEYS, build_classifier

    seen = []
    real = models.prediction_device

    def spy():  # what the logged pyfunc asks when MLflow loads it to check the example
        seen.append(os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE"))
        return real()

    monkeypatch.setattr(models, "prediction_device", spy)
    monkeypatch.delenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", raising=False)
    arch = {k: None for k in ARCH_KEYS} | dict(
        model="ResNetSimple", model_size="default", image_shape=[1, 16, 16], model_overrides={"width": 8},
        class_names=["a", "b"], normalize="none",
    )  # fmt: skip
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(get_or_create_experiment("models", uri))
    log_classifier_model(uri, run.info.run_id, build_classifier(arch), arch=arch)
    assert seen == ["cpu"] and "MLFLOW_DEFAULT_PREDICTION_DEVICE" not in os.environ
    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cuda:3")
    run = client.create_run(get_or_create_experiment("models", uri))
    log_classifier_model(uri, run.info.run_id, build_classifier(arch), arch=arch)  # MLflow warns: no cuda:3
    assert seen[-1] == "cuda:3" and os.environ["MLFLOW_DEFAULT_PREDICTION_DEVICE"] == "cuda:3"
