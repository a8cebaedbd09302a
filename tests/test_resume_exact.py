"""Resume is exact: a training stopped after epoch 1 (a failure injected as epoch 2 starts, no automatic
restart: the run fails, as a killed job does) and resumed with ``resume=True`` (jobs/train.py ``--resume``)
ends with the same weights, optimizer state and per-epoch metrics, bit for bit, as the same training run
uninterrupted; for each way a training runs (``runner`` task and trainer) and for online simulation, whose
resumed run renders the same images from epoch 2 on. Real Ray runtime, HDF5 data, SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deeplense_ray.config import TrainConfig
from deeplense_ray.train import LoopHooks, run_training
from deeplense_ray.train.checkpoint import load_training_state
from deeplense_ray.train.online import online_batches, resolve_sim_preset, steps_per_epoch
from deeplense_ray.train.seeding import input_digest

pytestmark = pytest.mark.slow

PRESET, SIM_OVERRIDES = "deeplense_model_i", {"num_pix": 16}
#: Report keys that measure time (or the attempt), not the training: the only ones allowed to differ.
CLOCK_KEYS = {
    "images_per_s", "train_seconds", "data_wait_frac", "first_batch_s", "first_step_s", "compile_s",
    "t_epoch_start", "setup_s", "val_seconds", "bn_recal_s", "resumed_from_epoch",
}  # fmt: skip


def _cfg(tmp: Path, data: Path | None, **kw) -> TrainConfig:
    base = dict(
        model="ResNetSimple", model_overrides={"width": 8}, epochs=3, batch_size=8, lr=3e-3, num_workers=1,
        cpus_per_worker=1, seed=7, shuffle_buffer=16, tracking_uri=f"sqlite:///{tmp}/mlflow.db",
        storage_path=str(tmp / "ray"), experiment="resume-exact", max_failures=0,
    )  # fmt: skip
    if data is None:
        base.update(simulate=PRESET, sim_overrides=SIM_OVERRIDES, images_per_epoch=32, val_size=12,
                    test_size=9, sim_chunk_batches=2)  # fmt: skip
    else:
        base["data_dir"] = str(data)
    base.update(kw)
    return TrainConfig(**base)


def _latest_state(run_dir: str) -> dict:
    states = [load_training_state(p) for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()]
    return max(states, key=lambda s: int(s["epoch"]))


def _training_numbers(history) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in CLOCK_KEYS} for h in history]


def _assert_same_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("runner, online", [("task", False), ("trainer", False), ("task", True)])
def test_stopped_and_resumed_run_equals_the_uninterrupted_run(tiny_dataset, tmp_path, runner, online):
    data = None if online else tiny_dataset
    rec_whole, rec_resumed = tmp_path / "inputs-whole", tmp_path / "inputs-resumed"
    record = LoopHooks(record_inputs=str(rec_whole))
    whole = run_training(_cfg(tmp_path, data, run_name="whole"), runner=runner, hooks=record)
    stop = LoopHooks(fail_at_epoch=2, fail_point="start", record_inputs=str(rec_resumed))
    with pytest.raises(Exception, match="injected failure at epoch 2, start"):
        run_training(_cfg(tmp_path, data, run_name="stopped"), runner=runner, hooks=stop)
    resumed = run_training(
        _cfg(tmp_path, data, run_name="stopped", resume=True), runner=runner,
        hooks=LoopHooks(record_inputs=str(rec_resumed)),
    )  # fmt: skip
    assert [h["resumed_from_epoch"] for h in resumed.history] == [0, 1, 1]  # epoch 1: the stopped run's
    assert _training_numbers(resumed.history) == _training_numbers(whole.history)
    assert resumed.test_metrics == whole.test_metrics and resumed.best_epoch == whole.best_epoch
    a, b = _latest_state(whole.run_dir), _latest_state(resumed.run_dir)
    assert a["epoch"] == b["epoch"] == 3
    for key in ("model", "optimizer", "scheduler"):
        _assert_same_tensors(a[key], b[key], key)

    # the same training inputs, epoch by epoch (the stopped run's epoch 1, then the resumed run's 2 and 3)
    for epoch in (1, 2, 3):
        seen = json.loads((rec_resumed / f"train_e{epoch}_r0.json").read_text())
        assert seen == json.loads((rec_whole / f"train_e{epoch}_r0.json").read_text()), epoch
        if online:  # and they are the stream of (seed, epoch, rank 0), rendered again here
            preset = resolve_sim_preset(PRESET, SIM_OVERRIDES)
            again = online_batches(
                preset, seed=7, epoch=epoch, rank=0, num_batches=steps_per_epoch(32, 8), batch_size=8,
                device=torch.device("cpu"), chunk_batches=2, prefetch=False,
            )  # fmt: skip
            assert seen == [input_digest(x["image"], x["label"]) for x in again], epoch
