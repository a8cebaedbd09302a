#!/usr/bin/env python
"""Hyperparameter search with Ray Tune (ASHA + Optuna) over the training loop, tracked in MLflow.

Thin CLI over deeplense_ray.tune.run_search. Examples:
    python jobs/tune.py --model CvT --num_samples 10
    python jobs/tune.py --model ViT --num-samples 16 --data data/m2 --max-epochs 20 --gpus-per-trial 0.25
    python jobs/tune.py --model ViT --num-samples 16 --data data/m2 --resume  # continue the newest
    python jobs/tune.py --model ResNetSimple --num-samples 4 --fix width=16 --choice lr=1e-3,3e-3

Without --data a small dataset of --preset (default deeplense_model_ii, the demo's data: the published
DeepLense Model II recipe; --preset model_ii for realistic, physical data) is simulated first into
<storage-path>/datasets/ (or reused from there when one with the same config exists). With --simulate PRESET
no dataset is written: every trial's workers render fresh training images (online simulation, as
jobs/train.py --simulate), validated and tested on fixed simulated sets or on the splits of --data.
Bad options (unknown model or metric, num_samples < 1, more GPUs per trial than the cluster has, ...) fail
before any trial starts, naming the value, with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

try:  # `ray job submit --working-dir .` runs this from a copy of the repo that may not be installed
    import deeplense_ray  # noqa: F401
except ImportError:
    _ROOT = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

from deeplense_ray.config import TrainConfig, add_field_flags, parse_overrides, parse_value  # noqa: E402
from deeplense_ray.tune.settings import DEFAULT_PRESET, TuneSettings  # noqa: E402

EXIT_BAD_INPUT = 2
#: Online-simulation sizes of every trial (TrainConfig fields; their flags are jobs/train.py's).
ONLINE_FIELDS = ("images_per_epoch", "val_size", "test_size")
#: TuneSettings fields of the trials' schedule and resources, in the order --help lists them.
SEARCH_FIELDS = ("max_epochs", "grace_period", "reduction_factor", "gpus_per_trial", "cpus_per_trial",
                 "workers_per_trial", "trial_runner", "max_concurrent", "metric")  # fmt: skip


class _Refused(argparse.Action):
    """A flag this job does not take because it means something else in another job: its ``const`` is the
    usage error that says which flag to use."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(self.const)


def build_parser() -> argparse.ArgumentParser:
    """The search's flags: TuneSettings fields, and the training settings it shares with jobs/train.py and
    jobs/study.py as TrainConfig's flags (name, default and help from the field: config.add_field_flags)."""
    ap = argparse.ArgumentParser(prog="tune.py", description=__doc__.split("\n")[0])
    a = ap.add_argument
    add_field_flags(ap, TrainConfig, ("model",))
    add_field_flags(ap, TuneSettings, ("num_samples",))
    add_field_flags(ap, TrainConfig, ("data_dir",))
    add_field_flags(ap, TuneSettings, ("preset", "num_per_class"))
    a(
        "--preset-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="preset field of the simulated dataset, e.g. num_pix=32 (repeatable)",
    )
    add_field_flags(ap, TrainConfig, ("simulate",))
    a("--sim-config", default=None, metavar="FILE.yaml", help="preset fields to override (with --simulate)")
    add_field_flags(ap, TrainConfig, ONLINE_FIELDS)
    add_field_flags(ap, TuneSettings, SEARCH_FIELDS)
    add_field_flags(ap, TrainConfig, ("task", "targets", "classes"))
    add_field_flags(ap, TuneSettings, ("mode", "scheduler", "search", "seed", "experiment"))
    a("--scheduler", dest="lr_scheduler", nargs="?", action=_Refused, default=argparse.SUPPRESS,
      help=argparse.SUPPRESS,
      const="--scheduler is the learning-rate schedule of jobs/train.py; a search's early stopping is "
            "--trial-scheduler asha|fifo, its trials' learning-rate schedule "
            "--train-override scheduler=...")  # fmt: skip
    add_field_flags(ap, TrainConfig, ("tracking_uri",))
    add_field_flags(ap, TuneSettings, ("storage_path", "name", "resume"))
    add_field_flags(ap, TrainConfig, ("model_size",))
    a(
        "--fix",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pin a searched key (lr, weight_decay, batch_size or a model hyperparameter) (repeatable)",
    )
    a(
        "--choice",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="search KEY over these values instead of its default range (repeatable)",
    )
    a(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="TrainConfig field for every trial, e.g. optimizer=sgd, precision=fp32 (repeatable)",
    )
    add_field_flags(ap, TrainConfig, ("compile",))
    a("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a new local runtime)")
    a(
        "--register",
        default=None,
        metavar="NAME",
        help="register the best trial's model (logged to the search run) as NAME, alias 'champion'",
    )
    add_field_flags(ap, TuneSettings, ("verbose", "keep_checkpoints"))
    return ap


