"""jobs/study.py / deeplense_ray.study: models x seeds, one report, resume, errors before any work, timm."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from deeplense_ray.study import StudyIncomplete, StudySettings, StudySetupError, parse_models, run_study
from deeplense_ray.study.report import aggregate, markdown_table, mean_std, roc_band
from deeplense_ray.study.settings import LENSIFORMER_PROTOCOL

SIM = {"num_pix": 32, "delta_pix": 0.2, "supersampling": 1}
TINY_VIT = {"model_overrides": {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "mlp_dim": 32}}
TRAIN = {"precision": "fp32", "augment": False, "batch_size": 16}


def _job():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "study_job", Path(__file__).parents[1] / "jobs" / "study.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _timm_importable() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:
        return False
    return True


# ------------------------------------------------------------------------------------------ no cluster
def test_mean_std_table_and_roc_band_by_hand():
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    m, s = mean_std([0.8])
    assert m == 0.8 and math.isnan(s)
    rows = [
        {"model": "A", "seed": 0, "params": 10, "accuracy": 0.5, "auc_macro": 0.6, "auc_x": 0.6, "auc_y": 0.6,
         "images_per_s": 100.0},
        {"model": "A", "seed": 1, "params": 10, "accuracy": 0.7, "auc_macro": 0.8, "auc_x": 0.8, "auc_y": 0.8,
         "images_per_s": 300.0},
    ]  # fmt: skip
    (row,) = aggregate(rows, ["A"], ["x", "y"])
    assert row["n_seeds"] == 2 and row["params"] == 10
    assert row["accuracy_mean"] == pytest.approx(0.6) and row["images_per_s_mean"] == pytest.approx(200.0)
    assert row["auc_macro_std"] == pytest.approx(math.sqrt(0.02))
    assert "0.600 ± 0.141" in markdown_table([row], ["x", "y"])
    # a perfect and a reversed classifier: mean TPR is their average, the band their spread
    y = np.array([0, 0, 1, 1])
    perfect = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9]])
    mean, std = roc_band([y, y], [perfect, perfect[:, ::-1]], 1)
    assert mean[-1] == pytest.approx(1.0) and mean[100] == pytest.approx(0.5) and std[100] > 0.5


def test_bad_model_name_fails_before_any_work(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown model 'Nope'; valid names: ViT"):
        parse_models("ViT,Nope")
    s = StudySettings(models="ViT,Nope", data_dir=str(tmp_path), storage_path=str(tmp_path / "out"), name="x")
    with pytest.raises(StudySetupError, match="Nope"):
        run_study(s)
    main = _job().main

    assert main(["--models", "ResNet18,Nope", "--data", str(tmp_path), "--storage-path", str(tmp_path)]) == 2
    assert "unknown model 'Nope'" in capsys.readouterr().err
    assert (
        main(["--models", "ResNet18", "--data", str(tmp_path / "none"), "--storage-path", str(tmp_path)]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no study directory, no MLflow store, no Ray


@pytest.mark.skipif(_timm_importable(), reason="timm is importable here (see the GPU test below)")
def test_timm_model_is_a_clear_error_where_timm_is_not_importable():
    from deeplense_ray.models import build_model

    with pytest.raises(ValueError, match=r"model 'timm:densenet201' needs timm, which is not importable"):
        parse_models("ResNet18,timm:densenet201")
    with pytest.raises(ValueError, match="needs timm"):
        build_model("timm:densenet201", 64, 1, 2)


def test_timm_model_builds_with_one_channel_and_our_head():
    pytest.importorskip("timm", exc_type=ImportError)
    import torch

    from deeplense_ray.models import build_model

    assert parse_models("timm:resnet18") == ("timm:resnet18",)
    net = build_model("timm:resnet18", 64, 1, 3, dropout=0.1)
    assert net.backbone.conv1.in_channels == 1 and net.head[-1].out_features == 3
    assert net(torch.zeros(2, 1, 64, 64)).shape == (2, 3)
    dense = build_model("timm:densenet201", 64, 1, 2)  # a baseline of the seed documents
    assert dense.eval()(torch.zeros(2, 1, 64, 64)).shape == (2, 2)
    with pytest.raises(ValueError, match="timm has no architecture 'nosuchnet'"):
        parse_models("timm:nosuchnet")


def test_lensiformer_protocol_recipe():
    s = StudySettings(protocol="lensiformer", seeds=1, epochs=5).with_protocol().validate()
    assert s.simulate == "real_galaxy_tiny" and s.model_size == "comparable"
    assert s.models == LENSIFORMER_PROTOCOL["models"]
    rows = StudySettings.dataset_config(s).validate().rows_per_class()
    assert rows == {"train": 500, "val": 25, "test": 500}  # 1000 training and 1000 test images (2 classes)
    f = StudySettings.train_fields(s, "Lensiformer", seed=2, data_dir="/d")
    assert (f["optimizer"], f["lr"], f["epochs"], f["seed"]) == ("adamw", 5e-7, 5, 2)
    from deeplense_ray.sim import resolve_preset

    assert list(resolve_preset("real_galaxy_tiny").class_names) == ["no_sub", "cdm"]


# ------------------------------------------------------------------------------------------ with Ray
@pytest.mark.slow
def test_tiny_study_report_runs_and_resume_without_redoing_finished_runs(ray_session, tmp_path):
    """2 models x 2 seeds x 1 epoch on a simulated 32x32 set; one run fails (an interrupted study), the
    resumed study runs only that one, then the table, the plots and the nested MLflow runs are there."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    s = StudySettings(
        models="ResNetSimple,ViT", simulate="model_ii", preset_overrides=dict(SIM), num_per_class=20, seeds=2,
        epochs=1, model_configs={"ViT": TINY_VIT}, train=dict(TRAIN), cpus_per_run=0.5, tracking_uri=uri,
        storage_path=str(tmp_path / "studies"), name="tiny", fail_runs=(("ViT", 1),),
    )  # fmt: skip
    with pytest.raises(StudyIncomplete, match=r"\['ViT-s1'\] did not finish"):
        run_study(s)
    out = tmp_path / "studies" / "tiny"
    done = {
        p.stem: (p.stat().st_mtime_ns, json.loads(p.read_text())["run_id"])
        for p in (out / "runs").glob("*.json")
    }
    assert sorted(done) == ["ResNetSimple-s0", "ResNetSimple-s1", "ViT-s0"]

    res = run_study(StudySettings(resume=True, name="tiny", storage_path=str(tmp_path / "studies")))
    assert res.ran_now == ["ViT-s1"]
    for key, (mtime, run_id) in done.items():  # finished runs were not redone
        p = out / "runs" / f"{key}.json"
        assert p.stat().st_mtime_ns == mtime and json.loads(p.read_text())["run_id"] == run_id

    assert [r["model"] for r in res.table] == ["ResNetSimple", "ViT"]
    for r in res.table:
        assert r["n_seeds"] == 2 and r["params"] > 0 and r["images_per_s_mean"] > 0
        assert 0 <= r["accuracy_mean"] <= 1 and math.isfinite(r["accuracy_std"])
        assert all(f"auc_{c}_mean" in r for c in ("no_sub", "axion", "cdm"))
    assert "| ResNetSimple |" in res.markdown and "±" in res.markdown
    csv_lines = (out / "study_table.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,n_seeds,params,accuracy_mean,accuracy_std") and len(csv_lines) == 3
    assert len((out / "study_runs.csv").read_text().splitlines()) == 5
    assert (out / "roc_study.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(res.parent_run_id)} >= {
        "study_table.md", "study_table.csv", "study_runs.csv", "roc_study.png"
    }  # fmt: skip
    assert parent.data.metrics["ViT.accuracy_mean"] == pytest.approx(res.table[1]["accuracy_mean"])
    children = client.search_runs(
        [res.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'"
    )
    assert sorted(c.data.tags["study.run"] for c in children) == [
        "ResNetSimple-s0", "ResNetSimple-s1", "ViT-s0", "ViT-s1"
    ]  # fmt: skip
    assert all(c.info.status == "FINISHED" and "test_auc_macro" in c.data.metrics for c in children)
    # one training run per model x seed in the whole store: nothing was trained twice
    runs = client.search_runs([res.experiment_id])
    assert len([r for r in runs if "deeplense.model" in r.data.tags]) == 4
    assert Path(res.data_dir, "manifest.json").is_file()
    # a run's row comes from its one test evaluation: what evaluating its checkpoint anew gives
    from deeplense_ray.train import evaluate_checkpoint

    row = json.loads((out / "runs" / "ResNetSimple-s1.json").read_text())
    again = evaluate_checkpoint(row["checkpoint"], res.data_dir, "test", device="cpu")
    assert row["auc_macro"] == pytest.approx(again["auc_macro"]) and row["accuracy"] == again["accuracy"]
    child = next(c for c in children if c.data.tags["study.run"] == "ResNetSimple-s1")
    assert child.data.metrics["test_auc_macro"] == pytest.approx(row["auc_macro"])


def test_config_file_gives_one_model_its_tuned_settings(tmp_path):
    doc = "model: ViT\ntrain_config:\n  lr: 1.0e-3\n  batch_size: 128\n  seed: 7\n  data_dir: /x\n"
    (tmp_path / "best_config.yaml").write_text(doc)
    from deeplense_ray.study import load_model_config

    model, fields = load_model_config(tmp_path / "best_config.yaml")
    assert model == "ViT" and fields == {"lr": 1e-3, "batch_size": 128}  # seed and data are the study's
    s = StudySettings(
        models="vit,ResNet18", data_dir="/d", model_configs={model: fields}, epochs=2
    ).validate()
    assert StudySettings.train_fields(s, "ViT", seed=1, data_dir="/d")["lr"] == 1e-3
    assert "lr" not in StudySettings.train_fields(s, "ResNet18", seed=1, data_dir="/d")  # TrainConfig default
    with pytest.raises(ValueError, match="'CvT', which is not in models"):
        StudySettings(models="ViT", data_dir="/d", model_configs={"cvt": {}}).validate()
    with pytest.raises(ValueError, match="online training needs simulate"):
        StudySettings(models="ViT", data_dir="/d", online=True).validate()


@pytest.mark.slow
def test_online_study_trains_on_rendered_images_and_evaluates_on_the_fixed_test_split(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    s = StudySettings(
        models="ResNetSimple", simulate="model_ii", online=True, images_per_epoch=32,
        preset_overrides=dict(SIM), num_per_class=8, seeds=1, epochs=1, train=dict(TRAIN), cpus_per_run=0.5,
        tracking_uri=uri, storage_path=str(tmp_path), name="online",
    )  # fmt: skip
    res = run_study(s)
    from deeplense_ray.config import describe_dataset

    info = describe_dataset(res.data_dir)
    assert set(info.split_rows) == {"val", "test"} and info.split_rows["test"] == 12  # 4 per class
    (row,) = res.runs
    run = MlflowClient(tracking_uri=uri).get_run(row["run_id"])
    assert run.data.params["config.simulate"] == "model_ii"
    assert run.data.params["config.images_per_epoch"] == "32"
    with np.load(Path(res.output_dir) / "runs" / "ResNetSimple-s0.npz") as z:
        assert z["y_true"].shape == (12,) and z["probs"].shape == (12, 3)
