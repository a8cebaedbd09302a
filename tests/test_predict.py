"""jobs/predict.py and the MLflow model: a real checkpoint (saved by the training code's own writer), a real
MLflow SQLite store with the model logged, registered and aliased, real HDF5 / .npy / FITS inputs.

The checkpoint's weights are a seeded initialisation, not a training (tests/test_train_ray.py trains); what is
checked is that every path (checkpoint dir, runs:/, models:/NAME@ALIAS; in process and through Ray Data)
gives the same probabilities as the registered model's pyfunc, with the model's own preprocessing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from deeplense_ray.infer import InputError, load_classifier, run_prediction
from deeplense_ray.infer.npy_import import import_npy
from deeplense_ray.tracking import get_or_create_experiment, use_tracking_uri
from deeplense_ray.tracking.models import register_checkpoint, register_model
from deeplense_ray.train.checkpoint import save_checkpoint
from deeplense_ray.train.metrics import classification_metrics
from deeplense_ray.train.modules import build_classifier
from tests.test_import_npy import SIZE, write_deeplense

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["no_sub", "axion", "cdm"]
ARCH = {
    "model": "ResNetSimple",
    "model_size": "default",
    "model_overrides": {"width": 4},
    "image_shape": [1, SIZE, SIZE],
    "class_names": CLASSES,
    "pixel_scale": 0.1,
    "normalize": "per_image_standard",
}
PROBS = [f"prob_{c}" for c in CLASSES]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A checkpoint directory, and the same model logged to a run, registered as 'lens' @ champion."""
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(3)
    model = build_classifier(ARCH)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(
        root / "checkpoint_000000",
        model=model,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0),
        scaler=None,
        epoch=1,
        config={**ARCH, "seed": 0},
        metrics={},
        history=[],
    )
    uri = f"sqlite:///{root}/mlflow.db"
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).create_run(get_or_create_experiment("test-predict", uri))
    npy = root / "npy"
    write_deeplense(npy, {"test/axion": 4, "test/cdm": 4, "test/no_sub": 4}, seed=7)
    # what jobs/tune.py --register does with the best checkpoint (input example from a dataset)
    data = root / "data"
    import_npy(npy, data, fractions={"train": 0.5, "val": 0.25, "test": 0.25}, progress=False)
    _, version = register_checkpoint(ckpt, "lens", tracking_uri=uri, run_id=run.info.run_id, data_dir=data)
    return {"ckpt": ckpt, "uri": uri, "run_id": run.info.run_id, "version": version, "npy": npy, "data": data}


def _images(paths) -> np.ndarray:
    out = []
    for p in paths:
        a = np.load(p, allow_pickle=True)
        out.append(np.asarray(a[0] if a.dtype == object else a, np.float32).reshape(1, SIZE, SIZE))
    return np.stack(out)


def _by_stem(table: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by their source file's name without suffix (to match .npy and FITS copies)."""
    return table.assign(k=table["source"].map(lambda s: Path(s).stem)).sort_values("k")


def test_registry_pyfunc_gives_the_probabilities_of_predict(store, tmp_path):
    """models:/lens@champion through predict (DeepLense .npy class folders) == the pyfunc on the same images;
    the logged model has a signature, an input example and the architecture in its metadata."""
    import mlflow

    out = tmp_path / "p.csv"
    res = run_prediction(
        "models:/lens@champion",
        store["npy"],
        out,
        tracking_uri=store["uri"],
        progress=False,
        log_mlflow=False,
    )
    table = pd.read_csv(out)
    assert res.num_images == 12 and res.labelled and res.mode == "in-process"
    assert list(table.columns) == ["source", "index", "true_class", *PROBS, "predicted"]
    np.testing.assert_allclose(table[PROBS].sum(axis=1), 1.0, atol=1e-9)
    assert (table["true_class"] == [Path(s).parent.name for s in table["source"]]).all()
    assert (table["predicted"] == np.asarray(CLASSES)[table[PROBS].to_numpy().argmax(1)]).all()
    with use_tracking_uri(store["uri"]):
        pyfunc = mlflow.pyfunc.load_model("models:/lens@champion")
        info = mlflow.models.get_model_info("models:/lens@champion")
    served = pyfunc.predict(_images(table["source"]))
    assert list(served.columns) == CLASSES
    np.testing.assert_allclose(served.to_numpy(), table[PROBS].to_numpy(), rtol=0, atol=1e-6)
    assert info.signature.inputs.inputs[0].shape == (-1, 1, SIZE, SIZE)
    assert [c.name for c in info.signature.outputs.inputs] == CLASSES
    assert info.saved_input_example_info is not None and store["version"] == "1"
    assert info.metadata["deeplense"]["arch"]["normalize"] == "per_image_standard"
    # runs:/ and the checkpoint directory load the same model with the same preprocessing
    for uri in (f"runs:/{store['run_id']}/model", str(store["ckpt"])):
        loaded = load_classifier(uri, store["uri"])
        assert loaded.arch == load_classifier("models:/lens@champion", store["uri"]).arch
    torch_model = load_classifier(str(store["ckpt"])).module
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(_images(table["source"]))).double()
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), served.to_numpy(), atol=1e-6)


