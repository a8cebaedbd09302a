#!/usr/bin/env python
"""Population inference of one target (e.g. Sigma_sub) from per-lens posteriors, training prior divided out.

    python jobs/population.py --posteriors post.npz --target sigma_sub
    python jobs/population.py --posteriors a.npz b.npz --target sigma_sub --select 100 --out pop.json \
        --tracking-uri sqlite:///runs/mlflow.db

Reads the per-lens Gaussian posteriors that parameter inference writes (deeplense_ray/infer/posteriors.py),
infers the population theta ~ Normal(mu, sigma) truncated to the training prior's support (flat hyperprior
in mu over the support and in sigma over [0, --sigma-max]), prints a short table, writes a JSON (atomically)
and a PNG of the posterior beside it, and logs both to MLflow (experiment "population") when mlflow imports. A
missing file, an unknown target, an empty input or a range outside the prior's support is refused before any
work, with status 2 and a message naming it. See docs/population.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplense_ray.cli import count_arg  # noqa: E402

DEFAULT_EXPERIMENT = "population"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--posteriors", nargs="+", required=True, help="posterior files (.npz), one or more")
    p.add_argument("--target", required=True, help="target name in the files, e.g. sigma_sub")
    p.add_argument(
        "--select", type=count_arg, default=None, help="use N lenses drawn at random (seeded by --seed)"
    )
    p.add_argument(
        "--out", default=None, help="result JSON (default: population_<target>.json); the plot is <out>.png"
    )
    p.add_argument(
        "--mu-range",
        nargs=2,
        type=float,
        default=None,
        metavar=("LOW", "HIGH"),
        help="flat hyperprior range of mu (default: the training prior's support; must lie inside it)",
    )
    p.add_argument(
        "--sigma-max",
        type=float,
        default=None,
        help="upper end of the flat sigma hyperprior (default: prior width)",
    )
    p.add_argument(
        "--method",
        choices=("analytic", "importance"),
        default="analytic",
        help="analytic (default) or paltas' importance sampling (needs --sigma-min > 0)",
    )
    p.add_argument(
        "--sigma-min", type=float, default=0.0, help="lower end of the sigma hyperprior (default 0)"
    )
    p.add_argument("--samples", type=count_arg, default=2000, help="posterior samples per lens (importance)")
    p.add_argument("--seed", type=int, default=0, help="seed of --select and of the importance samples")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<abs cwd>/mlflow.db)",
    )
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment of the run")
    p.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p


def main(argv: list[str] | None = None) -> int:
    """The job; a failure the user causes (a bad file or value, an MLflow store that refuses) exits 2."""
    from deeplense_ray.cli import run_main

    return run_main(_main, argv)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from deeplense_ray.infer.population import (
        PRIOR_LIKE_RATIO,
        UNINFORMED_RATIO,
        infer_population,
        load_target,
        prior_width_ratio,
        select_lenses,
    )
    from deeplense_ray.infer.population_report import log_population_run, plot_population
    from deeplense_ray.io import atomic_write_text, json_ready

    out = Path(args.out) if args.out else Path(f"population_{args.target}.json")
    if out.suffix != ".json":
        raise ValueError(f"--out {str(out)!r}: the result file ends in .json")
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {str(out)!r} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise ValueError(f"--out {str(out)!r}: directory {str(out.parent)!r} does not exist")
    tracking_uri = None
    if not args.no_mlflow:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            print("mlflow does not import: no MLflow run is logged", file=sys.stderr)
        else:
            from deeplense_ray.tracking.mlflow_utils import check_tracking_reachable

            tracking_uri = check_tracking_reachable(args.tracking_uri)
    data = select_lenses(load_target(args.posteriors, args.target), args.select, seed=args.seed)
    result = infer_population(
        data,
        mu_range=args.mu_range,
        sigma_max=args.sigma_max,
        sigma_min=args.sigma_min,
        method=args.method,
        n_samples=args.samples,
        seed=args.seed,
    )
    ratio = prior_width_ratio(data)
    prior_like = ratio > PRIOR_LIKE_RATIO
    informed = result.hyperprior_ratio() <= UNINFORMED_RATIO
    # under a normal training prior a lens exactly at the prior has a flat ratio: sigma is not forced small
    scatter_untrusted = prior_like and data.prior_normal is None
    png = out.with_suffix(".png")
    plot_population(result, png, title=f"{args.target}: population of {result.n} lenses")
    doc = {
        **result.summary(),
        "posteriors": [str(p) for p in args.posteriors],
        "selected": args.select,
        "seed": args.seed,
        "model_uris": list(data.model_uris),
        "plot": str(png),
        "posterior_std_over_prior_std": ratio,
        "prior_like": prior_like,
        "scatter_trustworthy": not scatter_untrusted,
        "mu_std_over_hyperprior_std": result.hyperprior_ratio(),
        "informed": informed,
    }
    atomic_write_text(out, json.dumps(json_ready(doc), indent=1, allow_nan=False) + "\n", fsync=False)
    run_id = None
    if tracking_uri is not None:
        params = {
            "target": args.target,
            "posteriors": ",".join(str(p) for p in args.posteriors),
            "n": result.n,
            "select": args.select,
            "seed": args.seed,
            "method": result.method,
            "training_prior": data.prior_label(),
            "mu_range": list(result.mu_range),
            "sigma_range": list(result.sigma_range),
            "model_uris": ",".join(data.model_uris),
            "prior_like": prior_like,
        }
        run_id = log_population_run(
            result, tracking_uri, args.experiment, params=params, artifacts=[out, png]
        )
    lo68, hi68 = result.mu_intervals[0.68]
    lo95, hi95 = result.mu_intervals[0.95]
    rows = [
        ("target", args.target),
        ("lenses", str(result.n)),
        ("training prior", data.prior_label()),
        ("informative lenses", str(result.data["informative_lenses"])),
        ("mu", f"{_fmt(result.mu_mean)} +- {_fmt(result.mu_std)}"),
        ("mu 68% (equal-tailed)", f"[{_fmt(lo68)}, {_fmt(hi68)}]"),
        ("mu 95% (equal-tailed)", f"[{_fmt(lo95)}, {_fmt(hi95)}]"),
        ("sigma median", _fmt(result.sigma_median)),
        ("sigma 95% upper limit", _fmt(result.sigma_upper95)),
        ("population mean", f"{_fmt(result.pop_mean_mean)} +- {_fmt(result.pop_mean_std)}"),
        ("posterior std / prior std", f"{ratio:.2f} (median over lenses)"),
        ("mu std / hyperprior std", f"{result.hyperprior_ratio():.2f}"),
    ]
    if result.truth is not None:
        rows.append(("true values", f"mean {_fmt(result.truth['mean'])}, std {_fmt(result.truth['std'])}"))
    rows += [("json", str(out)), ("plot", str(png)), ("mlflow run", run_id or "-")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if scatter_untrusted:
        print(
            "warning: the per-lens posteriors are about as wide as the training prior (median std / "
            f"prior std {ratio:.2f} > {PRIOR_LIKE_RATIO}): they say little about each lens, and a Gaussian "
            "that mimics the uniform prior reads as a measurement at its mean, so sigma (the scatter) is "
            "not trustworthy; quote the population mean, or train under a normal prior (sigma_sub_normal; "
            "docs/population.md)",
            file=sys.stderr,
        )
    if not informed:
        print(
            f"warning: the posterior of mu is about as wide as its hyperprior (std ratio "
            f"{result.hyperprior_ratio():.2f} > {UNINFORMED_RATIO}): these lenses do not constrain the "
            "population; its numbers are the hyperprior's, not a measurement",
            file=sys.stderr,
        )
    elif prior_like:
        print(
            "warning: the per-lens posteriors are about as wide as the training prior (median std / prior "
            f"std {ratio:.2f} > {PRIOR_LIKE_RATIO}): {result.n - result.data['informative_lenses']} of "
            f"{result.n} lenses say almost nothing, and what the population result rests on is the "
            "network's residual miscalibration at the prior (its outputs' scatter about it), not the "
            "lenses: not a measurement (docs/population.md)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
