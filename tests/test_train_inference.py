"""Task 'inference' end to end on the one training stack (real Ray runtime, renderer, HDF5 shards, SQLite
MLflow store): a tiny model learns a target from a stored dataset better than the prior mean, its metrics
and plots are in the MLflow run, its checkpoint and logged model carry the targets, standardisation and
prior, jobs/predict.py writes readable posteriors; and the same from online simulation.

The target is theta_E (the Einstein radius, uniform in model_ii's [1.0, 1.6] arcsec): a tiny model on a few
hundred 32x32 CPU images learns it within seconds. Sigma_sub has too weak a signal at that size (and cdm
images with hundreds of subhalos render slowly on a CPU): benchmarks/inference.py measures it on a GPU.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from deeplense_ray.config import TrainConfig

TINY = {"width": 8}


@pytest.fixture(scope="module")
def lens_data(tmp_path_factory):
    """A stored dataset of model_ii at 32x32, classes no_sub and axion (theta_E is learnt on no_sub: the axion
    rows must be left out), 160 / 20 / 20 images per class in train / val / test: real HDF5 shards and
    manifest, rendered in this process (the Ray Data build costs ~20 s of start-up on 2 cores)."""
    from deeplense_ray.data.manifest import build_manifest, write_manifest
    from deeplense_ray.data.shards import shard_attrs, write_shard
    from deeplense_ray.sim import resolve_preset, simulate

    out = tmp_path_factory.mktemp("inference-data") / "model_ii_32"
    pre = resolve_preset("model_ii", {"num_pix": 32, "class_names": ["no_sub", "axion"]})
    preset = pre.to_dict()
    shards, rows, meta = [], {}, {}
    for k, (split, n) in enumerate((("train", 320), ("val", 40), ("test", 40))):
        res = simulate(pre, n, 100 + k, "cpu")
        params = {name: v.numpy() for name, v in res.params.items()}
        meta = {name: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for name, v in params.items()}
        attrs = shard_attrs(preset=preset, class_names=pre.class_names, seed=100 + k, dataset_seed=3,
                            split=split, shard_index=0, rows=n, image_dtype="float32")  # fmt: skip
        rel = f"{split}/shard-00000.h5"
        (out / split).mkdir(parents=True)
        digest, _ = write_shard(out / rel, res.images.numpy(), res.labels.numpy(), params, attrs)
        shards.append({"split": split, "index": 0, "path": rel, "rows": n, "sha256": digest, "seed": 100 + k})
        rows[split] = n
    manifest = build_manifest(
        config={"preset": "model_ii", "preset_resolved": preset, "seed": 3}, class_names=pre.class_names,
        image_shape=pre.image_shape, image_dtype="float32", params=meta, split_rows=rows, shards=shards,
    )  # fmt: skip
    write_manifest(out, manifest)
    return out


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(
        model="ResNetSimple", model_overrides=TINY, task="inference", targets=("theta_E",),
        classes=("no_sub",), epochs=8, batch_size=32, lr=3e-3, augment=False, bn_recal_images=256,
        storage_path=str(tmp_path / "ray"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="inference",
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_stored_dataset_learns_theta_E_logs_metrics_and_predicts_posteriors(ray_session, lens_data, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from deeplense_ray.infer.posteriors import read_posteriors
    from deeplense_ray.infer.predict import run_prediction
    from deeplense_ray.tracking import use_tracking_uri
    from deeplense_ray.train import run_training
    from deeplense_ray.train.checkpoint import read_meta

    cfg = _cfg(tmp_path, data_dir=str(lens_data))
    result = run_training(cfg, runner="process")
    test = result.test_metrics
    assert test["n"] == 20  # the no_sub rows of the test split only
    # better than predicting the prior mean (whose RMSE is the prior's std, 0.6 / sqrt(12) = 0.173 arcsec)
    assert test["rmse_over_prior"]["theta_E"] < 0.6, test
    assert math.isfinite(test["nll"]) and 0 <= test["coverage_68"]["theta_E"] <= 1

    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.get_run(result.run_id)
    m = run.data.metrics
    for key in ("val_nll", "val_rmse_theta_E", "val_bias_theta_E", "val_coverage68_theta_E",
                "val_coverage95_theta_E", "val_calibrated", "test_nll", "test_rmse_theta_E",
                "test_bias_theta_E",
                "test_coverage68_theta_E", "test_coverage95_theta_E", "test_calibrated"):  # fmt: skip
        assert key in m, key
    assert "val_auc_macro" not in m and "train_acc" not in m
    assert len(client.get_metric_history(result.run_id, "val_nll")) == cfg.epochs
    assert run.data.tags["calibration"].startswith(("pass", "fail"))
    assert run.data.params["config.task"] == "inference"
    arts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"calibration_test.png", "pred_vs_true_test.png", "curves.png", "metrics.json"} <= arts
    # best checkpoint by the lowest val NLL; its meta carries what predict needs to de-standardise
    nll = {int(h["epoch"]): h["val_nll"] for h in result.history}
    assert nll[result.best_epoch] == min(nll.values())
    arch = read_meta(result.best_checkpoint)["arch"]
    assert (
        arch["task"] == "inference" and arch["targets"] == ["theta_E"] and arch["class_names"] == ["no_sub"]
    )
    assert arch["target_prior"] == [["uniform", 1.0, 1.6]]
    assert math.isclose(arch["target_loc"][0], 1.3) and math.isclose(
        arch["target_scale"][0], 0.6 / math.sqrt(12)
    )

    # the logged pyfunc: per-lens posterior mean and std in arcsec
    from deeplense_ray.tracking.models import example_images

    images = example_images(lens_data, n=4)
    with use_tracking_uri(result.tracking_uri):
        frame = mlflow.pyfunc.load_model(result.model_uri).predict(images)
    assert list(frame.columns) == ["mean_theta_E", "std_theta_E"]
    assert ((frame["mean_theta_E"] > 0.5) & (frame["mean_theta_E"] < 2.5)).all() and (
        frame["std_theta_E"] > 0
    ).all()

    # jobs/predict.py: a posterior file and a table of the test split's no_sub lenses, truths from the shards
    out = tmp_path / "post.npz"
    pred = run_prediction(result.model_uri, lens_data, out, tracking_uri=result.tracking_uri, splits=["test"],
                          progress=False)  # fmt: skip
    post = read_posteriors(out)
    assert post.targets == ("theta_E",) and post.n == 20 and post.model_uri == result.model_uri
    assert post.truth is not None and ((post.truth >= 1.0) & (post.truth <= 1.6)).all()
    assert post.prior_kind == ("uniform",) and post.prior_low[0] == 1.0 and post.prior_high[0] == 1.6
    # the same lenses, in the same order, with the same posteriors as the run's own test evaluation
    assert list(post.ids) == list(result.test_predictions["ids"])
    np.testing.assert_allclose(post.mean, result.test_predictions["mean"], rtol=1e-4)
    np.testing.assert_allclose(post.truth, result.test_predictions["truth"], rtol=1e-5)
    assert pred.metrics["n"] == 20 and pred.run_id is not None
    table = run_prediction(result.model_uri, lens_data, tmp_path / "post.csv",
                           tracking_uri=result.tracking_uri,
                           splits=["test"], progress=False, log_mlflow=False).table  # fmt: skip
    assert {"mean_theta_E", "std_theta_E", "true_theta_E"} <= set(table.columns) and len(table) == 20


def test_online_simulation_renders_only_the_task_classes_and_logs_the_prior(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    from deeplense_ray.train import run_training

    cfg = _cfg(
        tmp_path, simulate="model_ii", sim_overrides={"num_pix": 32}, classes=None, epochs=2,
        images_per_epoch=384, val_size=96, test_size=96,
    )  # fmt: skip
    info = cfg.resolved().validate()
    assert info.class_names == ("no_sub", "axion", "cdm")  # theta_E exists on every class
    cfg = _cfg(tmp_path, simulate="model_ii", sim_overrides={"num_pix": 32}, epochs=2, images_per_epoch=384,
               val_size=96, test_size=96)  # fmt: skip
    result = run_training(cfg, runner="process")
    assert result.test_metrics["n"] == 96 and len(result.history) == 2
    assert result.history[-1]["images_seen"] == 2 * 384
    run = MlflowClient(tracking_uri=result.tracking_uri).get_run(result.run_id)
    resolved = json.loads(run.data.params["simulation.preset_resolved.class_names"].replace("'", '"'))
    assert resolved == ["no_sub"]
    assert math.isfinite(run.data.metrics["test_nll"])
