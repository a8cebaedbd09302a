"""jobs/import_npy.py: class-folder .npy sets in the published DeepLense layouts -> sharded HDF5 + manifest.

Small files written here in those layouts (16x16 images, axion files as [image, axion_mass] object arrays);
the imported dataset is read back with the project's own readers and checked image by image.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deeplense_ray.config import TrainConfig, describe_dataset
from deeplense_ray.data import load_manifest, read_shard, verify_dataset
from deeplense_ray.infer.inputs import InputError
from deeplense_ray.infer.npy_import import SOURCES_FILE, import_npy

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


def write_deeplense(root: Path, per_class: dict[str, int], *, seed: int = 0, size: int = SIZE) -> dict:
    """One .npy per image in class folders; axion files hold object arrays [image, axion_mass]; a few
    plain images are stored [1, H, W] instead of [H, W]. Returns {path: (image float64, mass)}."""
    rng = np.random.default_rng(seed)
    written = {}
    for folder, n in per_class.items():
        cls = Path(folder).name
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = rng.random((size, size))
            path = root / folder / f"{cls}_sim_{i}.npy"
            if cls == "axion":
                mass = float(10 ** rng.uniform(-24, -22))
                arr = np.empty(2, dtype=object)
                arr[0], arr[1] = image, mass
                np.save(path, arr, allow_pickle=True)
            else:
                mass = 0.0
                np.save(path, image[None] if i % 3 == 0 else image)
            written[str(path.resolve())] = (image, mass)
    return written


def _rows(data_dir: Path) -> dict[str, tuple[np.ndarray, int, float]]:
    """{source file: (image, label, axion_mass)} of every row of the dataset, via sources.json."""
    manifest = load_manifest(data_dir)
    sources = json.loads((data_dir / SOURCES_FILE).read_text())
    out = {}
    for split, info in manifest["splits"].items():
        files = iter(sources[split])
        for shard in info["shards"]:
            part = read_shard(data_dir / shard["path"], params=True)
            masses = part["params"]["axion_mass"]
            for j in range(len(part["labels"])):
                out[next(files)] = (part["images"][j], int(part["labels"][j]), masses[j])
    return out


def test_split_folders_are_kept_and_every_image_survives(tmp_path):
    """train/ and test/ kept; val carved from train (seeded); images, labels and axion masses exact."""
    src = tmp_path / "Model_I"
    written = write_deeplense(
        src, {f"{s}/{c}": n for s, n in (("train", 10), ("test", 3)) for c in ("axion", "cdm", "no_sub")}
    )
    out = tmp_path / "imported"
    manifest = import_npy(src, out, shard_size=8, val_fraction=0.2, progress=False)

    assert manifest["class_names"] == ["no_sub", "axion", "cdm"]
    assert manifest["image_shape"] == [1, SIZE, SIZE]
    assert {s: i["rows"] for s, i in manifest["splits"].items()} == {"train": 24, "val": 6, "test": 9}
    assert "split folders" in manifest["config"]["splits_from"]
    assert verify_dataset(out) == []
    rows = _rows(out)
    assert sorted(rows) == sorted(written)
    names = manifest["class_names"]
    for path, (image, label, mass) in rows.items():
        want_image, want_mass = written[path]
        np.testing.assert_array_equal(image[0], want_image.astype(np.float32))
        assert names[label] == Path(path).parent.name
        assert mass == want_mass
        if "/test/" in path:
            assert path in json.loads((out / SOURCES_FILE).read_text())["test"]
    # shards mix the classes, and the dataset is one training can take
    first = read_shard(out / manifest["splits"]["train"]["shards"][0]["path"])
    assert len(set(first["labels"].tolist())) > 1
    info = TrainConfig(model="ResNetSimple", data_dir=str(out), model_overrides={"width": 4}).validate()
    assert info.class_names == ("no_sub", "axion", "cdm") and info.image_shape == (1, SIZE, SIZE)
    assert (out / "preview.png").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_flat_class_folders_split_by_fractions(tmp_path):
    src = tmp_path / "flat"
    write_deeplense(src, {"axion": 10, "cdm": 10, "no_sub": 10}, seed=1)
    a = import_npy(src, tmp_path / "a", fractions={"train": 0.6, "val": 0.2, "test": 0.2}, progress=False)
    assert {s: i["rows"] for s, i in a["splits"].items()} == {"train": 18, "val": 6, "test": 6}
    b = import_npy(src, tmp_path / "b", fractions={"train": 0.6, "val": 0.2, "test": 0.2}, progress=False)
    assert a["splits"] == b["splits"]  # same seed, same bytes
    assert describe_dataset(tmp_path / "a").split_rows == {"train": 18, "val": 6, "test": 6}
    with pytest.raises(ValueError, match="not empty"):
        import_npy(src, tmp_path / "a", progress=False)


@pytest.mark.parametrize("problem", ["wrong_shape", "mixed_sizes", "unreadable", "non_finite", "not_numeric"])
def test_bad_files_are_named_and_nothing_is_left(tmp_path, problem):
    src = tmp_path / "src"
    write_deeplense(src, {"axion": 10, "cdm": 10, "no_sub": 10}, seed=2)
    bad = src / "cdm" / "zz_bad.npy"
    if problem == "wrong_shape":
        np.save(bad, np.zeros((2, SIZE, SIZE)))
    elif problem == "mixed_sizes":
        np.save(bad, np.zeros((SIZE + 2, SIZE + 2)))
    elif problem == "unreadable":
        bad.write_bytes(b"\x93NUMPY garbage")
    elif problem == "non_finite":
        image = np.zeros((SIZE, SIZE))
        image[3, 4] = np.nan
        np.save(bad, image)
    else:
        np.save(bad, np.array(["a", "b"]))
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        import_npy(src, out, progress=False)
    assert str(bad) in str(err.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_imports_and_refuses_a_folder_without_classes(tmp_path):
    src = tmp_path / "src"
    write_deeplense(src, {"train/axion": 4, "train/no_sub": 4, "test/axion": 2, "test/no_sub": 2})
    (tmp_path / "empty").mkdir()
    cmd = [sys.executable, "jobs/import_npy.py", "--quiet"]
    run = dict(cwd=REPO, capture_output=True, text=True)
    ok = subprocess.run([*cmd, str(src), "--out", str(tmp_path / "d"), "--val-fraction", "0.25"], **run)
    bad = subprocess.run([*cmd, str(tmp_path / "empty"), "--out", str(tmp_path / "e")], **run)
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = json.loads(ok.stdout)
    assert summary["class_names"] == ["no_sub", "axion"] and sum(summary["splits"].values()) == 12
    assert bad.returncode == 2 and "no class folders" in bad.stderr and str(tmp_path / "empty") in bad.stderr
