"""The Gaussian posterior head of task 'inference' (train/gaussian.py) against closed forms, the targets and
their priors (train/targets.py), the calibration check, and the options checked before Ray starts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

from deeplense_ray.train.gaussian import (
    calibration_check,
    covariance,
    coverage,
    gaussian_nll_loss,
    head_to_gaussian,
    nll,
    num_outputs,
    num_targets_of,
    regression_metrics,
    split_head,
    to_physical,
    uniform_moments,
)


@pytest.mark.parametrize("t", [1, 2, 3])
def test_nll_and_covariance_equal_multivariate_normal(t):
    gen = torch.Generator().manual_seed(t)
    out = torch.randn(7, num_outputs(t), generator=gen, dtype=torch.float64)
    y = torch.randn(7, t, generator=gen, dtype=torch.float64)
    mean, factor = split_head(out, t)
    assert torch.equal(mean, out[:, :t])
    assert torch.allclose(torch.diagonal(factor, dim1=1, dim2=2), torch.exp(out[:, t : 2 * t]))
    assert torch.equal(factor, torch.tril(factor))  # lower triangular
    ref = MultivariateNormal(mean, precision_matrix=factor @ factor.transpose(1, 2))
    assert torch.allclose(nll(out, y), -ref.log_prob(y), atol=1e-10)
    assert torch.allclose(covariance(factor), ref.covariance_matrix, atol=1e-10)
    assert math.isclose(float(gaussian_nll_loss(out, y)), float(-ref.log_prob(y).mean()), rel_tol=1e-6)
    m, c = head_to_gaussian(out.numpy(), t)
    np.testing.assert_allclose(c, ref.covariance_matrix.numpy(), atol=1e-10)
    assert num_targets_of(num_outputs(t)) == t


def test_gradients_flow_and_head_sizes():
    assert [num_outputs(t) for t in (1, 2, 3)] == [2, 5, 9]
    with pytest.raises(ValueError, match="T \\+ T\\(T\\+1\\)/2"):
        num_targets_of(4)
    out = torch.zeros(4, 5, requires_grad=True)
    gaussian_nll_loss(out, torch.ones(4, 2)).backward()
    assert out.grad is not None and torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0


def test_physical_units_and_uniform_moments():
    mean, sd = uniform_moments(0.0, 4e-3)
    assert math.isclose(mean, 2e-3) and math.isclose(sd, 4e-3 / math.sqrt(12))
    m, c = to_physical(
        np.array([[1.0, -1.0]]), np.array([[[1.0, 0.5], [0.5, 4.0]]]), [2.0, -23.0], [0.1, 0.5]
    )
    np.testing.assert_allclose(m, [[2.1, -23.5]])
    np.testing.assert_allclose(c, [[[0.01, 0.025], [0.025, 1.0]]])


def _posteriors(n=4000, sd=0.3, seed=0):
    """Head outputs of a calibrated one-target posterior N(mu, sd^2) per lens and truths drawn from it."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=n)
    truth = mu + sd * rng.normal(size=n)
    # precision factor L = 1/sd: log-diagonal -log(sd)
    out = np.stack([mu, np.full(n, -math.log(sd))], axis=1)
    return out, truth[:, None]


def test_calibrated_head_passes_the_check_an_over_confident_one_fails():
    out, truth = _posteriors()
    cov = coverage(*head_to_gaussian(out, 1), truth)
    assert abs(cov[0, 0] - 0.68) < 0.03 and abs(cov[1, 0] - 0.95) < 0.02
    assert calibration_check(cov)
    confident = out.copy()
    confident[:, 1] += math.log(2.0)  # the predicted std scaled down by 2
    cov_bad = coverage(*head_to_gaussian(confident, 1), truth)
    assert cov_bad[0, 0] < 0.45 and not calibration_check(cov_bad)
    loose = out.copy()
    loose[:, 1] -= math.log(2.0)  # under-confident fails too
    assert not calibration_check(coverage(*head_to_gaussian(loose, 1), truth))
    # the same through the metrics the loop logs
    good = regression_metrics(out, truth, ["sigma_sub"], [0.0], [1.0])
    bad = regression_metrics(confident, truth, ["sigma_sub"], [0.0], [1.0])
    assert good["calibrated"] == 1 and bad["calibrated"] == 0
    assert bad["nll"] > good["nll"]
    assert math.isclose(good["rmse"]["sigma_sub"], 0.3, rel_tol=0.05)
    assert set(good["calibration_curve"]) >= {0.5, 0.95} and len(good["mean"]) == 4000


