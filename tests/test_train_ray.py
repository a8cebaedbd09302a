"""Distributed training end to end: real Ray runtime (2-worker DDP on CPU, gloo), real HDF5 data simulated
by deeplense_ray.data.build_dataset, real models, a real SQLite MLflow store. ONE 2-worker training (a crash,
a resume, an automatic worker restart: three Ray Train starts, three epochs) serves every check of the module.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deeplense_ray.config import TrainConfig
from deeplense_ray.data import DatasetConfig, LensShardDataset, build_dataset, manifest_hash
from deeplense_ray.tracking import use_tracking_uri
from deeplense_ray.train import REPORT_KEYS, LoopHooks, evaluate_checkpoint, run_training
from deeplense_ray.train.checkpoint import latest_checkpoint, load_training_state
from deeplense_ray.train.metrics import classification_metrics
from deeplense_ray.train.prepare import RUN_STATE_FILE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NUM_PER_CLASS = 20  # -> 16 train / 2 val / 2 test images per class
NUM_PIX = 16
MODEL = "ResNetSimple"
OVERRIDES = {"width": 8}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir(ray_session, tmp_path_factory):
    """One tiny model_ii dataset (16x16 pixels, 3 classes) shared by every test of this module."""
    out = tmp_path_factory.mktemp("train-data") / "model_ii_16"
    cfg = DatasetConfig(
        preset="model_ii",
        preset_overrides={"num_pix": NUM_PIX},
        num_per_class=NUM_PER_CLASS,
        shard_size=16,
        seed=5,
    )
    build_dataset(cfg, out, progress=False)
    return out


def _cfg(tmp: Path, data_dir: Path, **kw) -> TrainConfig:
    base = dict(
        model=MODEL,
        data_dir=str(data_dir),
        epochs=2,
        batch_size=8,
        lr=3e-3,
        num_workers=2,
        model_overrides=dict(OVERRIDES),
        tracking_uri=f"sqlite:///{tmp}/mlflow.db",
        storage_path=str(tmp / "ray"),
        experiment="test-train",
        shuffle_buffer=16,
    )
    base.update(kw)
    return TrainConfig(**base)


def _predict_test(model: torch.nn.Module, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Raw test images through a reloaded model (what a user of the logged model does)."""
    logits, labels = [], []
    loader = torch.utils.data.DataLoader(LensShardDataset(data_dir, "test"), batch_size=64)
    with torch.no_grad():
        for x, y in loader:
            logits.append(model(x).float())
            labels.append(y)
    probs = torch.softmax(torch.cat(logits).double(), dim=1).numpy()
    return torch.cat(labels).numpy(), probs


