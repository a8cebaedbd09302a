"""A study's report: per-model mean +- std over seeds, ROC or calibration curves with a band, all into the
parent MLflow run.

Mean and sample standard deviation (ddof 1; blank with one seed) of test accuracy, macro AUC and per-class
one-vs-rest AUC over the seeds of each model; parameter count; training images/s (each run's median over
its epochs 2.., then mean +- std over seeds). ROC: per class one-vs-rest, each run's curve interpolated on a
common false-positive-rate grid, mean over seeds with a +-1 std band.

Task 'inference' (per-lens Gaussian posteriors of the study's targets): per model and target the test RMSE,
RMSE / prior std, bias, the joint NLL, the observed coverage of the 68 % and 95 % intervals and the fraction
of seeds whose posteriors pass the calibration check, as mean +- std over seeds; instead of the ROC figure the
calibration curves (``calibration_study.png``): per target, observed vs nominal coverage at
``CURVE_LEVELS``, recomputed from each run's per-lens ``mean`` / ``cov`` / ``truth``, mean over seeds with a
+-1 std band.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TABLE_MD = "study_table.md"
TABLE_CSV = "study_table.csv"
RUNS_CSV = "study_runs.csv"
ROC_PNG = "roc_study.png"
CALIBRATION_PNG = "calibration_study.png"
#: Per-target metrics of an inference run's row (``<metric>_<target>``), in the table's column order.
TARGET_METRICS = ("rmse", "rmse_over_prior", "bias", "std", "coverage68", "coverage95")
FPR_GRID = np.linspace(0.0, 1.0, 201)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof 1) of the finite values; std nan with fewer than 2, both nan with none."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(float(x))], dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def aggregate_metrics(
    rows: Sequence[Mapping[str, Any]], models: Sequence[str], metrics: Sequence[str]
) -> list[dict]:
    """One row per model (in ``models`` order): n_seeds, params, and ``<metric>_mean`` / ``<metric>_std`` over
    the model's runs of each of ``metrics``."""
    table = []
    for m in models:
        runs = [r for r in rows if r["model"] == m]
        row: dict[str, Any] = {
            "model": m,
            "n_seeds": len(runs),
            "params": int(runs[0]["params"]) if runs else 0,
        }
        for k in metrics:
            row[f"{k}_mean"], row[f"{k}_std"] = mean_std([r.get(k, math.nan) for r in runs])
        table.append(row)
    return table


def aggregate(
    rows: Sequence[Mapping[str, Any]], models: Sequence[str], class_names: Sequence[str]
) -> list[dict]:
    """Classification: :func:`aggregate_metrics` of accuracy, macro AUC, per-class AUC and images/s."""
    metrics = ["accuracy", "auc_macro", *(f"auc_{c}" for c in class_names), "images_per_s"]
    return aggregate_metrics(rows, models, metrics)


