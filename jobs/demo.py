#!/usr/bin/env python
"""`make demo`: the whole pipeline on one machine with embedded defaults (thin: calls the library).

Local Ray runtime, local MLflow store, the GPU if there is one, else the CPU:
  1. simulate a small deeplense_model_ii dataset (sharded HDF5, Ray Data) into <out>/data: the published
     DeepLense Model II recipe (one fixed macro lens, 25 point-mass subhalos with the -0.9 mass slope,
     noise-free Euclid-like images), where substructure is visible within a demo's budget (PRESET_MEANING),
  2. tune CvT with ASHA + Optuna for a few trials and epochs (Ray Tune over Ray Train, MLflow runs),
  3. evaluate the best trial's best checkpoint on the test split (once),
  4. print the trial table, the test metrics, where everything is, and the command that opens the MLflow UI.
At most ~10 minutes on a 2-core CPU; re-running reuses the dataset and adds a new search.

    python jobs/demo.py                       # = make demo; results under ./demo_output
    python jobs/demo.py --out /tmp/demo --quick   # a ~1-2 minute smoke run (tiny images, 2 trials)
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path

try:  # run from a checkout that is not installed
    import deeplense_ray  # noqa: F401
except ImportError:
    _ROOT = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)


@dataclass(frozen=True)
class DemoSettings:
    """The embedded defaults of the demo (CPU); :func:`for_hardware` scales them for a GPU."""

    preset: str = "deeplense_model_ii"
    preset_overrides: tuple[tuple[str, object], ...] = ()
    num_per_class: int = 500
    shard_size: int = 256
    model: str = "CvT"
    num_samples: int = 4
    max_epochs: int = 3
    grace_period: int = 1
    reduction_factor: int = 2
    # On a CPU the stage widths are pinned (heads, depths, dropout, lr, weight decay are still searched):
    # the widest CvT of the default space is ~10x slower per epoch.
    fixed: tuple[tuple[str, object], ...] = (("batch_size", 32), ("s1_emb_dim", 32), ("s2_emb_dim", 96),
                                             ("s3_emb_dim", 192))
    seed: int = 0
    experiment: str = "deeplense-demo"


QUICK = DemoSettings(
    preset_overrides=(("num_pix", 32),),
    num_per_class=20,
    shard_size=32,
    num_samples=2,
    max_epochs=2,
    fixed=(("batch_size", 16), ("s1_emb_dim", 16), ("s2_emb_dim", 24), ("s3_emb_dim", 48),
           ("s2_depth", 1), ("s3_depth", 1)),
)


#: What the demo's data mean physically, printed with its results (docs/simulator.md: the recipe, its flaws).
PRESET_MEANING = {
    "deeplense_model_ii": (
        "deeplense_model_ii reproduces the published DeepLense Model II set: every image has the same macro "
        "lens (SIE + shear) and only the substructure differs: none, 25 point-mass CDM subhalos (10^6-10^10 "
        "Msun, dN/dm ~ m^-0.9: ~8 above 10^9 Msun per image) or an axion vortex; no noise. That makes "
        "substructure easy to see; the physical presets (model_ii: random macro lens, a normalised tNFW "
        "population, noise) are the hard, realistic problem."
    ),
}


def for_hardware(s: DemoSettings, gpus: float) -> DemoSettings:
    """More data, trials and epochs when a GPU is there (trials then pack 4 per GPU, tune's default)."""
    if gpus <= 0 or s == QUICK:
        return s
    return replace(s, num_per_class=5000, shard_size=1024, num_samples=8, max_epochs=6,
                   fixed=(("batch_size", 64),))


def paths(out: Path) -> dict[str, Path]:
    return {
        "out": out,
        "data": out / "data",
        "tune": out / "tune",
        "db": out / "mlflow.db",
        "artifacts": out / "mlartifacts",
        "token": out / ".ray_auth_token",
    }


def tracking_uri(p: dict[str, Path]) -> str:
    from deeplense_ray.tracking.mlflow_utils import sqlite_uri

    return sqlite_uri(p["db"])


def setup_ray_auth(p: dict[str, Path]) -> None:
    """Token auth on, set explicitly, with the demo's own token file (never ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    token = p["token"]
    if not token.exists():
        from deeplense_ray.io import atomic_path

        with atomic_path(token) as tmp:  # created 0o600: readable by this user only
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)


#: Logical CPUs of the local runtime, at least: a trial holds a driver (0.1 CPU) and a training worker
#: (1 CPU) while Ray Data read tasks (1 CPU each) feed it; with only 2 logical CPUs the reads never get
#: scheduled and the first trial waits forever. The work itself is torch threads on the real cores.
MIN_LOGICAL_CPUS = 4


def cpus_text(logical: float, cores: int | None) -> str:
    """The runtime's CPUs for the demo's first line; says why when Ray was given more than the cores."""
    if cores and logical > cores:
        return (f"{logical:g} logical CPUs on {cores} cores (Ray slots, so that a trial's training worker "
                f"and the Ray Data readers feeding it are all scheduled; the work runs on the {cores} cores)")
    return f"{logical:g} CPUs"


def start_ray() -> bool:
    """A local Ray runtime on 127.0.0.1 (dashboard too, see RAY_NOTES); False if one was already up."""
    import ray

    from deeplense_ray.runtime import start_local_ray
    from deeplense_ray.tracking.console import quiet_ray

    if ray.is_initialized():
        return False
    quiet = quiet_ray(verbose=False)  # Ray Data's execution plans and INFO lines off, as in the jobs
    start_local_ray(num_cpus=max(MIN_LOGICAL_CPUS, os.cpu_count() or 1), include_dashboard=True,
                    dashboard_host="127.0.0.1", configure_logging=False, **quiet)
    return True


def simulate(s: DemoSettings, p: dict[str, Path], gpus: float) -> dict:
    from deeplense_ray.data import build_dataset
    from deeplense_ray.data.config import DatasetConfig

    cfg = DatasetConfig(preset=s.preset, preset_overrides=dict(s.preset_overrides),
                        num_per_class=s.num_per_class, shard_size=s.shard_size, seed=s.seed)
    resume = p["data"].is_dir() and any(p["data"].iterdir())
    return build_dataset(cfg, p["data"], workers=1, gpus_per_worker=1.0 if gpus > 0 else 0.0, resume=resume,
                         progress=False)


def tune(s: DemoSettings, p: dict[str, Path]):
    from deeplense_ray.tune import run_search
    from deeplense_ray.tune.settings import TuneSettings

    settings = TuneSettings(
        model=s.model,
        num_samples=s.num_samples,
        data_dir=str(p["data"]),
        max_epochs=s.max_epochs,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        seed=s.seed,
        experiment=s.experiment,
        tracking_uri=tracking_uri(p),
        storage_path=str(p["tune"]),
        space=dict(s.fixed),
    )
    return run_search(settings)


def results_table(result) -> str:
    """The test metrics of the best trial as a two-column table (per-class one-vs-rest AUCs included), then
    its confusion matrix: a good macro AUC with a low accuracy is usually two classes not yet told apart."""
    m = result.test_metrics
    rows = [(k, v) for k, v in sorted(m.items()) if isinstance(v, (int, float))]
    rows += [(f"auc {name}", v) for name, v in (m.get("auc") or {}).items()]
    width = max([len(k) for k, _ in rows] + [6])
    lines = [f"{'metric':<{width}}  test", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {int(v) if k == 'n' else f'{v:.4f}'}" for k, v in rows]
    names, cm = list(m.get("class_names") or m.get("auc") or []), m.get("confusion_matrix")
    if cm and len(names) == len(cm):
        w = max(len(n) for n in names) + 2
        lines += ["", "confusion matrix (rows: true class, columns: predicted)",
                  " " * w + "".join(f"{n:>{w}}" for n in names)]
        lines += [f"{n:<{w}}" + "".join(f"{int(c):>{w}}" for c in row) for n, row in zip(names, cm)]
    return "\n".join(lines)


def done_lines(result, s: DemoSettings, p: dict[str, Path], seconds: float) -> list[str]:
    """The demo's last lines: a chance warning if any, where everything is, the MLflow UI command."""
    from deeplense_ray.tracking.console import human_bytes, where_lines

    return ["", *result.warnings, *where_lines(
        f"[demo] done in {seconds:.0f} s. Results:",
        [
            ("dataset", f"{p['data']}  (manifest.json, <split>/shard-*.h5, preview.png)"),
            ("search", f"{result.output_dir}  (best_config.yaml, summary, trial curves; "
                       f"{human_bytes(result.disk_bytes)} on disk)"),
            ("best checkpoint", result.best_checkpoint),
            ("MLflow store", f"{tracking_uri(p)}  (experiment {s.experiment!r})"),
            ("parent run", result.parent_run_id),
            ("best model", result.model_uri),
        ],
        tracking_uri=tracking_uri(p),
    )]


def main(argv: list[str] | None = None) -> int:
    """The job; a failure the user causes (a bad file, an MLflow store that refuses) exits 2 with one line."""
    from deeplense_ray.cli import run_main

    return run_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="demo_output", help="results directory (default ./demo_output)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (32 px, 2 trials of 2 epochs)")
    args = ap.parse_args(argv)
    p = paths(Path(args.out).resolve())
    from deeplense_ray.tracking.mlflow_utils import check_tracking_reachable

    check_tracking_reachable(tracking_uri(p))  # the demo's own SQLite store: no server to wait for
    p["out"].mkdir(parents=True, exist_ok=True)
    setup_ray_auth(p)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    import torch

    t0 = time.perf_counter()
    started = start_ray()
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        s = for_hardware(QUICK if args.quick else DemoSettings(), gpus)
        device = f"{gpus:g} GPU(s): {torch.cuda.get_device_name(0)}" if gpus > 0 else "CPU only"
        cpus = cpus_text(ray.cluster_resources().get("CPU", 0), os.cpu_count())
        print(f"[demo] Ray {ray.__version__} local runtime, {cpus}, {device}; results in {p['out']}",
              flush=True)

        t = time.perf_counter()
        manifest = simulate(s, p, gpus)
        rows = {k: v["rows"] for k, v in manifest["splits"].items()}
        print(f"[demo] 1/3 simulated {s.preset} {manifest['image_shape']} {rows} into {p['data']} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        if s.preset in PRESET_MEANING:
            print(textwrap.fill(PRESET_MEANING[s.preset], width=110, initial_indent="[demo]   ",
                                subsequent_indent="[demo]   "), flush=True)

        t = time.perf_counter()
        result = tune(s, p)
        print(f"[demo] 2/3 tuned {s.model}: {len(result.trials)} trials, ASHA + Optuna "
              f"({time.perf_counter() - t:.0f} s)\n", flush=True)
        print(result.summary_table)
        print(f"\n[demo] 3/3 best trial {result.best_trial_id}: {result.metric}={result.best_metric:.4f} at "
              f"epoch {result.best_epoch}; its best checkpoint on the test split:\n")
        print(results_table(result))
    finally:
        if started:
            ray.shutdown()
    print("\n".join(done_lines(result, s, p, time.perf_counter() - t0)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
