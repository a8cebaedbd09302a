#!/usr/bin/env python
"""Train a classifier on a simulated lens dataset on Ray, tracked in MLflow (thin CLI).

    python jobs/train.py --model ViT --data data/model_ii --epochs 20 --num-workers 2 --gpus-per-worker 1
    python jobs/train.py --model ViT --simulate model_ii --images-per-epoch 65536 --gpus-per-worker 1

Several workers train with Ray Train (DDP); one worker trains in one Ray task holding its CPUs and GPU
(--runner auto, the default; --runner trainer for a one-worker Ray Train run).

With --simulate PRESET every rank renders fresh training images on its own device each epoch (no dataset);
validation and test are fixed sets rendered from their own seeds, or the val/test splits of --data if given.
With neither flag it renders the demo's data (deeplense_model_ii) online, sized as the demo sizes its dataset.

Everything is validated before Ray starts: a missing data directory or manifest, an unknown model or one that
cannot take the dataset's images or classes exits with status 2 and a message naming the value.
Prints a JSON summary (MLflow run id, best epoch, test metrics, model URI) on success.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplense_ray.config import (  # noqa: E402
    DEFAULT_DATA_PER_CLASS,
    DEFAULT_DATA_PRESET,
    TrainConfig,
    add_field_flags,
    parse_overrides,
    unset_flag_fields,
)

#: Flags of this job that are not TrainConfig fields (every other flag's dest is the field it sets).
JOB_ONLY = ("sim_config", "address", "register", "verbose", "runner")
RUNNER_WHAT = {
    "task": "one worker trained and tested in one Ray task; --runner trainer for a Ray Train run",
    "trainer": "a Ray Train TorchTrainer: a Train controller and a worker group",
}
#: The TrainConfig fields of each help section (the rest: the main options); every field is a flag whose
#: name, type, default and help come from the field (deeplense_ray.config.add_field_flags).
SIM_FIELDS = ("simulate", "sim_overrides", "images_per_epoch", "val_size", "test_size", "sim_chunk_batches",
              "sim_prefetch")  # fmt: skip
TASK_FIELDS = ("task", "targets", "classes")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    sections = SIM_FIELDS + TASK_FIELDS
    main_fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in sections]
    add_field_flags(p, TrainConfig, main_fields[:2])  # --model, --data first
    sim = p.add_argument_group("online simulation (train on fresh images every step)")
    add_field_flags(sim, TrainConfig, SIM_FIELDS[:1])
    sim.add_argument("--sim-config", default=None, metavar="FILE.yaml", help="preset fields to override")
    add_field_flags(sim, TrainConfig, SIM_FIELDS[1:])
    add_field_flags(p, TrainConfig, main_fields[2:])
    task = p.add_argument_group("task (docs/parameter_inference.md)")
    add_field_flags(task, TrainConfig, TASK_FIELDS)
    p.add_argument(
        "--runner",
        choices=("auto", "trainer", "task"),
        default="auto",
        help="'trainer': Ray Train (a Train controller and a worker group; any --num-workers); 'task': one "
        "worker trained and tested in one Ray task, without the Train processes (faster start; "
        "--max-failures retries the task from the latest checkpoint); 'auto' (default): 'task' for one "
        "worker (not --ingest split), else 'trainer'; with --resume the runner the run started with",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray address; 'local' starts a fresh local runtime (default: $RAY_ADDRESS, else the cluster "
        "`ray start` recorded on this machine if it answers, else a local runtime with enough logical CPUs)",
    )
    p.add_argument(
        "--register",
        default=None,
        metavar="NAME",
        help="register the logged model in the MLflow Model Registry as a new version of NAME",
    )
    p.add_argument(
        "--verbose", action="store_true", help="Ray's own output too (worker logs, Ray Data progress bars)"
    )
    return p


def connect_for(cfg: TrainConfig, address: str | None, *, verbose: bool = False) -> str:
    """Join/start Ray for ``cfg`` (deeplense_ray.runtime.connect) and check that its workers fit; returns
    what happened. A local runtime gets enough logical CPUs for the workers plus the Ray Data readers; a
    joined cluster without them is a ValueError saying what to change (else training would wait forever),
    unless the request holds GPUs the cluster does not have yet (an autoscaling cluster will add nodes).
    RayConnectError when the cluster to join does not answer."""
    import ray

    from deeplense_ray.runtime import check_cpu_room, connect, local_cpus
    from deeplense_ray.tracking.console import quiet_ray

    need = cfg.num_workers * float(cfg.cpus_per_worker)
    how = connect(address, num_cpus=local_cpus(need), **quiet_ray(verbose))
    cluster = ray.cluster_resources()
    if cfg.num_workers * float(cfg.gpus_per_worker) > float(cluster.get("GPU", 0.0)) + 1e-9:
        return how  # GPUs the cluster does not have yet: an autoscaling cluster adds nodes (with CPUs)
    check_cpu_room(
        cluster,
        need,
        what="training",
        detail=f"--num-workers {cfg.num_workers} x --cpus-per-worker {cfg.cpus_per_worker:g}",
        fix="lower --num-workers or --cpus-per-worker (fractions are allowed), or use --address local",
    )
    return how


#: The online set sizes of the default data, per class: train, val, test (the demo's 80/10/10 split).
_SPLIT = {"images_per_epoch": 0.8, "val_size": 0.1, "test_size": 0.1}


def apply_default_data(args: argparse.Namespace) -> str | None:
    """Given neither --data nor --simulate: render :data:`DEFAULT_DATA_PRESET` online, sized as the demo sizes
    its dataset (per class: :data:`DEFAULT_DATA_PER_CLASS`, GPU when --gpus-per-worker > 0; split 80/10/10),
    for the sizes the user did not give; returns the line that says so (None when data was given). Sizes
    still unset take TrainConfig's defaults (:func:`config_from_args`)."""
    note = None
    if args.data_dir is None and args.simulate is None and not (args.sim_config or args.sim_overrides):
        args.simulate = DEFAULT_DATA_PRESET
        per_class = DEFAULT_DATA_PER_CLASS["gpu" if args.gpus_per_worker > 0 else "cpu"]
        for name, share in _SPLIT.items():
            if getattr(args, name) is None:
                setattr(args, name, int(3 * per_class * share))
        note = (
            f"train: no --data: rendering {DEFAULT_DATA_PRESET} online, the demo's data (the published "
            f"DeepLense Model II recipe: substructure visible), {per_class} images per class; "
            "--simulate model_ii for a physical, realistic preset, --data DIR for a dataset"
        )
    return note


