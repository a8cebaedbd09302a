"""Hyperparameter search on the real Ray runtime (CPU), real HDF5 data, real MLflow store.

Tiny data (model_ii at 32x32 pixels, 20 images per class), a tiny ViT (dim 16, depth 1), 1-2 epochs. One
dataset for the module, simulated by the search's own no-``--data`` path (``ensure_dataset``) and reused by
every search here. The ASHA case is pinned: its 4 trials (2 at a time) are ``points_to_evaluate`` with
lr = [1e-3, 1e-3, 10, 1e30], so the bad lr=10 trial starts after a good one finished and reaches the epoch-1
rung behind it (ASHA must stop it there), and the lr=1e30 trial's weights overflow to NaN in its first epoch
(it must end as "diverged at epoch 1" with the worst metric, not crash).
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from deeplense_ray.tune import SearchSetupError, TuneSettings, run_search
from deeplense_ray.tune.dataset import dataset_dir_for, ensure_dataset
from deeplense_ray.tune.mlflow_runs import (
    LOST_OUTCOME,
    STARTUP_KEY,
    TAG_OUTCOME,
    TAG_PARENT,
    TAG_PROCESS,
    TAG_ROLE,
    TAG_TRIAL_ID,
    WORKERS_UP_KEY,
)
from deeplense_ray.tune.results import trial_statuses

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
#: The auto-simulated dataset of every search here (jobs/tune.py: --num-per-class 20 --preset-override ...).
SIM = {"num_pix": 32, "delta_pix": 0.2, "supersampling": 1}
NUM_PER_CLASS = 20


@pytest.fixture(scope="module")
def search_root(tmp_path_factory) -> Path:
    """storage_path shared by the module's searches (so they share the simulated dataset under it)."""
    return tmp_path_factory.mktemp("tune_searches")


@pytest.fixture(scope="module")
def tiny_data(ray_session, search_root) -> str:
    """The dataset a search without data_dir simulates into ``<storage_path>/datasets/`` (built here once)."""
    s = TuneSettings(
        model="ViT", num_per_class=NUM_PER_CLASS, storage_path=str(search_root), preset="model_ii",
        preset_overrides=dict(SIM)
    ).validate()
    return ensure_dataset(s, str(search_root))


def _settings(tmp_path: Path, root: Path, **kw) -> TuneSettings:
    base = dict(
        model="ViT",
        num_samples=4,
        data_dir=None,  # the simulated dataset under ``root`` (built once by the tiny_data fixture)
        num_per_class=NUM_PER_CLASS,
        preset="model_ii", preset_overrides=dict(SIM),
        max_epochs=2,
        grace_period=1,
        reduction_factor=2,
        max_concurrent=2,
        metric="val_loss",
        seed=6,
        experiment="tune-test",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        storage_path=str(root),
        space={**TINY_VIT, "lr": tune.choice([1e-3, 10.0, 1e30])},
        train_overrides=dict(TRAIN),
    )
    base.update(kw)
    return TuneSettings(**base)


def _wait_cpus_free(ray, before: float, timeout: float = 60.0) -> float:
    """Free CPUs once they are back to ``before`` (a leaked placement group keeps them reserved)."""
    t0 = time.time()
    free = ray.available_resources().get("CPU", 0.0)
    while time.time() - t0 < timeout and free < before - 1e-6:
        time.sleep(0.25)
        free = ray.available_resources().get("CPU", 0.0)
    return free


def test_without_data_a_small_dataset_is_simulated_once_then_reused(tiny_data, search_root):
    from deeplense_ray.data import load_manifest, verify_dataset

    s = TuneSettings(
        model="ViT", num_per_class=NUM_PER_CLASS, storage_path=str(search_root), preset="model_ii",
        preset_overrides=dict(SIM)
    ).validate()
    assert tiny_data == dataset_dir_for(s, str(search_root))
    assert tiny_data.startswith(str(search_root / "datasets"))
    assert verify_dataset(tiny_data) == [] and load_manifest(tiny_data)["image_shape"] == [1, 32, 32]
    stamp = os.path.getmtime(os.path.join(tiny_data, "manifest.json"))
    assert ensure_dataset(s, str(search_root)) == tiny_data  # same config: reused, not rebuilt
    assert os.path.getmtime(os.path.join(tiny_data, "manifest.json")) == stamp
    other = TuneSettings(**{**s.__dict__, "num_per_class": NUM_PER_CLASS + 1})
    assert dataset_dir_for(other, str(search_root)) != tiny_data


