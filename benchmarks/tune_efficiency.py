#!/usr/bin/env python
"""What ASHA + Optuna saves, and what fractional GPUs buy: a table and a JSON file.

Three measurements on one Ray runtime and one simulated dataset:

1. ``asha``: a seeded ASHA + Optuna search of N trials x E epochs (``jobs/tune.py`` defaults otherwise):
   epochs spent, best validation metric, wall time.
2. ``full``: the SAME N configurations (ASHA's trials, replayed as points to evaluate) each run to E epochs
   with no early stopping: epochs spent (N x E), best validation metric, wall time.
3. ``packing``: K identical trials at ``--pack`` GPUs per trial (several trials share a GPU) against K trials
   at 1 GPU each (one trial per GPU): trials per GPU-hour = K / (wall hours x GPUs in the cluster).
   With ``--quick`` on a CPU machine the packing rows compare 2 concurrent CPU trials against 1 instead
   (a smoke test of the script, not a GPU number).

Usage (GPU machine, 16 CPUs + 1 GPU; one part per run, each sized to stay under ~9 minutes):
    python benchmarks/tune_efficiency.py --parts search --out tune_efficiency_search.json
    python benchmarks/tune_efficiency.py --parts packing --out tune_efficiency_packing.json
CPU smoke test:
    python benchmarks/tune_efficiency.py --quick --out /tmp/tune_efficiency_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

try:
    import deeplense_ray  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_data(root: Path, *, quick: bool, gpus: float) -> str:
    from deeplense_ray.data import DatasetConfig, build_dataset

    out = root / "data"
    if quick:
        cfg = DatasetConfig(
            preset="model_ii",
            num_per_class=20,
            seed=3,
            preset_overrides={"num_pix": 32, "delta_pix": 0.2, "supersampling": 1},
        )
    else:
        cfg = DatasetConfig(preset="model_ii", num_per_class=1000, seed=3)
    build_dataset(cfg, out, gpus_per_worker=gpus, progress=False, preview=False)
    return str(out)


def run(settings) -> tuple[object, float]:
    from deeplense_ray.tune import run_search

    t0 = time.perf_counter()
    res = run_search(settings)
    return res, time.perf_counter() - t0


def trial_spans(output_dir: str) -> list[tuple[float, float]]:
    """(start, end) wall-clock seconds of every trial of a finished search, from Tune's result.json files.

    start = first result's timestamp - its time_total_s (the trial's start), end = last result's timestamp.
    """
    spans = []
    for path in sorted(Path(output_dir).glob("trial_*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            spans.append((rows[0]["timestamp"] - rows[0]["time_total_s"], rows[-1]["timestamp"]))
    return spans


def peak_concurrency(spans: list[tuple[float, float]]) -> int:
    """Most trials whose (start, end) spans overlap at one instant."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    peak = now = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tune_efficiency.json", help="JSON output path")
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke test (minutes)")
    ap.add_argument("--model", default="ViT")
    ap.add_argument("--num-samples", type=int, default=None, help="trials of the search (default 8; quick 4)")
    ap.add_argument("--max-epochs", type=int, default=None, help="epochs per full trial (default 8; quick 2)")
    ap.add_argument("--pack", type=float, default=0.25, help="GPUs per trial when packing (default 0.25)")
    ap.add_argument("--pack-trials", type=int, default=None, help="trials of each packing run (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="search,packing", help="what to run: search, packing or both")
    ap.add_argument("--workdir", default=None, help="where data, runs and mlflow.db go (default: a temp dir)")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # trial logs stay readable
    import ray
    import torch

    from deeplense_ray.tune import TuneSettings
    from deeplense_ray.tune.runner import connect_ray

    connect_ray()
    cluster = ray.cluster_resources()
    n_gpu = float(cluster.get("GPU", 0.0))
    quick = args.quick
    n = args.num_samples or (4 if quick else 8)
    epochs = args.max_epochs or (2 if quick else 8)
    k = args.pack_trials or (2 if quick else 4)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="tune_eff_"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = build_data(root, quick=quick, gpus=1.0 if n_gpu > 0 else 0.0)
    t_data = time.perf_counter() - t0

    fixed: dict = {}
    if quick or args.model == "ViT":  # a small ViT: the kind of model that leaves a GPU mostly idle
        fixed = (
            {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32}
            if quick
            else {"dim": 64, "heads": 4, "mlp_dim": 128}
        )
    gpus_trial = args.pack if n_gpu > 0 else 0.0
    common = dict(
        model=args.model,
        data_dir=data,
        max_epochs=epochs,
        grace_period=1,
        reduction_factor=2,
        seed=args.seed,
        metric="val_auc_macro",
        experiment="tune-efficiency",
        tracking_uri=f"sqlite:///{root}/mlflow.db",
        storage_path=str(root / "runs"),
        space=dict(fixed),
        cpus_per_trial=None if quick else 2.0,
        train_overrides={"precision": "fp32"} if n_gpu == 0 else {},
    )
    parts = set(args.parts.split(","))
    unknown = parts - {"search", "packing"}
    if unknown:
        ap.error(f"--parts: unknown part(s) {sorted(unknown)}; use search, packing or search,packing")
    same_configs = None
    rows = []
    metric = common["metric"]
    if "search" in parts:
        asha, t_asha = run(TuneSettings(**common, num_samples=n, name="asha", gpus_per_trial=gpus_trial))
        points = [dict(t.config) for t in asha.trials]
        rows.append(("asha+optuna", asha, t_asha))
        full, t_full = run(
            TuneSettings(
                **common,
                num_samples=len(points),
                name="full",
                gpus_per_trial=gpus_trial,
                scheduler="fifo",
                search="random",
                points_to_evaluate=points,
            )
        )
        rows.append(("same trials, no early stop", full, t_full))
        key = lambda c: json.dumps(c, sort_keys=True, default=str)  # noqa: E731
        same_configs = sorted(map(key, points)) == sorted(key(dict(t.config)) for t in full.trials)

    pack_space = dict(fixed, lr=1e-3, weight_decay=1e-4, batch_size=64)
    pack_common = dict(common, space=pack_space, scheduler="fifo", search="random", num_samples=k)
    if n_gpu == 0:  # 2 trials of 0.4 CPU (+ driver) fit beside one CPU for the data readers of a 2-CPU box
        pack_common["cpus_per_trial"] = 0.4
    pack_rows = []
    if n_gpu > 0:
        variants = [(f"{args.pack:g} GPU/trial", args.pack, None), ("1 GPU/trial", 1.0, None)]
    else:
        variants = [("CPU, 2 concurrent", 0.0, 2), ("CPU, 1 at a time", 0.0, 1)]
    for label, g, conc in variants if "packing" in parts else []:
        res, wall = run(
            TuneSettings(**pack_common, name=f"pack-{g:g}-{conc}", gpus_per_trial=g, max_concurrent=conc)
        )
        hours = wall / 3600.0
        per_gpu_hour = k / (hours * max(n_gpu, 1.0))
        pack_rows.append(
            {
                "variant": label,
                "gpus_per_trial": g,
                "trials": k,
                "peak_concurrent_trials": peak_concurrency(trial_spans(res.output_dir)),
                "epochs_spent": sum(t.epochs_run for t in res.trials),
                "wall_s": round(wall, 1),
                "trials_per_gpu_hour" if n_gpu > 0 else "trials_per_hour": round(per_gpu_hour, 1),
            }
        )

    def summary(label, res, wall):
        return {
            "run": label,
            "trials": len(res.trials),
            "epochs_spent": sum(t.epochs_run for t in res.trials),
            "stopped_early": sum(t.outcome.startswith("stopped") for t in res.trials),
            f"best_{res.metric}": round(res.best_metric, 4),
            "best_trial_test": {
                kk: round(float(v), 4)
                for kk, v in res.test_metrics.items()
                if kk in ("accuracy", "auc_macro", "loss")
            },
            "peak_concurrent_trials": peak_concurrency(trial_spans(res.output_dir)),
            "wall_s": round(wall, 1),
        }

    search_rows = [summary(*r) for r in rows]
    report = {
        "benchmark": "tune_efficiency",
        "quick": quick,
        "model": args.model,
        "fixed_hparams": fixed,
        "num_samples": n,
        "max_epochs": epochs,
        "dataset": data,
        "dataset_build_s": round(t_data, 1),
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "cluster": {k2: v for k2, v in cluster.items() if k2 in ("CPU", "GPU")},
        "search": search_rows,
        "full_run_replayed_same_configs": same_configs,
        "epochs_saved_fraction": round(
            1 - search_rows[0]["epochs_spent"] / max(1, search_rows[1]["epochs_spent"]), 3
        )
        if len(search_rows) == 2
        else None,
        "packing": pack_rows,
    }
    if len(pack_rows) == 2:
        key = "trials_per_gpu_hour" if n_gpu > 0 else "trials_per_hour"
        report["packing_speedup"] = round(pack_rows[0][key] / pack_rows[1][key], 2)

    print(
        f"\ntune efficiency ({'quick CPU smoke' if quick else 'full'}), model {args.model}, "
        f"{n} trials x {epochs} epochs, device {report['device']}"
    )
    head = ("run", "trials", "epochs", "stopped", f"best {metric}", "test auc_macro", "at once", "wall s")
    print("  ".join(f"{h:<28}" if i == 0 else f"{h:>14}" for i, h in enumerate(head)))
    for r in search_rows:
        vals = (
            r["run"],
            r["trials"],
            r["epochs_spent"],
            r["stopped_early"],
            r[f"best_{metric}"],
            r["best_trial_test"].get("auc_macro", float("nan")),
            r["peak_concurrent_trials"],
            r["wall_s"],
        )
        print("  ".join(f"{v:<28}" if i == 0 else f"{v:>14}" for i, v in enumerate(vals)))
    if len(search_rows) == 2:
        print(
            f"ASHA spent {search_rows[0]['epochs_spent']} of {search_rows[1]['epochs_spent']} epochs "
            f"({100 * report['epochs_saved_fraction']:.0f}% saved); full run replayed the same configs: "
            f"{same_configs}"
        )
    for p in pack_rows:
        print(
            f"packing: {p['variant']:<22} {p['trials']} trials ({p['peak_concurrent_trials']} at once) "
            f"in {p['wall_s']:>7} s -> "
            + ", ".join(f"{kk} {vv}" for kk, vv in p.items() if kk.startswith("trials_per"))
        )
    if "packing_speedup" in report:
        print(f"packing speed-up: {report['packing_speedup']}x")
    out = Path(args.out)
    from deeplense_ray.io import atomic_write_text

    atomic_write_text(out, json.dumps(report, indent=2), fsync=False)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