def settings_from_args(args: argparse.Namespace) -> TuneSettings:
    """TuneSettings from the parsed flags (no Ray). ValueError naming the bad value."""
    from ray import tune

    space: dict[str, Any] = parse_overrides(args.fix, "--fix")
    for k, v in parse_overrides(args.choice, "--choice").items():
        if isinstance(v, tuple):  # --choice depth=[2, 4]
            values = list(v)
        elif isinstance(v, str):  # --choice lr=1e-3,3e-3
            values = [parse_value(x) for x in v.split(",") if x.strip()]
        else:
            values = [v]
        if not values:
            raise ValueError(f"--choice {k}=: no values")
        if k in space:
            raise ValueError(f"{k!r} is given with both --fix and --choice")
        space[k] = tune.choice(values)
    rf = args.reduction_factor
    preset_overrides = parse_overrides(args.preset_override, "--preset-override")
    train_overrides = parse_overrides(args.train_override, "--train-override")
    online = {k: getattr(args, k) for k in ONLINE_FIELDS}
    if args.simulate is None and (args.sim_config or any(v is not None for v in online.values())):
        raise ValueError("--sim-config, --images-per-epoch, --val-size, --test-size need --simulate PRESET")
    if args.simulate is not None:
        from deeplense_ray.train.online import merge_sim_overrides

        preset_overrides = merge_sim_overrides(args.simulate, args.sim_config, preset_overrides)
    train_overrides.update({k: v for k, v in online.items() if v is not None})
    if args.compile:
        train_overrides["compile"] = True
    if args.task != "classification" or args.targets or args.classes:  # TrainConfig.task / targets / classes
        train_overrides["task"] = args.task
        for key in ("targets", "classes"):
            if getattr(args, key):
                train_overrides[key] = list(getattr(args, key))
    return TuneSettings(
        model=args.model,
        num_samples=args.num_samples,
        data_dir=args.data_dir,
        preset=args.simulate or args.preset,
        simulate=args.simulate is not None,
        num_per_class=args.num_per_class,
        preset_overrides=preset_overrides,
        max_epochs=args.max_epochs,
        grace_period=args.grace_period,
        reduction_factor=int(rf) if float(rf).is_integer() else rf,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_trial=args.cpus_per_trial,
        workers_per_trial=args.workers_per_trial,
        trial_runner=args.trial_runner,
        max_concurrent=args.max_concurrent,
        metric=args.metric,
        mode=args.mode,
        search=args.search,
        scheduler=args.scheduler,
        seed=args.seed,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        storage_path=args.storage_path,
        name=args.name,
        resume=args.resume,
        train_overrides=train_overrides,
        space=space,
        **({"model_size": args.model_size} if args.model_size is not None else {}),
        verbose=args.verbose,
        keep_checkpoints=args.keep_checkpoints,
    )