def test_regression_metrics_in_physical_units_and_diverged():
    out, truth = _posteriors(n=500)
    m = regression_metrics(out, truth, ["theta_E"], [1.3], [0.1], prior_std=[0.2])
    assert math.isclose(m["rmse"]["theta_E"], 0.1 * math.sqrt(((out[:, 0] - truth[:, 0]) ** 2).mean()))
    assert math.isclose(m["rmse_over_prior"]["theta_E"], m["rmse"]["theta_E"] / 0.2)
    np.testing.assert_allclose(m["truth"][:, 0], 1.3 + 0.1 * truth[:, 0])
    out[3, 0] = np.nan
    d = regression_metrics(out, truth, ["theta_E"], [1.3], [0.1])
    assert d["diverged"] == 1 and math.isnan(d["nll"]) and d["calibrated"] == 0


def test_targets_values_classes_and_priors():
    from deeplense_ray.train.targets import (
        check_task_options,
        default_classes,
        target_spec,
        target_values,
    )

    params = {"subhalo_sigma_sub": np.array([1e-3, 2e-3]), "axion_mass": np.array([1e-23, 1e-22])}
    np.testing.assert_allclose(
        target_values(params, ["sigma_sub", "log10_m_axion"]), [[1e-3, -23], [2e-3, -22]]
    )
    tv = target_values({k: torch.as_tensor(v) for k, v in params.items()}, ["log10_m_axion"])
    assert isinstance(tv, torch.Tensor) and torch.allclose(
        tv[:, 0], torch.tensor([-23.0, -22.0], dtype=torch.float64)
    )
    with pytest.raises(KeyError, match="theta_E"):
        target_values(params, ["theta_E"])
    assert default_classes(["sigma_sub"], ("no_sub", "axion", "cdm")) == ("cdm",)
    assert default_classes(["theta_E"], ("no_sub", "cdm")) == ("no_sub", "cdm")
    with pytest.raises(ValueError, match="different classes"):
        default_classes(["sigma_sub", "log10_m_axion"], ("no_sub", "axion", "cdm"))
    spec = target_spec(
        ["sigma_sub", "e1"], {"sigma_sub": [0.0, 4e-3]}, np.array([[0, -0.2], [0, 0.2], [0, 0.0]])
    )
    assert spec["target_prior"] == [["uniform", 0.0, 4e-3], ["uniform", -0.2, 0.2]]
    assert math.isclose(spec["target_scale"][0], 4e-3 / math.sqrt(12)) and math.isclose(
        spec["target_loc"][1], 0
    )
    with pytest.raises(ValueError, match="needs targets"):
        check_task_options("inference", (), None)
    with pytest.raises(ValueError, match="options of task 'inference'"):
        check_task_options("classification", ("sigma_sub",), None)
    with pytest.raises(ValueError, match="exists on 'cdm' images only"):
        check_task_options("inference", ("sigma_sub",), ("no_sub",))


def test_inference_config_checked_before_ray(no_ray):
    from deeplense_ray.config import TrainConfig

    base = dict(model="ResNetSimple", simulate="deeplense_model_ii", task="inference")
    with pytest.raises(ValueError, match="task must be one of"):
        TrainConfig(**{**base, "task": "regress"}).validate_options()
    # the legacy Model II recipe has no Sigma_sub per image (a fixed subhalo count): named before Ray
    with pytest.raises(ValueError, match="subhalo_sigma_sub"):
        TrainConfig(**base, targets="sigma_sub", sim_overrides={"num_pix": 16}).validate()
    cfg = TrainConfig(**base, targets="log10_m_axion", sim_overrides={"num_pix": 16})
    info = cfg.validate()
    assert info.class_names == ("axion",)  # rendered: only the images the target exists on
    assert TrainConfig(model="ViT", data_dir="d").task == "classification"


def test_tune_settings_default_to_the_nll_for_inference():
    from deeplense_ray.tune.settings import TuneSettings

    s = TuneSettings(model="ResNetSimple", train_overrides={"task": "inference", "targets": ["theta_E"]})
    s.validate()
    assert s.metric == "val_nll" and s.resolved_mode == "min"
    with pytest.raises(ValueError, match="classification metric"):
        TuneSettings(model="ResNetSimple", metric="val_acc",
                     train_overrides={"task": "inference", "targets": ["theta_E"]}).validate()  # fmt: skip
    plain = TuneSettings(model="ResNetSimple").validate()
    assert plain.metric == "val_auc_macro" and plain.resolved_mode == "max"


def test_train_and_tune_jobs_take_the_task_flags():
    import importlib.util

    from deeplense_ray.config import TrainConfig

    def job(name):
        path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_job", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    train = job("train")
    argv = ["--model", "ResNet18", "--simulate", "model_ii", "--task", "inference", "--targets", "sigma_sub"]
    cfg = train.config_from_args(train.build_parser().parse_args(argv))
    assert cfg.task == "inference" and cfg.targets == ("sigma_sub",) and cfg.classes is None
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    tune = job("tune")
    args = tune.build_parser().parse_args(
        ["--model", "ResNet18", "--task", "inference", "--targets", "theta_E"]
    )
    settings = tune.settings_from_args(args)
    assert settings.train_overrides == {"task": "inference", "targets": ["theta_E"]}
    assert settings.validate().metric == "val_nll" and settings.resolved_mode == "min"
