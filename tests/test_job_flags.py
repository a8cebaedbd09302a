"""One flag vocabulary across jobs/train.py, jobs/tune.py and jobs/study.py: the flags of the training
settings they share are generated from TrainConfig's fields (deeplense_ray.config.add_field_flags), so
each has one name, one default and one help text everywhere, and each generated flag arrives in its
dataclass unchanged. No Ray, no training."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from deeplense_ray.config import FLAG, SHARED_FLAGS, TrainConfig, add_field_flags, flag_args
from deeplense_ray.tune.settings import TuneSettings

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("train", "tune", "study")


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_flags_job", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _spec(action: argparse.Action) -> tuple:
    """What a user sees and gets of a flag."""
    return (
        tuple(action.option_strings),
        type(action).__name__,
        action.type,
        action.default,
        tuple(action.choices) if action.choices else None,
        action.metavar,
        action.help,
        action.required,
    )


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return {name: _job(name).build_parser() for name in JOBS}


def test_shared_training_flags_are_identical_in_train_tune_and_study(parsers):
    shared = {name for names in SHARED_FLAGS.values() for name in names}
    for field in sorted(shared):
        jobs = [job for job in JOBS if field in SHARED_FLAGS[job]]
        opts, kw = flag_args(TrainConfig, field)
        specs = {}
        for job in jobs:
            action = _actions(parsers[job]).get(field)
            assert action is not None, f"jobs/{job}.py has no flag for TrainConfig.{field}"
            specs[job] = _spec(action)
        assert len(set(specs.values())) == 1, (field, specs)
        spec = next(iter(specs.values()))
        assert spec[0][: len(opts)] == tuple(opts) and spec[6] == kw["help"], (field, spec, opts, kw)
        default = TrainConfig.__dataclass_fields__[field].default
        unset = TrainConfig.__dataclass_fields__[field].metadata[FLAG].get("unset", False)
        if field != "model" and not isinstance(default, dict):
            assert spec[3] == (None if unset else default), (field, spec[3], default)


def test_a_flag_name_means_one_setting_in_every_job(parsers):
    """A TrainConfig flag name that a job has sets that TrainConfig field there (same dest), and the LR
    schedule is --scheduler in train only: tune's ASHA/FIFO choice is --trial-scheduler."""
    train_flags = {o: a.dest for a in parsers["train"]._actions for o in a.option_strings}
    study_own = {"--simulate"}  # study: build a dataset of PRESET first (its --online trains online)
    for job in ("tune", "study"):
        for action in parsers[job]._actions:
            for opt in action.option_strings:
                if opt in train_flags and opt not in study_own | {"-h", "--help"} and action.dest in {
                    f.name for f in dataclasses.fields(TrainConfig)
                }:
                    assert action.dest == train_flags[opt], (job, opt, action.dest)
    tune_flags = {o: a for a in parsers["tune"]._actions for o in a.option_strings}
    assert tune_flags["--trial-scheduler"].dest == "scheduler"
    assert tune_flags["--scheduler"].dest != "scheduler"  # refused, naming the flags it may mean (below)
    assert not re.search(r"(?<![-\w])--scheduler\b", parsers["tune"].format_help())


@pytest.mark.parametrize("argv", [["--scheduler", "fifo"], ["--scheduler"], ["--scheduler=cosine"]])
def test_tune_refuses_scheduler_naming_the_two_flags_it_may_mean(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _job("tune").build_parser().parse_args(["--model", "ViT", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "--trial-scheduler asha|fifo" in err and "--train-override scheduler" in err


def test_every_flag_field_round_trips_into_its_dataclass():
    """Each TrainConfig / TuneSettings field with flag metadata: a non-default value given on the command line
    is the field's value in the dataclass built from the parsed flags."""
    for cls, base in ((TrainConfig, {"model": "ViT"}), (TuneSettings, {"model": "ViT"})):
        for f in dataclasses.fields(cls):
            if FLAG not in f.metadata or f.name == "model":
                continue
            p = argparse.ArgumentParser()
            add_field_flags(p, cls, [f.name])
            opts, kw = flag_args(cls, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            action = kw.get("action")
            if action == "append":
                # a KEY=VALUE list, parsed by the job
                argv, want = [opts[0], "a=1", opts[0], "b=x"], ["a=1", "b=x"]
            elif action is argparse.BooleanOptionalAction:
                argv, want = [opts[0] if not default else f"--no-{opts[0][2:]}"], not default
            elif action == "store_true":
                argv, want = [opts[0]], True
            elif kw.get("choices"):
                want = next(c for c in kw["choices"] if c != default)
                argv = [opts[0], str(want)]
            elif kw["type"] in (int, float) or f.name in ("num_per_class", "reduction_factor"):
                want = int((default or 2) + 1)
                argv = [opts[0], str(want)]
            elif f.type.startswith("tuple"):
                argv, want = [opts[0], "a, b"], ("a", "b")
            else:
                argv, want = [opts[0], f"x-{f.name}"], f"x-{f.name}"
            got = getattr(p.parse_args(argv), f.name)
            assert got == want, (cls.__name__, f.name, got, want)
            if action != "append":
                built = cls(**{**base, f.name: got})
                assert getattr(built, f.name) == want != default, (cls.__name__, f.name)
            for alias in opts[1:]:  # an alias is the same flag
                assert getattr(p.parse_args([alias, *argv[1:]]), f.name) == got


def test_tune_settings_from_generated_flags_keep_their_defaults_and_values():
    tune = _job("tune")
    ap = tune.build_parser()
    defaults = tune.settings_from_args(ap.parse_args(["--model", "ViT"]))
    plain = TuneSettings(model="ViT")
    for f in dataclasses.fields(TuneSettings):
        if f.name not in ("model", "space"):
            assert getattr(defaults, f.name) == getattr(plain, f.name), f.name
    s = tune.settings_from_args(
        ap.parse_args(
            ["--model", "ViT", "--num_samples", "3", "--trial-scheduler", "fifo", "--model-size",
             "comparable", "--data", "d", "--task", "inference", "--targets", "theta_E",
             "--reduction-factor", "3", "--num-per-class", "1e3"]
        )
    )  # fmt: skip
    assert (s.num_samples, s.scheduler, s.model_size, s.data_dir) == (3, "fifo", "comparable", "d")
    assert s.train_overrides == {"task": "inference", "targets": ["theta_E"]}
    assert s.reduction_factor == 3 and isinstance(s.reduction_factor, int) and s.num_per_class == 1000


def test_study_settings_from_generated_flags(tmp_path):
    study = _job("study")
    ap = study.build_parser()
    args = ap.parse_args(["--models", "ResNetSimple", "--simulate", "model_ii", "--epochs", "3"])
    assert args.images_per_epoch is None and args.model_size is None and args.data_dir is None
    s = study.settings_from_args(
        ap.parse_args(
            ["--models", "ResNetSimple", "--data", str(tmp_path), "--epochs", "3", "--images-per-epoch", "64",
             "--model-size", "comparable", "--resume"]
        )
    )  # fmt: skip
    assert (s.data_dir, s.epochs, s.images_per_epoch, s.model_size) == (str(tmp_path), 3, 64, "comparable")


def test_help_texts_name_no_issue_numbers_or_dates(parsers):
    for job, p in parsers.items():
        for action in p._actions:
            text = action.help or ""
            assert not re.search(r"#\d+|\b(19|20)\d\d-\d\d-\d\d\b|\bissue\b", text, re.I), (job, text)
