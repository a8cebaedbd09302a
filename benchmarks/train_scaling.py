#!/usr/bin/env python
"""Training throughput: the Ray Train path (run_training; jobs/train.py's runner 'trainer') vs a bare loop
on the same device, model, data and step code (Ray's overhead), and on K GPUs against 1 (scaling).

Both paths time the same ``train_one_epoch`` (same model, augmentation on the device, autocast, optimizer);
images/s is training images / wall seconds of an epoch's training pass (waiting for data included, validation
excluded). The bare loop reads the train split once into pinned host memory (its best case); the Ray path
streams the HDF5 shards through Ray Data every epoch, wraps the model in DDP, reports and checkpoints every
epoch and logs to MLflow. Epoch 1 is warm-up (Ray Data start-up, kernel autotuning) and is left out; the
steady-state figure is the median of the other epochs. Prints a table and writes JSON (--out).

    python benchmarks/train_scaling.py --quick                       # CPU smoke test (tiny, minutes)
    python benchmarks/train_scaling.py --workers 1,2 --out train_scaling.json   # 2-GPU machine

Defaults (GPU): ViT 'comparable' (~13M parameters), model_ii 64x64 float32 (--dtype), 30000 images per
class, 4 epochs, 256 images per GPU per step, bf16. The table: images/s of the bare loop, Ray(1), Ray(2),
images/s per GPU, Ray overhead (1 - Ray(1)/bare, target <= 10%) and the 2-GPU speed-up (Ray(2)/Ray(1),
target >= 1.8x). JSON is rewritten after every phase (``complete`` false until the end), so a cut-short run
leaves its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deeplense_ray.io import atomic_write_text  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throw-away local Ray runtime started by this script
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")  # a loaded machine starts the raylet slowly

import torch  # noqa: E402

TARGET_OVERHEAD = 0.10
TARGET_SPEEDUP_2 = 1.8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="existing dataset dir; default: simulate one into --workdir")
    p.add_argument("--preset", default="model_ii")
    p.add_argument("--num-pix", type=int, default=None, help="override the preset's image size [pixels]")
    p.add_argument(
        "--num-per-class",
        type=int,
        default=30000,
        help="images per class (80%% train): 72k training images make an epoch of seconds per GPU, "
        "long enough that per-epoch start-up costs do not dominate the steady-state rate",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16"),
        help="image storage of the simulated dataset (float16 halves what the input path moves)",
    )
    p.add_argument(
        "--ingest",
        default="split",
        choices=("split", "per_rank"),
        help="how Ray Train ranks get data (TrainConfig.ingest)",
    )
    p.add_argument("--model", default="ViT")
    p.add_argument("--model-size", default="comparable", help="'default' or 'comparable' (~13M parameters)")
    p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=256, help="PER-WORKER batch (global = this x workers)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; epoch 1 is warm-up")
    p.add_argument("--workers", default="1,2", help="Ray Train worker counts to run, e.g. 1,2")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default 1 with CUDA, else 0")
    p.add_argument("--cpus-per-worker", type=float, default=4.0)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--skip-bare", action="store_true")
    p.add_argument(
        "--workdir", default=None, help="where data, checkpoints and MLflow go (default: a tmp dir)"
    )
    p.add_argument("--keep", action="store_true", help="keep --workdir")
    p.add_argument("--out", default="train_scaling.json")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: 32x32 images, tiny ResNet, 2 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.num_pix = args.num_pix or 32
        args.num_per_class = 40
        args.model, args.model_size = "ResNetSimple", "default"
        args.model_override = args.model_override or ["width=8"]
        args.batch_size, args.epochs = 8, 3
        args.gpus_per_worker = 0.0 if args.gpus_per_worker is None else args.gpus_per_worker
        args.cpus_per_worker = 0.5  # 2 workers on a 2-core box still leave a CPU to the Ray Data readers
    if args.gpus_per_worker is None:
        args.gpus_per_worker = 1.0 if torch.cuda.is_available() else 0.0
    args.worker_counts = [int(w) for w in str(args.workers).split(",") if w.strip()]
    return args


def ensure_dataset(args: argparse.Namespace, workdir: Path) -> tuple[Path, float]:
    """The dataset to train on and the seconds it took to simulate (0 if given)."""
    from deeplense_ray.data import DatasetConfig, build_dataset

    if args.data:
        return Path(args.data).resolve(), 0.0
    overrides = {"num_pix": args.num_pix} if args.num_pix else {}
    cfg = DatasetConfig(
        preset=args.preset,
        preset_overrides=overrides,
        num_per_class=args.num_per_class,
        shard_size=16 if args.quick else 4096,  # as jobs/simulate.py; quick: several shards (per_rank)
        seed=0,
        dtype=args.dtype,
    )
    out = workdir / "data"
    gpus = torch.cuda.device_count()
    t0 = time.perf_counter()
    build_dataset(
        cfg, out, workers=max(1, gpus), gpus_per_worker=1.0 if gpus else 0.0, overwrite=True, progress=False
    )
    return out, time.perf_counter() - t0


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in host memory (pinned when CUDA is there): images float32 [N,1,H,W], labels int64."""
    from deeplense_ray.train.ingest import load_split as load_to

    x, y = load_to(str(data_dir), split, torch.device("cpu"))
    x = x.to(torch.float32)
    if torch.cuda.is_available():
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


