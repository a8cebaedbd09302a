#!/usr/bin/env python
"""Cost and accuracy of the monopole compensation table (``compensation.subhalo_mean_radial``).

Under ``mass_compensation: monopole`` (the physical presets' default) every cdm image's subhalo monopole is
tabulated at R radii about the lens centre during the parameter draws (``draw_parameters`` ->
``lens_mass_model``). Timed here, on one device (CPU by default), for ``--n`` images of ``--preset``:

- ``draw_parameters`` with ``ring_slope`` (5 radii per image: the cheap reference point), and with
  ``monopole`` by the graded Gauss-Legendre half-circle rule (``method="gauss"``, the default) and by the
  former equally spaced ring (``method="ring"``, ``RING_ANGLES`` angles), the same seed and labels;
  the subhalo-table share of each draw (time inside ``subhalo_mean_radial``); wall and process CPU time (the
  minimum over ``--repeats``; the load average is recorded: other jobs inflate wall times).

With ``--accuracy`` (needs lenstronomy): the mean radial deflection of single tNFW subhalos on circles
(on / just off the circle, inside, far outside, tiny and large truncation, and random draws over the
preset's ranges) against lenstronomy's ``TNFW`` integrated over the circle by adaptive quadrature
(scipy ``quad``, break points at the subhalo's angular scales, rtol 1e-12), for both methods and the ring
at 4096 angles; errors in units of the subhalo's total m_tot / r (its mean radial deflection far outside).
And the rendered images (noise free, ``--image-n`` images, monopole, CPU) with the table by either method
against a float64, 24-node table: max |difference| / max pixel.

    python benchmarks/compensation_table.py --accuracy --out benchmarks/results/compensation_table_cpu.json
    python benchmarks/compensation_table.py --n 512 --repeats 1 --out /tmp/x.json        # quick

Prints a table and writes JSON (atomically).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplense_ray.io import atomic_write_text  # noqa: E402
from deeplense_ray.sim import compensation, resolve_preset, simulate  # noqa: E402
from deeplense_ray.sim.compensation import EFF_NODES  # noqa: E402
from deeplense_ray.sim.sampling import draw_parameters  # noqa: E402
from deeplense_ray.sim.simulate import resolve_labels  # noqa: E402

_ORIGINAL = compensation.subhalo_mean_radial


@contextmanager
def table_method(timer: list[float] | None = None, **kwargs):
    """Run ``lens_mass_model``'s subhalo tables with ``subhalo_mean_radial(..., **kwargs)``; add the time
    spent inside them to ``timer[0]`` (wall) and ``timer[1]`` (process CPU)."""

    def wrapped(*a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return _ORIGINAL(*a, **{**k, **kwargs})
        finally:
            if timer is not None:
                timer[0] += time.perf_counter() - t0
                timer[1] += time.process_time() - c0

    compensation.subhalo_mean_radial = functools.wraps(_ORIGINAL)(wrapped)
    try:
        yield
    finally:
        compensation.subhalo_mean_radial = _ORIGINAL


#: (compensation, table method) rows of the timing table: before (ring) and after (gauss)
CONFIGS = (("ring_slope", "ring"), ("ring_slope", "gauss"), ("monopole", "ring"), ("monopole", "gauss"))


def time_draw(preset: str, comp: str, method: str, n: int, seed: int) -> tuple[dict, dict]:
    """One timed ``draw_parameters`` (wall and process CPU time, and the share inside the subhalo tables)."""
    pre = resolve_preset(preset, {"mass_compensation": comp})
    lab = resolve_labels(pre, n, None, None)
    timer = [0.0, 0.0]
    with table_method(timer, method=method):
        t0, c0 = time.perf_counter(), time.process_time()
        p = draw_parameters(pre, lab, torch.Generator().manual_seed(seed), paired=pre.paired)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    run = {"wall_s": wall, "cpu_s": cpu, "table_wall_s": timer[0], "table_cpu_s": timer[1],
           "load1": os.getloadavg()[0]}  # fmt: skip
    return run, p


def summarize(comp: str, method: str, runs: list[dict], p: dict) -> dict:
    """The fastest of the runs (wall), with the draw's sizes."""
    best = min(runs, key=lambda r: r["wall_s"])
    cdm = p["subhalo_count"] > 0
    return {
        "compensation": comp, "method": method,
        "wall_s": best["wall_s"], "cpu_s": min(r["cpu_s"] for r in runs),
        "table_wall_s": best["table_wall_s"], "table_cpu_s": min(r["table_cpu_s"] for r in runs),
        "runs": runs, "images_with_subhalos": int(cdm.sum()),
        "subhalos_per_image": float(p["subhalo_count"][cdm].double().mean()) if bool(cdm.any()) else 0.0,
        "table_radii": int(p["radial_alpha"].shape[1]) if "radial_alpha" in p else len(EFF_NODES),
    }  # fmt: skip


