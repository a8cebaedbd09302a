"""The one KEY=VALUE parser (deeplense_ray.config.parse_override) as every job's flags use it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from deeplense_ray.config import parse_override, parse_overrides, parse_value

ROOT = Path(__file__).resolve().parents[1]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_values_are_typed_as_yaml_with_exponent_floats():
    assert parse_value("1e-1") == 0.1 and isinstance(parse_value("1e-1"), float)  # YAML 1.1: a string
    assert parse_value("3E5") == 300000.0 and parse_value("-2.5e-3") == -0.0025
    assert parse_value("2") == 2 and isinstance(parse_value("2"), int)
    assert parse_value("true") is True and parse_value("mean") == "mean" and parse_value("") == ""
    assert parse_value("[1e-3, 2]") == (0.001, 2)
    assert parse_value("1e") == "1e" and parse_value("a: [1") == "a: [1"  # not a number / not YAML: text
    assert parse_override(" dropout = 1e-1") == ("dropout", 0.1)
    with pytest.raises(ValueError, match="bad --fix 'depth': expected KEY=VALUE"):
        parse_override("depth", "--fix")
    with pytest.raises(ValueError, match="--model-override 'depth' is given twice"):
        parse_overrides(["depth=2", "depth=3"], "--model-override")


def test_every_job_types_its_overrides_the_same_way(tmp_path):
    train = _job("train")
    args = train.build_parser().parse_args(
        ["--model", "ViT", "--data", "d", "--model-override", "dropout=1e-1", "--model-override", "depth=2"]
    )
    assert train.config_from_args(args).model_overrides == {"dropout": 0.1, "depth": 2}

    tune = _job("tune")
    args = tune.build_parser().parse_args(
        ["--model", "ViT", "--fix", "lr=1e-3", "--choice", "weight_decay=1e-2,5e-2",
         "--choice", "depth=[2, 4]", "--train-override", "label_smoothing=1e-1",
         "--preset-override", "sigma_bkg=1e-2"]
    )
    settings = tune.settings_from_args(args)
    assert settings.space["lr"] == 0.001
    assert settings.space["weight_decay"].categories == [0.01, 0.05]
    assert settings.space["depth"].categories == [2, 4]
    assert settings.train_overrides == {"label_smoothing": 0.1}
    assert settings.preset_overrides == {"sigma_bkg": 0.01}

    simulate = _job("simulate")
    cfg_file = tmp_path / "preset.yaml"
    cfg_file.write_text("preset: model_ii\nnum_pix: 32\nsigma_bkg: 1e-2\n")
    args = simulate.build_parser().parse_args(
        ["--config", str(cfg_file), "--preset-override", "num_pix=24", "--num-per-class", "10", "--out", "o"]
    )
    assert simulate.config_from_args(args).preset_overrides == {"num_pix": 24, "sigma_bkg": 0.01}


def test_compile_flag_reaches_train_and_tune_configs():
    train = _job("train")
    args = train.build_parser().parse_args(["--model", "ViT", "--data", "d", "--compile"])
    assert train.config_from_args(args).compile is True
    args = train.build_parser().parse_args(["--model", "ViT", "--data", "d"])
    assert train.config_from_args(args).compile is False
    tune = _job("tune")
    settings = tune.settings_from_args(tune.build_parser().parse_args(["--model", "ViT", "--compile"]))
    assert settings.train_overrides == {"compile": True}


def test_every_train_config_field_is_a_train_flag_that_reaches_the_config():
    """jobs/train.py: each TrainConfig field has a flag whose dest is the field (the job copies no field
    list), and a non-default value given for every flag at once arrives in the config unchanged."""
    import argparse
    import dataclasses

    from deeplense_ray.config import TrainConfig

    train = _job("train")
    actions = {a.dest: a for a in train.build_parser()._actions if a.dest != "help"}
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert sorted(set(fields) - set(actions)) == []  # nothing unreachable, nothing deliberately left out
    assert sorted(set(actions) - set(fields)) == sorted(train.JOB_ONLY)
    special = {
        "model": ("ViT", "ViT"),
        "simulate": ("model_ii", "model_ii"),
        "data_dir": ("d", "d"),
        "model_overrides": ("depth=2", {"depth": 2}),
        "sim_overrides": ("num_pix=32", None),
        "targets": ("sigma_sub,theta_E", ("sigma_sub", "theta_E")),
        "classes": ("cdm", ("cdm",)),
    }
    argv, expected = [], {}
    for name, default in fields.items():
        action, flag = actions[name], actions[name].option_strings[0]
        if name in special:
            value, expected[name] = special[name]
            argv += [flag, value]
        elif isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if not default else f"--no-{flag[2:]}")
            expected[name] = not default
        elif isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
            expected[name] = True
        elif action.choices:
            expected[name] = next(c for c in action.choices if c != default)
            argv += [flag, str(expected[name])]
        elif action.type in (int, float):
            expected[name] = action.type((default or 2) + 1)
            argv += [flag, str(expected[name])]
        else:
            expected[name] = f"x-{name}"
            argv += [flag, expected[name]]
    cfg = train.config_from_args(train.build_parser().parse_args(argv))
    for name, want in expected.items():
        got = getattr(cfg, name)
        if name == "sim_overrides":
            assert got.get("num_pix") == 32, got
            continue
        assert got == want and got != fields[name], (name, got, want)


def test_train_runner_task_refuses_two_workers_and_a_split_input_before_ray(capsys, monkeypatch):
    """jobs/train.py --runner task trains one worker in one Ray task: two workers, or the 'split' input (a Ray
    Train feature), exit with status 2 and a message naming the value, before Ray starts."""
    import deeplense_ray.runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a bad --runner request")

    monkeypatch.setattr(deeplense_ray.runtime, "connect", no_ray)
    train = _job("train")
    base = ["--model", "ResNetSimple", "--simulate", "model_ii", "--runner", "task"]
    assert train.main([*base, "--num-workers", "2"]) == 2
    assert "runner 'task' trains one worker, got num_workers=2" in capsys.readouterr().err
    assert train.main([*base, "--ingest", "split"]) == 2
    assert "ingest 'split'" in capsys.readouterr().err


def test_runner_auto_picks_task_for_one_worker_and_a_resumed_run_its_own_kind(tmp_path):
    import json

    from deeplense_ray.config import TrainConfig
    from deeplense_ray.train.prepare import RUN_STATE_FILE
    from deeplense_ray.train.runners import resolve_runner

    def cfg(**kw):
        return TrainConfig(model="ViT", data_dir="/d", storage_path=str(tmp_path), seed=3, **kw)

    assert resolve_runner("auto", cfg()) == "task"
    assert resolve_runner("auto", cfg(num_workers=2)) == "trainer"
    assert resolve_runner("auto", cfg(ingest="split")) == "trainer"
    assert resolve_runner("trainer", cfg()) == "trainer" and resolve_runner("task", cfg()) == "task"
    for name, layout in (("a", "local"), ("b", "ray_train"), ("c", None)):
        (tmp_path / name).mkdir()
        state = {"config": {"model": "ViT", "seed": 3}} | ({"checkpoint_layout": layout} if layout else {})
        (tmp_path / name / RUN_STATE_FILE).write_text(json.dumps(state))
    assert resolve_runner("auto", cfg(resume=True, run_name="a")) == "task"
    assert resolve_runner("auto", cfg(resume=True, run_name="b")) == "trainer"
    assert resolve_runner("auto", cfg(resume=True, run_name="c")) == "trainer"  # before layouts: Ray Train
    assert resolve_runner("auto", cfg(resume=True, run_name="missing")) == "trainer"  # run_training says why


def test_simulate_checks_the_count_first_and_reads_exponents(capsys, monkeypatch):
    """--num-per-class -5 is refused naming that value before --out is asked for; 1e3 is a thousand; 1.5 and
    abc are refused; all with status 2, before Ray starts."""
    import time

    import deeplense_ray.runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(deeplense_ray.runtime, "connect", no_ray)
    simulate = _job("simulate")
    for bad in ("-5", "1.5", "abc"):
        t0 = time.perf_counter()
        with pytest.raises(SystemExit) as info:
            simulate.main(["--num-per-class", bad])
        assert info.value.code == 2 and time.perf_counter() - t0 < 5
        err = capsys.readouterr().err
        assert "--num-per-class" in err and repr(bad) in err and "--out" not in err.splitlines()[-1], err
    args = simulate.build_parser().parse_args(["--num-per-class", "1e3", "--out", "o"])
    assert args.num_per_class == 1000
