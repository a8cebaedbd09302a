"""Files from outside the project: a .npy file never runs code, an import never deletes what it did not write,
and predict's inputs are each read once, as named, and as the user says.

Real files throughout: crafted pickles written the way np.save writes them, a real checkpoint saved by the
training code's writer, the jobs run as subprocesses where the exit status is what is checked.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplense_ray.data import load_manifest
from deeplense_ray.infer.inputs import InputError, npy_header, plan_inputs, read_unit, read_units
from deeplense_ray.infer.model import is_mlflow_uri, load_classifier
from deeplense_ray.infer.npy_import import import_npy
from deeplense_ray.npyio import NpyError, read_npy
from deeplense_ray.train.checkpoint import save_checkpoint
from deeplense_ray.train.modules import build_classifier
from tests.test_import_npy import SIZE, _rows, write_deeplense
from tests.test_predict import ARCH, CLASSES

REPO = Path(__file__).resolve().parents[1]
SHAPE = (1, SIZE, SIZE)


class _RunsShell:
    """What an attacker pickles: unpickling it calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_malicious(path: Path, marker: Path) -> str:
    """A DeepLense-looking axion file [image, payload] whose unpickling writes ``marker``; returns the class
    name the pickle asks for."""
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = np.zeros((SIZE, SIZE)), _RunsShell(f"touch {marker}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr, allow_pickle=True)
    return f"{os.system.__module__}.system"


def write_numpy1_axion(path: Path, image: np.ndarray, mass) -> None:
    """An axion file as numpy 1 wrote it (``numpy.core.multiarray`` in the pickle, protocol 2)."""
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = image, mass
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": (2,)})
    data = pickle.dumps(arr, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data
    path.write_bytes(header.getvalue() + data)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_classifier(ARCH)
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(
        tmp_path_factory.mktemp("untrusted") / "checkpoint_000000",
        model=model,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0),
        scaler=None,
        epoch=1,
        config={**ARCH, "seed": 0},
        metrics={},
        history=[],
    )


def _plan(source, **kw):
    return plan_inputs(source, image_shape=SHAPE, class_names=CLASSES, **kw)


# --------------------------------------------------------------------------------------------- no code runs
def test_a_pickle_that_runs_a_command_is_refused_by_both_jobs(ckpt, tmp_path):
    """jobs/predict.py and jobs/import_npy.py exit 2 naming the file and the class; the command never runs."""
    marker = tmp_path / "MARKER"
    src = tmp_path / "src"
    write_deeplense(src, {"axion": 10, "cdm": 10, "no_sub": 10})
    evil = src / "axion" / "axion_sim_99.npy"
    wanted = write_malicious(evil, marker)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    runs = {
        "predict": [
            "jobs/predict.py", "--model-uri", str(ckpt), "--input", str(evil),
            "--out", str(tmp_path / "p.csv"), "--no-mlflow", "--quiet",
        ],
        "import": ["jobs/import_npy.py", str(src), "--out", str(tmp_path / "data"), "--quiet"],
    }  # fmt: skip
    procs = {
        k: subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
        for k, cmd in runs.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err[-3000:])
        assert str(evil) in err and wanted in err and "Traceback" not in err, (name, err[-3000:])
    assert not marker.exists()
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "data").exists()


def test_the_published_format_still_reads(tmp_path):
    """[image, axion_mass] object arrays as numpy 1 (protocol 2) and numpy 2 write them, the mass a float or
    a numpy scalar, read exactly by the reader and by the import."""
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    write_deeplense(src, {"cdm": 10, "no_sub": 10})
    want = {}
    for i in range(10):
        image, mass = rng.random((SIZE, SIZE)), 10 ** rng.uniform(-24, -22)
        path = src / "axion" / f"axion_sim_{i}.npy"
        path.parent.mkdir(exist_ok=True)
        if i % 2:
            write_numpy1_axion(path, image, np.float64(mass) if i % 4 == 1 else mass)
        else:
            arr = np.empty(2, dtype=object)
            arr[0], arr[1] = image, np.float64(mass)
            np.save(path, arr, allow_pickle=True)
        got = read_npy(path)
        np.testing.assert_array_equal(got[0], image)
        assert float(got[1]) == mass
        want[str(path.resolve())] = (image, mass)
    import_npy(src, tmp_path / "data", progress=False)
    rows = _rows(tmp_path / "data")
    assert len(rows) == 30
    for path, (image, mass) in want.items():
        np.testing.assert_array_equal(rows[path][0][0], image.astype(np.float32))
        assert rows[path][2] == mass


