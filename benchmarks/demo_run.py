#!/usr/bin/env python
"""Run `make demo` (jobs/demo.py) as a new user would and save what it reached: wall time and test metrics.

    python benchmarks/demo_run.py --out benchmarks/results/demo_cpu2.json            # the CPU demo
    python benchmarks/demo_run.py --out benchmarks/results/demo_h200.json            # on a GPU machine

The demo runs in a fresh temporary directory (its dataset is simulated anew). The JSON holds the machine
(CPU count, GPU name, load average before the run: a busy machine slows the demo), the demo's wall time,
the preset, the best trial and its test metrics (read from the search's best_config.yaml), and the demo
targets (<= 600 s and test macro AUC >= 0.85 on a 2-core CPU; macro AUC >= 0.95 with a GPU).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"cpu": {"wall_s_max": 600.0, "test_auc_macro_min": 0.85}, "gpu": {"test_auc_macro_min": 0.95}}


def gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write (e.g. benchmarks/results/demo_cpu.json)")
    ap.add_argument("--quick", action="store_true", help="pass --quick to the demo (smoke run)")
    args = ap.parse_args(argv)

    gpu = gpu_name()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="demo-run-") as tmp:
        cmd = [sys.executable, str(ROOT / "jobs" / "demo.py"), "--out", tmp]
        cmd += ["--quick"] if args.quick else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            print(log[-4000:], file=sys.stderr)
            raise SystemExit(f"jobs/demo.py exited {proc.returncode}")
        (best_file,) = glob.glob(os.path.join(tmp, "tune", "*", "best_config.yaml"))
        best = yaml.safe_load(Path(best_file).read_text())
        preset = json.loads((Path(tmp) / "data" / "manifest.json").read_text())["config"]["preset"]

    kind = "gpu" if gpu else "cpu"
    test = best["test_metrics"]
    targets = TARGETS[kind]
    met = test["auc_macro"] >= targets["test_auc_macro_min"]
    met = met and wall <= targets.get("wall_s_max", float("inf"))
    doc = {
        "benchmark": "demo_run",
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "gpu": gpu, "platform": platform.platform(),
                    "loadavg_before": list(load)},
        "wall_s": wall,
        "preset": preset,
        "model": best["model"],
        "best_trial": best["trial_id"],
        "best_epoch": best["best_epoch"],
        "val_metric": {best["metric"]: best["best_metric"]},
        "test_metrics": test,
        "test_auc_macro_ci": best.get("test_auc_macro_ci"),
        "targets": targets,
        "targets_met": met,
        # what the demo printed from its search summary on: per-class AUCs, confusion matrix, where things are
        "stdout_tail": proc.stdout[proc.stdout.rfind("[demo] 2/3") :].splitlines(),
    }
    out = Path(args.out)
    from deeplense_ray.io import atomic_write_text

    atomic_write_text(out, json.dumps(doc, indent=1) + "\n", fsync=False)
    print(f"{'machine':<22} {kind}: {os.cpu_count()} CPUs{', ' + gpu if gpu else ''} (load {load[0]:.1f})")
    print(f"{'wall':<22} {wall:.0f} s")
    print(f"{'best trial':<22} {best['trial_id']} epoch {best['best_epoch']}")
    for k in ("auc_macro", "accuracy", "n"):
        print(f"{'test ' + k:<22} {test.get(k)}")
    print(f"{'targets':<22} {targets} -> {'met' if met else 'NOT met'}")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