def test_dataset_metrics_are_logged_as_their_own_run(store, tmp_path):
    """An HDF5 dataset (imported from .npy): labels known -> metrics equal to classification_metrics of the
    written table, and an MLflow run with the ROC and confusion plots; Parquet output."""
    from mlflow.tracking import MlflowClient

    data = store["data"]
    out = tmp_path / "p.parquet"
    res = run_prediction(
        str(store["ckpt"]), data, out, tracking_uri=store["uri"], splits=["test"], progress=False
    )
    table = pd.read_parquet(out)
    assert len(table) == 3 and set(table["source"].map(lambda s: Path(s).parent.name)) == {"test"}
    labels = table["true_class"].map(CLASSES.index).to_numpy()
    want = classification_metrics(labels, table[PROBS].to_numpy(), CLASSES)
    assert (
        res.metrics["accuracy"] == want["accuracy"]
        and res.metrics["confusion_matrix"] == want["confusion_matrix"]
    )
    client = MlflowClient(store["uri"])
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["deeplense.role"] == "predict"
    assert run.data.metrics["predict_acc"] == pytest.approx(want["accuracy"])
    assert run.data.params["preprocessing.normalize"] == "per_image_standard"
    assert {"roc.png", "confusion.png", "metrics.json", "p.parquet"} <= {
        a.path for a in client.list_artifacts(res.run_id)
    }


def test_fits_files_and_globs(store, tmp_path):
    """FITS images in class folders (labels known) and a glob over .npy files give the .npy numbers."""
    from astropy.io import fits

    paths = sorted((store["npy"] / "test").rglob("*.npy"))
    images = _images(paths)
    for p, image in zip(paths, images):
        target = tmp_path / "fits" / p.parent.name / (p.stem + ".fits")
        target.parent.mkdir(parents=True, exist_ok=True)
        fits.PrimaryHDU(image[0].astype(np.float64)).writeto(target)
    a = run_prediction(
        str(store["ckpt"]), tmp_path / "fits", tmp_path / "a.csv", progress=False, log_mlflow=False
    )
    b = run_prediction(
        str(store["ckpt"]), f"{store['npy']}/**/*.npy", tmp_path / "b.csv", progress=False, log_mlflow=False
    )
    assert a.labelled and b.labelled and a.num_images == b.num_images == 12
    ta, tb = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    ta, tb = _by_stem(ta), _by_stem(tb)
    np.testing.assert_allclose(ta[PROBS].to_numpy(), tb[PROBS].to_numpy(), atol=1e-6)
    # one stacked file: [N, H, W] holds N images, numbered by index, when the caller says axis 0 is a stack
    np.save(tmp_path / "stack.npy", images[:, 0])
    with pytest.raises(InputError, match="stack-axis0"):
        run_prediction(str(store["ckpt"]), tmp_path / "stack.npy", tmp_path / "c.csv", progress=False)
    c = run_prediction(
        str(store["ckpt"]), tmp_path / "stack.npy", tmp_path / "c.csv", progress=False, stack_axis0=True
    )
    tc = pd.read_csv(tmp_path / "c.csv")
    assert not c.labelled and c.run_id is None and tc["index"].tolist() == list(range(12))
    same_order = tb.set_index("source").loc[[str(p.resolve()) for p in paths]]
    np.testing.assert_allclose(tc[PROBS].to_numpy(), same_order[PROBS].to_numpy(), atol=1e-6)


