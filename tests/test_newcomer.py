"""What a newcomer meets on a fresh clone, following README and docs/deployment.md: flag errors in a useful
order, outputs that stay out of git and out of `ray job submit --working-dir .`, quiet Ray output, an
installable package without warnings, and train/tune/study on data that shows something."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_newcomer_job", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def ray_forbidden(monkeypatch):
    import deeplense_ray.runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(deeplense_ray.runtime, "connect", no_ray)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--workers", "0"], "--workers"),
        (["--shard-size", "0"], "shard_size"),
        (["--dtype", "int8"], "'int8'"),
        (["--splits", "train=2"], "2.0"),
        (["--seed", "-1"], "-1"),
        (["--gpus-per-worker", "-1"], "-1"),
        (["--preset", "nope"], "'nope'"),
        (["--preset-override", "num_pixx=3"], "num_pixx"),
        (["--resume", "--overwrite"], "--resume"),
        (["--num-per-class", "5", "--workers", "0"], "--workers"),
    ],
)
def test_simulate_names_a_bad_value_before_a_missing_flag(argv, needle, capsys, ray_forbidden):
    """A value the user typed that is wrong is the error, not the --num-per-class or --out not yet given."""
    t0 = time.perf_counter()
    assert _job("simulate").main(argv) == 2
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "required" not in err[0], err


def test_simulate_asks_for_a_missing_flag_once_the_values_are_good(capsys, ray_forbidden):
    simulate = _job("simulate")
    assert simulate.main([]) == 2
    assert capsys.readouterr().err.strip() == "error: --num-per-class is required"
    assert simulate.main(["--num-per-class", "5"]) == 2
    assert capsys.readouterr().err.strip() == "error: --out is required"


def test_pyproject_licence_is_an_spdx_string_with_its_files_and_reads_without_warnings():
    """`pip install -e .` printed setuptools' deprecation box for a `license = {text = ...}` table."""
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] and all((ROOT / f).is_file() for f in project["license-files"])
    assert "setuptools>=77" in pyproject["build-system"]["requires"]  # the first to read an SPDX string
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "MIT"


def test_demo_says_why_it_gives_ray_more_cpus_than_cores():
    demo = _job("demo")
    line = demo.cpus_text(demo.MIN_LOGICAL_CPUS, 2)
    assert line.startswith(f"{demo.MIN_LOGICAL_CPUS} logical CPUs on 2 cores (")
    assert "Ray Data readers" in line
    assert demo.cpus_text(16, 16) == "16 CPUs"


#: What the jobs, the demo and the benchmarks write into the checkout with their default paths or the paths
#: README shows ($PWD/data/...): none of it may be committed or uploaded by `ray job submit --working-dir .`.
OUTPUTS = [
    "data/model_ii/train/shard-00000.h5",
    "data/model_ii/manifest.json",
    "demo_output/mlflow.db",
    "mlflow.db",
    "mlflow.db-journal",
    "mlartifacts/1/a/model.pt",
    "mlruns/0/meta.yaml",
    "ray_results/run/checkpoint.pt",
    "tune_results/search/best_config.yaml",
    "study_results/report.json",
    "runs/17/job_settings.env",
    "train_scaling.json",
    "test.csv",
    "basic_auth.db",
    "jobs/x.h5",
]
#: What a submitted job needs.
CODE = [
    "jobs/simulate.py",
    "deeplense_ray/__init__.py",
    "deeplense_ray/sim/data/hdf_galaxies.npz",
    "benchmarks/results/demo_cpu_actor.json",
    "pyproject.toml",
]


def test_outputs_are_ignored_by_git_and_nothing_tracked_is():
    import subprocess

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)

    if git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    ignored = git("check-ignore", "--no-index", *OUTPUTS, *CODE).stdout.split()
    assert sorted(ignored) == sorted(OUTPUTS)
    assert git("ls-files", "-ci", "--exclude-standard").stdout == ""  # no tracked file matches a pattern


