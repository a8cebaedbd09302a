#!/usr/bin/env python
"""Fixed cost of a training job: wall time minus the seconds its epochs spent training and validating.

Runs ``jobs/train.py`` itself (a subprocess per variant, a fresh local Ray runtime each, as a user runs it) on
one dataset (simulated first with ``jobs/simulate.py`` unless --data is given), reads the job's timeline
(``timeline.json``, logged to its MLflow run by ``deeplense_ray.train.timeline``) and reports per variant:
the wall time seen from outside (process start to exit), the job's own wall (its timeline), the train and
validation seconds of its epochs, ``overhead_s`` = job wall - train - val (target <= 15 s on one H200),
the first validation's seconds, compile seconds (``--variants base,compile``), images/s per
epoch (MLflow ``images_per_s``; steady = median of epochs 2..E, and the compile speed-up from it) and every
phase. Variant ``split`` forces the Ray Data input (``base`` reads a split of up to 2 GiB into memory), for
comparison. Variants ``joined`` / ``joined_compile`` run the job against a Ray head started for it with
``ray start --head`` (127.0.0.1, token auth; its start-up timed as ``cluster_start_s`` and not part of the
job), as ``ray job submit`` runs jobs on a cluster: the job's Ray start becomes a connection. Prints a table
and writes JSON (after every variant).

    python benchmarks/train_overhead.py --quick --out /tmp/train_overhead_quick.json        # CPU smoke test
    python benchmarks/train_overhead.py --variants base,compile \\
        --out benchmarks/results/train_overhead_h200.json                                    # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from deeplense_ray.io import atomic_write_json  # noqa: E402

TARGET_OVERHEAD_S = 15.0
#: base: the job's defaults (ingest "auto": the train split read into memory up to 2 GiB, else Ray Data;
#: runner "auto": one worker in one Ray task); split / memory: that ingest forced; compile: torch.compile on
#: top of base; trainer: ``--runner trainer`` (a Ray Train controller and worker group, the default before
#: 2026-12-03); task / compile_task: ``--runner task`` forced, without / with compile
VARIANTS = {
    "base": [],
    "split": ["--ingest", "split"],
    "memory": ["--ingest", "memory"],
    "compile": ["--compile"],
    "trainer": ["--runner", "trainer"],
    "task": ["--runner", "task"],
    "compile_task": ["--compile", "--runner", "task"],
    "joined": [],
    "joined_compile": ["--compile"],
}
#: variants run against a Ray head started for them (``ray start --head``) instead of a local runtime
JOINED = ("joined", "joined_compile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="dataset directory (default: simulate one first)")
    p.add_argument("--preset", default="model_ii")
    p.add_argument("--num-pix", type=int, default=None, help="preset override num_pix of the simulated data")
    p.add_argument("--num-per-class", type=int, default=20000, help="simulated images per class (all splits)")
    p.add_argument("--model", default="ResNet18")
    p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default 1 with a GPU, else 0")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="default: jobs/train.py's")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--variants", default="base", help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--workdir", default=None, help="where runs and data go (default: a temporary directory)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_overhead.json"))
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per job")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: 32x32, tiny ResNet, 2 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.num_pix = args.num_pix or 32
        args.num_per_class = 40
        args.model = "ResNetSimple"
        args.model_override = args.model_override or ["width=8"]
        args.epochs, args.batch_size = 2, 8
        args.gpus_per_worker = 0.0 if args.gpus_per_worker is None else args.gpus_per_worker
    if args.gpus_per_worker is None:
        import torch

        args.gpus_per_worker = 1.0 if torch.cuda.is_available() else 0.0
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown or not args.variant_list:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    return args


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run ``cmd`` in the repository root; (stdout, seconds). RuntimeError with its output tail on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return proc.stdout, wall


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RayHead:
    """``ray start --head --block`` on 127.0.0.1 with token auth and its own temp dir (a cluster as a job
    submitted with ``ray job submit`` finds it); ``env``: the environment a job needs to join it. Stopped by
    SIGTERM to that process (Ray then stops every process it started)."""

    def __init__(self, workdir: Path, gpus: float, timeout: float = 120.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: Ray's sockets live below it
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"
        }
        self.env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(32),
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONUNBUFFERED="1",
        )
        # the `ray` CLI's own module: an environment without the console script (a bundled site) has it too
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={_free_port()}", f"--num-gpus={gpus:g}", f"--temp-dir={self.root / 'r'}",
               "--disable-usage-stats"]  # fmt: skip
        self.log = open(workdir / f"head-{port}.log", "wb")  # noqa: SIM115
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        while b"Ray runtime started" not in Path(self.log.name).read_bytes():
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"ray start failed:\n{Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.1)
        self.start_s = time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


def ensure_dataset(args: argparse.Namespace, workdir: Path) -> tuple[str, float]:
    if args.data:
        return str(Path(args.data).resolve()), 0.0
    out = workdir / "data"
    cmd = [sys.executable, "jobs/simulate.py", "--preset", args.preset, "--num-per-class",
           str(args.num_per_class), "--out", str(out), "--address", "local", "--no-progress", "--no-preview",
           "--overwrite"]  # fmt: skip
    if args.num_pix:
        cmd += ["--preset-override", f"num_pix={args.num_pix}"]
    if args.quick:
        cmd += ["--shard-size", "16"]
    _, seconds = _run(cmd, args.timeout)
    return str(out), seconds


def job_summary(stdout: str) -> dict[str, Any]:
    """The JSON summary jobs/train.py prints (an indented object starting at a line '{')."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line == "{")
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    return json.loads("\n".join(lines[start : end + 1]))


def run_variant(
    args: argparse.Namespace, variant: str, data: str, workdir: Path, index: int = 0
) -> dict[str, Any]:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    head = RayHead(workdir, gpus=1.0 if args.gpus_per_worker > 0 else 0.0) if variant in JOINED else None
    cmd = [sys.executable, "jobs/train.py", "--model", args.model, "--data", data,
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--gpus-per-worker", f"{args.gpus_per_worker:g}",
           "--precision", args.precision, "--address", head.address if head else "local",
           "--experiment", "train-overhead",
           "--tracking-uri", uri, "--storage-path", str(workdir / "ray_results"),
           "--run-name", f"overhead-{variant}-{index}", *VARIANTS[variant]]  # fmt: skip
    for kv in args.model_override:
        cmd += ["--model-override", kv]
    if args.cpus_per_worker is not None:
        cmd += ["--cpus-per-worker", f"{args.cpus_per_worker:g}"]
    try:
        stdout, outer_wall = _run(cmd, args.timeout, env=head.env if head else None)
    finally:
        if head is not None:
            head.stop()
    summary = job_summary(stdout)
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    run_id = summary["mlflow_run_id"]
    timeline = mlflow.artifacts.load_dict(f"runs:/{run_id}/timeline.json")
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "images_per_s")
    per_epoch = [m.value for m in sorted(history, key=lambda m: m.step)]
    steady = per_epoch[1:] or per_epoch  # epoch 1 holds the input's start-up (and compilation)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("timeline: ")), "")
    return {
        "variant": variant,
        "command": " ".join(cmd),
        "outer_wall_s": outer_wall,
        "cluster_start_s": head.start_s if head else None,  # the head's `ray start` (not part of the job)
        "wall_s": timeline["wall_s"],
        "train_s": timeline["train_s"],
        "val_s": timeline["val_s"],
        "overhead_s": timeline["overhead_s"],
        "outer_overhead_s": outer_wall - timeline["train_s"] - timeline["val_s"],
        "first_val_s": timeline["first_val_s"],
        "compile_s": timeline["compile_s"],
        "images_per_s_epochs": per_epoch,
        "images_per_s_steady": statistics.median(steady) if steady else None,
        "target_overhead_s": TARGET_OVERHEAD_S,
        "target_met": timeline["overhead_s"] <= TARGET_OVERHEAD_S,
        "test_auc_macro": summary["test"].get("auc_macro"),
        "timeline_line": line,
        "phases": timeline["phases"],
    }


