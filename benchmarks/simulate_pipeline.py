#!/usr/bin/env python
"""End-to-end dataset build rate vs the raw renderer and the disk, with a breakdown of where time goes.

Measures, in one run on one machine:
  1. disk: sequential write bandwidth of the scratch dir (python writes of 16 MiB blocks + fsync, like dd);
  2. raw renderer: ``deeplense_ray.sim.simulate`` images/s on the device, one shard at a time;
  3. shard encoding alone (HDF5 in memory, as written; and with gzip-1 + shuffle on the images, to compare);
  4. ``deeplense_ray.data.build_dataset`` end to end (Ray Data actors + Datasink, Ray start-up excluded):
     images/s, MB/s, and per-stage seconds (render, Arrow conversion, HDF5 encode, sha256, write + fsync),
     for each storage dtype.
The issue's target: end-to-end >= min(70% of disk bandwidth, 50% of the raw renderer rate).

    python benchmarks/simulate_pipeline.py --out results/simulate_pipeline.json          # GPU, full
    python benchmarks/simulate_pipeline.py --quick --out /tmp/sp.json                     # CPU smoke test
Prints a table and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    import deeplense_ray  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    _ROOT = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

import numpy as np  # noqa: E402
import torch  # noqa: E402

MiB = 1 << 20


def disk_write_bandwidth(directory: Path, total_mib: int, block_mib: int = 16) -> dict:
    """Sequential write of ``total_mib`` random bytes in ``block_mib`` blocks, then fsync (dd + fdatasync)."""
    block = np.random.default_rng(0).integers(0, 256, size=block_mib * MiB, dtype=np.uint8).tobytes()
    path = directory / "disk_probe.bin"
    n = max(1, total_mib // block_mib)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(n):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    path.unlink()
    return {"mib": n * block_mib, "seconds": dt, "MB_per_s": n * block_mib * MiB / dt / 1e6}


def raw_renderer_rate(preset: str, n: int, reps: int, device: str) -> dict:
    from deeplense_ray.sim import simulate

    labels = torch.arange(n) % 3
    simulate(preset, n=n, seed=999, device=device, labels=labels)  # warm-up (kernels, caches)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(reps):
        res = simulate(preset, n=n, seed=i, device=device, labels=labels)
    dt = time.perf_counter() - t0
    img_bytes = res["images"][0].numel() * 4
    return {
        "images": n * reps,
        "seconds": dt,
        "images_per_s": n * reps / dt,
        "image_bytes_float32": img_bytes,
        "result": res,
    }


def encode_rates(res, reps: int = 3) -> dict:
    """HDF5 encode rate of one rendered shard, as written and with gzip-1 + shuffle on the images."""
    import h5py

    from deeplense_ray.data.shards import encode_shard, sha256_bytes, write_shard

    images = res["images"].numpy()
    labels = res["labels"].numpy()
    params = {k: v.numpy() for k, v in res["params"].items()}
    out = {}
    for dtype in ("float32", "float16"):
        imgs = images.astype(dtype)
        t0 = time.perf_counter()
        for _ in range(reps):
            data = encode_shard(imgs, labels, params, {"format_version": 1})
        dt = (time.perf_counter() - t0) / reps
        t1 = time.perf_counter()
        sha256_bytes(data)
        dh = time.perf_counter() - t1
        tm: dict = {}
        t2 = time.perf_counter()
        write_shard(
            Path(tempfile.gettempdir()) / "dlr-probe" / "s.h5",
            imgs,
            labels,
            params,
            {"format_version": 1},
            timings=tm,
        )
        dw = time.perf_counter() - t2
        out[dtype] = {
            "write_shard_MB_per_s": imgs.nbytes / dw / 1e6,
            "write_shard_timings": tm,
            "encode_MB_per_s": imgs.nbytes / dt / 1e6,
            "file_MB": len(data) / 1e6,
            "sha256_MB_per_s": len(data) / dh / 1e6,
        }
    # For comparison only (not used by the pipeline): gzip-1 + shuffle on the float32 images.
    t0 = time.perf_counter()
    with h5py.File("probe.h5", "w", driver="core", backing_store=False) as f:
        f.create_dataset(
            "images",
            data=images,
            chunks=(min(64, len(images)), *images.shape[1:]),
            compression="gzip",
            compression_opts=1,
            shuffle=True,
        )
        f.flush()
        size = len(f.id.get_file_image())
    dt = time.perf_counter() - t0
    out["float32_gzip1_shuffle"] = {
        "encode_MB_per_s": images.nbytes / dt / 1e6,
        "file_MB": size / 1e6,
        "size_ratio": size / images.nbytes,
    }
    return out


def run_build(
    preset: str,
    num_per_class: int,
    shard_size: int,
    dtype: str,
    workers: int,
    gpus: float,
    data_dir: Path,
) -> dict:
    from deeplense_ray.data import DatasetConfig, build_dataset

    cfg = DatasetConfig(
        preset=preset,
        num_per_class=num_per_class,
        shard_size=shard_size,
        seed=0,
        dtype=dtype,
        splits={"train": 1.0},
    )
    stats: dict = {}
    t0 = time.perf_counter()
    build_dataset(
        cfg,
        data_dir,
        workers=workers,
        gpus_per_worker=gpus,
        overwrite=True,
        progress=False,
        preview=False,
        stats=stats,
    )
    wall = time.perf_counter() - t0
    n = stats["images_written"]
    stats.update(
        {
            "dtype": dtype,
            "wall_s": wall,
            "images_per_s": n / wall,
            "MB_per_s": stats["bytes_written"] / wall / 1e6,
        }
    )
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="model_ii")
    ap.add_argument(
        "--num-per-class",
        type=int,
        default=200000,
        help="images per class (one split); large enough to amortise start-up, which is reported",
    )
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument(
        "--workers",
        default="1",
        help="renderer actors; a comma list (e.g. 1,2) runs a build for each, all on the one GPU",
    )
    ap.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="default: 1/workers if CUDA is available (the actors share one GPU), else 0",
    )
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument(
        "--disk-mib", type=int, default=4096, help="size of the disk probe (large: little page-cache help)"
    )
    ap.add_argument("--raw-reps", type=int, default=5, help="shards rendered for the raw renderer rate")
    ap.add_argument("--scratch", default=None, help="directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--out", default="simulate_pipeline.json", help="JSON result path")
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_per_class, args.shard_size, args.disk_mib, args.raw_reps = 16, 16, 64, 2
        args.dtypes = "float32"
    cuda = torch.cuda.is_available()
    worker_counts = [int(w) for w in str(args.workers).split(",") if w.strip()]

    def gpus_for(workers: int) -> float:
        if args.gpus_per_worker is not None:
            return args.gpus_per_worker
        return 1.0 / workers if cuda else 0.0

    device = "cuda" if gpus_for(1) > 0 else "cpu"
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="dlr-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)

    print(f"# simulate_pipeline: preset {args.preset}, device {device}, scratch {scratch}", flush=True)
    disk = disk_write_bandwidth(scratch, args.disk_mib)
    print(f"disk: {disk['MB_per_s']:.0f} MB/s", flush=True)
    raw = raw_renderer_rate(args.preset, args.shard_size, args.raw_reps, device)
    res = raw.pop("result")
    print(f"raw renderer: {raw['images_per_s']:.0f} images/s", flush=True)
    enc = encode_rates(res)

    import ray

    t0 = time.perf_counter()
    from deeplense_ray.data.pipeline import start_local_ray

    if not ray.is_initialized():  # as jobs/simulate.py starts it (workers pre-import torch on a GPU host)
        start_local_ray(include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - t0
    builds = []
    for workers in worker_counts:
        for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
            data_dir = scratch / f"ds_{dtype}"
            gpus = gpus_for(workers)
            build = run_build(
                args.preset, args.num_per_class, args.shard_size, dtype, workers, gpus, data_dir
            )
            build.update({"workers": workers, "gpus_per_worker": gpus})
            builds.append(build)
            shutil.rmtree(data_dir, ignore_errors=True)
            print(
                f"build {dtype}, {workers} actor(s) x {gpus:g} GPU: {build['images_per_s']:.0f} images/s",
                flush=True,
            )
    ray.shutdown()

    img_mb = raw["image_bytes_float32"] / 1e6
    rows = []
    for b in builds:
        per_img_mb = b["bytes_written"] / b["images_written"] / 1e6
        disk_img_s = disk["MB_per_s"] / per_img_mb
        target = min(0.7 * disk_img_s, 0.5 * raw["images_per_s"])
        b.update(
            {
                "disk_limit_images_per_s": disk_img_s,
                "target_images_per_s": target,
                "meets_target": b["images_per_s"] >= target,
                "meets_target_steady": b.get("steady_images_per_s", 0.0) >= target,
                "fraction_of_disk": b["MB_per_s"] / disk["MB_per_s"],
                "fraction_of_raw": b["images_per_s"] / raw["images_per_s"],
            }
        )
        rows.append(b)

    print()
    print(f"{'measure':44s} {'value':>12s}  unit")
    print(f"{'disk sequential write (fsync)':44s} {disk['MB_per_s']:12.0f}  MB/s")
    print(
        f"{'raw renderer (simulate, ' + device + ')':44s} {raw['images_per_s']:12.0f}  images/s "
        f"({raw['images_per_s'] * img_mb:.0f} MB/s float32)"
    )
    for k, v in enc.items():
        print(
            f"{'HDF5 encode in memory, ' + k:44s} {v['encode_MB_per_s']:12.0f}  MB/s"
            + (f"  (size x{v['size_ratio']:.2f})" if "size_ratio" in v else "")
        )
    for k, v in enc.items():
        if "write_shard_MB_per_s" in v:
            print(f"{'write_shard (encode+sha256+fsync), ' + k:44s} {v['write_shard_MB_per_s']:12.0f}  MB/s")
    print(f"{'ray.init (excluded below)':44s} {ray_start_s:12.1f}  s")
    for b in rows:
        print(
            f"--- build_dataset {b['dtype']}, {b['workers']} actor(s) x {b['gpus_per_worker']:g} GPU: "
            f"{b['images_written']} images, {b['shards_written']} shards, wall {b['wall_s']:.1f} s"
        )
        print(f"{'  end to end':44s} {b['images_per_s']:12.0f}  images/s  ({b['MB_per_s']:.0f} MB/s)")
        if "steady_images_per_s" in b:
            print(
                f"{'  after the first shard (no start-up)':44s} {b['steady_images_per_s']:12.0f}  images/s"
                f"  ({b['steady_MB_per_s']:.0f} MB/s; first shard after {b['first_shard_s']:.1f} s)"
            )
        print(
            f"{'  target min(70% disk, 50% raw)':44s} {b['target_images_per_s']:12.0f}  images/s  "
            f"-> end to end {'MET' if b['meets_target'] else 'NOT MET'}, "
            f"steady {'MET' if b['meets_target_steady'] else 'NOT MET'}"
        )
        print(
            f"{'  fraction of disk / of raw renderer':44s} {b['fraction_of_disk']:12.2f}  / "
            f"{b['fraction_of_raw']:.2f}"
        )
        for a in b.get("actor_init", []):
            print(
                f"{'  actor start: import/device/warm-up':44s} {a['import_s']:6.1f} {a['device_init_s']:5.1f}"
                f" {a['warmup_s']:5.1f}  s"
            )
        marks = "  ".join(f"{k} {v:.1f}" for k, v in b.get("startup", {}).items())
        print(f"{'  start-up timeline [s after pipeline start]':44s} {marks}")
        for k in ("render_s", "to_arrow_s", "from_arrow_s", "encode_s", "hash_s", "write_s"):
            print(f"{'  stage ' + k + ' (summed over shards)':44s} {b[k]:12.2f}  s")

    result = {
        "benchmark": "simulate_pipeline",
        "quick": args.quick,
        "preset": args.preset,
        "device": device,
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "host": platform.node(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "workers": worker_counts,
        "num_per_class": args.num_per_class,
        "shard_size": args.shard_size,
        "disk": disk,
        "raw_renderer": raw,
        "encode": enc,
        "ray_init_s": ray_start_s,
        "builds": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsaved {out}")
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