# ----------------------------------------------------------------------------- accuracy


#: (s, r): on the circle, 1e-4 / 1e-3 off it, at two radii; inside, outside, far inside / outside, near the
#: centre, a large circle
GEOMETRIES = [(1.0, 1.0), (1.0, 1.0001), (1.0, 0.999), (4.7, 4.7), (4.7, 4.72), (4.7, 4.6), (0.3, 0.3),
              (0.5, 1.0), (2.0, 1.0), (0.006, 1.2), (3.0, 0.13), (4.0, 8.0), (4.8, 8.0),
              (0.05, 0.1)]  # fmt: skip


def _pairs(rng: np.random.Generator) -> list[tuple[float, ...]]:
    """(s, r, Rs, alpha_Rs, r_trunc): designed geometries and random draws over the preset's ranges."""
    out = []
    for rs, tau in [(0.04, 2.3), (0.2, 9.0), (0.05, 44.0), (1.5, 5.0), (0.3, 0.3), (1.5, 44.0)]:
        for s, r in GEOMETRIES:
            out.append((s, r, rs, 0.002, rs * tau))
    for _ in range(150):
        rs = 10 ** rng.uniform(math.log10(0.04), math.log10(1.5))
        tau = 10 ** rng.uniform(math.log10(0.3), math.log10(44.0))
        s = rng.uniform(0.005, 4.8)
        near = rng.random() < 0.6
        r = abs(s + rng.normal() * rng.choice([0.003, 0.03, 0.3])) if near else rng.uniform(0.05, 8.0)
        out.append((s, r, rs, 10 ** rng.uniform(-3.2, -1.9), rs * tau))
    return out


def _ours(pairs, **kwargs) -> np.ndarray:
    """subhalo_mean_radial for one subhalo per image (at a random angle about an off-origin centre)."""
    a = np.array(pairs, dtype=np.float64)
    n = len(a)
    ang = np.random.default_rng(1).uniform(0.0, 2.0 * math.pi, n)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    p = {"subhalo_count": torch.ones(n, dtype=torch.int64), "center_x": t(np.full(n, 0.05)),
         "center_y": t(np.full(n, -0.03)), "subhalo_x": t(0.05 + a[:, 0] * np.cos(ang))[:, None],
         "subhalo_y": t(-0.03 + a[:, 0] * np.sin(ang))[:, None], "subhalo_Rs": t(a[:, 2])[:, None],
         "subhalo_alpha_Rs": t(a[:, 3])[:, None], "subhalo_r_trunc": t(a[:, 4])[:, None]}  # fmt: skip
    cpu = torch.device("cpu")
    return _ORIGINAL(p, torch.arange(n), t(a[:, 1])[:, None], "tnfw", device=cpu, **kwargs)[:, 0].numpy()


def _lenstronomy_reference(pairs) -> tuple[np.ndarray, np.ndarray]:
    """lenstronomy TNFW's mean radial deflection on each circle (adaptive quadrature over the angle psi from
    the subhalo's direction, [0, pi] by symmetry) and m_tot / r (its total mass over r)."""
    from lenstronomy.LensModel.Profiles.tnfw import TNFW
    from scipy import integrate

    prof = TNFW()
    ref, scale = [], []
    for s, r, rs, a_rs, rt in pairs:

        def radial(psi, s=s, r=r, rs=rs, a_rs=a_rs, rt=rt):
            c, sn = math.cos(psi), math.sin(psi)
            ax, ay = prof.derivatives(r * c, r * sn, rs, a_rs, rt, center_x=s, center_y=0.0)
            return float(ax * c + ay * sn)

        w = abs(r - s) / math.sqrt(r * s)
        pts = sorted(
            {min(0.5 * math.pi, x) for x in (w, 3 * w, 10 * w, rs / r, rt / r, 0.1 * min(rs, rt) / r)}
        )
        v, _ = integrate.quad(radial, 0.0, math.pi, points=pts, limit=1000, epsabs=0.0, epsrel=1e-12)
        ref.append(v / math.pi)
        big = 1e4 * (rs + rt)
        scale.append(float(prof.derivatives(big, 0.0, rs, a_rs, rt)[0]) * big / r)
    return np.array(ref), np.array(scale)


