"""Hyperparameter search on the real Ray runtime (CPU), real HDF5 data, real MLflow store.

Tiny data (model_ii at 32x32 pixels, 20 images per class), a tiny ViT (dim 16, depth 1), 2 epochs.
The ASHA case is seeded: with seed 6 Optuna draws lr = [1e-3, 1e-3, 10, 1e-3] for the 4 trials (2 at a
time), so the diverging lr=10 trial reaches the epoch-1 rung after a good one and ASHA must stop it there.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from deeplense_ray.data import DatasetConfig, build_dataset
from deeplense_ray.tune import SearchSetupError, TuneSettings, run_search
from deeplense_ray.tune.mlflow_runs import TAG_OUTCOME, TAG_PARENT, TAG_ROLE, TAG_TRIAL_ID
from deeplense_ray.tune.runner import trial_statuses

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = {
    "dim": 16,
    "depth": 1,
    "heads": 2,
    "mlp_dim": 32,
    "dropout": 0.0,
    "emb_dropout": 0.0,
    "weight_decay": 1e-4,
    "batch_size": 16,
}
TRAIN = {"precision": "fp32", "augment": False}


@pytest.fixture(scope="module")
def tiny_data(ray_session, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tune_data") / "ds"
    cfg = DatasetConfig(
        preset="model_ii",
        preset_overrides={"num_pix": 32, "delta_pix": 0.2, "supersampling": 1},
        num_per_class=20,
        seed=3,
    )
    build_dataset(cfg, out, progress=False, preview=False)
    return str(out)


def _settings(tmp_path: Path, data: str, **kw) -> TuneSettings:
    base = dict(
        model="ViT",
        num_samples=4,
        data_dir=data,
        max_epochs=2,
        grace_period=1,
        reduction_factor=2,
        max_concurrent=2,
        metric="val_loss",
        seed=6,
        experiment="tune-test",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        storage_path=str(tmp_path / "runs"),
        space={**TINY_VIT, "lr": tune.choice([1e-3, 10.0])},
        train_overrides=dict(TRAIN),
    )
    base.update(kw)
    return TuneSettings(**base)


def _wait_cpus_free(ray, before: float, timeout: float = 60.0) -> float:
    """Free CPUs once they are back to ``before`` (a leaked placement group keeps them reserved)."""
    t0 = time.time()
    free = ray.available_resources().get("CPU", 0.0)
    while time.time() - t0 < timeout and free < before - 1e-6:
        time.sleep(1.0)
        free = ray.available_resources().get("CPU", 0.0)
    return free


def test_asha_stops_the_diverging_trial_and_mlflow_nests_trials(ray_session, tiny_data, tmp_path):
    settings = _settings(tmp_path, tiny_data, name="asha")
    cpus_free = _wait_cpus_free(ray_session, ray_session.cluster_resources()["CPU"], timeout=30)
    res = run_search(settings)

    by_lr = {}
    for t in res.trials:
        by_lr.setdefault(t.config["lr"], []).append(t)
    assert sorted(len(v) for v in by_lr.values()) == [1, 3], "seed 6 draws lr=10 once and lr=1e-3 three times"
    bad = by_lr[10.0][0]
    assert bad.outcome == "stopped by ASHA at epoch 1" and bad.epochs_run == 1
    assert any(t.outcome == "completed" and t.epochs_run == 2 for t in by_lr[1e-3])
    assert res.best_config["hparams"]["lr"] == 1e-3
    assert res.best_trial_id != bad.trial_id

    # on disk
    out = Path(res.output_dir)
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["trial_id"] == res.best_trial_id and best["train_config"]["model_overrides"]["dim"] == 16
    assert Path(best["best_checkpoint"]).is_dir()
    assert (out / "best_checkpoint.txt").read_text().strip() == best["best_checkpoint"]
    assert "stopped by ASHA at epoch 1" in (out / "summary.txt").read_text()

    # MLflow: one parent, one child per trial, outcomes, per-epoch metrics, best config + test metrics
    client = MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == "search"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == res.parent_run_id and parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get(TAG_PARENT) == parent.info.run_id]
    assert len(children) == 4 and len(runs) == 5
    assert {c.data.tags[TAG_TRIAL_ID] for c in children} == {t.trial_id for t in res.trials}
    for c in children:
        lr = float(c.data.params["lr"])
        hist = client.get_metric_history(c.info.run_id, "val_loss")
        if lr == 10.0:
            assert c.data.tags[TAG_OUTCOME] == "stopped by ASHA at epoch 1" and c.info.status == "KILLED"
            assert [m.step for m in hist] == [1]
        elif c.data.tags[TAG_OUTCOME] == "completed":
            assert c.info.status == "FINISHED" and sorted(m.step for m in hist) == [1, 2]
    pm = parent.data.metrics
    assert pm["best_val_loss"] == pytest.approx(res.best_metric)
    assert {"test_accuracy", "test_auc_macro", "test_loss"} <= set(pm)
    assert pm["test_accuracy"] == pytest.approx(res.test_metrics["accuracy"])
    assert parent.data.params["best.lr"] == "0.001"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "val_curves.png", "summary.txt"} <= arts

    # the stopped trial's reserved CPUs came back (no leaked placement group)
    assert _wait_cpus_free(ray_session, cpus_free) == pytest.approx(cpus_free)


def test_interrupted_search_resumes_without_redoing_finished_trials(ray_session, tiny_data, tmp_path):
    """jobs/tune.py as a second driver on this cluster, SIGKILLed once a trial has finished, then resumed."""
    settings = _settings(
        tmp_path,
        tiny_data,
        name="resumable",
        num_samples=3,
        seed=2,
        space={**TINY_VIT, "lr": tune.choice([1e-3, 2e-3])},
    )
    argv = [
        sys.executable,
        str(ROOT / "jobs" / "tune.py"),
        "--model",
        "ViT",
        "--num_samples",
        "3",
        "--data",
        tiny_data,
        "--max-epochs",
        "2",
        "--grace-period",
        "1",
        "--reduction-factor",
        "2",
        "--max-concurrent",
        "2",
        "--metric",
        "val_loss",
        "--seed",
        "2",
        "--experiment",
        "tune-test",
        "--tracking-uri",
        settings.tracking_uri,
        "--storage-path",
        settings.storage_path,
        "--name",
        "resumable",
        "--train-override",
        "precision=fp32",
        "--train-override",
        "augment=false",
        "--choice",
        "lr=1e-3,2e-3",
        *[a for k, v in TINY_VIT.items() for a in ("--fix", f"{k}={v}")],
    ]
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    cpus_free = _wait_cpus_free(ray_session, ray_session.cluster_resources()["CPU"], timeout=30)
    out_dir = Path(settings.storage_path) / "resumable"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    done_before: set[str] = set()
    try:
        t0 = time.time()
        while time.time() - t0 < 600 and proc.poll() is None:
            done_before = {t for t, s in trial_statuses(str(out_dir)).items() if s == "TERMINATED"}
            if done_before:
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert done_before, (tmp_path / "first.log").read_text()[-3000:]
    assert len(trial_statuses(str(out_dir))) < 3 or not all(
        s == "TERMINATED" for s in trial_statuses(str(out_dir)).values()
    ), "the search finished before it was interrupted"
    finished = sorted(done_before)
    ckpts_before = {t: sorted(os.listdir(out_dir / "trainers" / t)) for t in finished}

    res = run_search(
        _settings(
            tmp_path,
            tiny_data,
            name="resumable",
            num_samples=3,
            seed=2,
            space={**TINY_VIT, "lr": tune.choice([1e-3, 2e-3])},
            resume=True,
        )
    )
    assert len(res.trials) == 3
    assert set(finished) <= {t.trial_id for t in res.trials}
    for t in finished:  # not run again: same checkpoints as before the interruption
        assert sorted(os.listdir(out_dir / "trainers" / t)) == ckpts_before[t]
    assert all(s == "TERMINATED" for s in trial_statuses(str(out_dir)).values())
    client = MlflowClient(settings.tracking_uri)
    children = client.search_runs(
        [res.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{res.parent_run_id}'", max_results=100
    )
    assert sorted(c.data.tags[TAG_TRIAL_ID] for c in children) == sorted(t.trial_id for t in res.trials)
    assert all(
        c.data.tags.get(TAG_OUTCOME) == "completed" or c.data.tags[TAG_OUTCOME].startswith("stopped by ASHA")
        for c in children
    )
    assert client.get_run(res.parent_run_id).info.status == "FINISHED"
    assert _wait_cpus_free(ray_session, cpus_free) == pytest.approx(cpus_free)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "NoSuchNet"], "unknown model 'NoSuchNet'"),
        (["--model", "ViT", "--metric", "val_top5"], "unknown metric 'val_top5'"),
        (["--model", "ViT", "--num_samples", "0"], "num_samples=0"),
        (["--model", "ViT", "--gpus-per-trial", "0.5"], "0.5 GPUs per trial, but the Ray cluster has 0 GPUs"),
        (["--model", "ViT", "--fix", "patches=4"], "'patches' is neither an optimiser key"),
    ],
)
def test_invalid_options_fail_before_any_trial(ray_session, tiny_data, tmp_path, capsys, args, needle):
    spec = importlib.util.spec_from_file_location("tune_job", ROOT / "jobs" / "tune.py")
    tune_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune_job)
    storage = tmp_path / "runs"
    db = tmp_path / "mlflow.db"
    rc = tune_job.main(
        [
            *args,
            "--data",
            tiny_data,
            "--storage-path",
            str(storage),
            "--tracking-uri",
            f"sqlite:///{db}",
            "--name",
            "bad",
        ]
    )
    assert rc == 2
    assert needle in capsys.readouterr().err
    assert not (storage / "bad").exists()  # no search directory, no trial
    assert not db.exists() or not MlflowClient(f"sqlite:///{db}").search_experiments(
        filter_string="name='tune-test'"
    )


def test_gpu_request_checked_against_cluster_before_any_trial(ray_session, tiny_data, tmp_path):
    with pytest.raises(SearchSetupError, match="the Ray cluster has 0 GPUs"):
        run_search(_settings(tmp_path, tiny_data, name="gpu", gpus_per_trial=1.0))
    assert not (tmp_path / "runs" / "gpu").exists()


def test_without_data_a_small_dataset_is_simulated_once_then_reused(ray_session, tmp_path):
    from deeplense_ray.data import load_manifest, verify_dataset
    from deeplense_ray.tune.runner import dataset_dir_for, ensure_dataset

    s = TuneSettings(
        model="ViT",
        num_per_class=10,
        storage_path=str(tmp_path),
        preset_overrides={"num_pix": 32, "delta_pix": 0.2, "supersampling": 1},
    ).validate()
    out = ensure_dataset(s, str(tmp_path))
    assert out == dataset_dir_for(s, str(tmp_path)) and out.startswith(str(tmp_path / "datasets"))
    assert verify_dataset(out) == [] and load_manifest(out)["image_shape"] == [1, 32, 32]
    stamp = os.path.getmtime(os.path.join(out, "manifest.json"))
    assert ensure_dataset(s, str(tmp_path)) == out  # same config: reused, not rebuilt
    assert os.path.getmtime(os.path.join(out, "manifest.json")) == stamp
    other = TuneSettings(**{**s.__dict__, "num_per_class": 12})
    assert dataset_dir_for(other, str(tmp_path)) != out
