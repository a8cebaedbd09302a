#!/usr/bin/env python
"""Simulate a sharded HDF5 lens dataset with Ray Data (thin CLI over deeplense_ray.data.build_dataset).

Examples:
    python jobs/simulate.py --preset model_ii --num-per-class 1000 --out data/model_ii
    python jobs/simulate.py --config my_preset.yaml --num-per-class 200 --shard-size 512 --out data/x
    python jobs/simulate.py --verify data/model_ii
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token \\
        ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/simulate.py --preset model_ii --num-per-class 100 --out /abs/path/data

Every flag is checked before Ray starts; errors name the bad value and exit with status 2. One job writes an
--out at a time: the job holds an exclusive lock on DIR/.lock (fcntl.flock: local file systems; on NFS only
as good as the mount's lock support) and a second job on the same directory exits 2 at once, naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

try:  # `ray job submit --working-dir .` runs this from a copy of the repo that may not be installed
    import deeplense_ray  # noqa: F401
except ImportError:
    _ROOT = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

from deeplense_ray.cli import count_arg  # noqa: E402
from deeplense_ray.config import parse_overrides  # noqa: E402
from deeplense_ray.data.config import (  # noqa: E402
    STORAGE_DTYPES,
    DatasetConfig,
    check_splits,
    load_preset_yaml,
    parse_splits,
)

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="simulate.py", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--preset", default=None, help="simulator preset name (default model_ii, or the config's)"
    )
    ap.add_argument("--config", default=None, help="YAML file: 'preset: NAME' plus preset fields to override")
    ap.add_argument(
        "--preset-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="preset field, e.g. num_pix=32 or sigma_bkg=1e-2 (repeatable; wins over --config)",
    )
    ap.add_argument(
        "--num-per-class",
        type=count_arg,
        default=None,
        help="images of EACH class in all, partitioned by --splits (required unless --verify)",
    )
    ap.add_argument("--splits", default="train=0.8,val=0.1,test=0.1", help="NAME=FRACTION,... summing to 1")
    ap.add_argument("--shard-size", type=int, default=4096, help="rows per HDF5 shard (default 4096)")
    ap.add_argument(
        "--out", default=None, help="output directory (required unless --verify; locked while the job runs)"
    )
    ap.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    ap.add_argument("--dtype", default="float32", help="image storage dtype: float32 (default) or float16")
    ap.add_argument("--workers", type=int, default=1, help="renderer actors (default 1)")
    ap.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per renderer actor, fractions allowed, 0 = CPU (default: 1 if the cluster has GPUs)",
    )
    ap.add_argument(
        "--address",
        default=None,
        help="Ray address; 'local' starts a fresh local runtime (default: join a running cluster "
        "if there is one, else start a local one)",
    )
    ap.add_argument(
        "--resume", action="store_true", help="keep valid shards of an earlier run, render the rest"
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing dataset in --out (removes its manifest, preview, <split>/shard-NNNNN.h5 "
        "and temporary files; any other file stays)",
    )
    ap.add_argument(
        "--verify", metavar="DIR", default=None, help="check a dataset against its manifest and exit"
    )
    ap.add_argument(
        "--no-progress", action="store_true", help="no Ray Data progress bars, even with --verbose"
    )
    ap.add_argument(
        "--verbose",
        action="store_true",
        help="Ray's own output too (Ray Data progress bars and logs, the workers' output)",
    )
    ap.add_argument("--no-preview", action="store_true", help="do not write DIR/preview.png")
    return ap


def config_from_args(args: argparse.Namespace) -> DatasetConfig:
    """A validated DatasetConfig from the parsed flags (no Ray). ValueError naming the bad value."""
    overrides: dict = {}
    base = args.preset
    if args.config is not None:
        yaml_base, overrides = load_preset_yaml(args.config)
        if base is not None and yaml_base is not None and base != yaml_base:
            raise ValueError(f"--preset {base!r} contradicts 'preset: {yaml_base}' in {args.config}")
        base = base or yaml_base or overrides.get("name")
    overrides = {**overrides, **parse_overrides(args.preset_override, "--preset-override")}
    # A bad value is reported before a missing flag: the values given are checked first.
    if args.dtype not in STORAGE_DTYPES:
        raise ValueError(f"--dtype must be one of {list(STORAGE_DTYPES)}, got {args.dtype!r}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.gpus_per_worker is not None and not args.gpus_per_worker >= 0:
        raise ValueError(f"--gpus-per-worker must be >= 0, got {args.gpus_per_worker}")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    splits = parse_splits(args.splits)
    fields = dict(preset=base or "model_ii", preset_overrides=overrides, shard_size=args.shard_size,
                  seed=args.seed, dtype=args.dtype)
    missing = [flag for flag, value in (("--num-per-class", args.num_per_class), ("--out", args.out))
               if value is None]
    try:
        if missing:  # everything but the count: the preset, its overrides, shard size, seed, split fractions
            check_splits(splits)
            DatasetConfig(**fields, num_per_class=1, splits={"all": 1.0}).validate()
            raise ValueError(f"{missing[0]} is required")
        cfg = DatasetConfig(**fields, num_per_class=args.num_per_class, splits=splits)
        cfg.validate()
    except KeyError as exc:  # unknown preset name: get_preset lists the valid ones
        raise ValueError(exc.args[0] if exc.args else str(exc)) from None
    return cfg


def check_resume_dir(out: Path) -> None:
    """``--resume`` only continues a dataset of this project: a non-empty directory without its
    ``manifest.json``, build marker or split folders of shards is refused, naming what it holds."""
    from deeplense_ray.data.manifest import LOCK_NAME, MANIFEST_NAME
    from deeplense_ray.data.pipeline import BUILDING_NAME

    if not out.is_dir() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return
    if (out / MANIFEST_NAME).is_file() or (out / BUILDING_NAME).is_file():
        return
    if any(out.glob("*/shard-*.h5")):
        return
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name != LOCK_NAME)
    shown = ", ".join(found[:8]) + (f", ... ({len(found)} entries)" if len(found) > 8 else "")
    raise ValueError(
        f"--resume: {out} is not a dataset of this project (no {MANIFEST_NAME}, no {BUILDING_NAME}, no "
        f"<split>/shard-*.h5); it holds: {shown}. Use an empty or new --out, or --overwrite"
    )


def main(argv: list[str] | None = None) -> int:
    """The job; a failure the user causes (a bad file, an MLflow store that refuses) exits 2 with one line."""
    from deeplense_ray.cli import run_main

    return run_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verify is not None:
        from deeplense_ray.data.manifest import load_manifest, verify_dataset

        problems = verify_dataset(args.verify)
        for p in problems:
            print(f"BAD {p}", file=sys.stderr)
        if problems:
            print(f"verify {args.verify}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        manifest = load_manifest(args.verify)
        n = sum(len(s["shards"]) for s in manifest["splits"].values())
        print(f"verify {args.verify}: OK, {n} shards match the manifest")
        return 0

    from deeplense_ray.data.manifest import LOCK_NAME, dataset_lock
    from deeplense_ray.data.pipeline import check_out_dir

    with contextlib.ExitStack() as held:
        try:
            cfg = config_from_args(args)
            out = Path(args.out).resolve()
            from deeplense_ray.data.room import check_dataset_room

            check_dataset_room(cfg, out)  # disk space and the build plan's memory, before Ray
            # The whole job holds the directory's lock: a second job writing the same --out stops here.
            made = [q for q in (out, out / LOCK_NAME) if not q.exists()]
            held.enter_context(dataset_lock(out))
            try:
                check_out_dir(out, resume=args.resume, overwrite=args.overwrite)
                if args.resume:
                    check_resume_dir(out)
            except ValueError:  # not a directory of ours: leave it as it was, without our lock file
                for q in reversed(made):
                    q.unlink() if q.is_file() else q.rmdir()
                raise
                from deeplense_ray.data.pipeline import _check_resume_config, resolved_config
                from deeplense_ray.sim import resolve_preset

                preset = resolve_preset(cfg.preset, cfg.preset_overrides or None)
                _check_resume_config(out, resolved_config(cfg, preset.to_dict()))
        except (ValueError, OSError) as exc:  # OSError: the lock is held, or `out` cannot be made
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return _simulate(args, cfg)


def _simulate(args: argparse.Namespace, cfg: DatasetConfig) -> int:
    """Start Ray and build the dataset (the caller holds the lock of ``--out``)."""
    import ray

    from deeplense_ray.data import build_dataset, manifest_hash
    from deeplense_ray.data.pipeline import WORKER_PRELOAD_MODULES
    from deeplense_ray.runtime import RayConnectError, connect
    from deeplense_ray.tracking.console import quiet_ray

    try:
        # Ray's own output (Ray Data's progress and logs, the workers' output) only with --verbose; set in
        # this process, the driver, before the dataset runs: it holds under `ray job submit` too
        how = connect(args.address, preload_modules=WORKER_PRELOAD_MODULES, **quiet_ray(args.verbose))
    except RayConnectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    gpus = args.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    print(
        f"simulate: {how}; preset {cfg.preset}, {cfg.num_per_class} per class, workers {args.workers}, "
        f"gpus/worker {gpus:g}, out {Path(args.out).resolve()}",
        flush=True,
    )
    note = cpu_note(ray.cluster_resources().get("CPU", 0.0), ray.available_resources().get("CPU", 0.0),
                    args.workers)
    if note:
        print(f"simulate: {note}", flush=True)
    stats: dict = {}
    t0 = time.perf_counter()
    manifest = build_dataset(
        cfg,
        args.out,
        workers=args.workers,
        gpus_per_worker=gpus,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=args.verbose and not args.no_progress,
        preview=not args.no_preview,
        stats=stats,
    )
    wall = time.perf_counter() - t0
    rows = sum(s["rows"] for s in manifest["splits"].values())
    print("\n".join(done_lines(Path(args.out).resolve(), manifest, wall)), flush=True)
    print(
        json.dumps(
            {
                "out": str(Path(args.out).resolve()),
                "manifest_sha256": manifest_hash(args.out),
                "images": rows,
                "wall_s": round(wall, 3),
                **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()},
            }
        )
    )
    return 0


def cpu_note(total: float, free: float, workers: int) -> str | None:
    """One line when the cluster's CPUs make the build wait (what Ray Data's "Dataset job will hang"
    warning is about), else None. Each renderer actor holds 1 CPU and each write task WRITE_CPUS."""
    from deeplense_ray.data.pipeline import WRITE_CPUS

    if free < 1:
        return (f"none of the cluster's {total:g} CPUs is free now (other jobs' tasks or actors hold them); "
                "the build starts when one is released")
    if total < workers + WRITE_CPUS:
        return (f"the cluster's {total:g} CPUs cannot hold {workers} renderer actor(s) (1 CPU each) and a "
                f"write task ({WRITE_CPUS:g} CPU) at once: shards are written once rendering ends; lower "
                "--workers to write while rendering")
    return None


def done_lines(out: Path, manifest: dict, wall: float) -> list[str]:
    """Where the dataset is and how to use it (printed just before the job's last line, its JSON report)."""
    from deeplense_ray.tracking.console import where_lines

    rows = {k: v["rows"] for k, v in manifest["splits"].items()}
    return ["", *where_lines(
        f"simulated {sum(rows.values())} images {rows} in {wall:.0f} s. Results:",
        [
            ("dataset", out),
            ("manifest", out / "manifest.json"),
            ("preview", out / "preview.png" if (out / "preview.png").is_file() else None),
            ("check it", f"python jobs/simulate.py --verify {out}"),
            ("train on it", f"python jobs/train.py --model ResNetSimple --data {out}"),
        ],
    )]


if __name__ == "__main__":
    sys.exit(main())
