"""Sizes and types are checked before Ray starts: a dataset larger than the disk, online sets larger than the
machine's memory, a search-space value of the wrong kind and a model override of the wrong type each end the
job with status 2 and one line naming the flag, the value and (for sizes) what is needed and what there is."""

from __future__ import annotations

import importlib
import re
import shutil
import time

import pytest

from deeplense_ray.sizes import (
    check_disk_room,
    check_memory_room,
    format_bytes,
    nearest_existing_dir,
    physical_memory,
)
from tests.test_job_args import _job

WARM_IMPORTS = ("torch", "ray", "ray.tune", "ray.train", "mlflow.tracking", "deeplense_ray.sim")


def _run(job: str, argv: list[str], capsys) -> tuple[int, str]:
    """``job``'s main on ``argv``: (exit status, stderr), checked to take < 5 s and print one line."""
    mod = _job(job)
    for name in WARM_IMPORTS:  # the libraries' import time is not the job's: measure the job's own work
        importlib.import_module(name)
    t0 = time.perf_counter()
    try:
        rc = mod.main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert elapsed < 5, (elapsed, err)
    lines = err.strip().splitlines()
    assert rc == 2 and lines and "Traceback" not in err, err
    return rc, lines[-1]


def test_simulate_refuses_a_dataset_larger_than_the_disk(tmp_path, no_ray, capsys):
    out = tmp_path / "new" / "data"
    _, err = _run("simulate", ["--num-per-class", "1e12", "--out", str(out)], capsys)
    # 3 classes x 1e12 images of 1x64x64 float32 (16 KiB) + an 8-byte label each
    need = 3 * 10**12 * (64 * 64 * 4 + 8)
    assert err.startswith(
        "error: --num-per-class 1000000000000: the dataset (3 classes x 1000000000000 images"
    ), err
    assert f"needs at least {format_bytes(need)} on disk" in err and "43.7 PiB" in err, err
    assert f"(nearest existing: {tmp_path})" in err and " free" in err, err
    assert not out.parent.exists()  # refused before anything was made


