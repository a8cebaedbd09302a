"""What a population inference leaves behind: its plot and its MLflow run (``jobs/population.py``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deeplense_ray.infer.population import PopulationResult
from deeplense_ray.tracking.plots import save_png


def plot_population(result: PopulationResult, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """PNG: the (mu, sigma) posterior (68 / 95 % highest-density contours), the mu marginal with its
    equal-tailed intervals (and the mean of the true values when known), the sigma marginal."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure


    fig = Figure(figsize=(13.5, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax_joint, ax_mu, ax_sig = fig.subplots(1, 3)
    mu, sig, dens = result.mu, result.sigma, result.density
    flat = np.sort(dens.ravel())[::-1]
    cum = np.cumsum(flat) / flat.sum()
    levels = sorted({float(flat[min(np.searchsorted(cum, q), flat.size - 1)]) for q in (0.95, 0.68)})
    ax_joint.contourf(mu, sig, dens.T, levels=20, cmap="Blues")
    if len(levels) == 2 and levels[0] < levels[1] and sig.size > 1 and mu.size > 1:
        ax_joint.contour(mu, sig, dens.T, levels=levels, colors=["k", "k"], linestyles=["--", "-"])
    ax_joint.set_xlabel(f"mu ({result.target})")
    ax_joint.set_ylabel(f"sigma ({result.target})")
    ax_joint.set_title("posterior of (mu, sigma): 68 / 95 % HPD")
    ax_mu.plot(mu, result.mu_marginal, color="C0")
    for lv, alpha in ((0.95, 0.15), (0.68, 0.3)):
        lo, hi = result.mu_intervals[lv]
        inside = (mu >= lo) & (mu <= hi)
        ax_mu.fill_between(mu[inside], result.mu_marginal[inside], color="C0", alpha=alpha,
                           label=f"{round(lv * 100)} % equal-tailed")  # fmt: skip
    if result.truth is not None:
        ax_mu.axvline(result.truth["mean"], color="C3", label="mean of true values")
    ax_mu.set_xlabel(f"mu ({result.target})")
    ax_mu.set_title(f"mu = {result.mu_mean:.3g} +- {result.mu_std:.2g}  (N = {result.n})")
    ax_mu.legend(fontsize=8)
    ax_sig.plot(sig, result.sigma_marginal, color="C1")
    ax_sig.axvline(result.sigma_upper95, color="C1", ls="--", label="95 % upper limit")
    if result.truth is not None:
        ax_sig.axvline(result.truth["std"], color="C3", label="std of true values")
    ax_sig.set_xlabel(f"sigma ({result.target})")
    ax_sig.set_title(f"sigma: median {result.sigma_median:.2g}, < {result.sigma_upper95:.2g} (95 %)")
    ax_sig.legend(fontsize=8)
    if title:
        fig.suptitle(title, y=1.04)
    return save_png(fig, path)


def log_population_run(
    result: PopulationResult,
    tracking_uri: str,
    experiment: str,
    *,
    params: Mapping[str, Any],
    artifacts: Sequence[str | os.PathLike[str]],
) -> str:
    """One MLflow run: ``params``, the mu / sigma summaries as metrics, ``artifacts`` (JSON, PNG). Run id."""
    from mlflow.tracking import MlflowClient

    from deeplense_ray.tracking import get_or_create_experiment, log_metrics, log_params

    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = get_or_create_experiment(experiment, tracking_uri)
    run = client.create_run(
        exp_id, run_name=f"population-{result.target}-n{result.n}", tags={"deeplense.role": "population"}
    )
    run_id = run.info.run_id
    try:
        log_params(tracking_uri, run_id, params)
        metrics = {
            "n": result.n,
            "mu_mean": result.mu_mean,
            "mu_std": result.mu_std,
            "mu_median": result.mu_median,
            "sigma_median": result.sigma_median,
            "sigma_upper95": result.sigma_upper95,
            "seconds": result.seconds,
        }
        for lv, (lo, hi) in result.mu_intervals.items():
            metrics[f"mu_lo{round(lv * 100)}"], metrics[f"mu_hi{round(lv * 100)}"] = lo, hi
        if result.truth is not None:
            metrics["truth_mean"], metrics["truth_std"] = result.truth["mean"], result.truth["std"]
        log_metrics(tracking_uri, run_id, metrics)
        for path in artifacts:
            client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
