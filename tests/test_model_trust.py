"""No model or checkpoint runs code when it is loaded.

A checkpoint file that ``torch.load(weights_only=True)`` refuses ends a job with one line naming the file and
exit status 2 (predict with a checkpoint directory, train --resume). A model logged by train/tune is a pyfunc
"from code" whose weights are a tensor file: ``jobs/predict.py --model-uri`` and ``mlflow.pyfunc`` load it
without unpickling anything (an audit hook makes any unpickling of a class raise while it loads); a model
logged in the pickle format is refused unless the user says it is trusted.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplense_ray.train.checkpoint import (
    MODEL_FILE,
    CheckpointError,
    load_model_from_checkpoint,
    save_checkpoint,
)
from deeplense_ray.train.modules import build_classifier
from tests.test_job_args import _job

SIZE = 16
CLASSES = ["no_sub", "cdm"]
ARCH = {
    "model": "ResNetSimple",
    "model_size": "default",
    "model_overrides": {"width": 4},
    "image_shape": [1, SIZE, SIZE],
    "class_names": CLASSES,
    "pixel_scale": 0.1,
    "normalize": "per_image_standard",
}


class Custom:
    """A class weights_only loading does not know (any pickled object of a user's class)."""

    def __init__(self, value: int = 1):
        self.value = value


def _checkpoint(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_classifier(ARCH)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    return save_checkpoint(
        directory, model=model, optimizer=opt, scheduler=sched, scaler=None, epoch=1,
        config={**ARCH, "seed": 0}, metrics={}, history=[],
    )  # fmt: skip


def _poison(ckpt: Path) -> Path:
    """``model.pt`` replaced by a pickle holding an object of a custom class; returns the file."""
    bad = ckpt / MODEL_FILE
    torch.save({"weight": torch.zeros(2), "extra": Custom()}, bad)
    return bad


def _run(main, argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return rc, err


# ------------------------------------------------------------------------------------ refused checkpoints
def test_a_refused_checkpoint_is_a_typed_error_naming_the_file(tmp_path):
    bad = _poison(_checkpoint(tmp_path / "ckpt"))
    with pytest.raises(CheckpointError) as info:
        load_model_from_checkpoint(tmp_path / "ckpt")
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg
    assert str(bad) in msg and f"{__name__}.Custom" in msg, msg


def test_predict_with_a_refused_checkpoint_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    import deeplense_ray.runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a model that does not load")

    monkeypatch.setattr(deeplense_ray.runtime, "connect", no_ray)
    bad = _poison(_checkpoint(tmp_path / "ckpt"))
    np.save(tmp_path / "x.npy", np.zeros((SIZE, SIZE), np.float32))
    argv = ["--model-uri", str(tmp_path / "ckpt"), "--input", str(tmp_path / "x.npy"),
            "--out", str(tmp_path / "p.csv"), "--no-mlflow", "--quiet"]  # fmt: skip
    rc, err = _run(_job("predict").main, argv, capsys)
    assert rc == 2 and len(err) == 1, err
    assert str(bad) in err[0] and "weights_only" in err[0], err
    assert not (tmp_path / "p.csv").exists()


def test_train_resume_of_a_run_with_a_refused_checkpoint_exits_2_before_ray(tmp_path, capsys, monkeypatch):
    """The run's checkpoints are read before Ray starts: a refused file is named in one line, exit 2."""
    import deeplense_ray.runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run whose checkpoint does not load")

    monkeypatch.setattr(deeplense_ray.runtime, "connect", no_ray)
    run = tmp_path / "runs" / "r1"
    _checkpoint(run / "checkpoint_epoch_00001")
    bad = _poison(_checkpoint(run / "checkpoint_epoch_00002"))
    argv = ["--model", "ResNetSimple", "--simulate", "model_ii", "--resume", "--run-name", "r1",
            "--storage-path", str(tmp_path / "runs"), "--runner", "task"]  # fmt: skip
    rc, err = _run(_job("train").main, argv, capsys)
    assert rc == 2 and len(err) == 1, err
    assert str(bad) in err[0] and f"{__name__}.Custom" in err[0], err


# ------------------------------------------------------------------------------------------ no pickle
@contextmanager
def no_unpickling():
    """Inside the block, unpickling any class or function (``pickle.find_class``, which the C and Python
    unpicklers, cloudpickle and ``torch.load(weights_only=False)`` all go through) raises. The
    weights_only unpickler of torch resolves its few allowed names itself."""
    active = [True]

    def hook(event, args):
        if active[0] and event == "pickle.find_class":
            raise RuntimeError(f"unpickled {args[0]}.{args[1]}")

    sys.addaudithook(hook)  # an audit hook cannot be removed: it is switched off on leaving the block
    try:
        yield
    finally:
        active[0] = False


@pytest.fixture(scope="module")
def models_store(tmp_path_factory):
    """A checkpoint logged and registered as train/tune do ('lens' @ champion), and the same network logged
    in the pickle format (the pytorch flavor), in one real SQLite store; images to predict."""
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from deeplense_ray.tracking import get_or_create_experiment, use_tracking_uri
    from deeplense_ray.tracking.models import METADATA_KEY, classifier_signature, register_checkpoint

    root = tmp_path_factory.mktemp("trust")
    ckpt = _checkpoint(root / "ckpt", seed=5)
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(get_or_create_experiment("trust", uri))
    model_uri, _ = register_checkpoint(ckpt, "lens", tracking_uri=uri, run_id=run.info.run_id)
    old = client.create_run(get_or_create_experiment("trust", uri))
    with use_tracking_uri(uri), mlflow.start_run(run_id=old.info.run_id):
        pickled = mlflow.pytorch.log_model(
            load_model_from_checkpoint(ckpt), name="model", serialization_format="pickle",
            signature=classifier_signature([1, SIZE, SIZE], CLASSES), metadata={METADATA_KEY: {"arch": ARCH}},
        ).model_uri  # fmt: skip
    images = np.random.default_rng(0).normal(size=(3, 1, SIZE, SIZE)).astype(np.float32)
    for k, image in enumerate(images):
        np.save(root / f"img{k}.npy", image[0])
    with torch.no_grad():
        want = torch.softmax(load_model_from_checkpoint(ckpt)(torch.from_numpy(images)).double(), 1).numpy()
    return {"uri": uri, "run_id": run.info.run_id, "model_uri": model_uri, "pickled": pickled, "root": root,
            "images": images, "want": want}  # fmt: skip


def test_a_logged_model_is_code_spec_and_weights_and_loads_without_unpickling(models_store, tmp_path, capsys):
    """The logged model holds no pickle of an object (its weights load with weights_only); predict on
    models:/NAME@ALIAS and runs:/, and mlflow.pyfunc, load it with any unpickling of a class made to raise."""
    import mlflow
    import pandas as pd

    from deeplense_ray.infer import load_classifier
    from deeplense_ray.tracking import use_tracking_uri

    s = models_store
    with use_tracking_uri(s["uri"]):
        local = Path(mlflow.artifacts.download_artifacts("models:/lens@champion", dst_path=str(tmp_path)))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert "MLmodel" in files and "pyfunc_model.py" in files and "artifacts/spec.json" in files, files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pth"))], files
    weights = [f for f in files if f.startswith("artifacts/") and f.endswith(".pt")]
    assert len(weights) == 1 and torch.load(local / weights[0], weights_only=True).keys()
    assert "pytorch" not in mlflow.models.Model.load(str(local)).flavors
    with no_unpickling():
        for uri in ("models:/lens@champion", f"runs:/{s['run_id']}/model"):
            loaded = load_classifier(uri, s["uri"])
            assert loaded.arch["class_names"] == CLASSES and loaded.arch["normalize"] == "per_image_standard"
        with use_tracking_uri(s["uri"]):
            served = mlflow.pyfunc.load_model("models:/lens@champion").predict(s["images"])
        out = tmp_path / "p.csv"
        argv = ["--model-uri", "models:/lens@champion", "--input", str(s["root"] / "img*.npy"),
                "--out", str(out), "--tracking-uri", s["uri"], "--no-mlflow", "--quiet"]  # fmt: skip
        rc, err = _run(_job("predict").main, argv, capsys)
    assert rc == 0, err
    assert list(served.columns) == CLASSES
    np.testing.assert_allclose(served.to_numpy(), s["want"], atol=1e-6)
    table = pd.read_csv(out).sort_values("source")
    np.testing.assert_allclose(table[[f"prob_{c}" for c in CLASSES]].to_numpy(), s["want"], atol=1e-6)


def test_a_pickled_model_is_refused_unless_the_user_trusts_the_store(models_store, tmp_path, capsys):
    from deeplense_ray.infer import load_classifier

    s = models_store
    argv = ["--model-uri", s["pickled"], "--input", str(s["root"] / "img*.npy"), "--tracking-uri", s["uri"],
            "--no-mlflow", "--quiet"]  # fmt: skip
    rc, err = _run(_job("predict").main, [*argv, "--out", str(tmp_path / "a.csv")], capsys)
    assert rc == 2 and len(err) == 1, err
    assert s["pickled"] in err[0] and "--trust-pickled-model" in err[0], err
    assert not (tmp_path / "a.csv").exists()
    trusted = [*argv, "--out", str(tmp_path / "b.csv"), "--trust-pickled-model"]
    rc, err = _run(_job("predict").main, trusted, capsys)
    assert rc == 0, err
    with no_unpickling(), pytest.raises(RuntimeError, match="unpickled"):  # the guard sees a real unpickling
        load_classifier(s["pickled"], s["uri"], trust_pickled_model=True)
