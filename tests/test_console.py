"""What a researcher reads: epoch lines, end-of-job blocks, the chance warning, checkpoint pruning, the
``--resume`` refusal of jobs/simulate.py. No Ray here (the search's console output is checked in
tests/test_tune.py); a real MLflow SQLite store for the per-epoch watcher."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from deeplense_ray.tracking.console import (
    RunWatcher,
    chance_warning,
    dir_size,
    epoch_line,
    hms,
    mlflow_ui_command,
    where_lines,
)
from deeplense_ray.train.metrics import bootstrap_auc_ci, flatten_metrics
from deeplense_ray.tune.disk import best_checkpoint_dir, prune_to_best_trial, prune_trial_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def test_epoch_line_has_loss_metrics_rate_elapsed_and_eta():
    m = {"epoch": 2, "train_loss": 0.98123, "val_loss": 1.1, "val_acc": 0.5, "val_auc_macro": 0.653,
         "images_per_s": 412.4}
    line = epoch_line(m, max_epochs=10, elapsed=72.0, prefix="[trial a] ")
    assert line == (
        "[trial a] epoch 2/10  loss 0.9812  val_loss 1.1000  val_acc 0.5000  val_auc_macro 0.6530  "
        "412 img/s  elapsed 0:01:12  eta 0:04:48"
    )
    last = epoch_line({**m, "epoch": 10}, max_epochs=10, elapsed=3700.0)
    assert last.endswith("elapsed 1:01:40") and "eta" not in last and "\x1b" not in last
    assert "DIVERGED" in epoch_line({**m, "diverged": 1, "val_loss": math.nan}, max_epochs=10, elapsed=1)
    assert hms(math.nan) == "?"


def test_bootstrap_interval_and_chance_warning():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    noise = rng.dirichlet(np.ones(3), size=len(y))  # predictions unrelated to the labels
    lo, hi = bootstrap_auc_ci(y, noise, n_boot=200)
    assert lo < 0.5 < hi
    warning = chance_warning("test AUC (macro)", 0.49, (lo, hi))
    assert warning and "includes 0.5" in warning and f"[{lo:.4f}, {hi:.4f}]" in warning
    good = 0.1 * noise + 0.9 * np.eye(3)[y]  # well separated
    lo2, hi2 = bootstrap_auc_ci(y, good, n_boot=200)
    assert 0.5 < lo2 <= hi2 <= 1.0
    assert chance_warning("test AUC (macro)", 0.99, (lo2, hi2)) is None
    assert chance_warning("x", 0.5, (math.nan, math.nan)) is None
    assert all(math.isnan(v) for v in bootstrap_auc_ci(y, np.full((len(y), 3), np.nan)))  # diverged model
    flat = flatten_metrics({"loss": 1, "accuracy": 0, "auc_macro": 0.5, "auc_micro": 0.5, "f1_macro": 0,
                            "auc": {}, "f1": {}, "auc_macro_ci": [lo, hi]}, "test")
    assert flat["test_auc_macro_ci_low"] == lo and flat["test_auc_macro_ci_high"] == hi


def test_where_block_names_every_place_and_the_mlflow_ui_command(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = mlflow_ui_command(uri)
    assert f"--backend-store-uri {uri}" in cmd and f"--artifacts-destination {tmp_path}/mlartifacts" in cmd
    assert cmd.endswith("--host 127.0.0.1 --port 5000") and " ui " in cmd
    rows = [("dataset", "/d"), ("model", None), ("MLflow store", uri)]
    lines = where_lines("Results:", rows, tracking_uri=uri)
    assert lines[0] == "Results:" and lines[1] == "  dataset       /d" and lines[-1] == f"  {cmd}"
    assert not any("model" in ln for ln in lines)
    assert "\x1b" not in "\n".join(lines)


def test_run_watcher_prints_each_logged_epoch_once(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from deeplense_ray.tracking import get_or_create_experiment, log_metrics

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = MlflowClient(uri).create_run(get_or_create_experiment("w", uri)).info.run_id
    watcher = RunWatcher(uri, run_id, max_epochs=3)
    assert watcher.poll() == []
    for epoch in (1, 2):
        log_metrics(uri, run_id, {"train_loss": 1.0 / epoch, "val_auc_macro": 0.5 + epoch / 10,
                                  "images_per_s": 100.0}, step=epoch)
    lines = watcher.poll()
    assert [ln.split("  ")[0] for ln in lines] == ["epoch 1/3", "epoch 2/3"]
    assert "val_auc_macro 0.7000" in lines[1] and "100 img/s" in lines[1] and "eta" in lines[1]
    assert watcher.poll() == []
    assert capsys.readouterr().out.splitlines() == lines


def _checkpoint(trial: Path, name: str, epoch: int, value: float) -> Path:
    d = trial / f"checkpoint_{name}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"epoch": epoch, "metrics": {"val_loss": value}}))
    (d / "model.pt").write_bytes(b"\0" * 1000)
    return d


def test_an_ended_trial_keeps_its_best_checkpoint_and_a_search_its_best_trial(tmp_path):
    a, b = tmp_path / "trainers" / "aaa", tmp_path / "trainers" / "bbb"
    first = _checkpoint(a, "1", 1, 0.9)
    best = _checkpoint(a, "2", 2, 0.4)
    _checkpoint(a, "3", 3, math.nan)
    assert best_checkpoint_dir(a, "val_loss", "min") == best
    assert best_checkpoint_dir(a, "val_loss", "max") == first
    gone = prune_trial_checkpoints(a, "val_loss", "min")
    assert len(gone) == 2 and sorted(p.name for p in a.iterdir()) == ["checkpoint_2"]
    _checkpoint(b, "1", 1, 0.5)
    assert dir_size(tmp_path) == 2 * 1000 + sum(len(p.read_bytes()) for p in tmp_path.rglob("meta.json"))
    prune_to_best_trial(tmp_path / "trainers", "aaa")
    assert not list(b.iterdir()) and best.is_dir()


def _simulate_job():
    spec = importlib.util.spec_from_file_location("simulate_job", ROOT / "jobs" / "simulate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_simulate_resume_refuses_a_directory_that_is_not_a_dataset(tmp_path, capsys):
    job = _simulate_job()
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes\n")
    (notes / "plots").mkdir()
    assert job.main(["--preset", "model_ii", "--num-per-class", "20", "--out", str(notes), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "is not a dataset of this project" in err and "notes.txt, plots/" in err and str(notes) in err
    assert sorted(p.name for p in notes.iterdir()) == ["notes.txt", "plots"]  # nothing written
    # a dataset folder (its manifest or an unfinished build's marker) passes the check
    (notes / ".building.json").write_text("{}")
    job.check_resume_dir(notes)
    with pytest.raises(ValueError, match="it holds: a.txt"):
        other = tmp_path / "other"
        other.mkdir()
        (other / "a.txt").write_text("")
        job.check_resume_dir(other)


def test_gitignore_covers_every_default_output():
    ignored = (ROOT / ".gitignore").read_text().split()
    for entry in ("mlartifacts/", "ray_results/", "tune_results/", "mlflow.db"):
        assert entry in ignored
    assert any("demo_output" in e for e in ignored)