def test_a_search_waits_for_another_one_building_the_same_dataset(tiny_data, search_root):
    """Two searches without data_dir and with one dataset config share its directory: while one builds it
    (holding ``<dir>.lock``), the other waits and touches none of its files, then reuses the dataset."""
    import fcntl
    import threading

    from deeplense_ray.data import verify_dataset

    s = TuneSettings(
        model="ViT", num_per_class=NUM_PER_CLASS, storage_path=str(search_root), preset="model_ii",
        preset_overrides=dict(SIM)
    ).validate()
    out = Path(tiny_data)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    in_flight = out / "train" / ".shard-00000.h5.tmp-other-search"  # a write of the search building it
    got: list[str] = []
    with open(f"{out}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other search is building the dataset
        in_flight.write_bytes(b"half a shard")
        (out / "manifest.json").rename(out / "manifest.json.aside")  # ... which has no manifest yet
        second = threading.Thread(target=lambda: got.append(ensure_dataset(s, str(search_root))))
        second.start()
        second.join(3.0)
        assert second.is_alive() and not got, "the second search did not wait for the first"
        assert in_flight.read_bytes() == b"half a shard"
        in_flight.unlink()  # the other search finishes its dataset and releases the lock
        (out / "manifest.json.aside").rename(out / "manifest.json")
    second.join(60)
    assert got == [tiny_data] and verify_dataset(out) == []
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_asha_stops_the_bad_trial_a_diverged_trial_ends_and_mlflow_nests_trials(
    ray_session, tiny_data, search_root, tmp_path, capsys
):
    points = [{"lr": lr} for lr in (1e-3, 1e-3, 10.0, 1e30)]
    # one checkpoint kept per trial (plus the latest): the best by the searched metric, val_loss
    settings = _settings(
        tmp_path,
        search_root,
        name="asha",
        points_to_evaluate=points,
        train_overrides={**TRAIN, "num_to_keep": 1},
    )
    stamp = os.path.getmtime(os.path.join(tiny_data, "manifest.json"))
    cpus_free = _wait_cpus_free(ray_session, ray_session.cluster_resources()["CPU"], timeout=30)
    res = run_search(settings)
    assert res.name == "asha" and res.output_dir == str(search_root / "asha")

    by_lr = {}
    for t in res.trials:
        by_lr.setdefault(t.config["lr"], []).append(t)
    assert sorted(by_lr) == [1e-3, 10.0, 1e30] and len(by_lr[1e-3]) == 2
    bad = by_lr[10.0][0]
    assert bad.outcome == "stopped by ASHA at epoch 1" and bad.epochs_run == 1
    nan = by_lr[1e30][0]  # a diverged trial: a result (the worst), not a crash
    assert nan.outcome == "diverged at epoch 1" and nan.epochs_run == 1
    assert any(t.outcome == "completed" and t.epochs_run == 2 for t in by_lr[1e-3])
    assert res.best_config["hparams"]["lr"] == 1e-3
    assert res.best_trial_id not in (bad.trial_id, nan.trial_id)
    # no data_dir: the search used the simulated dataset under its storage path, without rebuilding it
    assert res.best_config["train_config"]["data_dir"] == tiny_data
    assert os.path.getmtime(os.path.join(tiny_data, "manifest.json")) == stamp

    # on disk
    out = Path(res.output_dir)
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["trial_id"] == res.best_trial_id and best["train_config"]["model_overrides"]["dim"] == 16
    assert Path(best["best_checkpoint"]).is_dir()
    assert best["checkpoint_epoch"] == best["best_epoch"]  # test metrics of the epoch the search names
    assert (out / "best_checkpoint.txt").read_text().strip() == best["best_checkpoint"]
    summary = (out / "summary.txt").read_text()
    assert "stopped by ASHA at epoch 1" in summary and "diverged at epoch 1" in summary
    assert "trial start-up (trial started -> first training batch): first trial" in summary
    # each trial names the process it trained in; trials in a reused process are told apart
    assert "that started their process: median" in summary
    # where the trials' seconds went (checked against the parent run's numbers below)
    m = re.search(r"trial time \(summed over 4 trials\): (\d+) s = start-up (\d+) s \+ training (\d+) s \+ "
                  r"validation (\d+) s \+ other (\d+) s", summary)  # fmt: skip
    assert m, summary

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
        # the trial's start-up: Tune start -> training workers up -> first batch
        assert 0 < c.data.metrics[WORKERS_UP_KEY] < c.data.metrics[STARTUP_KEY] < 600
        assert c.data.tags[TAG_PROCESS].split(":")[1].isdigit()
        if lr == 10.0:
            assert c.data.tags[TAG_OUTCOME] == "stopped by ASHA at epoch 1" and c.info.status == "KILLED"
            assert [m.step for m in hist] == [1]
        elif lr == 1e30:
            assert c.data.tags[TAG_OUTCOME] == "diverged at epoch 1" and c.info.status == "KILLED"
            assert [m.step for m in hist] == [1] and hist[0].value != hist[0].value  # logged as NaN
        elif c.data.tags[TAG_OUTCOME] == "completed":
            assert c.info.status == "FINISHED" and sorted(m.step for m in hist) == [1, 2]
    pm = parent.data.metrics
    assert pm["best_val_loss"] == pytest.approx(res.best_metric)
    assert {"trial_startup_first_s", "trial_startup_later_median_s", "trial_startup_later_max_s"} <= set(pm)
    times = {k: pm[f"trial_time_{k}_s"] for k in ("total", "startup", "train", "val", "other")}
    assert times["train"] > 0 and times["val"] > 0
    # the summary prints these numbers; "other" is the rest of the trials' wall, never negative (no bound on
    # the seconds themselves: the clocks of a loaded machine decide them)
    assert [f"{v:.0f}" for v in times.values()] == list(m.groups()), (times, summary)
    rest = times["total"] - times["startup"] - times["train"] - times["val"]
    assert times["other"] == pytest.approx(max(0.0, rest), abs=1e-6)
    assert {"test_accuracy", "test_auc_macro", "test_loss"} <= set(pm)
    assert pm["test_accuracy"] == pytest.approx(res.test_metrics["accuracy"])
    assert parent.data.params["best.lr"] == "0.001"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "val_curves.png", "summary.txt"} <= arts

    # the stopped trials' reserved CPUs came back (no leaked placement group)
    assert _wait_cpus_free(ray_session, cpus_free) == pytest.approx(cpus_free)

    # the console: a line per trial start, per epoch and per trial end, plain text; the same best trial and
    # epoch in the console, the summary, the parent run and the best trial's child run
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.startswith("[trial ")]
    # (the raylet's own warnings, e.g. "N worker processes started" on a loaded machine, reach every driver)
    ours = [ln for ln in text.splitlines() if "(raylet)" not in ln]
    assert not any("\x1b" in ln for ln in ours) and len(ours) < 40, text
    assert sum(" start (" in ln for ln in lines) == 4 and sum(" end (" in ln for ln in lines) == 4
    epoch_lines = [ln for ln in lines if re.match(r"\[trial \w+\] epoch \d/2  loss ", ln)]
    assert len(epoch_lines) == sum(t.epochs_run for t in res.trials)
    assert sum("s after the trial started)" in ln for ln in epoch_lines) == 4  # each trial's first epoch
    best_end = next(ln for ln in lines if ln.startswith(f"[trial {res.best_trial_id}] end"))
    assert f"best val_loss {res.best_metric:.4f} at epoch {res.best_epoch}," in best_end
    assert f"best so far: trial {res.best_trial_id} " in next(ln for ln in lines if " end (4/4)" in ln)
    assert pm["best_epoch"] == res.best_epoch and parent.data.tags["tune.best_trial_id"] == res.best_trial_id
    for c in children:  # every trial: its curves and its best epoch by the search metric
        t = next(t for t in res.trials if t.trial_id == c.data.tags[TAG_TRIAL_ID])
        assert "curves.png" in {a.path for a in client.list_artifacts(c.info.run_id)}
        assert client.get_run(c.info.run_id).data.metrics["best_epoch"] == t.best_epoch
    # the parent run: the best trial's model and its test-split plots; the test AUC with its interval
    assert {"roc_test.png", "confusion_test.png", "curves.png", "metrics_test.json"} <= arts
    assert parent.data.tags["tune.best_model_uri"] == res.model_uri
    import torch

    from deeplense_ray.infer import load_classifier

    model = load_classifier(res.model_uri, settings.tracking_uri).module
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)
    lo, hi = res.test_metrics["auc_macro_ci"]
    assert lo <= res.test_metrics["auc_macro"] <= hi
    assert pm["test_auc_macro_ci_low"] == pytest.approx(lo)
    assert ("warning.chance" in parent.data.tags) == (lo <= 0.5 <= hi)
    # disk: only the best trial keeps a checkpoint (its best), and the search reports what it uses
    trainers = out / "trainers"
    kept = {d.name: sum(c.is_dir() for c in d.glob("checkpoint_*")) for d in trainers.iterdir() if d.is_dir()}
    assert {k: v for k, v in kept.items() if v} == {res.best_trial_id: 1}
    assert res.disk_bytes == pm["disk_bytes"] > 0