#: training images per epoch above which online rendering on a CPU gets a note (a physical preset renders a
#: few images per second per core there, so an epoch of the default size takes the better part of an hour)
CPU_ONLINE_IMAGES = 2048


def cpu_online_note(cfg: TrainConfig) -> str | None:
    """The line that says an online set is large for a CPU (``--simulate`` with ``--gpus-per-worker 0`` and
    more than :data:`CPU_ONLINE_IMAGES` training images per epoch), with the flags of a small first run."""
    if cfg.simulate is None or float(cfg.gpus_per_worker) > 0 or cfg.images_per_epoch <= CPU_ONLINE_IMAGES:
        return None
    return (
        f"train: rendering {cfg.images_per_epoch} {cfg.simulate} images per epoch online on the CPU "
        "(--gpus-per-worker 0): physical presets take 0.1-0.5 s per image on one core, so an epoch may "
        "take many minutes; --images-per-epoch 512 --val-size 128 --test-size 128 for a first run"
    )


def sim_overrides_from_args(args: argparse.Namespace) -> dict:
    """--sim-config (a YAML of preset fields; its 'preset: NAME' must agree with --simulate) plus
    --preset-override; ValueError naming the file or value. Empty without --simulate (an error if given)."""
    if args.simulate is None:
        if args.sim_config or args.sim_overrides:
            raise ValueError("--sim-config / --preset-override need --simulate PRESET")
        if args.data_dir is None:
            raise ValueError("give --data DIR (a dataset) or --simulate PRESET (online simulation)")
        return {}
    from deeplense_ray.train.online import merge_sim_overrides

    cli = parse_overrides(args.sim_overrides, "--preset-override")
    return merge_sim_overrides(args.simulate, args.sim_config, cli)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the parsed flags: every flag's dest is the field it sets (except :data:`JOB_ONLY`),
    so no field list is copied here; the KEY=VALUE lists are parsed into their mappings."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unset = unset_flag_fields(TrainConfig)  # None: not given, the field's default applies
    values = {k: v for k, v in vars(args).items() if k in fields and not (k in unset and v is None)}
    values["model_overrides"] = parse_overrides(args.model_overrides, "--model-override")
    values["sim_overrides"] = sim_overrides_from_args(args)
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    """The job; a failure the user causes (a bad file, an MLflow store that refuses) exits 2 with one line."""
    from deeplense_ray.cli import run_main

    return run_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    from deeplense_ray.tracking.mlflow_utils import check_tracking_reachable
    from deeplense_ray.train.prepare import check_resume
    from deeplense_ray.train.runners import check_runner, resolve_runner
    from deeplense_ray.train.timeline import Timeline

    timeline = Timeline()  # the job's phases, printed at the end and logged as timeline.json
    args = build_parser().parse_args(argv)
    note = apply_default_data(args)
    if note is not None:
        print(note, flush=True)
    try:
        cfg = config_from_args(args).resolved()
        info = cfg.validate()  # before Ray starts
        cpu_note = cpu_online_note(cfg)
        if cpu_note is not None:
            print(cpu_note, flush=True)
        if cfg.simulate is not None:
            from deeplense_ray.train.online import check_online_memory

            check_online_memory(cfg, info.image_shape)
        runner = resolve_runner(args.runner, cfg)
        check_runner(runner, cfg)
        check_resume(cfg)
        if args.register is not None:
            from deeplense_ray.tracking.models import check_registered_name

            check_registered_name(args.register)
        check_tracking_reachable(cfg.tracking_uri)
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from deeplense_ray.runtime import RayConnectError

    try:
        print(f"train: {connect_for(cfg, args.address, verbose=args.verbose)}", flush=True)
        print(f"train: runner {runner} ({RUNNER_WHAT[runner]})", flush=True)
        timeline.mark("ray connected")
    except (RayConnectError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from deeplense_ray.train import run_training

    result = run_training(cfg, progress=True, timeline=timeline, runner=runner)
    summary = {
        "mlflow_run_id": result.run_id,
        "tracking_uri": result.tracking_uri,
        "run_name": result.run_name,
        "runner": runner,
        "run_dir": result.run_dir,
        "best_epoch": result.best_epoch,
        "best_val_auc_macro": result.best_val.get("val_auc_macro"),
        "test": {k: result.test_metrics.get(k) for k in CLASS_SUMMARY_KEYS},
        "model_uri": result.model_uri,
        "timeline": {k: result.timeline.get(k) for k in ("wall_s", "train_s", "val_s", "overhead_s")},
    }
    if cfg.inference:  # per-target posterior metrics instead of class metrics
        keys = ("nll", "rmse", "bias", "rmse_over_prior", "coverage_68", "coverage_95", "calibrated")
        summary.pop("best_val_auc_macro")
        summary["best_val_nll"] = result.best_val.get("val_nll")
        summary["test"] = {k: result.test_metrics[k] for k in keys}
    if args.register is not None:
        from deeplense_ray.tracking.models import register_model

        version = register_model(result.model_uri, args.register, result.tracking_uri)
        summary["registered_model"] = f"models:/{args.register.strip()}/{version}"
    print(json.dumps(summary, indent=2, default=str))
    print("\n".join(done_lines(result, cfg, summary.get("registered_model"))), flush=True)
    print(result.timeline_line, flush=True)
    return 0


#: Test metrics of a classification run in the job's JSON summary.
CLASS_SUMMARY_KEYS = ("accuracy", "auc_macro", "auc_micro", "loss", "auc")


def done_lines(result, cfg: TrainConfig, registered: str | None = None) -> list[str]:
    """The last lines of a training run: a chance warning if any, then where its results are."""
    from deeplense_ray.tracking.console import chance_warning, mlflow_run_url, where_lines

    test = result.test_metrics
    warning = chance_warning("test AUC (macro)", test.get("auc_macro"), test.get("auc_macro_ci"))
    ci = test.get("auc_macro_ci")
    interval = f" (95% interval [{ci[0]:.4f}, {ci[1]:.4f}])" if ci and None not in ci else ""
    nan = float("nan")
    headline = (
        f"best epoch {result.best_epoch}: val_auc_macro {result.best_val.get('val_auc_macro', nan):.4f}; "
        f"test accuracy {test.get('accuracy', nan):.4f}, auc_macro {test.get('auc_macro', nan):.4f}"
        f"{interval}"
    )
    if cfg.inference:
        per_target = "; ".join(
            f"{t}: rmse {test['rmse'][t]:.4g} ({test['rmse_over_prior'][t]:.3f} x prior std), bias "
            f"{test['bias'][t]:+.3g}, coverage 68% {test['coverage_68'][t]:.3f} / 95% "
            f"{test['coverage_95'][t]:.3f}"
            for t in cfg.targets
        )
        calibrated = "calibrated" if test.get("calibrated") else "NOT calibrated (coverage off by > 5 points)"
        headline = (
            f"best epoch {result.best_epoch}: val_nll {result.best_val.get('val_nll', nan):.4f}; test nll "
            f"{test.get('nll', nan):.4f}, {per_target}; {calibrated}"
        )
    return [
        "",
        headline,
        *([warning] if warning else []),
        *where_lines(
            "Results:",
            [
                ("dataset", cfg.data_dir),
                ("run directory", result.run_dir),
                ("best checkpoint", result.best_checkpoint),
                ("MLflow store", result.tracking_uri),
                ("MLflow run", f"{result.run_id} (experiment {result.experiment_id})"),
                ("run page", mlflow_run_url(result.experiment_id, result.run_id)),
                ("model", result.model_uri),
                ("registered", registered),
            ],
            tracking_uri=result.tracking_uri,
        ),
    ]


if __name__ == "__main__":
    sys.exit(main())