@pytest.fixture(scope="module")
def resumed_run(ray_session, data_dir, tmp_path_factory) -> SimpleNamespace:
    """ONE 2-worker DDP training, shared by the tests below (each Ray Train start costs ~10 s on 2 cores):
    a crash after epoch 1's checkpoint report and before its MLflow log (``max_failures=0``: the run fails),
    then ``resume=True`` with ``FailureConfig(max_failures=1)`` and a worker failure injected in epoch 3
    after its checkpoint is written and before it is reported, which Ray retries from the epoch-2
    checkpoint. 3 epochs of 48 training images in all; the final result is tracked and reloaded like any
    run. Returns the result and what the crash left behind."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("resumed-run")
    cfg = _cfg(tmp, data_dir, epochs=3, run_name="crashy", max_failures=0)
    with pytest.raises(Exception, match="injected failure at epoch 1, after_report"):
        run_training(cfg, hooks=LoopHooks(fail_at_epoch=1, fail_point="after_report"))
    run_dir = tmp / "ray" / "crashy"
    state = json.loads((run_dir / RUN_STATE_FILE).read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    crash = SimpleNamespace(
        state=state,
        mlflow_status=client.get_run(state["mlflow_run_id"]).info.status,
        auc_steps=[m.step for m in client.get_metric_history(state["mlflow_run_id"], "val_auc_macro")],
    )
    # --resume: the newest run of this model and seed, continued from its latest (epoch-1) checkpoint
    resumed = _cfg(tmp, data_dir, epochs=3, resume=True, max_failures=1)
    result = run_training(resumed, hooks=LoopHooks(fail_at_epoch=3, fail_point="before_report"))
    return SimpleNamespace(tmp=tmp, run_dir=run_dir, crash=crash, result=result)


def test_crash_then_resume_continues_epochs_and_optimizer(resumed_run):
    from mlflow.tracking import MlflowClient

    crash, result, run_dir = resumed_run.crash, resumed_run.result, resumed_run.run_dir
    assert crash.state["status"] == "failed" and crash.mlflow_status == "FAILED"
    assert crash.auc_steps == []  # epoch 1 was reported (checkpointed), then the crash came before its log

    assert result.run_name == "crashy" and result.run_id == crash.state["mlflow_run_id"]
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    # epoch 1 from the first attempt, epoch 2 after --resume, epoch 3 after Ray's automatic restart
    assert [h["resumed_from_epoch"] for h in result.history] == [0, 1, 2]

    ckpts = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    latest = max(ckpts, key=lambda p: load_training_state(p)["epoch"])
    train_state = load_training_state(latest)
    assert train_state["epoch"] == 3
    # 2 ranks x 24 rows, batches of 4 per rank: 6 optimizer steps per epoch
    steps = {int(s["step"].item()) for s in train_state["optimizer"]["state"].values()}
    assert steps == {3 * 6}, "optimizer state was not carried over the crash and the restart"
    assert train_state["scheduler"]["last_epoch"] == 3
    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resume.config.max_failures"] == "1"
    assert math.isfinite(result.test_metrics["loss"])
    # the job's timeline: only this job's epochs (2 and 3; epoch 1 ran before the crash), workers started
    # twice (--resume, then Ray's restart in epoch 3), logged as timeline.json
    tl = result.timeline
    phases = [p["phase"] for p in tl["phases"]]
    assert tl["epochs"] == 2 and phases.count("workers_up") == 2 and "epoch 1 start" not in phases
    assert phases.index("fit start") < phases.index("epoch 2 start") < phases.index("epoch 3 val end")
    assert phases[-1] == "end"
    assert tl["overhead_s"] == pytest.approx(tl["wall_s"] - tl["train_s"] - tl["val_s"])
    assert "timeline.json" in {a.path for a in client.list_artifacts(result.run_id)}


def test_two_worker_ddp_run_is_tracked_and_reloadable(resumed_run, data_dir):
    import mlflow
    from mlflow.tracking import MlflowClient

    result, tmp_path = resumed_run.result, resumed_run.tmp
    # per-epoch reports: every key, whole-split validation, every training image once per epoch
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    for h in result.history:
        assert set(REPORT_KEYS) <= set(h)
        assert h["val_n"] == 3 * 2  # the whole val split (one shard: evaluated by rank 0 alone)
        assert h["train_images"] == 3 * 16  # 2 ranks x 24 rows, batches of 4 (no row dropped)
        assert h["images_per_s"] > 0 and h["lr"] > 0 and h["diverged"] == 0
        assert h["bn_recal_layers"] > 0  # ResNetSimple's BatchNorm recalibrated before every validation
    # selection by val only: the best checkpoint is the epoch with the highest val_auc_macro
    best = max(result.history, key=lambda h: (h["val_auc_macro"], -h["val_loss"], -h["epoch"]))
    assert result.best_epoch == best["epoch"]
    assert result.best_val["val_auc_macro"] == pytest.approx(best["val_auc_macro"])

    # the val metrics gathered over 2 ranks equal a single-process evaluation of the whole val split
    val = evaluate_checkpoint(result.best_checkpoint, data_dir, "val", device="cpu")
    assert val["n"] == 6
    assert val["auc_macro"] == pytest.approx(best["val_auc_macro"], abs=1e-6)
    assert val["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert val["accuracy"] == pytest.approx(best["val_acc"])

    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert result.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    params = run.data.params
    assert params["config.model"] == MODEL and params["config.num_workers"] == "2"
    assert params["dataset.manifest_hash"] == manifest_hash(data_dir)
    assert params["config.ingest"] == "auto" and params["ingest_mode"] == "memory"  # a 12 KiB train split
    assert params["package_version"] and params["git_commit"]
    assert run.data.tags["test_evaluated_in"] == "driver"  # one local node: no task process to start
    # every epoch logged exactly once: epoch 1 from the checkpoint's history on --resume (its log was lost),
    # epoch 3 once although its first attempt crashed between its validation and its report
    for key in ("epoch", "val_auc_macro", "val_loss", "train_loss", "images_per_s"):
        assert sorted(m.step for m in client.get_metric_history(result.run_id, key)) == [1, 2, 3], key
    metrics = run.data.metrics
    test = result.test_metrics
    assert test["n"] == 6
    assert metrics["test_auc_macro"] == pytest.approx(test["auc_macro"])
    assert metrics["test_acc"] == pytest.approx(test["accuracy"])
    assert metrics["best_epoch"] == result.best_epoch

    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"roc_test.png", "confusion_test.png", "curves.png", "metrics.json", "config.json"} <= artifacts
    local = Path(client.download_artifacts(result.run_id, "", str(tmp_path / "dl")))
    for png in ("roc_test.png", "confusion_test.png", "curves.png"):
        assert (local / png).read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((local / "metrics.json").read_text())
    assert summary["best_epoch"] == result.best_epoch
    assert summary["test"]["auc_macro"] == pytest.approx(test["auc_macro"])
    assert summary["test"]["confusion_matrix"] == test["confusion_matrix"]
    assert np.sum(summary["test"]["confusion_matrix"]) == 6

    # the logged model's network (its pyfunc's module) reproduces the logged test metrics
    with use_tracking_uri(result.tracking_uri):
        model = mlflow.pyfunc.load_model(result.model_uri).unwrap_python_model().module.cpu().eval()
    y, probs = _predict_test(model, data_dir)
    again = classification_metrics(y, probs, ["no_sub", "axion", "cdm"])
    assert again["auc_macro"] == pytest.approx(metrics["test_auc_macro"], abs=1e-6)
    assert again["auc_micro"] == pytest.approx(metrics["test_auc_micro"], abs=1e-6)
    assert again["accuracy"] == pytest.approx(metrics["test_acc"])
    assert again["loss"] == pytest.approx(metrics["test_loss"], rel=1e-5)

    state = json.loads((Path(result.run_dir) / RUN_STATE_FILE).read_text())
    assert state["status"] == "finished" and state["mlflow_run_id"] == result.run_id


@pytest.mark.parametrize("ingest, images", [("per_rank", 32), ("split", 48)])
def test_ray_data_ingest_modes(ray_session, data_dir, tmp_path, monkeypatch, ingest, images):
    """The two Ray Data inputs (the module's main run uses ingest='auto', which reads this small split into
    memory). 'split': one Ray Data stream split across 2 ranks, all 48 training images per epoch.
    'per_rank': each of 2 ranks streams its own shards through its own Ray Data execution; the train split
    has 3 shards of 16 rows: per epoch one rank is dealt 2 shards and the other 1, and both take 16 rows
    (4 steps of 4 images), so DDP stays in step: 32 training images per epoch. The test split is evaluated
    in a Ray task here (as on a cluster), with the metrics of a plain evaluation."""
    from mlflow.tracking import MlflowClient

    from deeplense_ray.train.runners import TEST_EVAL_ENV

    monkeypatch.setenv(TEST_EVAL_ENV, "task")
    result = run_training(_cfg(tmp_path, data_dir, ingest=ingest, run_name=ingest))
    run = MlflowClient(tracking_uri=result.tracking_uri).get_run(result.run_id)
    assert run.data.tags["test_evaluated_in"] == "task"
    assert run.data.params["ingest_mode"] == ingest
    test = evaluate_checkpoint(result.best_checkpoint, data_dir, "test", device="cpu")
    assert result.test_metrics["loss"] == pytest.approx(test["loss"], rel=1e-5)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert [h["train_images"] for h in result.history] == [images, images]
    for h in result.history:
        assert h["val_n"] == 6 and 0.0 <= h["val_auc_macro"] <= 1.0 and math.isfinite(h["train_loss"])
    assert result.test_metrics["n"] == 6


def test_bad_input_fails_before_ray_starts(ray_session, data_dir, tmp_path):
    """Each bad input is refused with a message naming it, in a fresh process where Ray never starts."""
    one_class = tmp_path / "one_class"
    build_dataset(
        DatasetConfig(preset="model_ii", preset_overrides={"num_pix": 16, "class_names": ["cdm"]},
                      num_per_class=4, splits={"train": 0.5, "val": 0.25, "test": 0.25}, seed=1),
        one_class,
        progress=False,
    )  # fmt: skip
    no_manifest = tmp_path / "empty"
    no_manifest.mkdir()
    cases = {
        "missing": {"model": "ViT", "data_dir": str(tmp_path / "missing")},
        "no_manifest": {"model": "ViT", "data_dir": str(no_manifest)},
        "unknown_model": {"model": "ResNet99", "data_dir": str(data_dir)},
        "image_size": {"model": "ViT", "data_dir": str(data_dir), "model_overrides": {"patch_size": 5}},
        "classes": {"model": "ViT", "data_dir": str(one_class)},
        "per_rank_shards": {
            "model": MODEL,
            "data_dir": str(data_dir),
            "num_workers": 4,
            "ingest": "per_rank",
        },
    }
    script = textwrap.dedent(
        f"""
        import json, sys
        import ray
        from deeplense_ray.config import TrainConfig
        from deeplense_ray.train import run_training
        out = {{}}
        for name, kw in json.loads(sys.argv[1]).items():
            try:
                run_training(TrainConfig(**kw, storage_path={str(tmp_path / "ray")!r},
                                         tracking_uri={f"sqlite:///{tmp_path}/mlflow.db"!r}))
                out[name] = "no error"
            except Exception as exc:
                out[name] = type(exc).__name__ + ": " + str(exc)
        out["ray_started"] = ray.is_initialized()
        print(json.dumps(out))
        """
    )
    # the library calls and the CLI, in two fresh processes run side by side (each spends ~10 s importing)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, json.dumps(cases)], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        subprocess.Popen([sys.executable, "jobs/train.py", "--model", "ViT", "--data", str(data_dir),
                          "--model-override", "patch_size=5", "--storage-path", str(tmp_path / "ray")],
                         cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
    ]  # fmt: skip
    (out_lib, err_lib), (_, err_cli) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 0, err_lib[-3000:]
    out = json.loads(out_lib.strip().splitlines()[-1])
    assert out["ray_started"] is False
    assert out["missing"].startswith("FileNotFoundError") and str(tmp_path / "missing") in out["missing"]
    assert "manifest" in out["no_manifest"] and str(no_manifest) in out["no_manifest"]
    assert "unknown model 'ResNet99'" in out["unknown_model"] and "ResNetSimple" in out["unknown_model"]
    assert "cannot take" in out["image_size"] and "[1, 16, 16]" in out["image_size"]
    assert "patch_size=5" in out["image_size"]
    assert "1 class" in out["classes"] and str(one_class) in out["classes"]
    assert "3 train shard(s) for num_workers=4" in out["per_rank_shards"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()

    # the CLI says the same and exits with status 2
    assert procs[1].returncode == 2, err_cli[-3000:]
    assert "error: model 'ViT' cannot take dataset" in err_cli


def test_task_runner_retries_from_its_checkpoint_and_matches_ray_train(ray_session, data_dir, tmp_path):
    """``runner='task'`` (jobs/train.py --runner task): one worker trained and tested in one Ray task, no Ray
    Train processes. A failure injected in epoch 2 (after its checkpoint is written, before it is reported)
    with max_failures=1: Ray retries the task, which resumes from the epoch-1 checkpoint. The weights equal a
    one-worker Ray Train run's of the same config and seed (same data order, same steps), byte for byte; a
    run without a failure trains in the warm-up's worker; a run continues with the other runner from its
    checkpoints to the same weights, and runner 'task' refuses two workers."""
    from mlflow.tracking import MlflowClient

    kw = dict(num_workers=1, epochs=2, max_failures=1)
    task = run_training(
        _cfg(tmp_path, data_dir, run_name="task", **kw), runner="task",
        hooks=LoopHooks(fail_at_epoch=2, fail_point="before_report"),
    )  # fmt: skip
    assert [h["resumed_from_epoch"] for h in task.history] == [0, 1]
    assert sorted(p.name for p in Path(task.run_dir).glob("checkpoint_*")) == [
        "checkpoint_epoch_00001", "checkpoint_epoch_00002",
    ]  # fmt: skip
    run = MlflowClient(tracking_uri=task.tracking_uri).get_run(task.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["test_evaluated_in"] == "task"
    assert [m.step for m in MlflowClient(tracking_uri=task.tracking_uri).get_metric_history(
        task.run_id, "val_auc_macro")] == [1, 2]  # fmt: skip
    phases = [p["phase"] for p in task.timeline["phases"]]
    assert phases.index("fit start") < phases.index("epoch 2 val end") < phases.index("fit end")
    assert phases.index("fit end") < phases.index("test evaluated")
    test = evaluate_checkpoint(task.best_checkpoint, data_dir, "test", device="cpu")
    assert task.test_metrics["loss"] == pytest.approx(test["loss"], rel=1e-5)

    trainer = run_training(_cfg(tmp_path, data_dir, run_name="trainer", **kw))
    a, b = (load_training_state(Path(r.best_checkpoint))["model"] for r in (task, trainer))
    assert task.best_epoch == trainer.best_epoch and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "runner 'task' trained other weights than Ray Train"

    # without a failure the task runs in the worker process that imported torch etc. while the driver made
    # the MLflow run (warm_task_worker), not in one Ray starts for it
    warm = run_training(_cfg(tmp_path, data_dir, run_name="warm", num_workers=1, epochs=1), runner="task")
    tags = MlflowClient(tracking_uri=warm.tracking_uri).get_run(warm.run_id).data.tags
    assert tags["task_worker"] == "warmed"
    phases = [p["phase"] for p in warm.timeline["phases"]]
    assert phases.index("run prepared") < phases.index("task worker ready") < phases.index("workers_up")

    # one checkpoint layout: the task run continues under Ray Train and the Ray Train run in a task, each from
    # its epoch-2 checkpoint, and both reach the same weights; the best is chosen over both segments
    more = dict(kw, epochs=3)
    continued = {
        name: run_training(_cfg(tmp_path, data_dir, run_name=name, resume=True, **more), runner=other)
        for name, other in (("task", "trainer"), ("trainer", "task"))
    }
    for r in continued.values():
        assert [h["epoch"] for h in r.history] == [1, 2, 3]
        assert [h["resumed_from_epoch"] for h in r.history][-1] == 2
        assert r.best_epoch == max(r.history, key=lambda h: (h["val_auc_macro"], -h["val_loss"]))["epoch"]
    a, b = (load_training_state(latest_checkpoint(r.run_dir))["model"] for r in continued.values())
    assert all(torch.equal(a[k], b[k]) for k in a), "a run continued with the other runner diverged"
    with pytest.raises(ValueError, match="runner 'task' trains one worker, got num_workers=2"):
        run_training(_cfg(tmp_path, data_dir, run_name="two"), runner="task")