def test_disk_and_memory_checks_name_the_sizes(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    check_disk_room(tmp_path / "a" / "b", 1, what="x")  # fits
    with pytest.raises(ValueError, match=r"^--n 5: y needs at least .* on disk, but the file system of "):
        check_disk_room(tmp_path, 2 * free + 2**30, what="--n 5: y")
    # files the job replaces count as room
    check_disk_room(tmp_path, free + 2**30, what="x", reclaimable=2**31)
    assert nearest_existing_dir(tmp_path / "a" / "b") == tmp_path
    have = physical_memory()
    assert have > 2**26
    check_memory_room(have // 2, what="x")
    with pytest.raises(
        ValueError, match=rf"^z needs .* in memory at once, more than this machine's {format_bytes(have)}"
    ):
        check_memory_room(have + 1, what="z")
    assert format_bytes(512) == "512 B" and format_bytes(3 * 2**40 / 2) == "1.5 TiB"


def test_simulate_plan_memory_is_checked(tmp_path):
    """The build plan's labels in the driver (32 B a row) against this machine's memory; the dataset check
    passes a size that fits."""
    from deeplense_ray.data.config import DatasetConfig
    from deeplense_ray.data.room import PLAN_BYTES_PER_ROW, check_dataset_room, dataset_bytes

    cfg = DatasetConfig(
        preset="model_ii", preset_overrides={"num_pix": 16}, num_per_class=10, dtype="float16"
    )
    assert dataset_bytes(cfg.validate(), (1, 16, 16), 3) == 30 * (16 * 16 * 2 + 8)
    check_dataset_room(cfg, tmp_path / "d")
    rows = physical_memory() // PLAN_BYTES_PER_ROW // 3 + 1
    big = DatasetConfig(
        preset="model_ii", preset_overrides={"num_pix": 16}, num_per_class=rows, dtype="float16"
    )
    need = 3 * rows * (16 * 16 * 2 + 8)
    if need <= shutil.disk_usage(tmp_path).free:  # a disk larger than 170 x the memory: the plan check speaks
        with pytest.raises(
            ValueError, match=f"--num-per-class {rows}: the build plan of {3 * rows} rows needs"
        ):
            check_dataset_room(big, tmp_path / "d")
    else:
        with pytest.raises(ValueError, match="on disk"):
            check_dataset_room(big, tmp_path / "d")


def test_train_online_sets_larger_than_memory_exit_2(tmp_path, no_ray, capsys):
    base = ["--model", "ResNetSimple", "--simulate", "model_ii", "--preset-override", "num_pix=32",
            "--tracking-uri", str(tmp_path / "mlruns"), "--storage-path", str(tmp_path / "runs")]  # fmt: skip
    _, err = _run("train", [*base, "--val-size", str(10**10)], capsys)
    assert "a rank's share of --val-size 10000000000 (10000000000 images)" in err, err
    assert "in memory at once, more than this machine's" in err, err
    _, err = _run("train", [*base, "--test-size", str(10**10)], capsys)
    assert "--test-size 10000000000: the fixed test set needs" in err, err


def test_train_model_override_of_the_wrong_type_exits_2(tmp_path, no_ray, capsys):
    base = ["--model", "ResNetSimple", "--simulate", "model_ii", "--tracking-uri", str(tmp_path / "mlruns")]
    _, err = _run("train", [*base, "--model-override", "width=abc"], capsys)
    assert err == "error: model 'ResNetSimple': override width='abc' must be an integer (default 32)", err
    _, err = _run("train", [*base, "--model-override", "widht=8"], capsys)
    assert "unknown override(s) ['widht'] for model 'ResNetSimple'; valid keys: dropout, width" in err, err


def test_override_types_follow_the_constructor_defaults():
    from deeplense_ray.models.registry import check_override, resolve_hparams

    assert check_override("ResNetSimple", "width", 64.0) == 64 and check_override("ViT", "dropout", 0) == 0
    assert (
        check_override("Swin", "depths", [2, 2]) == (2, 2)
        and check_override("ViT", "patch_size", None) is None
    )
    assert check_override("ViT", "pool", "mean") == "mean" and check_override("ViT", "patch_size", 8) == 8
    bad = [
        ("ResNetSimple", "width", "abc", "must be an integer"),
        ("ResNetSimple", "width", True, "must be an integer"),
        ("ResNetSimple", "width", 1.5, "must be an integer"),
        ("ViT", "dropout", "x", "must be a number"),
        ("ViT", "patch_size", "8px", "must be an integer"),
        ("Swin", "depths", 2, "must be a list of ints, e.g. [2, 2, 4, 2]"),
        ("Swin", "depths", [2, "a"], "must be an integer"),
        ("SISAutoencoder", "classifier", 3, "must be a name"),
    ]
    for model, key, value, words in bad:
        with pytest.raises(
            ValueError, match="^" + re.escape(f"model '{model}': override {key}={value!r} {words}")
        ):
            check_override(model, key, value)
    with pytest.raises(ValueError, match="unknown override 'nope' for model 'ViT'; valid keys: depth, dim, "):
        check_override("ViT", "nope", 1)
    assert resolve_hparams("ResNetSimple", width=16.0)["width"] == 16


def test_tune_choice_values_are_checked_against_the_space_before_ray(tmp_path, no_ray, capsys):
    base = ["--model", "ResNetSimple", "--num-samples", "1", "--tracking-uri", str(tmp_path / "mlruns"),
            "--storage-path", str(tmp_path / "tune")]  # fmt: skip
    _, err = _run("tune", [*base, "--choice", "lr=a,b"], capsys)
    assert "search-space key 'lr': 'a' is not a number > 0" in err, err
    _, err = _run("tune", [*base, "--choice", "batch_size=32,big"], capsys)
    assert "search-space key 'batch_size': 'big' is not an integer >= 1" in err, err
    _, err = _run("tune", [*base, "--fix", "width=abc"], capsys)
    assert "model 'ResNetSimple': override width='abc' must be an integer (default 32)" in err, err
    _, err = _run("tune", [*base, "--choice", "widht=8,16"], capsys)
    assert "search-space key 'widht' is neither an optimiser key" in err and "(dropout, width)" in err, err
    _, err = _run("tune", [*base, "--num-per-class", "1e12"], capsys)
    assert "--num-per-class 1000000000000: the dataset (3 classes" in err and "needs at least" in err, err
    assert not (tmp_path / "tune").exists()


def test_search_space_keeps_numbers_as_numbers():
    from ray import tune

    from deeplense_ray.tune.spaces import search_space

    space = search_space(
        "ResNetSimple",
        overrides={"lr": tune.choice([1e-3, 3e-3]), "batch_size": tune.choice([64.0, 32]), "width": 16.0},
    )
    assert space["lr"].categories == [0.001, 0.003] and space["batch_size"].categories == [64, 32]
    assert space["width"] == 16 and isinstance(space["width"], int)
    assert isinstance(space["weight_decay"], tune.search.sample.Float)  # a range stays a range


def test_study_refuses_a_dataset_larger_than_the_disk_before_ray(tmp_path, no_ray, capsys):
    argv = ["--models", "ResNetSimple", "--simulate", "model_ii", "--num-per-class", str(10**12), "--seeds",
            "1", "--epochs", "1", "--tracking-uri", str(tmp_path / "mlruns"),
            "--storage-path", str(tmp_path / "study")]  # fmt: skip
    _, err = _run("study", argv, capsys)
    assert "--num-per-class 1000000000000: the dataset (3 classes" in err and "needs at least" in err, err


def test_tune_online_sets_larger_than_memory_exit_2(tmp_path, no_ray, capsys):
    argv = ["--model", "ResNetSimple", "--num-samples", "1", "--simulate", "model_ii",
            "--val-size", str(10**10), "--tracking-uri", str(tmp_path / "mlruns"),
            "--storage-path", str(tmp_path / "tune")]  # fmt: skip
    _, err = _run("tune", argv, capsys)
    assert "a rank's share of --val-size 10000000000 (10000000000 images)" in err, err
    assert "--batch-size 128 / 1 workers" in err and "more than this machine's" in err, err