@pytest.mark.parametrize("problem", ["size", "non_finite", "mixed_labels", "suffix", "model"])
def test_bad_input_is_named_before_work_and_nothing_is_written(store, tmp_path, problem):
    src = tmp_path / "in"
    write_deeplense(src, {"axion": 2, "cdm": 2}, seed=1)
    bad = src / "cdm" / "bad.npy"
    model, out = str(store["ckpt"]), tmp_path / "out.csv"
    if problem == "size":
        np.save(bad, np.zeros((SIZE * 2, SIZE * 2)))
        match = f"{bad}.*does not hold images of the model's shape \\[1, {SIZE}, {SIZE}\\]"
    elif problem == "non_finite":
        image = np.zeros((SIZE, SIZE))
        image[0, 0] = np.inf
        np.save(bad, image)
        match = f"{bad}: image 0 has non-finite values"
    elif problem == "mixed_labels":
        bad = src / "loose.npy"
        np.save(bad, np.zeros((SIZE, SIZE)))
        match = "are not .*loose.npy"
    elif problem == "suffix":
        out = tmp_path / "out.txt"
        match = "must end in .csv or .parquet"
    else:
        model = str(tmp_path / "no-such-checkpoint")
        match = "neither an MLflow URI"
    with pytest.raises((InputError, ValueError, FileNotFoundError), match=match):
        run_prediction(model, src, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.slow
def test_ray_data_path_gives_the_in_process_numbers(ray_session, store, tmp_path):
    """ray_threshold=0: read tasks + an actor pool (CPU here) -> the same table, in the same order."""
    a = run_prediction(str(store["ckpt"]), store["npy"], tmp_path / "a.csv", ray_threshold=0, progress=False,
                       log_mlflow=False)  # fmt: skip
    b = run_prediction(str(store["ckpt"]), store["npy"], tmp_path / "b.csv", progress=False, log_mlflow=False)
    assert a.mode == "ray" and b.mode == "in-process"
    ta, tb = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert ta[["source", "index", "true_class", "predicted"]].equals(
        tb[["source", "index", "true_class", "predicted"]]
    )
    np.testing.assert_allclose(ta[PROBS].to_numpy(), tb[PROBS].to_numpy(), atol=1e-6)


def test_cli_prints_a_summary_and_exits_2_on_a_bad_image(store, tmp_path):
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "big.npy", np.zeros((SIZE + 1, SIZE)))
    cmd = [
        sys.executable,
        "jobs/predict.py",
        "--model-uri",
        "models:/lens@champion",
        "--tracking-uri",
        store["uri"],
    ]
    run = dict(cwd=REPO, capture_output=True, text=True)
    ok = subprocess.run(
        [*cmd, "--input", str(store["npy"]), "--out", str(tmp_path / "p.csv"), "--quiet"], **run
    )
    bad = subprocess.run([*cmd, "--input", str(tmp_path / "in"), "--out", str(tmp_path / "q.csv")], **run)
    assert ok.returncode == 0, ok.stderr[-3000:]
    summary = json.loads(ok.stdout[ok.stdout.index("{") :])
    assert summary["images"] == 12 and summary["labelled"] and summary["mlflow_run_id"]
    assert bad.returncode == 2 and str(tmp_path / "in" / "big.npy") in bad.stderr
    assert not (tmp_path / "q.csv").exists()


@pytest.mark.slow
def test_end_to_end_import_train_register_predict(ray_session, tmp_path):
    """The three commands' libraries in a row: a DeepLense-layout .npy set imported, a tiny model trained on
    it with Ray Train (CPU), registered (what --register does), then predicted from the registry on the
    HDF5 test split, on the .npy class folders and on the same images as FITS: one set of numbers."""
    from astropy.io import fits

    from deeplense_ray.config import TrainConfig
    from deeplense_ray.train import run_training

    src = tmp_path / "Model_II"
    write_deeplense(src, {f"{s}/{c}": n for s, n in (("train", 8), ("test", 2)) for c in CLASSES}, seed=11)
    data = tmp_path / "data"
    import_npy(src, data, val_fraction=0.25, progress=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = TrainConfig(model="ResNetSimple", data_dir=str(data), epochs=1, batch_size=6, num_workers=1,
                      model_overrides={"width": 4}, tracking_uri=uri, storage_path=str(tmp_path / "ray"),
                      shuffle_buffer=0, experiment="e2e")  # fmt: skip
    result = run_training(cfg)
    assert register_model(result.model_uri, "e2e", uri) == "1"
    kw = dict(tracking_uri=uri, progress=False)
    h5 = run_prediction("models:/e2e/1", data, tmp_path / "h5.csv", splits=["test"], **kw)
    assert h5.metrics["accuracy"] == pytest.approx(result.test_metrics["accuracy"])
    assert h5.metrics["auc_macro"] == pytest.approx(result.test_metrics["auc_macro"], nan_ok=True)
    npy = run_prediction("models:/e2e/1", src / "test", tmp_path / "npy.csv", log_mlflow=False, **kw)
    for p in (src / "test").rglob("*.npy"):
        target = tmp_path / "fits" / p.parent.name / (p.stem + ".fits")
        target.parent.mkdir(parents=True, exist_ok=True)
        fits.PrimaryHDU(_images([p])[0, 0]).writeto(target)
    fit = run_prediction("models:/e2e/1", tmp_path / "fits", tmp_path / "fits.csv", log_mlflow=False, **kw)
    assert npy.num_images == fit.num_images == h5.num_images == 6
    by_stem = [_by_stem(pd.read_csv(tmp_path / f)) for f in ("npy.csv", "fits.csv")]
    np.testing.assert_allclose(by_stem[0][PROBS].to_numpy(), by_stem[1][PROBS].to_numpy(), atol=1e-6)
    assert npy.metrics["accuracy"] == pytest.approx(h5.metrics["accuracy"])