def bare_loop(args: argparse.Namespace, cfg, info, world: int = 1) -> dict[str, Any]:
    """Plain PyTorch: same model, step code, augmentation and precision; no Ray. ``world`` = 1: one device,
    in this process, no DDP. ``world`` > 1: one process per device (torch.multiprocessing), DDP wrapped as
    Ray's ``prepare_model`` wraps it, NCCL on GPUs (gloo on CPU); each epoch the split is permuted and dealt
    ``order[rank::world]`` (a DistributedSampler's share), per-device batch as Ray(K). This is the
    hardware's own scaling for the model, with every image already in host memory."""
    import torch.multiprocessing as mp

    if world == 1:
        return _bare_worker(0, 1, args, cfg, info, None)
    with tempfile.TemporaryDirectory(prefix="bare-ddp-") as tmp:
        result = Path(tmp) / "result.json"
        with socket.socket() as sock:  # a free port for the process group's rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_bare_worker, args=(world, args, cfg, info, (port, str(result))), nprocs=world, join=True)
        return json.loads(result.read_text())


def _bare_worker(rank: int, world: int, args, cfg, info, ddp: tuple[int, str] | None) -> dict[str, Any]:
    from deeplense_ray.train.ingest import memory_epoch_rows
    from deeplense_ray.train.modules import build_classifier
    from deeplense_ray.train.optim import autocast_dtype, build_optimizer
    from deeplense_ray.train.seeding import derive_seed
    from deeplense_ray.train.steps import train_one_epoch
    from deeplense_ray.train.trainer import loop_config

    cuda = args.gpus_per_worker > 0 and torch.cuda.is_available()
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    # the CPU threads Ray gives a Train worker (OMP_NUM_THREADS = its CPUs): K processes with a thread per
    # core each oversubscribe the host and slow every kernel launch
    torch.set_num_threads(max(1, int(args.cpus_per_worker)))
    if ddp is not None:
        import torch.distributed as dist

        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{ddp[0]}", rank=rank, world_size=world
        )
    x, y = load_split(Path(info.data_dir), "train")
    conf = loop_config(cfg, info)
    torch.manual_seed(cfg.seed)
    model = build_classifier(conf).to(device)
    if ddp is not None:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rank] if cuda else None, output_device=rank if cuda else None
        )
    opt = build_optimizer(model.parameters(), conf)
    amp = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    bs = cfg.batch_size
    epochs = []
    for epoch in range(1, cfg.epochs + 1):
        # the epoch's permutation dealt order[rank::world], cut to whole batches, as ingest="memory" does
        order = memory_epoch_rows(len(y), rank, world, bs, derive_seed(cfg.seed, epoch), drop_last=True)
        batches = (
            {"image": x[order[i : i + bs]], "label": y[order[i : i + bs]]} for i in range(0, len(order), bs)
        )
        gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, epoch, rank, 1))
        sums = train_one_epoch(
            model, batches, opt, device=device, amp_dtype=amp, scaler=scaler,
            augment={"rot90": True, "flip": True} if cfg.augment else None, generator=gen,
        )  # fmt: skip
        seconds, images = sums["seconds"], sums["images"] * world
        if ddp is not None:  # the slowest rank's seconds, all ranks' images (as the Ray loop reports)
            t = torch.tensor([seconds], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            seconds = float(t.item())
        epochs.append(
            {
                "epoch": epoch,
                "images": images,
                "seconds": seconds,
                "images_per_s": images / seconds,
                "loss": sums["loss_sum"] / sums["images"],
            }
        )
        if rank == 0:
            print(f"  bare x{world} epoch {epoch}: {epochs[-1]['images_per_s']:.0f} img/s", flush=True)
    out = {"workers": world, "device": str(device), "epochs": epochs, "images_per_s": steady(epochs)}
    del model, opt
    if ddp is not None:
        torch.distributed.destroy_process_group()
        if rank == 0:
            Path(ddp[1]).write_text(json.dumps(out))
    if cuda:
        torch.cuda.empty_cache()
    return out


def ray_run(args: argparse.Namespace, cfg, workdir: Path, workers: int) -> dict[str, Any]:
    """run_training (what jobs/train.py calls) with ``workers`` Ray Train workers (runner 'trainer')."""
    import dataclasses

    from deeplense_ray.train import run_training

    run_cfg = dataclasses.replace(
        cfg,
        num_workers=workers,
        batch_size=args.batch_size * workers,
        run_name=f"bench-w{workers}-{int(time.time())}",
    )
    t0 = time.perf_counter()
    result = run_training(run_cfg)
    wall = time.perf_counter() - t0
    epochs = [
        {k: h[k] for k in ("epoch", "images_per_s", "train_images", "train_seconds", "data_wait_frac",
                           "first_batch_s", "val_seconds") if k in h}
        for h in result.history
    ]
    for e in epochs:
        wait = ""
        if "data_wait_frac" in e:
            wait = f" (waiting for data {100 * e['data_wait_frac']:.0f}%, "
            wait += f"first batch after {e['first_batch_s']:.2f} s)"
        print(f"  ray x{workers} epoch {e['epoch']}: {e['images_per_s']:.0f} img/s{wait}", flush=True)
    return {
        "workers": workers,
        "global_batch": run_cfg.batch_size,
        "epochs": epochs,
        "images_per_s": steady(epochs),
        "wall_s_incl_startup_test_eval_and_model_logging": wall,
        "mlflow_run_id": result.run_id,
    }


def steady(epochs: list[dict[str, Any]]) -> float:
    """Median images/s over epochs after the first (all epochs if there is only one)."""
    vals = [e["images_per_s"] for e in epochs[1:]] or [e["images_per_s"] for e in epochs]
    return float(statistics.median(vals))


def environment() -> dict[str, Any]:
    import ray

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "host": platform.node(),
    }
    return env