@pytest.mark.parametrize(("runner", "samples"), [("trainer", 2), ("actor", 6)])
def test_interrupted_search_resumes_without_redoing_finished_trials(
    ray_session, tiny_data, search_root, tmp_path, runner, samples
):
    """jobs/tune.py (no --data) as a second driver on this cluster, SIGKILLed once a trial has finished,
    then resumed: trials of 1 epoch, one at a time (trials in their own reused actor take about a second each
    here: more of them, so that the search is still running when it is killed)."""
    # keep_checkpoints="trials": each finished trial keeps its checkpoint, compared before/after the resume
    kw = dict(name=f"resumable-{runner}", num_samples=samples, max_epochs=1, max_concurrent=1, seed=2)
    kw["keep_checkpoints"], kw["trial_runner"] = "trials", runner
    kw["space"] = {**TINY_VIT, "lr": tune.choice([1e-3, 2e-3])}
    settings = _settings(tmp_path, search_root, **kw)
    argv = [
        sys.executable,
        str(ROOT / "jobs" / "tune.py"),
        "--model",
        "ViT",
        "--num_samples",
        str(samples),
        "--trial-runner",
        runner,
        "--preset",
        "model_ii",
        "--num-per-class",
        str(NUM_PER_CLASS),
        *[a for k, v in SIM.items() for a in ("--preset-override", f"{k}={v}")],
        "--max-epochs",
        "1",
        "--grace-period",
        "1",
        "--max-concurrent",
        "1",
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
        kw["name"],
        "--train-override",
        "precision=fp32",
        "--train-override",
        "augment=false",
        "--choice",
        "lr=1e-3,2e-3",
        *[a for k, v in TINY_VIT.items() for a in ("--fix", f"{k}={v}")],
    ]
    # the search state saved at every step, so that a finished trial is on record before the next one ends
    env = dict(os.environ, TUNE_GLOBAL_CHECKPOINT_S="0")
    # the suite's runtime listens on this machine's routable address, with auth disabled: accepted here
    env["RAY_ADDRESS"] = ray_session.get_runtime_context().gcs_address
    env["DEEPLENSE_ALLOW_INSECURE_RAY"] = "1"
    cpus_free = _wait_cpus_free(ray_session, ray_session.cluster_resources()["CPU"], timeout=30)
    out_dir = Path(settings.storage_path) / kw["name"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    done_before: set[str] = set()
    try:
        t0 = time.time()
        while time.time() - t0 < 600 and proc.poll() is None:
            done_before = {t for t, s in trial_statuses(str(out_dir)).items() if s == "TERMINATED"}
            if done_before:
                break
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    first_log = (tmp_path / "first.log").read_text()
    assert done_before, first_log[-3000:]
    # what the CLI printed: our lines, no Ray config boxes, no worker progress bars, no escape codes
    assert "[trial " in first_log and "\x1b" not in first_log and "│" not in first_log, first_log[-3000:]
    assert len(first_log.splitlines()) < 30, first_log[-3000:]
    assert len(trial_statuses(str(out_dir))) < samples or not all(
        s == "TERMINATED" for s in trial_statuses(str(out_dir)).values()
    ), "the search finished before it was interrupted"
    state = yaml.safe_load((out_dir / "search_state.json").read_text())
    assert state["data_dir"] == tiny_data  # the CLI without --data found the simulated dataset
    finished = sorted(done_before)
    ckpts_before = {t: sorted(os.listdir(out_dir / "trainers" / t)) for t in finished}
    # as a kill during Tune's copy of its state leaves it (seen here): the resume drops it and goes on
    states = sorted(out_dir.glob("callback-states-*.pkl"))
    assert states, sorted(p.name for p in out_dir.iterdir())
    states[-1].write_bytes(states[-1].read_bytes()[:5])

    res = run_search(_settings(tmp_path, search_root, **kw, resume=True))
    assert len(res.trials) == samples
    assert set(finished) <= {t.trial_id for t in res.trials}
    for t in finished:  # not run again: same checkpoints as before the interruption
        assert sorted(os.listdir(out_dir / "trainers" / t)) == ckpts_before[t]
    assert all(s == "TERMINATED" for s in trial_statuses(str(out_dir)).values())
    client = MlflowClient(settings.tracking_uri)
    children = client.search_runs(
        [res.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{res.parent_run_id}'", max_results=100
    )
    # a trial started just before the kill but not yet in the saved search state is not resumed (Tune samples
    # a new one): its child run is closed as lost, not left RUNNING
    ids = {t.trial_id for t in res.trials}
    assert ids <= {c.data.tags[TAG_TRIAL_ID] for c in children}
    for c in children:
        if c.data.tags[TAG_TRIAL_ID] in ids:
            assert c.data.tags.get(TAG_OUTCOME) == "completed" and c.info.status == "FINISHED"
        else:
            assert c.data.tags.get(TAG_OUTCOME) == LOST_OUTCOME and c.info.status == "KILLED"
    assert client.get_run(res.parent_run_id).info.status == "FINISHED"
    # Killed trials' actors and tasks are reaped by Ray through a chain of owners (driver -> trial ->
    # Train controller -> workers, dataset coordinator -> read tasks); on a loaded 2-core box that has taken
    # over a minute. A leak (e.g. a placement group never removed) keeps the CPU for good.
    free = _wait_cpus_free(ray_session, cpus_free, timeout=180)
    assert free == pytest.approx(cpus_free), _holders()


def _holders() -> str:
    """What is alive in the Ray runtime (for a failed resource-leak check)."""
    try:
        from ray.util.state import list_actors, list_placement_groups, list_tasks
    except ImportError as exc:  # the state API needs ray[default]
        return f"(state API unavailable: {exc})"
    actors = [
        (a.class_name, a.state, a.pid, a.job_id, a.actor_id[:8])
        for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
    ]
    tasks = [(t.name, t.state, t.job_id) for t in list_tasks(filters=[("state", "=", "RUNNING")])]
    groups = [
        (g.name, g.state, g.creator_job_id, g.is_detached, g.bundles)
        for g in list_placement_groups(filters=[("state", "=", "CREATED")], detail=True)
    ]
    return f"alive actors {actors}; running tasks {tasks}; placement groups {groups}"


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
        run_search(_settings(tmp_path, tmp_path / "runs", data_dir=tiny_data, name="gpu", gpus_per_trial=1.0))
    assert not (tmp_path / "runs" / "gpu").exists()


def test_a_local_run_restored_after_its_last_epoch_reports_that_epoch_again(tiny_data, tmp_path):
    """A trial killed after its last epoch's checkpoint but before Tune recorded it as finished is restarted
    on resume with nothing left to train: it reports that epoch again (a trial ending without the search
    metric fails the whole search; CI caught this on a resumed search)."""
    from deeplense_ray.config import TrainConfig
    from deeplense_ray.train.local import LocalRunSession, checkpoint_name, fit_here, local_loop_config

    hp = {k: v for k, v in TINY_VIT.items() if k not in ("lr", "weight_decay", "batch_size")}
    cfg = TrainConfig(model="ViT", data_dir=tiny_data, epochs=1, batch_size=16, model_overrides=hp, **TRAIN)
    loop = local_loop_config(cfg.resolved(), cfg.resolved().validate())
    run = tmp_path / "run"
    first = fit_here(LocalRunSession(run, metric="val_loss", mode="min", num_to_keep=1), loop)
    assert [p.name for p in run.iterdir()] == [checkpoint_name(1)]
    again = LocalRunSession(run, metric="val_loss", mode="min", num_to_keep=1)
    fit_here(again, loop)
    assert again.last_metrics["epoch"] == 1
    assert again.last_metrics["val_loss"] == pytest.approx(first.metrics["val_loss"])
    assert [p.name for p in run.iterdir()] == [checkpoint_name(1)]  # nothing trained or written again
