"""The loop's typed config (train/worker_config.py): one dict form at the Ray boundary, no hidden keys, and
the tests' hooks outside it. No Ray: the configs of online runs (their 'dataset' is the preset)."""

from __future__ import annotations

import dataclasses

import pytest

from deeplense_ray.config import TrainConfig
from deeplense_ray.train.modules import arch_of
from deeplense_ray.train.trainer import loop_config
from deeplense_ray.train.worker_config import LoopConfig, LoopHooks, MlflowTarget

ONLINE = dict(
    model="ResNetSimple", model_overrides={"width": 4}, simulate="model_ii", sim_overrides={"num_pix": 16},
    images_per_epoch=32, val_size=8, test_size=8, epochs=1, batch_size=8,
)  # fmt: skip


def _loop_dict(**kw) -> dict:
    cfg = TrainConfig(**{**ONLINE, **kw}).resolved()
    return loop_config(cfg, cfg.validate())


@pytest.mark.parametrize("task", ["classification", "inference"])
def test_the_dict_round_trips_and_the_fields_are_typed(task):
    kw = {"task": "inference", "targets": ("theta_E",)} if task == "inference" else {}
    d = _loop_dict(**kw) | {"mlflow": {"tracking_uri": "sqlite:///x.db", "run_id": "abc"}}
    loop = LoopConfig.from_dict(d)
    out = loop.to_dict()  # the plain dict Ray Train and Tune pass: the same values, and every default
    assert {k: out[k] for k in d} == d and set(out) - set(d) <= {f.name for f in dataclasses.fields(loop)}
    assert LoopConfig.from_dict(loop.to_dict()) == loop
    assert loop.mlflow == MlflowTarget("sqlite:///x.db", "abc")
    assert loop.train.model == "ResNetSimple" and loop.train.seed == 0
    assert loop.image_shape == (1, 16, 16) and isinstance(loop.class_names, tuple)
    assert loop.ingest_mode == "simulate" and loop.sim_preset["num_pix"] == 16
    assert loop.arch == arch_of(d)  # what builds the model and what meta.json stores
    if task == "inference":
        assert loop.target_prior == (("uniform", 1.0, 1.6),) and loop.train.targets == ("theta_E",)
        assert loop.targets_config["targets"] == ["theta_E"] and loop.targets_config["target_loc"] == [1.3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        loop.ingest_mode = "memory"  # type: ignore[misc]


@pytest.mark.parametrize("key", ["_fail_at_epoch", "_record_inputs", "manifest_hash", "lr_typo"])
def test_an_unknown_key_is_refused_naming_it(key):
    with pytest.raises(ValueError, match=f"unknown loop config keys \\['{key}'\\]"):
        LoopConfig.from_dict(_loop_dict() | {key: 1})


def test_a_missing_key_is_refused_naming_it():
    d = _loop_dict()
    del d["image_shape"]
    with pytest.raises(ValueError, match=r"loop config lacks \['image_shape'\]"):
        LoopConfig.from_dict(d)


def test_hooks_check_their_fail_point_and_an_injected_failure_fires_once():
    with pytest.raises(ValueError, match="fail_point must be one of"):
        LoopHooks(fail_at_epoch=2, fail_point="middle")
    hooks = LoopHooks(fail_at_epoch=2, fail_point="before_report")
    hooks.check("start", 2, start_epoch=1)  # another point: nothing
    with pytest.raises(RuntimeError, match="injected failure at epoch 2, before_report"):
        hooks.check("before_report", 2, start_epoch=1)
    hooks.check("before_report", 2, start_epoch=2)  # restored from epoch 1's checkpoint: fired already
    with pytest.raises(RuntimeError, match="injected failure at epoch 2, after_report"):  # after: always
        LoopHooks(fail_at_epoch=2, fail_point="after_report").check("after_report", 2, start_epoch=2)
    LoopHooks().check("start", 2, start_epoch=1)  # no failure asked: never