def _report(args, gpu, data, sim_s, runs, speedup) -> dict[str, Any]:
    return {
        "benchmark": "train_overhead",
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "gpu": gpu},
        "settings": {k: v for k, v in vars(args).items() if k not in ("variant_list",)},
        "data": data,
        "simulate_s": sim_s,
        "runs": runs,
        "compile_speedup": speedup,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        workdir = Path(args.workdir).resolve() if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        data, sim_s = ensure_dataset(args, workdir)
        runs = []
        for i, variant in enumerate(args.variant_list):  # a variant may repeat (runs named by position)
            runs.append(run_variant(args, variant, data, workdir, i))
            r = runs[-1]
            print(f"{variant}: {r['timeline_line']}", flush=True)
            # written after every variant: a run stopped later keeps what finished
            atomic_write_json(args.out, _report(args, gpu, data, sim_s, runs, None))
    print(f"\n{'variant':<12} {'outer':>7} {'wall':>7} {'train':>7} {'val':>6} {'overhead':>9} "
          f"{'1st val':>8} {'compile':>8} {'img/s':>9}  overhead <= {TARGET_OVERHEAD_S:g} s")  # fmt: skip
    for r in runs:
        print(f"{r['variant']:<12} {r['outer_wall_s']:7.1f} {r['wall_s']:7.1f} {r['train_s']:7.1f} "
              f"{r['val_s']:6.1f} {r['overhead_s']:9.1f} {r['first_val_s'] or 0:8.2f} {r['compile_s']:8.2f} "
              f"{r['images_per_s_steady'] or 0:9.0f}  {'met' if r['target_met'] else 'NOT met'}")  # fmt: skip
    speedup = None
    by_variant = {r["variant"]: r["images_per_s_steady"] for r in runs}
    for plain, compiled in (("base", "compile"), ("task", "compile_task")):
        if by_variant.get(plain) and by_variant.get(compiled):
            speedup = by_variant[compiled] / by_variant[plain]
            print(
                f"compile speed-up ({compiled} / {plain}, steady images/s, epochs 2..E): {speedup:.2f}x "
                "(target for ViT >= 1.8x)"
            )
    atomic_write_json(args.out, _report(args, gpu, data, sim_s, runs, speedup))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
