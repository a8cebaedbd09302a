"""jobs/study.py --task inference: models x seeds of regression networks with per-lens Gaussian posteriors,
one report (table of RMSE / NLL / coverage, calibration figure), resume, errors before Ray.

A real tiny study: the suite's local Ray runtime, a model_ii dataset built by the study itself (real HDF5
shards, no_sub images only, 32x32), a SQLite MLflow store in tmp_path. The target is theta_E (learnable at
CPU size; Sigma_sub is not, see tests/test_train_inference.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from deeplense_ray.study import StudySettings, StudySetupError, run_study
from deeplense_ray.study.report import aggregate_inference, coverage_band, markdown_table_inference

SIM = {"num_pix": 32, "delta_pix": 0.2, "supersampling": 1, "class_names": ["no_sub"]}
TRAIN = {"precision": "fp32", "augment": False, "batch_size": 32, "lr": 3e-3, "bn_recal_images": 64,
         "model_overrides": {"width": 8}}  # fmt: skip
TARGET_COLUMNS = ("rmse", "rmse_over_prior", "bias", "std", "coverage68", "coverage95")


def _job():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "study_job", Path(__file__).parents[1] / "jobs" / "study.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------ no cluster
def test_table_and_calibration_band_by_hand():
    rows = [
        {"model": "A", "params": 10, "images_per_s": 100.0, "nll": 1.0, "calibrated": 1.0,
         **{f"{m}_theta_E": 0.1 for m in TARGET_COLUMNS}},
        {"model": "A", "params": 10, "images_per_s": 120.0, "nll": 2.0, "calibrated": 0.0,
         **{f"{m}_theta_E": 0.3 for m in TARGET_COLUMNS}},
    ]  # fmt: skip
    (r,) = aggregate_inference(rows, ["A"], ["theta_E"])
    assert r["nll_mean"] == 1.5 and r["nll_std"] == pytest.approx(math.sqrt(0.5))
    assert r["calibrated_mean"] == 0.5 and r["rmse_theta_E_mean"] == pytest.approx(0.2)
    md = markdown_table_inference([r], ["theta_E"])
    assert "| A | theta_E | 10 | 110 ± 14 |" in md and "| 1/2 | 2 |" in md
    # a perfect posterior (truth at the mean, unit std) covers every level; one 10 sigma off covers none
    n = 50
    good = {"mean": np.zeros((n, 1)), "cov": np.ones((n, 1, 1)), "truth": np.zeros((n, 1))}
    bad = {"mean": np.zeros((n, 1)), "cov": np.ones((n, 1, 1)), "truth": np.full((n, 1), 10.0)}
    mean, std = coverage_band([good, bad])
    assert np.allclose(mean, 0.5) and np.all(std > 0.7)


def test_bad_inference_options_exit_2_naming_the_value_before_ray(no_ray, tmp_path, capsys):
    main = _job().main
    base = ["--models", "ResNetSimple", "--simulate", "model_ii", "--preset-override", "num_pix=8",
            "--preset-override", "supersampling=1", "--storage-path", str(tmp_path / "out"),
            "--tracking-uri", f"sqlite:///{tmp_path}/m"]  # fmt: skip
    assert main([*base, "--task", "inference"]) == 2
    assert "task 'inference' needs targets" in capsys.readouterr().err
    assert main([*base, "--task", "inference", "--targets", "theta_E,nope"]) == 2
    assert "target 'nope' needs the per-image parameter 'nope'" in capsys.readouterr().err
    assert main([*base, "--targets", "theta_E"]) == 2  # targets are options of the inference task
    assert "targets ['theta_E']" in capsys.readouterr().err
    bad = StudySettings(models="ResNetSimple", simulate="model_ii", task="inference", targets=" , ",
                        storage_path=str(tmp_path / "out"))  # fmt: skip
    with pytest.raises(StudySetupError, match="task 'inference' needs targets"):
        run_study(bad)
    with pytest.raises(ValueError, match=r"\['targets', 'task'\] are set by the study itself"):
        StudySettings(
            models="ResNetSimple", data_dir="/d", train={"task": "inference", "targets": "x"}
        ).validate()
    assert not (tmp_path / "out").exists()  # no study directory, no Ray
    job = _job()
    argv = ["--models", "ResNetSimple", "--data", "/d", "--task", "inference",
            "--targets", "theta_E,sigma_sub"]  # fmt: skip
    s = job.settings_from_args(job.build_parser().parse_args(argv))
    assert (s.task, s.targets) == ("inference", ("theta_E", "sigma_sub"))
    fields = StudySettings.train_fields(s, "ResNetSimple", seed=1, data_dir="/d")
    assert (fields["task"], fields["targets"]) == ("inference", ("theta_E", "sigma_sub"))


# ------------------------------------------------------------------------------------------ with Ray
@pytest.mark.slow
def test_inference_study_table_calibration_figure_mlflow_and_resume(ray_session, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = tmp_path / "studies"
    s = StudySettings(
        models="ResNetSimple", simulate="model_ii", preset_overrides=dict(SIM), num_per_class=100,
        splits={"train": 0.6, "val": 0.2, "test": 0.2}, seeds=2, epochs=2,
        train=dict(TRAIN), cpus_per_run=0.5, tracking_uri=uri, storage_path=str(storage), name="inf",
        task="inference", targets="theta_E",
    )  # fmt: skip
    res = run_study(s)
    out = Path(res.output_dir)
    assert sorted(res.ran_now) == ["ResNetSimple-s0", "ResNetSimple-s1"]
    assert "test NLL" in capsys.readouterr().err  # the progress lines: the task's metrics

    # the table: per model mean +- std over seeds of the regression metrics, all finite
    (r,) = res.table
    assert (
        r["model"] == "ResNetSimple" and r["n_seeds"] == 2 and r["params"] > 0 and r["images_per_s_mean"] > 0
    )
    for key in ("nll", *(f"{m}_theta_E" for m in TARGET_COLUMNS)):
        assert math.isfinite(r[f"{key}_mean"]) and math.isfinite(r[f"{key}_std"]), key
    assert 0 <= r["coverage68_theta_E_mean"] <= 1 and 0 <= r["calibrated_mean"] <= 1
    assert "accuracy_mean" not in r
    assert "| ResNetSimple | theta_E |" in res.markdown and "RMSE / prior std" in res.markdown
    header = (out / "study_table.csv").read_text().splitlines()[0].split(",")
    assert {"nll_mean", "rmse_theta_E_mean", "coverage95_theta_E_std", "calibrated_mean"} <= set(header)
    assert len((out / "study_runs.csv").read_text().splitlines()) == 3
    assert (out / "calibration_study.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "roc_study.png").exists()

    # per run: the row's metrics, and the per-lens posteriors in physical units (arcsec)
    row = json.loads((out / "runs" / "ResNetSimple-s1.json").read_text())
    with np.load(out / "runs" / "ResNetSimple-s1.npz") as z:
        mean, cov, truth = z["mean"], z["cov"], z["truth"]
    n = row["n_test"]
    assert n > 0 and mean.shape == truth.shape == (n, 1) and cov.shape == (n, 1, 1)
    assert ((truth >= 1.0) & (truth <= 1.6)).all() and (cov > 0).all()
    assert row["rmse_theta_E"] == pytest.approx(float(np.sqrt(((mean - truth) ** 2).mean())), rel=1e-6)

    # MLflow: the parent run holds the report and <model>.<metric>_mean / _std; the runs nested under it
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(res.parent_run_id)} >= {
        "study_table.md", "study_table.csv", "study_runs.csv", "calibration_study.png"
    }  # fmt: skip
    m = parent.data.metrics
    assert m["ResNetSimple.nll_mean"] == pytest.approx(r["nll_mean"])
    assert "ResNetSimple.rmse_over_prior_theta_E_mean" in m and "ResNetSimple.coverage68_theta_E_std" in m
    assert parent.data.params["study.task"] == "inference"
    children = client.search_runs(
        [res.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'"
    )
    assert len(children) == 2 and all("test_nll" in c.data.metrics for c in children)
    child = next(c for c in children if c.data.tags["study.run"] == "ResNetSimple-s1")
    assert child.data.metrics["test_nll"] == pytest.approx(row["nll"])

    # resume of a finished study (jobs/study.py): nothing re-runs, the settings (task, targets) are kept
    done = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert _job().main(["--resume", "--name", "inf", "--storage-path", str(storage)]) == 0
    printed = capsys.readouterr().out
    assert "2 runs (0 now)" in printed and "calibration_study.png" in printed
    assert "| ResNetSimple | theta_E |" in printed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == done

    # a run trained but whose result was not written: only evaluated again (evaluate_inference), same numbers
    (out / "runs" / "ResNetSimple-s1.json").unlink()
    res2 = run_study(StudySettings(resume=True, name="inf", storage_path=str(storage)))
    assert res2.ran_now == ["ResNetSimple-s1"]
    again = json.loads((out / "runs" / "ResNetSimple-s1.json").read_text())
    assert again["run_id"] == row["run_id"] and again["nll"] == pytest.approx(row["nll"], rel=1e-4)
    assert len(client.search_runs([res.experiment_id])) == 3  # 2 training runs + the parent: none twice