@pytest.mark.parametrize("include_gitignore", [True, False])
def test_ray_working_dir_upload_leaves_the_outputs_out(tmp_path, include_gitignore):
    """Ray's own packaging walk over a copy of the ignore files with outputs and code in place: the outputs
    stay out with .gitignore honoured, and with .rayignore alone (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1)."""
    import shutil

    from ray._private.runtime_env.packaging import _dir_travel

    for name in (".gitignore", ".rayignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    for rel in OUTPUTS + CODE:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    packed: list[str] = []

    def handler(path: Path) -> None:
        if path.is_file():
            packed.append(str(path.relative_to(tmp_path)))

    _dir_travel(tmp_path, [], handler, include_gitignore=include_gitignore)
    assert sorted(packed) == sorted([*CODE, ".gitignore", ".rayignore"])


def test_simulate_says_in_one_line_why_the_cluster_makes_the_build_wait():
    """Ray Data's "Dataset job will hang" warning is off with Ray's own output; the job says why."""
    simulate = _job("simulate")
    assert simulate.cpu_note(2, 2, 1) is None
    busy = simulate.cpu_note(2, 0, 1)
    assert "none of the cluster's 2 CPUs is free" in busy and "\n" not in busy
    assert "--workers" in simulate.cpu_note(2, 2, 2)


def test_a_missing_dependency_names_the_interpreter_and_the_fix():
    """`ray job submit -- python ...` from a head started outside the virtualenv runs another Python."""
    from deeplense_ray.cli import run_main

    def job(argv):
        raise ModuleNotFoundError("No module named 'h5py'", name="h5py")

    assert run_main(job, []) == 2
    from deeplense_ray.cli import error_message

    line = error_message(ModuleNotFoundError("No module named 'h5py'", name="h5py"))
    assert "h5py" in line and sys.executable in line and ".venv/bin/activate" in line
    assert error_message(ModuleNotFoundError("x", name="deeplense_ray.nope")) is None  # ours: a bug


@pytest.mark.slow
def test_simulate_prints_no_ray_progress_or_actor_restart_lines(tmp_path):
    """Ray Data's progress blocks, its "will hang" warning and Ray's error line about the renderer actors'
    max_restarts stay out of a simulate run without --verbose (set in the driver, so under `ray job submit`
    too, where the entrypoint is the driver)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(RAY_USAGE_STATS_ENABLED="0")
    res = subprocess.run(
        [
            sys.executable,
            "jobs/simulate.py",
            "--preset",
            "model_ii",
            "--preset-override",
            "num_pix=16",
            "--num-per-class",
            "10",
            "--shard-size",
            "8",
            "--out",
            str(tmp_path / "ds"),
            "--address",
            "local",
            "--no-preview",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    for noise in (
        "max_restarts",
        "Running Dataset",
        "logging_progress",
        "will hang",
        "Execution plan",
        "ray_remote_args",
    ):
        assert noise not in out, out[-3000:]


def test_tune_without_data_simulates_the_demo_data_and_says_so():
    """`python jobs/tune.py --model CvT --num_samples 10`, as README shows it, searches on the data the demo
    uses (substructure visible), not on a physical preset where a small search ends at chance."""
    tune = _job("tune")
    args = tune.build_parser().parse_args(["--model", "CvT", "--num_samples", "10"])
    settings = tune.settings_from_args(args)
    assert settings.preset == "deeplense_model_ii" and settings.data_dir is None
    note = tune.data_note(settings)
    assert "deeplense_model_ii" in note and "--preset model_ii" in note and "\n" not in note
    physical = tune.build_parser().parse_args(["--model", "CvT", "--preset", "model_ii"])
    assert tune.settings_from_args(physical).preset == "model_ii"
    assert (
        tune.data_note(
            tune.settings_from_args(tune.build_parser().parse_args(["--model", "CvT", "--data", "d"]))
        )
        is None
    )


def test_train_without_data_renders_the_demo_data_online_and_says_so():
    """`python jobs/train.py --model ViT` with no data flag trains on the demo's data (deeplense_model_ii)
    rendered online, sized as the demo sizes its dataset, and says so in one line; sizes the user gives and
    --data / --simulate are kept."""
    train = _job("train")
    args = train.build_parser().parse_args(["--model", "ViT"])
    note = train.apply_default_data(args)
    cfg = train.config_from_args(args)
    assert cfg.simulate == "deeplense_model_ii" and cfg.data_dir is None
    assert (cfg.images_per_epoch, cfg.val_size, cfg.test_size) == (1200, 150, 150)  # 500 per class, 80/10/10
    assert "deeplense_model_ii" in note and "--simulate model_ii" in note and "\n" not in note
    gpu = train.build_parser().parse_args(["--model", "ViT", "--gpus-per-worker", "1", "--val-size", "64"])
    train.apply_default_data(gpu)
    assert (gpu.images_per_epoch, gpu.val_size, gpu.test_size) == (12000, 64, 1500)
    for argv in (["--data", "d"], ["--simulate", "model_ii"]):
        given = train.build_parser().parse_args(["--model", "ViT", *argv])
        assert train.apply_default_data(given) is None
        cfg = train.config_from_args(given)
        assert cfg.images_per_epoch == 8192 and cfg.simulate == (None if "--data" in argv else "model_ii")


def test_train_says_when_an_online_set_is_large_for_a_cpu():
    """`--simulate model_ii` on a CPU renders 8192 images an epoch by default: one line says so, with flags
    of a small first run; small sets, GPU training and stored data get no line."""
    train = _job("train")

    def note(*argv):
        return train.cpu_online_note(
            train.config_from_args(train.build_parser().parse_args(["--model", "ViT", *argv]))
        )

    text = note("--simulate", "model_ii", "--gpus-per-worker", "0")
    assert "8192" in text and "--images-per-epoch 512" in text and "\n" not in text
    assert note("--simulate", "model_ii", "--gpus-per-worker", "0", "--images-per-epoch", "512") is None
    assert note("--simulate", "model_ii", "--gpus-per-worker", "1") is None
    assert note("--data", "d", "--gpus-per-worker", "0") is None
