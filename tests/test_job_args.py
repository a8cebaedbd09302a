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
