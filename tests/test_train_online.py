"""Online simulation (train/online.py): streams reproducible and disjoint, val/test fixed, a 2-worker Ray
Train run rendering its own images (real Ray, renderer and SQLite MLflow store), errors before Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deeplense_ray.config import TrainConfig
from deeplense_ray.train.online import eval_batches, eval_chunks, online_batches, resolve_sim_preset

REPO = Path(__file__).resolve().parents[1]
PRESET = "deeplense_model_i"  # cheapest preset on CPU
OVERRIDES = {"num_pix": 16}
CPU = torch.device("cpu")


def _pre():
    return resolve_sim_preset(PRESET, OVERRIDES)


def _stream(*, epoch=1, rank=0, seed=3, prefetch=True, num_batches=3, chunk_batches=2, materialize=True):
    it = online_batches(
        _pre(), seed=seed, epoch=epoch, rank=rank, num_batches=num_batches, batch_size=8, device=CPU,
        chunk_batches=chunk_batches, prefetch=prefetch,
    )  # fmt: skip
    return list(it) if materialize else it


def _rows(batches) -> set[bytes]:
    return {img.numpy().tobytes() for b in batches for img in b["image"]}


def test_same_seed_same_batches_with_or_without_prefetch():
    a, b = _stream(prefetch=True), _stream(prefetch=False)
    assert [tuple(x["image"].shape) for x in a] == [(8, 1, 16, 16)] * 3
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert not torch.equal(a[0]["image"], _stream(seed=4)[0]["image"])
    # shuffled within a chunk: the labels of a batch are not the renderer's 0, 1, 2, 0, ... order
    assert any(x["label"].tolist() != [i % 3 for i in range(8)] for x in a)
    assert a[0]["image"].requires_grad is False and not a[0]["image"].is_inference()


def test_rank_and_epoch_streams_disjoint():
    r0, r1, e2 = _rows(_stream(rank=0)), _rows(_stream(rank=1)), _rows(_stream(epoch=2))
    assert len(r0) == len(r1) == len(e2) == 24  # no image repeats within a stream
    assert not r0 & r1 and not r0 & e2 and not r1 & e2


def test_val_test_fixed_and_disjoint_from_training():
    assert eval_chunks(1100) == [512, 512, 76]
    size = 20
    val = eval_batches(_pre(), "val", seed=3, size=size, positions=[0], device=CPU, batch_size=8)
    again = eval_batches(_pre(), "val", seed=3, size=size, positions=[0], device=CPU, batch_size=8)
    test = eval_batches(_pre(), "test", seed=3, size=size, positions=[0], device=CPU, batch_size=8)
    assert [len(b["label"]) for b in val[0]] == [8, 8, 4]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(val[0], again[0], strict=True))
    v, t = _rows(val[0]), _rows(test[0])
    train = _rows(_stream(epoch=1)) | _rows(_stream(epoch=2)) | _rows(_stream(rank=1))
    assert len(v) == len(t) == size and not v & t and not v & train and not t & train
    with pytest.raises(ValueError, match="'train'"):
        eval_batches(_pre(), "train", seed=3, size=size, positions=[0], device=CPU, batch_size=8)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"simulate": "model_zz"}, "unknown preset 'model_zz'.*model_ii"),
        ({"sim_overrides": {"num_pix": -3}}, "num_pix"),
        ({"sim_overrides": {"no_such_field": 1}}, "no_such_field"),
        ({"images_per_epoch": 4.5}, "images_per_epoch must be an integer >= 1, got 4.5"),
        ({"val_size": 0}, "val_size must be an integer >= 1, got 0"),
    ],
)
def test_bad_preset_or_override_is_a_clear_error(kw, match):
    base = dict(model="ResNetSimple", simulate=PRESET, sim_overrides=OVERRIDES, batch_size=8)
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**base, **kw}).validate()


def test_job_rejects_a_wrong_preset_before_ray(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs/train.py"), "--model", "ResNetSimple", "--simulate", "model_zz"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "unknown preset 'model_zz'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ray_results").exists()


@pytest.mark.slow
def test_two_worker_online_run(ray_session, tmp_path):
    """2 ranks on CPU (gloo) render their own training images each epoch; the fixed val/test sets are
    evaluated once per epoch / at the end; MLflow records the preset, overrides, seeds and images seen. A
    failure injected as epoch 2 starts restarts the workers from epoch 1's checkpoint (Ray FailureConfig):
    the online stream resumes at epoch 2."""
    from mlflow.tracking import MlflowClient

    from deeplense_ray.train import LoopHooks, run_training

    cfg = TrainConfig(
        model="ResNetSimple",
        model_overrides={"width": 8},
        simulate=PRESET,
        sim_overrides=OVERRIDES,
        images_per_epoch=48,
        val_size=24,
        test_size=18,
        sim_chunk_batches=2,
        epochs=2,
        max_failures=1,
        batch_size=16,
        lr=3e-3,
        num_workers=2,
        cpus_per_worker=1,
        seed=11,
        storage_path=str(tmp_path / "ray"),
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="online",
    )
    result = run_training(cfg, hooks=LoopHooks(fail_at_epoch=2, fail_point="start"))
    assert [int(h["epoch"]) for h in result.history] == [1, 2]
    assert [h["resumed_from_epoch"] for h in result.history] == [0, 1]
    assert [h["images_seen"] for h in result.history] == [48, 96]
    assert all(h["val_n"] == 24 for h in result.history)
    assert result.test_metrics["n"] == 18
    run = MlflowClient(tracking_uri=result.tracking_uri).get_run(result.run_id)
    params = run.data.params
    assert params["simulation.preset"] == PRESET
    assert params["simulation.overrides.num_pix"] == "16" and params["config.simulate"] == PRESET
    assert params["simulation.seed"] == "11" and "epoch, rank, chunk" in params["simulation.train_seeds"]
    assert params["simulation.parameter_draws"] == "cpu"  # CPU workers: simulate(draws="cpu")
    assert run.data.metrics["images_seen"] == 96
    assert run.info.status == "FINISHED"


def test_tune_rejects_a_wrong_override_before_ray(tmp_path):
    """jobs/tune.py --simulate: a bad preset override fails at the settings, before Ray starts."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs/tune.py"), "--model", "ResNetSimple", "--simulate", PRESET,
         "--preset-override", "num_pix=-3", "--storage-path", str(tmp_path / "t")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "num_pix" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_tune_trials_train_online(ray_session, tmp_path):
    """jobs/tune.py --simulate: every trial renders its training images (no dataset written); the best
    checkpoint is tested on the fixed simulated test set."""
    from ray import tune

    from deeplense_ray.tune import TuneSettings, run_search

    settings = TuneSettings(
        model="ResNetSimple",
        num_samples=2,
        simulate=True,
        preset=PRESET,
        preset_overrides=dict(OVERRIDES),
        max_epochs=1,
        max_concurrent=2,
        scheduler="fifo",
        seed=2,
        experiment="online-tune",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        storage_path=str(tmp_path / "searches"),
        space={"width": 8, "batch_size": 16, "weight_decay": 1e-4, "lr": tune.choice([1e-3, 3e-3])},
        train_overrides={"images_per_epoch": 32, "val_size": 24, "test_size": 12, "precision": "fp32"},
    )
    res = run_search(settings)
    assert len(res.trials) == 2 and all(t.epochs_run == 1 for t in res.trials)
    assert res.test_metrics["n"] == 12
    assert res.best_config["train_config"]["simulate"] == PRESET
    assert not (tmp_path / "searches" / "datasets").exists()