def aggregate_inference(
    rows: Sequence[Mapping[str, Any]], models: Sequence[str], targets: Sequence[str]
) -> list[dict]:
    """Task 'inference': :func:`aggregate_metrics` of ``nll``, ``calibrated`` (its mean: the fraction of
    seeds), per target ``<metric>_<target>`` of :data:`TARGET_METRICS`, and ``images_per_s``."""
    metrics = ["nll", "calibrated", *(f"{m}_{t}" for t in targets for m in TARGET_METRICS), "images_per_s"]
    return aggregate_metrics(rows, models, metrics)


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if not math.isfinite(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(table: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> str:
    head = [
        "model",
        "params",
        "train img/s",
        "accuracy",
        "macro AUC",
        *(f"AUC {c}" for c in class_names),
        "seeds",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", *["---:"] * (len(head) - 1)]) + "|"]
    for r in table:
        cells = [
            r["model"],
            f"{r['params']:,}",
            _pm(r["images_per_s_mean"], r["images_per_s_std"], 0),
            _pm(r["accuracy_mean"], r["accuracy_std"]),
            _pm(r["auc_macro_mean"], r["auc_macro_std"]),
            *(_pm(r[f"auc_{c}_mean"], r[f"auc_{c}_std"]) for c in class_names),
            str(r["n_seeds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pm_g(mean: float, std: float) -> str:
    """mean ± std in 4 significant digits (physical units of any size)."""
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.4g}" if not math.isfinite(std) else f"{mean:.4g} ± {std:.2g}"


def markdown_table_inference(table: Sequence[Mapping[str, Any]], targets: Sequence[str]) -> str:
    """Task 'inference': one line per model and target (NLL, params and images/s are the model's)."""
    head = ["model", "target", "params", "train img/s", "RMSE", "RMSE / prior std", "bias", "NLL",
            "coverage 68 %", "coverage 95 %", "calibrated", "seeds"]  # fmt: skip
    rule = "|" + "|".join(["---", "---", *["---:"] * (len(head) - 2)]) + "|"
    lines = ["| " + " | ".join(head) + " |", rule]
    for r in table:
        n, frac = r["n_seeds"], r["calibrated_mean"]
        calibrated = "n/a" if not math.isfinite(frac) else f"{round(frac * n)}/{n}"
        for t in targets:
            cells = [
                r["model"],
                t,
                f"{r['params']:,}",
                _pm(r["images_per_s_mean"], r["images_per_s_std"], 0),
                _pm_g(r[f"rmse_{t}_mean"], r[f"rmse_{t}_std"]),
                _pm(r[f"rmse_over_prior_{t}_mean"], r[f"rmse_over_prior_{t}_std"]),
                _pm_g(r[f"bias_{t}_mean"], r[f"bias_{t}_std"]),
                _pm(r["nll_mean"], r["nll_std"]),
                _pm(r[f"coverage68_{t}_mean"], r[f"coverage68_{t}_std"]),
                _pm(r[f"coverage95_{t}_mean"], r[f"coverage95_{t}_std"]),
                calibrated,
                str(n),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in keys})
    return buf.getvalue()


def roc_band(
    y_true: Sequence[np.ndarray], probs: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (over runs) of the one-vs-rest ROC of class ``k``, true-positive rate on FPR_GRID."""
    from sklearn.metrics import roc_curve

    tprs = []
    for y, p in zip(y_true, probs):
        pos = np.asarray(y) == k
        if pos.all() or not pos.any() or not np.isfinite(p).all():
            continue
        fpr, tpr, _ = roc_curve(pos, np.asarray(p)[:, k])
        t = np.interp(FPR_GRID, fpr, tpr)
        t[0] = 0.0
        tprs.append(t)
    if not tprs:
        return np.full_like(FPR_GRID, np.nan), np.full_like(FPR_GRID, np.nan)
    a = np.stack(tprs)
    return a.mean(0), (a.std(0, ddof=1) if len(a) > 1 else np.zeros_like(FPR_GRID))


def plot_roc_study(preds: Mapping[str, list[tuple[np.ndarray, np.ndarray]]], class_names: Sequence[str],
                   path: Path, title: str) -> Path:  # fmt: skip
    """One panel per class (one-vs-rest): per model the mean ROC over seeds and a +-1 std band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from deeplense_ray.tracking.plots import save_png

    fig = Figure(figsize=(4.2 * len(class_names), 4.2))
    FigureCanvasAgg(fig)
    for k, c in enumerate(class_names):
        ax = fig.add_subplot(1, len(class_names), k + 1)
        for model, runs in preds.items():
            mean, std = roc_band([y for y, _ in runs], [p for _, p in runs], k)
            line = ax.plot(FPR_GRID, mean, label=f"{model} (n={len(runs)})")[0]
            ax.fill_between(FPR_GRID, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1),
                            color=line.get_color(), alpha=0.2)  # fmt: skip
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{c} vs rest", xlim=(0, 1),
               ylim=(0, 1.01))  # fmt: skip
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    return save_png(fig, path)


def coverage_band(posteriors: Sequence[Mapping[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (over runs) of the observed coverage [len(CURVE_LEVELS), T] of each run's posteriors
    (``mean`` [N, T], ``cov`` [N, T, T], ``truth`` [N, T]) at the nominal levels ``CURVE_LEVELS``; a run
    with non-finite posteriors is left out (all nan when none is left)."""
    from deeplense_ray.train.gaussian import CURVE_LEVELS, coverage

    curves = []
    for z in posteriors:
        mean, cov, truth = (np.asarray(z[k], np.float64) for k in ("mean", "cov", "truth"))
        if len(truth) and np.isfinite(mean).all() and np.isfinite(cov).all():
            curves.append(coverage(mean, cov, truth, CURVE_LEVELS))
    if not curves:
        t = np.asarray(posteriors[0]["truth"]).shape[1] if posteriors else 1
        nan = np.full((len(CURVE_LEVELS), t), np.nan)
        return nan, nan
    a = np.stack(curves)
    return a.mean(0), (a.std(0, ddof=1) if len(a) > 1 else np.zeros_like(a[0]))


def plot_calibration_study(posteriors: Mapping[str, list[Mapping[str, np.ndarray]]],
                           targets: Sequence[str], path: Path, title: str) -> Path:  # fmt: skip
    """One panel per target: per model the observed coverage of the central intervals vs their nominal
    level (mean over seeds, +-1 std band), and the diagonal of a calibrated posterior."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from deeplense_ray.tracking.plots import save_png
    from deeplense_ray.train.gaussian import CURVE_LEVELS

    levels = np.asarray(CURVE_LEVELS, np.float64)
    fig = Figure(figsize=(4.2 * len(targets), 4.2))
    FigureCanvasAgg(fig)
    bands = {model: coverage_band(runs) for model, runs in posteriors.items()}
    for k, t in enumerate(targets):
        ax = fig.add_subplot(1, len(targets), k + 1)
        for model, runs in posteriors.items():
            mean, std = bands[model][0][:, k], bands[model][1][:, k]
            line = ax.plot(levels, mean, marker=".", label=f"{model} (n={len(runs)})")[0]
            ax.fill_between(levels, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1),
                            color=line.get_color(), alpha=0.2)  # fmt: skip
        ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="calibrated")
        ax.set(xlabel="nominal coverage (central interval)", ylabel="observed coverage", title=t,
               xlim=(0, 1), ylim=(0, 1.01))  # fmt: skip
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    return save_png(fig, path)


def write_report(s, out: Path, *, client, state: Mapping[str, Any]):
    """Read every run's result, write the table (markdown, CSV), the per-run CSV and the ROC figure (task
    'inference': the calibration figure) into ``out`` and the parent MLflow run (metrics
    ``<model>.<metric>_mean`` / ``_std`` too)."""
    from deeplense_ray.config import describe_dataset
    from deeplense_ray.io import atomic_write_text
    from deeplense_ray.study.settings import PROTOCOLS, RUNS_DIR, StudyResult, run_key, slug

    info = describe_dataset(state["data_dir"])
    classes = list(info.class_names)
    inference = s.task == "inference"
    targets = list(s.targets)
    rows, preds = [], {}
    for m in s.models:
        preds[m] = []
        for seed in range(s.seeds):
            key = run_key(m, seed)
            rows.append(json.loads((out / RUNS_DIR / f"{key}.json").read_text()))
            with np.load(out / RUNS_DIR / f"{key}.npz") as z:
                if inference:
                    preds[m].append({k: z[k] for k in ("mean", "cov", "truth")})
                else:
                    preds[m].append((z["y_true"], z["probs"]))
    if inference:
        table = aggregate_inference(rows, s.models, targets)
        md = markdown_table_inference(table, targets)
    else:
        table = aggregate(rows, s.models, classes)
        md = markdown_table(table, classes)
    note = (
        f"{s.seeds} seed(s) per model, {s.epochs} epoch(s), dataset {info.data_dir} "
        f"(test rows {info.split_rows['test']})"
    )
    if inference:
        lenses = sorted({int(r["n_test"]) for r in rows if "n_test" in r})
        note += f"; task inference, targets {', '.join(targets)} (test lenses {', '.join(map(str, lenses))})"
    if s.protocol:
        note += f"; protocol {s.protocol} (published: {PROTOCOLS[s.protocol]['published_epochs']} epochs)"
    parent = state["parent_run_id"]
    paths = []
    for name, text in ((TABLE_MD, f"# study {s.name}\n\n{note}\n\n{md}"), (TABLE_CSV, csv_text(table)),
                       (RUNS_CSV, csv_text(rows))):  # fmt: skip
        atomic_write_text(out / name, text, fsync=False)
        paths.append(out / name)
    if inference:
        paths.append(plot_calibration_study(
            preds, targets, out / CALIBRATION_PNG, f"study {s.name}: test calibration, mean ± std over seeds"
        ))  # fmt: skip
    else:
        paths.append(
            plot_roc_study(preds, classes, out / ROC_PNG, f"study {s.name}: test ROC, mean ± std over seeds")
        )
    with tempfile.TemporaryDirectory(prefix="dlr-study-") as tmp:
        for p in paths:
            Path(tmp, p.name).write_bytes(p.read_bytes())
        client.log_artifacts(parent, tmp)
    from deeplense_ray.tracking import log_metrics

    flat = {f"{slug(r['model'])}.{k}": float(v) for r in table for k, v in r.items()
            if k.endswith(("_mean", "_std")) and v is not None and math.isfinite(float(v))}  # fmt: skip
    flat.update({f"{slug(r['model'])}.params": float(r["params"]) for r in table})
    log_metrics(state["tracking_uri"], parent, flat)
    client.set_tag(parent, "study.table", md[:5000])
    return StudyResult(
        name=s.name, output_dir=str(out), parent_run_id=parent, experiment_id=state["experiment_id"],
        data_dir=state["data_dir"], table=table, markdown=md, runs=rows, artifacts=[str(p) for p in paths],
    )  # fmt: skip
