#!/usr/bin/env python
"""How much a substructure class changes an image against its paired no_sub partner, in noise sigmas.

For paired groups (same macro lens, source and observation; ``paired=True``) of a preset, per class c and
group: the noise-free images a_c and a_no_sub, the image units of the noisy images (the least-squares factor k
between a noisy image and its noise-free version, same seed) and the noise sigma per image (the standard
deviation of noisy - k * noise-free). Reported per (mass compensation, Sigma_sub scale, class): the median and
90 % quantile over groups of chi^2 = sum_pixels (k (a_c - a_no_sub) / sigma)^2 and the median of the largest
pixel change max |k (a_c - a_no_sub)| / sigma. A paired chi^2 far above the number of pixels is a change an
ideal observer who knows the macro lens and source sees; a network that sees only one image must separate
it from the variation of sources and macro lenses.

    python benchmarks/paired_signal.py --out benchmarks/results/paired_signal_cpu.json     # CPU, minutes
    python benchmarks/paired_signal.py --groups 64 --scales 1 8 --compensations none monopole --out x.json

Prints a table and writes JSON (atomically).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplense_ray.io import atomic_write_text  # noqa: E402
from deeplense_ray.sim import resolve_preset, simulate  # noqa: E402
from deeplense_ray.sim.presets import MASS_COMPENSATIONS  # noqa: E402


def measure(preset: str, classes: list[str], comp: str, scale: float, groups: int, seed: int) -> dict:
    base = resolve_preset(preset)
    over = {
        "class_names": ["no_sub", *classes], "mass_compensation": comp, "paired": True,
        "sigma_sub": [base.sigma_sub[0] * scale, base.sigma_sub[1] * scale],
    }  # fmt: skip
    c = len(over["class_names"])
    clean = simulate(resolve_preset(preset, {**over, "noise": "none"}), c * groups, seed).images
    noisy = simulate(resolve_preset(preset, over), c * groups, seed).images
    a = clean.double().reshape(groups, c, -1)
    b = noisy.double().reshape(groups, c, -1)
    k = (a * b).sum(-1) / (a * a).sum(-1).clamp_min(1e-300)  # image units of the noisy images
    sigma = (b - k[..., None] * a).std(-1)
    out = {}
    for j, name in enumerate(classes, start=1):
        d = k[:, 0, None] * (a[:, j] - a[:, 0]) / sigma[:, 0, None]
        chi2 = (d * d).sum(1)
        out[name] = {
            "chi2_median": float(chi2.median()),
            "chi2_q90": float(chi2.quantile(0.9)),
            "max_pixel_sigma_median": float(d.abs().max(1).values.median()),
            "pixels": int(d.shape[1]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="model_ii")
    p.add_argument("--classes", default="cdm,axion", help="substructure classes compared with no_sub")
    p.add_argument(
        "--compensations", nargs="+", default=["none", "monopole"], choices=list(MASS_COMPENSATIONS)
    )
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 8.0], help="Sigma_sub prior scales")
    p.add_argument("--groups", type=int, default=16, help="paired groups per point")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.groups < 2 or any(s <= 0 for s in args.scales):
        raise SystemExit(f"--groups must be >= 2 and --scales positive, got {args.groups} / {args.scales}")
    classes = [x for x in args.classes.split(",") if x]
    t0 = time.time()
    rows = []
    head = f"{'compensation':<13}{'scale':>6}  {'class':<8}{'chi2 median':>13}{'chi2 q90':>12}"
    print(f"{head}{'max |d|/sigma':>15}")
    for comp in args.compensations:
        for scale in args.scales:
            res = measure(args.preset, classes, comp, scale, args.groups, args.seed)
            for name, r in res.items():
                rows.append({"compensation": comp, "scale": scale, "class": name, **r})
                print(f"{comp:<13}{scale:>6g}  {name:<8}{r['chi2_median']:>13.1f}{r['chi2_q90']:>12.1f}"
                      f"{r['max_pixel_sigma_median']:>15.2f}", flush=True)  # fmt: skip
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "host": platform.node(),
            "time": time.strftime("%Y-%m-%d %H:%M"),
        },  # fmt: skip
        "rows": rows,
        "wall_s": time.time() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2), fsync=False)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
