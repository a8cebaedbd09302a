#!/usr/bin/env python
"""Training input throughput: how fast Ray Train workers receive a dataset's images, with no model.

Runs one Ray Train ``TorchTrainer`` per worker count (each worker on its own GPU) whose loop only consumes
its share of the ``train`` split, once per input variant, and times the second pass of each (the first
warms up). A variant is a way of turning the rank's Ray Data stream into device batches:

  iter_torch_batches+host_shuffle   the path the training loop used before (Ray Data's own batches of the
                                    step size, float32, Ray Data's local shuffle buffer on the host)
  iter_torch_batches                the same without shuffling
  device_batches                    deeplense_ray.train.ingest.device_batches, the current path: big pinned
                                    host batches prefetched, images as stored, shuffle buffer on the device
  device_batches+float16            the same on a float16 copy of the dataset
  device_batches+4096_row_blocks    the same reading 4096-row blocks
  device_batches+per_rank           ingest="per_rank": every rank streams its own shards (rank_shards)
                                    through its own Ray Data execution, 4096-row blocks

Each pass moves every image to the device and converts it to float32 (as training does); images/s per
rank and in total (all ranks' images / the slowest rank's seconds) are reported, with MB/s of images as
stored. Prints a table and writes JSON.

    python benchmarks/train_ingest.py --workers 1,2 --out train_ingest.json     # GPU machine
    python benchmarks/train_ingest.py --quick --out /tmp/train_ingest.json      # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throw-away local Ray runtime started by this script
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from train_scaling import environment, write_json  # noqa: E402

VARIANTS = (
    "iter_torch_batches+host_shuffle",
    "iter_torch_batches",
    "device_batches",
    "device_batches+float16",
    "device_batches+4096_row_blocks",
    "device_batches+per_rank",
)
#: The dataset each variant reads: (storage dtype, Ray Data read block rows).
SOURCES = {"f32": ("float32", 1024), "f16": ("float16", 1024), "f32big": ("float32", 4096)}


def source_of(variant: str) -> str:
    if variant.endswith("float16"):
        return "f16"
    return "f32big" if variant.endswith(("blocks", "per_rank")) else "f32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="model_ii")
    p.add_argument("--num-pix", type=int, default=None, help="override the preset's image size [pixels]")
    p.add_argument("--num-per-class", type=int, default=30000, help="images per class (80%% train)")
    p.add_argument("--batch-size", type=int, default=256, help="per-worker batch")
    p.add_argument("--shuffle-buffer", type=int, default=2048, help="shuffle buffer rows (as TrainConfig)")
    p.add_argument("--workers", default="1,2", help="Ray Train worker counts, e.g. 1,2")
    p.add_argument("--cpus-per-worker", type=float, default=4.0)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of variants to run")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default="train_ingest.json")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny 32x32 dataset, 1 worker")
    args = p.parse_args(argv)
    if args.quick:
        args.num_pix, args.num_per_class, args.batch_size = 32, 200, 32
        args.shuffle_buffer, args.workers, args.cpus_per_worker = 64, "1", 0.5
    args.worker_counts = [int(w) for w in str(args.workers).split(",") if w.strip()]
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variant_list) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return args


def build_datasets(args: argparse.Namespace, workdir: Path) -> dict[str, Path]:
    """The same dataset stored as float32 and as float16 (same config and seed otherwise)."""
    from deeplense_ray.data import DatasetConfig, build_dataset

    gpus = torch.cuda.device_count()
    out = {}
    for dtype in ("float32", "float16"):
        cfg = DatasetConfig(
            preset=args.preset,
            preset_overrides={"num_pix": args.num_pix} if args.num_pix else {},
            num_per_class=args.num_per_class,
            shard_size=64 if args.quick else 4096,  # the jobs/simulate.py default
            seed=0,
            dtype=dtype,
        )
        out[dtype] = workdir / dtype
        build_dataset(
            cfg, out[dtype], workers=max(1, gpus), gpus_per_worker=1.0 if gpus else 0.0, progress=False
        )
    return out


def ingest_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: consume this rank's share of every dataset once per variant, twice; time pass 2."""
    import ray.train
    import ray.train.torch

    from deeplense_ray.data import read_split
    from deeplense_ray.train.ingest import device_batches, rank_shards

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bs, buf = int(config["batch_size"]), int(config["shuffle_buffer"])
    results: dict[str, Any] = {}
    for variant in config["variants"]:
        per_rank = variant.endswith("per_rank")
        shard = None if per_rank else ray.train.get_dataset_shard(source_of(variant))
        passes = []
        for attempt in range(2):
            gen = torch.Generator(device=device).manual_seed(rank)
            if variant.startswith("iter_torch_batches"):
                batches = shard.iter_torch_batches(
                    batch_size=bs,
                    dtypes={"image": torch.float32, "label": torch.int64},
                    device=device,
                    local_shuffle_buffer_size=buf if variant.endswith("host_shuffle") else None,
                    local_shuffle_seed=rank if variant.endswith("host_shuffle") else None,
                )
            elif per_rank:  # this rank's own Ray Data execution over the shards dealt to it
                mine, rows = rank_shards(config["shard_rows"], rank, world, attempt)
                own = read_split(
                    config["f32_dir"], "train", image_dtype="stored", block_rows=4096, shards=mine
                )
                batches = device_batches(
                    own.iterator(),
                    batch_size=bs,
                    device=device,
                    shuffle_rows=buf,
                    generator=gen,
                    max_rows=rows,
                )
            else:
                batches = device_batches(shard, batch_size=bs, device=device, shuffle_rows=buf, generator=gen)
            t0 = time.perf_counter()
            n, total, first = 0, torch.zeros((), device=device), None
            for b in batches:
                if first is None:
                    first = time.perf_counter() - t0  # the execution's start-up, as a rank sees it
                x = b["image"].to(device, non_blocking=True).float()
                total += x[:, 0, 0, 0].sum()  # touch the data on the device, as a step would
                n += int(b["label"].shape[0])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            passes.append({"images": n, "seconds": time.perf_counter() - t0, "first_batch_s": first})
        results[variant] = passes[-1]
    ray.train.report({"rank": rank, "results": json.dumps(results)})
    gathered = [None] * ctx.get_world_size()
    if ctx.get_world_size() > 1:
        torch.distributed.all_gather_object(gathered, results)
    else:
        gathered = [results]
    if rank == 0:
        path = Path(config["result_path"])
        path.write_text(json.dumps(gathered))