def write_json(report: dict[str, Any], out: Path) -> None:
    """Atomic JSON write (temporary name in the same directory, then os.replace)."""
    atomic_write_text(out, json.dumps(report, indent=2, default=str) + "\n", fsync=False)


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Ray overhead against the bare loop (1 device) and the K-device speed-ups, with the targets."""
    by_w = {r["workers"]: r["images_per_s"] for r in report.get("ray", [])}
    summary: dict[str, Any] = {"ray_images_per_s": by_w, "targets": {
        "ray_overhead_max": TARGET_OVERHEAD, "speedup_2_vs_1_min": TARGET_SPEEDUP_2}}  # fmt: skip
    bare = report.get("bare", {}).get("images_per_s")
    if bare:
        summary["bare_images_per_s"] = bare
    if bare and 1 in by_w:
        overhead = 1.0 - by_w[1] / bare
        summary.update(ray_overhead=overhead, overhead_target_met=bool(overhead <= TARGET_OVERHEAD))
    for w, rate in by_w.items():
        if w > 1 and 1 in by_w:
            summary[f"speedup_{w}_vs_1"] = rate / by_w[1]
        if w > 1 and bare:
            summary[f"speedup_{w}_vs_bare"] = rate / bare
    if "speedup_2_vs_1" in summary:
        summary["speedup_target_met"] = bool(summary["speedup_2_vs_1"] >= TARGET_SPEEDUP_2)
    for r in report.get("bare_ddp", []):  # the hardware's own scaling, and Ray's cost at K devices
        w = r["workers"]
        summary.setdefault("bare_ddp_images_per_s", {})[w] = r["images_per_s"]
        if bare:
            summary[f"bare_ddp_speedup_{w}_vs_1"] = r["images_per_s"] / bare
        if w in by_w:
            summary[f"ray_overhead_{w}"] = 1.0 - by_w[w] / r["images_per_s"]
    return summary


def table(report: dict[str, Any], unit: str) -> str:
    """The printed table: images/s of bare vs Ray(1) vs Ray(K), overhead %, speed-ups, target verdicts."""
    s = report["summary"]
    bare = s.get("bare_images_per_s")
    one = s["ray_images_per_s"].get(1)
    rows = [f"{'path':<22}{unit + 's':>8}{'img/s':>11}{'img/s/' + unit:>13}{'vs bare':>10}{'vs Ray(1)':>11}"]
    if bare:
        rows.append(f"{'bare PyTorch loop':<22}{1:>8}{bare:>11.0f}{bare:>13.0f}{'1.00x':>10}{'':>11}")
    for r in report.get("bare_ddp", []):
        w, rate = r["workers"], r["images_per_s"]
        vs_bare = f"{rate / bare:.2f}x" if bare else "-"
        name = f"bare PyTorch DDP ({w})"
        rows.append(f"{name:<22}{w:>8}{rate:>11.0f}{rate / w:>13.0f}{vs_bare:>10}{'':>11}")
    for r in report.get("ray", []):
        w, rate = r["workers"], r["images_per_s"]
        vs_bare = f"{rate / bare:.2f}x" if bare else "-"
        vs_one = f"{rate / one:.2f}x" if one else "-"
        rows.append(f"{f'Ray Train ({w})':<22}{w:>8}{rate:>11.0f}{rate / w:>13.0f}{vs_bare:>10}{vs_one:>11}")
    if "ray_overhead" in s:
        ok = "MET" if s["overhead_target_met"] else "NOT met"
        rows.append(f"Ray overhead, 1 {unit} (1 - Ray(1)/bare): {100 * s['ray_overhead']:.1f}% "
                    f"(target <= {100 * TARGET_OVERHEAD:.0f}%: {ok})")  # fmt: skip
    if "speedup_2_vs_1" in s:
        ok = "MET" if s["speedup_target_met"] else "NOT met"
        line = f"speed-up, 2 {unit}s vs 1 (Ray(2)/Ray(1)): {s['speedup_2_vs_1']:.2f}x "
        line += f"(target >= {TARGET_SPEEDUP_2}x: {ok})"
        if "speedup_2_vs_bare" in s:
            line += f"; Ray(2) vs bare loop: {s['speedup_2_vs_bare']:.2f}x"
        rows.append(line)
    for r in report.get("bare_ddp", []):
        w = r["workers"]
        if f"ray_overhead_{w}" in s:
            rows.append(f"bare DDP speed-up, {w} {unit}s vs 1: {s[f'bare_ddp_speedup_{w}_vs_1']:.2f}x (the "
                        f"model's own scaling); Ray overhead at {w} (1 - Ray({w})/bare DDP({w})): "
                        f"{100 * s[f'ray_overhead_{w}']:.1f}%")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import ray

    from deeplense_ray.config import TrainConfig, parse_overrides

    t_start = time.perf_counter()
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="train-scaling-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    if args.gpus_per_worker > 0 and torch.cuda.device_count() < max(args.worker_counts):
        print(f"error: --workers {args.workers} needs {max(args.worker_counts)} GPUs, "
              f"found {torch.cuda.device_count()}", file=sys.stderr)  # fmt: skip
        return 2
    phases: dict[str, float] = {}
    report: dict[str, Any] = {"benchmark": "train_scaling", "complete": False, "phases_s": phases}
    address = os.environ.get("RAY_ADDRESS", "local")  # a fresh local runtime unless told otherwise
    t0 = time.perf_counter()
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    phases["ray_init"] = time.perf_counter() - t0
    try:
        cpus = float(ray.cluster_resources().get("CPU", 0))
        need = max(args.worker_counts) * args.cpus_per_worker
        if need > cpus - 1:  # Train workers holding every CPU starve the Ray Data read tasks: a silent hang
            print(f"error: {max(args.worker_counts)} workers x --cpus-per-worker {args.cpus_per_worker} = "
                  f"{need:g} CPUs leave none of the cluster's {cpus:g} to the Ray Data readers; lower "
                  f"--cpus-per-worker", file=sys.stderr)  # fmt: skip
            return 2
        data_dir, sim_s = ensure_dataset(args, workdir)
        phases["simulate"] = sim_s
        cfg = TrainConfig(
            model=args.model,
            data_dir=str(data_dir),
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=1e-3,
            scheduler="none",
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            precision=args.precision,
            model_size=args.model_size,
            model_overrides=parse_overrides(args.model_override, "--model-override"),
            tracking_uri=f"sqlite:///{workdir}/mlflow.db",
            storage_path=str(workdir / "ray_results"),
            experiment="train-scaling",
            num_to_keep=1,
            ingest=args.ingest,
        ).resolved()
        info = cfg.validate()
        report.update({
            "environment": environment(),
            "args": {k: v for k, v in vars(args).items()},
            "dataset": {
                "dir": str(data_dir),
                "rows": info.split_rows,
                "image_shape": list(info.image_shape),
                "simulate_s": sim_s,
            },
            "definition": "images/s = training images / wall seconds of the epoch's training pass (data "
            "waits included, validation excluded); steady state = median over epochs 2..E; Ray overhead = "
            "1 - Ray(1)/bare; speed-up K = Ray(K)/Ray(1) at a fixed per-device batch; bare DDP(K) = K "
            "processes of the bare loop under DDP (the model's own scaling on the hardware)",
        })  # fmt: skip
        write_json(report, out)  # partial results survive a time-out: rewritten after every phase
        if not args.skip_bare:
            print("bare PyTorch loop ...", flush=True)
            t0 = time.perf_counter()
            report["bare"] = bare_loop(args, cfg, info)
            phases["bare"] = time.perf_counter() - t0
            report["summary"] = summarize(report)
            write_json(report, out)
            report["bare_ddp"] = []
            for w in (w for w in args.worker_counts if w > 1):
                print(f"bare PyTorch DDP, {w} processes ...", flush=True)
                t0 = time.perf_counter()
                report["bare_ddp"].append(bare_loop(args, cfg, info, world=w))
                phases[f"bare_ddp_{w}"] = time.perf_counter() - t0
                report["summary"] = summarize(report)
                write_json(report, out)
        report["ray"] = []
        for w in args.worker_counts:
            print(f"Ray Train, {w} worker(s) ...", flush=True)
            t0 = time.perf_counter()
            report["ray"].append(ray_run(args, cfg, workdir, w))
            phases[f"ray_{w}"] = time.perf_counter() - t0
            report["summary"] = summarize(report)
            write_json(report, out)
    finally:
        ray.shutdown()

    phases["total"] = time.perf_counter() - t_start
    report["summary"] = summarize(report)
    report["complete"] = True
    unit = "GPU" if args.gpus_per_worker > 0 else "worker"
    report["table"] = table(report, unit)
    print()
    print(report["table"])
    print("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    write_json(report, out)
    print(f"wrote {out}")
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
