#!/usr/bin/env python
"""Compare architectures the way papers do: every model x seed trained alike, one report (thin CLI).

Thin CLI over deeplense_ray.study.run_study. Examples:
    python jobs/study.py --models ViT,CvT,Lensiformer,ResNet18 --data data/m2 --seeds 3 --epochs 20
    python jobs/study.py --models ViT,timm:densenet201 --simulate model_ii --num-per-class 2000 --seeds 3
    python jobs/study.py --protocol lensiformer --seeds 3 --epochs 50      # Real-Galaxy-Tiny recipe
    python jobs/study.py --models ResNet18,ViT --simulate model_ii --task inference --targets theta_E
    python jobs/study.py --resume --name study-20261202-101500             # run only the unfinished pairs

Bad options (unknown model, timm not importable, a missing dataset, a model that cannot take the data,
--task inference without --targets or with a target the data does not hold, more GPUs per run than the
cluster has) fail before any training, naming the value, with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:  # `ray job submit --working-dir .` runs this from a copy of the repo that may not be installed
    import deeplense_ray  # noqa: F401
except ImportError:
    _ROOT = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

from deeplense_ray.config import TrainConfig, add_field_flags, parse_overrides  # noqa: E402
from deeplense_ray.study.settings import PROTOCOLS, StudySettings, load_model_config  # noqa: E402

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="study.py", description=__doc__.split("\n")[0])
    a = ap.add_argument
    a("--models", "--model", dest="models", default=None,
      help="comma-separated model names (list_models(), or timm:<arch> where timm is importable); "
           "default ViT,CvT,Lensiformer,ResNet18 (or the protocol's)")  # fmt: skip
    add_field_flags(ap, TrainConfig, ("data_dir",))
    a("--simulate", default=None, metavar="PRESET", help="build a PRESET dataset first (instead of --data)")
    a("--num-per-class", type=int, default=None, help="images per class of the --simulate dataset (1000)")
    a("--preset-override", action="append", default=[], metavar="KEY=VALUE",
      help="preset field of the --simulate dataset, e.g. num_pix=32 (repeatable)")  # fmt: skip
    a("--data-seed", type=int, default=0, help="seed of the --simulate dataset")
    a("--online", action="store_true",
      help="with --simulate: every run renders fresh training images on its device (as jobs/train.py "
           "--simulate); the built dataset holds only the fixed val/test splits")  # fmt: skip
    add_field_flags(ap, TrainConfig, ("images_per_epoch",))
    a("--seeds", type=int, default=3, help="runs per model, seeds 0..N-1 (default 3)")
    add_field_flags(ap, TrainConfig, ("epochs", "model_size", "task", "targets"))
    a(
        "--config",
        action="append",
        default=[],
        metavar="best_config.yaml",
        help="a tune search's best_config.yaml: that model's training settings (repeatable, one per model)",
    )
    a(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="TrainConfig field of every run, e.g. lr=1e-3, batch_size=128, precision=bf16 (repeatable)",
    )
    a("--gpus-per-run", type=float, default=None, help="GPUs per run (fractions pack runs; default 0.25)")
    a("--cpus-per-run", type=float, default=None, help="CPUs per run (default 1, less on a small cluster)")
    a("--max-concurrent", type=int, default=None, help="runs at once (default: what the cluster holds)")
    a("--protocol", default=None, choices=sorted(PROTOCOLS), help="a published recipe (docs/study.md)")
    a("--experiment", default="deeplense-study", help="MLflow experiment (default deeplense-study)")
    add_field_flags(ap, TrainConfig, ("tracking_uri",))
    a("--storage-path", default="study_results", help="root of all outputs (default ./study_results)")
    a("--name", default=None, help="study name (default study-<time>; with --resume the newest)")
    a("--resume", action="store_true", help="continue a study: only the model x seed runs without a result")
    a("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a new local runtime)")
    return ap


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    """StudySettings from the parsed flags (no Ray). ValueError naming the bad value."""
    explicit = {k for k in ("models", "num_per_class", "model_size") if getattr(args, k) is not None}
    explicit |= {"data_dir"} if args.data_dir else set()
    explicit |= {"simulate"} if args.simulate else set()
    configs = {}
    for path in args.config:
        model, fields = load_model_config(path)
        if model.lower() in (m.lower() for m in configs):
            raise ValueError(f"--config: two files for model {model!r}")
        configs[model] = fields
    kw = {
        "models": args.models,
        "num_per_class": args.num_per_class,
        "model_size": args.model_size,
        "images_per_epoch": args.images_per_epoch,
    }
    s = StudySettings(
        **{k: v for k, v in kw.items() if v is not None},
        data_dir=args.data_dir,
        simulate=args.simulate,
        preset_overrides=parse_overrides(args.preset_override, "--preset-override"),
        data_seed=args.data_seed,
        online=args.online,
        seeds=args.seeds,
        epochs=args.epochs,
        model_configs=configs,
        train=parse_overrides(args.train_override, "--train-override"),
        gpus_per_run=args.gpus_per_run,
        cpus_per_run=args.cpus_per_run,
        max_concurrent=args.max_concurrent,
        task=args.task,
        targets=args.targets,
        protocol=args.protocol,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        storage_path=args.storage_path,
        name=args.name,
        resume=args.resume,
    )
    s = s.with_protocol(explicit)
    return s if args.resume else s.validate()  # a resumed study takes its saved settings


def main(argv: list[str] | None = None) -> int:
    """The job; a failure the user causes (a bad file, an MLflow store that refuses) exits 2 with one line."""
    from deeplense_ray.cli import run_main

    return run_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    from deeplense_ray.tracking.mlflow_utils import check_tracking_reachable

    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        check_tracking_reachable(settings.tracking_uri)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from deeplense_ray.study import StudyIncomplete, StudySetupError, run_study

    try:
        result = run_study(settings, address=args.address)
    except StudySetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StudyIncomplete as exc:
        print(f"incomplete: {exc}", file=sys.stderr)
        return 1
    print()
    print(f"study {result.name}: {len(result.runs)} runs ({len(result.ran_now)} now), data {result.data_dir}")
    print(result.markdown)
    print(f"report: {result.output_dir} ({', '.join(Path(a).name for a in result.artifacts)})")
    print(f"MLflow parent run {result.parent_run_id} (experiment {result.experiment_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