def producer_rate(data_dir: Path, block_rows: int) -> dict[str, Any]:
    """Ray Data alone: rows/s of read_split's blocks arriving in the driver (no Train, no device), pass 2."""
    from deeplense_ray.data import read_split

    out = {}
    for attempt in range(2):
        ds = read_split(data_dir, "train", image_dtype="stored", block_rows=block_rows)
        t0 = time.perf_counter()
        n, first = 0, None
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            first = time.perf_counter() - t0 if first is None else first
            n += len(b["label"])
        out = {
            "first_block_s": first,
            "block_rows": block_rows,
            "images": n,
            "seconds": time.perf_counter() - t0,
            "pass": attempt + 1,
        }
    out["images_per_s"] = out["images"] / out["seconds"]
    return out


def run_workers(args: argparse.Namespace, data: dict[str, Path], workers: int, tmp: Path) -> dict[str, Any]:
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from deeplense_ray.config import describe_dataset
    from deeplense_ray.data import read_split

    info = describe_dataset(data["float32"])
    use_gpu = torch.cuda.is_available()
    result_path = tmp / f"ingest-w{workers}.json"
    trainer = TorchTrainer(
        ingest_loop,
        train_loop_config={
            "batch_size": args.batch_size,
            "shuffle_buffer": args.shuffle_buffer,
            "variants": list(args.variant_list),
            "f32_dir": str(data["float32"]),
            "shard_rows": list(info.train_shard_rows),
            "result_path": str(result_path),
        },
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": args.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})},
        ),
        run_config=RunConfig(name=f"ingest-w{workers}-{int(time.time())}", storage_path=str(tmp / "ray")),
        datasets={
            name: read_split(data[dtype], "train", image_dtype="stored", block_rows=rows)
            for name, (dtype, rows) in SOURCES.items()
            if any(source_of(v) == name and not v.endswith("per_rank") for v in args.variant_list)
        },
        dataset_config=DataConfig(datasets_to_split="all"),
    )
    trainer.fit()
    per_rank = json.loads(result_path.read_text())
    image_bytes = {"float32": 4, "float16": 2}
    pixels = int(np.prod(info.image_shape))
    out: dict[str, Any] = {"workers": workers, "variants": {}}
    for variant in args.variant_list:
        ranks = [r[variant] for r in per_rank]
        images = sum(r["images"] for r in ranks)
        seconds = max(r["seconds"] for r in ranks)
        itemsize = image_bytes[SOURCES[source_of(variant)][0]]
        out["variants"][variant] = {
            "per_rank": ranks,
            "images_per_s": images / seconds,
            "images_per_s_per_rank": [r["images"] / r["seconds"] for r in ranks],
            "MB_per_s": images * pixels * itemsize / seconds / 1e6,
        }
    return out


def table(report: dict[str, Any]) -> str:
    head = f"{'variant':34s} {'workers':>7s} {'img/s':>9s} {'img/s/rank':>11s} {'MB/s':>8s}"
    lines = [head + f" {'1st batch':>10s}"]
    for run in report["runs"]:
        for variant, v in run["variants"].items():
            per = sum(v["images_per_s_per_rank"]) / len(v["images_per_s_per_rank"])
            first = max(r.get("first_batch_s") or 0.0 for r in v["per_rank"])
            lines.append(
                f"{variant:34s} {run['workers']:7d} {v['images_per_s']:9.0f} {per:11.0f} {v['MB_per_s']:8.0f}"
                f" {first:9.2f}s"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import ray

    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="train-ingest-"))
    report: dict[str, Any] = {"benchmark": "train_ingest", "args": vars(args), "complete": False}
    ray.init(num_cpus=os.cpu_count() if not args.quick else 2, log_to_driver=False)
    report["environment"] = environment()
    t0 = time.perf_counter()
    data = build_datasets(args, workdir)
    report["simulate_s"] = time.perf_counter() - t0
    report["producer"] = [producer_rate(data["float32"], rows) for rows in (1024, 4096)]
    for p in report["producer"]:
        print(
            f"Ray Data alone, {p['block_rows']}-row blocks: {p['images_per_s']:.0f} img/s "
            f"(first block after {p['first_block_s']:.2f} s)",
            flush=True,
        )
    write_json(report, Path(args.out))
    report["runs"] = []
    for k in args.worker_counts:
        report["runs"].append(run_workers(args, data, k, workdir))
        write_json(report, Path(args.out))
        print(table(report), flush=True)
    report["complete"] = True
    report["table"] = table(report)
    write_json(report, Path(args.out))
    print(report["table"])
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
