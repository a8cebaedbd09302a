#!/usr/bin/env python
"""Import a class-folder .npy image set (the published DeepLense Model I-IV layouts) as a sharded HDF5
dataset with a manifest, for jobs/train.py, jobs/tune.py and jobs/predict.py (thin CLI).

    python jobs/import_npy.py ~/deeplense/Model_I --out $PWD/data/model_i_npy
    python jobs/import_npy.py ~/deeplense/Model_II/train --out data/m2 --splits train=0.8,val=0.1,test=0.1

SRC/<class>/*.npy is split by --splits; SRC/train/<class>/, SRC/test/<class>/ (and val/) are kept as splits
(without val/, --val-fraction of train becomes val). Splits follow simulate.py's rules: none is left without
an image of a class unless it is left out. An axion file's [image, axion_mass] object array gives the
parameter axion_mass; it is read by a data-only unpickler, and a file asking for anything but numpy arrays
and numbers is refused. A file that cannot be read, has another size, or holds non-finite values stops the
import with status 2 and its name; nothing is left half-written. --out may not be, contain or lie inside
SRC; --overwrite replaces only a dataset (its manifest, sources, preview and listed shards), nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplense_ray.infer.npy_import import DEFAULT_SHARD_SIZE  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("src", help="folder: SRC/<class>/*.npy or SRC/{train,val,test}/<class>/*.npy")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument(
        "--splits", default=None, help="fractions, e.g. train=0.8,val=0.1,test=0.1 (pools split folders)"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="of train/, when there is no val/ folder (0: no val split)",
    )
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="rows per shard")
    p.add_argument("--seed", type=int, default=0, help="seeds the splits and the row order")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="image storage type")
    p.add_argument("--pixel-scale", type=float, default=None, help="arcsec per pixel (models that use it)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the dataset at --out (refused if it holds files other than a dataset's own)",
    )
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """The job; a failure the user causes (a bad file, an MLflow store that refuses) exits 2 with one line."""
    from deeplense_ray.cli import run_main

    return run_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from deeplense_ray.data.config import parse_splits
    from deeplense_ray.infer.npy_import import import_npy

    try:
        manifest = import_npy(
            args.src,
            args.out,
            fractions=parse_splits(args.splits) if args.splits else None,
            val_fraction=args.val_fraction,
            shard_size=args.shard_size,
            seed=args.seed,
            dtype=args.dtype,
            pixel_scale=args.pixel_scale,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "out": str(Path(args.out).resolve()),
        "class_names": manifest["class_names"],
        "image_shape": manifest["image_shape"],
        "splits": {s: info["rows"] for s, info in manifest["splits"].items()},
        "splits_from": manifest["config"]["splits_from"],
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