def pair_accuracy(seed: int) -> dict:
    import warnings

    pairs = _pairs(np.random.default_rng(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quad's roundoff notes at rtol 1e-12
        ref, scale = _lenstronomy_reference(pairs)
    out: dict = {"pairs": len(pairs)}
    cases = {
        "gauss": {}, "gauss_float64": {"dtype": torch.float64}, "ring": {"method": "ring"},
        "ring_4096": {"method": "ring", "n_phi": 4096},
    }  # fmt: skip
    for name, kw in cases.items():
        v = _ours(pairs, **kw)
        err = np.abs(v - ref) / scale
        big = np.abs(ref) > 0.01 * scale  # the circle holds > 1 % of the subhalo's mass
        i = int(np.argmax(err))
        out[name] = {
            "max_err_over_mtot_r": float(err.max()), "median_err_over_mtot_r": float(np.median(err)),
            "max_rel_err_where_above_1pct": float((np.abs(v - ref)[big] / np.abs(ref[big])).max()),
            "worst_pair_s_r_Rs_alphaRs_rtrunc": [float(x) for x in pairs[i]],
        }  # fmt: skip
    return out


def table_accuracy(preset: str, seed: int, images: int = 4) -> dict:
    """Drawn subhalo tables (``images`` cdm images of ``preset``, its R radii) by each method against a
    float64 24-node table: max |difference| / max |table|."""
    pre = resolve_preset(preset, {"class_names": ["no_sub", "cdm"]})
    lab = resolve_labels(pre, 8 * images, None, None)
    with table_method(None, method="ring"):  # the draw itself, cheaply
        p = draw_parameters(pre, lab, torch.Generator().manual_seed(seed), paired=pre.paired)
    rows = torch.nonzero(p["subhalo_count"] > 0).squeeze(1)[:images]
    R = compensation.smooth_table_size(pre)
    radii = (
        p["theta_E"][rows, None]
        * torch.arange(R, dtype=torch.float64)
        / compensation.SMOOTH_NODES_PER_THETA_E
    )
    cpu = torch.device("cpu")
    ref = _ORIGINAL(p, rows, radii, "tnfw", device=cpu, dtype=torch.float64, nodes=24)
    out = {"images": int(rows.numel()), "subhalos": int(p["subhalo_count"][rows].sum()), "radii": R}
    for name, kw in {
        "gauss": {},
        "ring": {"method": "ring"},
        "ring_4096": {"method": "ring", "n_phi": 4096},
    }.items():
        v = _ORIGINAL(p, rows, radii, "tnfw", device=cpu, **kw)
        out[f"{name}_max_abs_diff_over_max"] = float((v - ref).abs().max() / ref.abs().max())
    return out


def image_accuracy(preset: str, n: int, seed: int) -> dict:
    """Noise-free images (monopole, CPU) with each table method against a float64 24-node table."""
    over = {"mass_compensation": "monopole", "noise": "none", "class_names": ["no_sub", "cdm"]}
    imgs = {}
    for name, kw in {
        "reference": {"dtype": torch.float64, "nodes": 24},
        "gauss": {},
        "ring": {"method": "ring"},
    }.items():
        with table_method(None, **kw):
            imgs[name] = simulate(preset, n, seed=seed, device="cpu", overrides=over).images.double()
    peak = float(imgs["reference"].abs().max())
    d = lambda a, b: float((imgs[a] - imgs[b]).abs().max()) / peak  # noqa: E731
    diffs = {
        f"{a}_vs_{b}": d(a, b) for a, b in (("gauss", "ring"), ("gauss", "reference"), ("ring", "reference"))
    }
    return {"images": n, "max_abs_diff_over_max_pixel": diffs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="model_ii")
    p.add_argument("--n", type=int, default=2048, help="images per draw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed draws per row (the fastest is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--accuracy", action="store_true", help="also the lenstronomy and image comparisons")
    p.add_argument("--image-n", type=int, default=24, help="images of the image comparison")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        raise SystemExit(f"--n and --repeats must be >= 1, got {args.n} / {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    load_before = os.getloadavg()
    rows = []
    head = f"{'compensation':<13}{'table method':<14}{'draw s':>8}{'cpu s':>8}{'table s':>9}"
    print(f"{head}{'vs ring_slope':>15}")
    runs: dict[tuple[str, str], list[dict]] = {c: [] for c in CONFIGS}
    last: dict[tuple[str, str], dict] = {}
    for _ in range(args.repeats):  # interleaved, so a change of the machine's load hits every row alike
        for comp, method in CONFIGS:
            run, last[(comp, method)] = time_draw(args.preset, comp, method, args.n, args.seed)
            runs[(comp, method)].append(run)
    for comp, method in CONFIGS:
        r = summarize(comp, method, runs[(comp, method)], last[(comp, method)])
        base = next((b for b in rows if b["compensation"] == "ring_slope" and b["method"] == method), r)
        r["over_ring_slope"] = r["wall_s"] / base["wall_s"]
        rows.append(r)
        print(f"{comp:<13}{method:<14}{r['wall_s']:>8.2f}{r['cpu_s']:>8.2f}{r['table_wall_s']:>9.2f}"
              f"{r['over_ring_slope']:>14.2f}x", flush=True)  # fmt: skip
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "device": "cpu", "processor": platform.processor() or platform.machine(),
            "cpu_model": _cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "platform": platform.platform(),
            "load_before": list(load_before), "load_after": list(os.getloadavg()),
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "host": platform.node(),
            "time": time.strftime("%Y-%m-%d %H:%M"),
        },
        "table": {"gauss_nodes": compensation.GAUSS_NODES, "gauss_inner": compensation.GAUSS_INNER,
                  "ring_angles": compensation.RING_ANGLES},
        "rows": rows,
        "speedup_monopole_table": rows[2]["table_wall_s"] / max(rows[3]["table_wall_s"], 1e-12),
        "speedup_monopole_draw": rows[2]["wall_s"] / rows[3]["wall_s"],
        "monopole_gauss_over_ring_slope_gauss": rows[3]["over_ring_slope"],
        "monopole_gauss_over_ring_slope_ring": rows[3]["wall_s"] / rows[0]["wall_s"],
    }  # fmt: skip
    print(
        f"monopole draw: {result['speedup_monopole_draw']:.1f}x faster, its table "
        f"{result['speedup_monopole_table']:.1f}x; monopole / ring_slope {rows[3]['over_ring_slope']:.2f} "
        f"(/ the former ring_slope {result['monopole_gauss_over_ring_slope_ring']:.2f})"
    )
    if args.accuracy:
        acc = pair_accuracy(args.seed)
        print(f"{'vs lenstronomy':<16}{'max err / (m_tot/r)':>21}{'median':>10}{'max rel (>1 %)':>16}")
        for name in ("gauss", "gauss_float64", "ring", "ring_4096"):
            a = acc[name]
            print(
                f"{name:<16}{a['max_err_over_mtot_r']:>21.2e}{a['median_err_over_mtot_r']:>10.1e}"
                f"{a['max_rel_err_where_above_1pct']:>16.2e}"
            )
        tab = table_accuracy(args.preset, args.seed)
        for k in ("gauss", "ring", "ring_4096"):
            print(f"tables {k} vs float64 24 nodes: max |diff| / max {tab[f'{k}_max_abs_diff_over_max']:.2e}")
        img = image_accuracy(args.preset, args.image_n, args.seed)
        for k, v in img["max_abs_diff_over_max_pixel"].items():
            print(f"images {k}: max |diff| / max pixel {v:.2e}")
        result["accuracy"] = {"pairs_vs_lenstronomy": acc, "tables": tab, "images": img}
    result["wall_s"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2), fsync=False)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
