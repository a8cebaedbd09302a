"""Calibration of the population inference of Sigma_sub (deeplense_ray/infer/population.py), on CPU.

Per-lens posteriors exactly as a calibrated estimator gives them: theta_i ~ N(mu*, sigma*) truncated to the
training prior U(0, 0.02) kpc^-2, sigma* = 0.55 mu* (the paltas population N(2e-3, 1.1e-3)), per-lens
posterior std s_i ~ U(0.5e-3, 2e-3), d_i = theta_i + s_i eps, posterior N(d_i, s_i^2) truncated to the
prior. For N = 10, 100, 1000 lenses and mu* = 0.5x, 1x, 2x, 4x the model_ii prior mean (2e-3), over seeded
replicates: coverage of mu* by the equal-tailed 68 / 95 % intervals, bias z = mean (mu_hat - mu*) / std_hat,
the mean posterior std of mu (its shrinkage with N), the coverage of sigma* by the 95 % upper limit and of the
population mean E[theta] by its intervals. ``--overconfidence 2`` divides every per-lens std by 2.
Replicates run in a process pool (``--workers``). Prints a table, writes a JSON.

    python benchmarks/population_calibration.py --out benchmarks/results/population_calibration_cpu.json
    python benchmarks/population_calibration.py --replicates 200 200 50 --quick   # fewer, for a look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplense_ray.infer.population_calibration import calibration_run  # noqa: E402
from deeplense_ray.io import atomic_write_text, json_ready  # noqa: E402

PRIOR = (0.0, 0.02)
NOISE = (0.5e-3, 2e-3)
SPREAD = 0.55
PRIOR_MEAN = 2e-3  # model_ii: Sigma_sub ~ U(0, 4e-3) kpc^-2
SCALES = (0.5, 1.0, 2.0, 4.0)


def _one(job: tuple[int, float, int, int, float]) -> dict:
    n, mu, reps, seed, overconfidence = job
    run = calibration_run(n, mu, SPREAD * mu, PRIOR, NOISE, reps, seed=seed, overconfidence=overconfidence)
    return {**run.summary(), "scale": mu / PRIOR_MEAN}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument(
        "--replicates", type=int, nargs="+", default=[400, 200, 40], help="replicates per N (one per --ns)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overconfidence", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--chunks", type=int, default=4, help="pool jobs per (N, mu*), each its own seed")
    p.add_argument("--out", default="benchmarks/results/population_calibration_cpu.json")
    args = p.parse_args(argv)
    if len(args.replicates) != len(args.ns):
        p.error(f"--replicates needs one count per --ns ({len(args.ns)})")
    started = time.perf_counter()
    jobs = []
    for n, reps in zip(args.ns, args.replicates):
        for k, scale in enumerate(SCALES):
            per = [reps // args.chunks + (c < reps % args.chunks) for c in range(args.chunks)]
            for c, r in enumerate(per):
                if r:
                    seed = args.seed * 1_000_000 + n * 1000 + k * 10 + c
                    jobs.append((n, scale * PRIOR_MEAN, r, seed, args.overconfidence))
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        parts = list(pool.map(_one, jobs))
    rows = []
    for n in args.ns:
        for scale in SCALES:
            group = [r for r in parts if r["n"] == n and abs(r["scale"] - scale) < 1e-9]
            reps = sum(r["replicates"] for r in group)

            def avg(key, sub=None, group=group, reps=reps):
                vals = [(r[key] if sub is None else r[key][sub]) * r["replicates"] for r in group]
                return sum(vals) / reps

            pm = [r["population_mean"] for r in group]
            rows.append(
                {
                    "n": n,
                    "scale": scale,
                    "mu_true": group[0]["mu_true"],
                    "sigma_true": group[0]["sigma_true"],
                    "replicates": reps,
                    "coverage_68": avg("coverage", "0.68"),
                    "coverage_95": avg("coverage", "0.95"),
                    "bias_z": avg("bias_z"),
                    "bias_rel": avg("bias_rel"),
                    "mu_std_mean": avg("mu_std_mean"),
                    "sigma_coverage95": avg("sigma_coverage95"),
                    "pop_mean_coverage_68": sum(
                        x["coverage"]["0.68"] * r["replicates"] for x, r in zip(pm, group)
                    )
                    / reps,
                    "pop_mean_coverage_95": sum(
                        x["coverage"]["0.95"] * r["replicates"] for x, r in zip(pm, group)
                    )
                    / reps,
                    "pop_mean_bias_z": sum(x["bias_z"] * r["replicates"] for x, r in zip(pm, group)) / reps,
                    "seconds": sum(r["seconds"] for r in group),
                }
            )
    for row in rows:
        row["mu_within_5_points"] = bool(
            abs(row["coverage_68"] - 0.68) <= 0.05 and abs(row["coverage_95"] - 0.95) <= 0.05
        )
    wall = time.perf_counter() - started
    header = (
        f"{'N':>5} {'mu*':>7} {'reps':>5} {'cov68':>6} {'cov95':>6} {'bias_z':>7} {'std(mu)':>9} "
        f"{'sig<95':>6} {'m68':>5} {'m95':>5} {'m_z':>6}"
    )
    print(f"overconfidence {args.overconfidence:g}; m68/m95/m_z: the population mean E[theta]")
    print(header)
    for r in rows:
        print(
            f"{r['n']:>5} {r['mu_true']:>7.1e} {r['replicates']:>5} {r['coverage_68']:>6.3f} "
            f"{r['coverage_95']:>6.3f} {r['bias_z']:>+7.3f} {r['mu_std_mean']:>9.2e} "
            f"{r['sigma_coverage95']:>6.3f} {r['pop_mean_coverage_68']:>5.2f} "
            f"{r['pop_mean_coverage_95']:>5.2f} {r['pop_mean_bias_z']:>+6.2f}"
        )
    shrink = {}
    for scale in SCALES:
        std = {r["n"]: r["mu_std_mean"] for r in rows if r["scale"] == scale}
        shrink[str(scale)] = {
            f"std_{a}_over_std_{b}": std[a] / std[b]
            for a, b in zip(args.ns, args.ns[1:])
            if a in std and b in std
        }
    print("std(mu) ratios between consecutive N (sqrt(10) = 3.16 for 1/sqrt(N)):", json.dumps(shrink))
    doc = {
        "benchmark": "population_calibration",
        "setup": {
            "training_prior": list(PRIOR),
            "per_lens_std": list(NOISE),
            "sigma_over_mu": SPREAD,
            "mu_scales_of_prior_mean": list(SCALES),
            "prior_mean": PRIOR_MEAN,
            "hyperprior": "mu flat on the prior support, sigma flat on [0, 0.02]",
            "intervals": "equal-tailed",
            "overconfidence": args.overconfidence,
            "seed": args.seed,
        },
        "rows": rows,
        "std_ratios": shrink,
        "wall_s": wall,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "workers": args.workers},
    }
    atomic_write_text(args.out, json.dumps(json_ready(doc), indent=1) + "\n", fsync=False)
    print(f"wrote {args.out} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