@pytest.mark.parametrize("damage", ["truncated", "padded", "pickle_padded"])
def test_a_header_that_does_not_fit_the_file_is_named(tmp_path, damage):
    path = tmp_path / "x.npy"
    if damage.startswith("pickle"):
        arr = np.empty(2, dtype=object)
        arr[0], arr[1] = np.zeros((SIZE, SIZE)), 1e-23
        np.save(path, arr, allow_pickle=True)
    else:
        np.save(path, np.zeros((4, 1, SIZE, SIZE), np.float32))
    raw = path.read_bytes()
    path.write_bytes(raw[:-7] if damage == "truncated" else raw + b"\0" * 64)
    with pytest.raises((InputError, NpyError), match=str(path)):
        npy_header(path) if not damage.startswith("pickle") else read_npy(path)
    with pytest.raises(InputError, match=str(path)):
        read_units(_plan(path).units, SHAPE)


def test_a_large_npy_is_memory_mapped_and_read_in_units(tmp_path):
    """20k images (20 MiB): work units of at most 1024 images, each read without reading the file whole."""
    n = 20_000
    stack = np.random.default_rng(2).random((n, *SHAPE), dtype=np.float32)
    np.save(tmp_path / "big.npy", stack)
    plan = _plan(tmp_path / "big.npy")
    assert plan.num_images == n and len(plan.units) == 20 and max(u.rows for u in plan.units) == 1024
    assert isinstance(read_npy(tmp_path / "big.npy"), np.memmap)
    unit = plan.units[7]
    tracemalloc.start()
    try:
        images, _ = read_unit(unit, SHAPE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(images, stack[unit.start : unit.stop])
    assert peak < stack.nbytes / 4, f"reading one unit of {unit.rows} images allocated {peak} bytes"
    np.testing.assert_array_equal(read_units(plan.units, SHAPE)["image"], stack)


# ------------------------------------------------------------------------------------------- predict inputs
def test_a_glob_through_a_symlink_loop_reads_each_file_once(tmp_path):
    root = tmp_path / "imgs"
    write_deeplense(root, {"axion": 2, "cdm": 2, "no_sub": 2})
    (root / "cdm" / "loop").symlink_to(root / "cdm", target_is_directory=True)
    (root / "again.npy").symlink_to(root / "cdm" / "cdm_sim_0.npy")
    plan = _plan(f"{root}/**/*.npy")
    paths = [u.path for u in plan.units]
    assert len(paths) == len(set(paths)) == 6 and plan.num_images == 6


@pytest.mark.parametrize("how", ["glob", "folder"])
def test_a_symlink_out_of_the_input_folder_is_an_error(tmp_path, how):
    root, outside = tmp_path / "imgs", tmp_path / "elsewhere"
    write_deeplense(root, {"axion": 1, "cdm": 1})
    np.save(outside.mkdir() or outside / "secret.npy", np.zeros((SIZE, SIZE)))
    link = root / "cdm" / "link.npy"
    link.symlink_to(outside / "secret.npy")
    with pytest.raises(InputError, match=f"{link}.*outside {root}"):
        _plan(f"{root}/**/*.npy" if how == "glob" else root)


def test_an_existing_file_with_glob_characters_is_that_file(tmp_path):
    path = tmp_path / "run[1].npy"
    np.save(path, np.ones((2, *SHAPE), np.float32))
    np.save(tmp_path / "run1.npy", np.ones((5, *SHAPE), np.float32))  # what the pattern would match
    plan = _plan(path)
    assert [u.path for u in plan.units] == [str(path)] and plan.num_images == 2


def test_only_mlflow_schemes_go_to_mlflow_a_folder_named_http_is_a_path(ckpt, tmp_path, monkeypatch):
    for uri in ("runs:/abc/model", "models:/lens@champion", "http://host:5000/x", "https://h/x"):
        assert is_mlflow_uri(uri)
    assert not is_mlflow_uri("httpckpt") and not is_mlflow_uri("s3ckpt")
    (tmp_path / "httpckpt").symlink_to(ckpt, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    model = load_classifier("httpckpt")
    assert model.source == "checkpoint" and model.class_names == CLASSES


def test_a_three_plane_array_for_a_one_channel_model_needs_stack_axis0(tmp_path):
    path = tmp_path / "three.npy"
    stack = np.random.default_rng(3).random((3, SIZE, SIZE)).astype(np.float32)
    np.save(path, stack)
    with pytest.raises(InputError, match=r"three\.npy.*--stack-axis0"):
        _plan(path)
    plan = _plan(path, stack_axis0=True)
    assert plan.num_images == 3
    np.testing.assert_array_equal(read_units(plan.units, SHAPE)["image"][:, 0], stack)
    help_text = subprocess.run(
        [sys.executable, "jobs/predict.py", "--help"], cwd=REPO, capture_output=True, text=True
    ).stdout
    assert "--stack-axis0" in help_text


# ------------------------------------------------------------------------------------- import: nothing lost
def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_import_refuses_an_out_that_is_in_or_around_the_source(tmp_path):
    """--out = SRC (also through a symlink), inside SRC, or above SRC: exit 2 before anything is deleted."""
    src = tmp_path / "data" / "src"
    write_deeplense(src, {"axion": 10, "cdm": 10})
    (tmp_path / "data" / "notes.txt").write_text("mine")
    (tmp_path / "alias").symlink_to(src, target_is_directory=True)
    before = _files(tmp_path / "data")
    outs = {
        "is": src, "symlink": tmp_path / "alias", "inside": src / "cdm" / "out", "contains": tmp_path / "data"
    }  # fmt: skip
    for how, out in outs.items():
        with pytest.raises(ValueError, match="the source folder") as err:
            import_npy(src, out, overwrite=True, progress=False)
        assert str(src) in str(err.value), how
    bad = subprocess.run(
        [sys.executable, "jobs/import_npy.py", str(src), "--out", str(src), "--overwrite", "--quiet"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "is the source folder" in bad.stderr, bad.stderr[-2000:]
    assert _files(tmp_path / "data") == before


def test_overwrite_replaces_a_dataset_and_nothing_else(tmp_path):
    src = tmp_path / "src"
    write_deeplense(src, {"axion": 10, "cdm": 10})
    out = tmp_path / "out"
    first = import_npy(src, out, seed=1, progress=False)
    (out / "train" / "analysis.ipynb").write_text("mine")
    before = _files(out)
    with pytest.raises(ValueError, match=r"holds others \(train/analysis.ipynb\)"):
        import_npy(src, out, seed=2, overwrite=True, progress=False)
    assert _files(out) == before
    (out / "train" / "analysis.ipynb").unlink()
    second = import_npy(src, out, seed=2, overwrite=True, progress=False)
    assert second["splits"] != first["splits"] and load_manifest(out) == second
    # a folder that is not a dataset is not replaced at all
    other = tmp_path / "results"
    (other / "cdm").mkdir(parents=True)
    np.save(other / "cdm" / "x.npy", np.zeros((SIZE, SIZE)))
    with pytest.raises(ValueError, match="replaces only a dataset"):
        import_npy(src, other, overwrite=True, progress=False)
    assert (other / "cdm" / "x.npy").is_file()


# ------------------------------------------------------------------------------------------- import: splits
def test_import_applies_simulates_split_rules(tmp_path):
    flat = tmp_path / "flat"
    write_deeplense(flat, {"axion": 3, "cdm": 3})
    wanted = f"split 'val' gets 0 images per class with 3 files of class 'axion' in {flat}"
    with pytest.raises(InputError, match=wanted):
        import_npy(flat, tmp_path / "a", progress=False)  # 0.8/0.1/0.1 of 3 files
    with pytest.raises(ValueError, match="fraction must be in"):
        import_npy(flat, tmp_path / "a", fractions={"train": 1.0, "val": 0.0}, progress=False)
    asked = import_npy(flat, tmp_path / "a", fractions={"train": 0.67, "test": 0.33}, progress=False)
    assert {s: i["rows"] for s, i in asked["splits"].items()} == {"train": 4, "test": 2}

    folders = tmp_path / "folders"
    write_deeplense(folders, {"train/axion": 4, "train/cdm": 4, "test/axion": 2, "test/cdm": 2})
    with pytest.raises(InputError, match=r"split 'val'.*train.*--val-fraction 0"):
        import_npy(folders, tmp_path / "b", val_fraction=0.1, progress=False)
    no_val = import_npy(folders, tmp_path / "b", val_fraction=0, progress=False)
    assert {s: i["rows"] for s, i in no_val["splits"].items()} == {"train": 8, "test": 4}
    (folders / "test" / "cdm" / "cdm_sim_0.npy").unlink()
    (folders / "test" / "cdm" / "cdm_sim_1.npy").unlink()
    (folders / "test" / "cdm").rmdir()
    with pytest.raises(InputError, match="split 'test' has no .npy files of class 'cdm'"):
        import_npy(folders, tmp_path / "c", val_fraction=0.25, progress=False)