def check_room(settings: TuneSettings) -> None:
    """Before Ray: the dataset a search without --data simulates fits on disk and its build plan in memory;
    with --simulate, a trial's fixed val/test sets and training chunks fit in memory (at the largest batch
    size searched by default). ValueError naming the flag, the size needed and the room there is."""
    if settings.resume:
        return  # the search's dataset exists already
    if settings.simulate:
        import dataclasses

        from deeplense_ray.config import TrainConfig
        from deeplense_ray.train.online import check_online_memory, resolve_sim_preset
        from deeplense_ray.tune.spaces import batch_size_choices

        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        workers = settings.workers_per_trial
        trial = TrainConfig(
            **{k: v for k, v in settings.train_overrides.items() if k in fields},
            model=settings.model,
            data_dir=settings.data_dir,
            simulate=settings.preset,
            num_workers=workers,
            batch_size=max(batch_size_choices(workers)),
        )
        check_online_memory(trial, resolve_sim_preset(settings.preset, settings.preset_overrides).image_shape)
    elif settings.data_dir is None:
        from deeplense_ray.data.room import check_dataset_room
        from deeplense_ray.tune.dataset import dataset_config, dataset_dir_for

        out = dataset_dir_for(settings, os.path.abspath(settings.storage_path))
        check_dataset_room(dataset_config(settings), out)


def summary_lines(result, registered: str | None = None) -> list[str]:
    """What the search prints last: the trial table, the best trial, its test metrics, where everything is."""
    from deeplense_ray.tracking.console import human_bytes, where_lines

    lines = [
        "",
        f"search {result.name}: {len(result.trials)} trials, metric {result.metric} ({result.mode})",
        result.summary_table,
        f"best trial {result.best_trial_id}: {result.metric}={result.best_metric:.4f} "
        f"at epoch {result.best_epoch}",
    ]
    if result.test_metrics:
        keys = ("accuracy", "auc_macro", "auc_micro", "loss")
        shown = ", ".join(f"{k}={result.test_metrics[k]:.4f}" for k in keys if k in result.test_metrics)
        ci = result.test_metrics.get("auc_macro_ci")
        interval = f" (auc_macro 95% interval [{ci[0]:.4f}, {ci[1]:.4f}])" if ci else ""
        lines.append(f"test metrics of its best checkpoint: {shown}{interval}")
    lines += result.warnings
    lines += where_lines(
        "Results:",
        [
            ("dataset", result.data_dir),
            ("search", f"{result.output_dir} ({human_bytes(result.disk_bytes)} on disk)"),
            ("best config", os.path.join(result.output_dir, "best_config.yaml")),
            ("best checkpoint", result.best_checkpoint),
            ("MLflow store", result.tracking_uri),
            ("parent run", f"{result.parent_run_id} (experiment {result.experiment_id})"),
            ("best model", result.model_uri),
            ("registered", registered),
        ],
        tracking_uri=result.tracking_uri,
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    """The job; a failure the user causes (a bad file, an MLflow store that refuses) exits 2 with one line."""
    from deeplense_ray.cli import run_main

    return run_main(_main, argv)


def data_note(settings: TuneSettings) -> str | None:
    """One line saying which data a search given no --data simulates, and how to choose a physical preset."""
    if settings.data_dir is not None or settings.simulate:
        return None
    if settings.preset == DEFAULT_PRESET:
        return (f"tune: no --data: simulating {DEFAULT_PRESET}, the demo's data (the published DeepLense "
                "Model II recipe: substructure visible); --preset model_ii for a physical, realistic set")
    return f"tune: no --data: simulating a {settings.preset} dataset"


def _main(argv: list[str] | None = None) -> int:
    from deeplense_ray.tracking.mlflow_utils import check_tracking_reachable

    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args).validate()
        check_room(settings)
        if args.register is not None:
            from deeplense_ray.tracking.models import check_registered_name

            check_registered_name(args.register)
        check_tracking_reachable(settings.tracking_uri)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from deeplense_ray.runtime import RayConnectError
    from deeplense_ray.tune import SearchSetupError, run_search

    note = data_note(settings)
    if note:
        print(note, flush=True)
    try:
        result = run_search(settings, address=args.address)
    except (SearchSetupError, RayConnectError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    registered = None
    if args.register is not None and result.model_uri:
        from deeplense_ray.tracking.models import register_model

        version = register_model(result.model_uri, args.register, result.tracking_uri, alias="champion")
        registered = f"models:/{args.register.strip()}@champion (version {version})"
    print("\n".join(summary_lines(result, registered)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