def test_stream_stops_cleanly_and_reports_a_render_error():
    import threading

    it = iter(_stream(num_batches=6, chunk_batches=1, materialize=False))
    next(it)
    it.close()  # the consumer stops early: the producer thread ends instead of waiting on a full queue
    assert not [t for t in threading.enumerate() if t.name.startswith("online-sim")]
    bad = online_batches("no_such_preset", seed=1, epoch=3, rank=1, num_batches=1, batch_size=8, device=CPU)
    with pytest.raises(RuntimeError, match="online simulation failed on rank 1, epoch 3.*no_such_preset"):
        next(bad)


def _job(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_job_online", REPO / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_job_flags_reach_the_config(tmp_path):
    """--sim-config (YAML) under --preset-override (alias --sim-override); a YAML naming another preset,
    or sim flags without --simulate, are errors; jobs/tune.py puts the same preset and sizes into its
    settings."""
    yml = tmp_path / "sim.yaml"
    yml.write_text(f"preset: {PRESET}\nnum_pix: 24\nsigma_bkg: 1e-2\n")
    train = _job("train")
    argv = ["--model", "ResNetSimple", "--simulate", PRESET, "--sim-config", str(yml), "--preset-override",
            "num_pix=16", "--images-per-epoch", "64", "--val-size", "10", "--test-size", "12"]  # fmt: skip
    cfg = train.config_from_args(train.build_parser().parse_args(argv))
    assert cfg.simulate == PRESET and cfg.data_dir is None
    assert cfg.sim_overrides == {"num_pix": 16, "sigma_bkg": 0.01}
    assert (cfg.images_per_epoch, cfg.val_size, cfg.test_size) == (64, 10, 12)
    with pytest.raises(ValueError, match="differs from 'preset: deeplense_model_i'"):
        train.config_from_args(train.build_parser().parse_args(argv[:3] + ["model_ii"] + argv[4:]))
    with pytest.raises(ValueError, match="--data DIR.*or --simulate PRESET"):
        train.config_from_args(train.build_parser().parse_args(["--model", "ViT"]))
    with pytest.raises(ValueError, match="need --simulate"):
        train.config_from_args(train.build_parser().parse_args(["--model", "ViT", "--sim-override", "a=1"]))
    tune = _job("tune")
    s = tune.settings_from_args(tune.build_parser().parse_args(argv[:2] + argv[2:6] + ["--val-size", "10"]))
    assert s.simulate and s.preset == PRESET and s.preset_overrides == {"num_pix": 24, "sigma_bkg": 0.01}
    assert s.train_overrides == {"val_size": 10}


@pytest.mark.gpu
def test_cuda_stream_same_bytes_with_the_side_stream():
    """On CUDA the prefetched chunks (rendered on a side stream by a background thread) are the bytes of the
    serial path, and plain tensors the training step can take."""
    dev = torch.device("cuda")
    kw = dict(seed=3, epoch=1, rank=0, num_batches=6, batch_size=64, device=dev, chunk_batches=2)
    a = list(online_batches(_pre(), prefetch=True, **kw))
    b = list(online_batches(_pre(), prefetch=False, **kw))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert a[0]["image"].device.type == "cuda" and not a[0]["image"].is_inference()


@pytest.mark.slow
def test_val_test_from_a_dataset(ray_session, tmp_path):
    """--simulate with --data: val/test rows are the dataset's, which must match the preset's shape and
    classes; the run's hash covers the dataset's."""
    from deeplense_ray.data import DatasetConfig, build_dataset

    data = tmp_path / "d"
    dcfg = DatasetConfig(preset=PRESET, preset_overrides=OVERRIDES, num_per_class=10, shard_size=8, seed=1)
    build_dataset(dcfg, data, progress=False)
    base = dict(model="ResNetSimple", simulate=PRESET, sim_overrides=OVERRIDES, data_dir=str(data))
    info = TrainConfig(**base).validate()
    online = TrainConfig(**{**base, "data_dir": None}).validate()
    assert info.split_rows["train"] == 8192 and info.data_dir == str(data.resolve())
    assert 0 < info.split_rows["val"] < 30 and info.split_rows["val"] != online.split_rows["val"]
    assert info.manifest_hash != online.manifest_hash and info.sim_preset == online.sim_preset
    with pytest.raises(ValueError, match=r"does not match preset 'deeplense_model_i'.*\[1, 24, 24\]"):
        TrainConfig(**{**base, "sim_overrides": {"num_pix": 24}}).validate()


def test_device_draws_are_part_of_the_online_runs_hash():
    """A GPU run draws parameters on the device (another stream): resuming it on CPU workers is refused."""
    from deeplense_ray.config import TrainConfig

    kw = dict(model="ResNetSimple", simulate=PRESET, sim_overrides={"num_pix": 16})
    cpu, gpu = (TrainConfig(**kw, gpus_per_worker=g).simulated_info() for g in (0, 1))
    assert cpu.manifest_hash != gpu.manifest_hash
    assert TrainConfig(**kw, gpus_per_worker=0).simulated_info().manifest_hash == cpu.manifest_hash
