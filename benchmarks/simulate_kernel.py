"""Throughput of the batched lens simulator (images/s) beside lenstronomy's time per image on one CPU core.

    python benchmarks/simulate_kernel.py --quick --out runs/bench_sim_cpu.json          # CPU smoke test
    python benchmarks/simulate_kernel.py --device cuda --out runs/bench_sim_gpu.json    # GPU (H100)

Configurations: model_i (150x150) and model_ii (64x64), supersampling 1 and 2, 25 point-mass subhalos,
Gaussian PSF and Poisson + Gaussian noise. For each and each batch size it measures
- ``draw``: drawing all parameters on CPU (vectorised, images/s);
- ``render_eager`` / ``render_compiled``: the noise-free renderer on the device with parameters already
  there (eager: subhalos only for cdm images; compiled: torch.compile of the dense hot path);
- ``simulate_eager`` / ``simulate_compiled``: the whole ``simulate()`` call (draw + transfer + render +
  noise + copy back to CPU), once with the default class mix (no_sub/axion/cdm balanced) and once with
  every image cdm (25 subhalos each: the issue's target configuration);
- ``lenstronomy``: ImageModel.image (SIE + SHEAR + 25 POINT_MASS, SERSIC_ELLIPSE, GAUSSIAN PSF, same
  supersampling) + Poisson/Gaussian noise, per image on one CPU core (skipped if lenstronomy is absent).
Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # lenstronomy on one core
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deeplense_ray.sim import resolve_preset, simulate  # noqa: E402
from deeplense_ray.sim.sampling import draw_parameters  # noqa: E402
from deeplense_ray.sim.simulate import Renderer, noise_block, resolve_labels  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timeit(fn, dev: torch.device, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_config(name, ss, dev, batch_sizes, repeats, do_compile, n_batches):
    pre = resolve_preset(name, {"supersampling": ss, "subhalo_count": [25, 25]})
    rows = []
    for bs in batch_sizes:
        bs = max(noise_block(dev), bs // noise_block(dev) * noise_block(dev))
        row = {
            "preset": name,
            "supersampling": ss,
            "num_pix": pre.num_pix,
            "batch_size": bs,
            "device": str(dev),
        }
        try:
            lab = resolve_labels(pre, bs, None, None)
            t = _timeit(
                lambda lab=lab: draw_parameters(pre, lab, torch.Generator().manual_seed(0), paired=False),
                torch.device("cpu"),
                repeats,
            )
            row["draw"] = bs / t
            p = draw_parameters(
                pre, resolve_labels(pre, bs, ["cdm"], None), torch.Generator().manual_seed(0), paired=False
            )
            pd = {
                k: (v.to(dev, torch.float32) if v.dtype.is_floating_point else v.to(dev))
                for k, v in p.items()
            }
            modes = [("eager", False)] + ([("compiled", True)] if do_compile else [])
            for mode, comp in modes:
                try:
                    r = Renderer(preset=pre, device=dev, dtype=torch.float32, compile=comp)
                    with torch.no_grad():
                        t = _timeit(lambda r=r, pd=pd: r(pd), dev, repeats)
                    row[f"render_{mode}_cdm"] = bs / t
                    n = bs * n_batches
                    for mix, classes in (("mix", None), ("cdm", ["cdm"])):
                        t = _timeit(
                            lambda c=classes, comp=comp, n=n, bs=bs: simulate(
                                pre, n, 0, device=dev, classes=c, batch_size=bs, compile=comp
                            ),
                            dev,
                            max(1, repeats // 2),
                        )
                        row[f"simulate_{mode}_{mix}"] = n / t
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as e:  # a failing torch.compile must not lose the eager numbers
                    row[f"error_{mode}"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"  {mode} failed: {row[f'error_{mode}']}", flush=True)
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            torch.cuda.empty_cache()
            rows.append(row)
            break
        rows.append(row)
        print(_fmt_row(row), flush=True)
    return rows


def bench_lenstronomy(name, ss, n_images, seed=0):
    try:
        from lenstronomy.Data.imaging_data import ImageData
        from lenstronomy.Data.psf import PSF
        from lenstronomy.ImSim.image_model import ImageModel
        from lenstronomy.LensModel.lens_model import LensModel
        from lenstronomy.LightModel.light_model import LightModel
        from lenstronomy.Util.simulation_util import data_configure_simple
    except ImportError:
        return None
    pre = resolve_preset(name, {"supersampling": ss, "subhalo_count": [25, 25], "noise": "none"})
    res = simulate(pre, n_images, seed, device="cpu", classes=["cdm"])
    data = ImageData(**data_configure_simple(pre.num_pix, pre.delta_pix, inverse=False))
    model = ImageModel(
        data_class=data,
        psf_class=PSF("GAUSSIAN", fwhm=pre.psf_fwhm, truncation=5),
        lens_model_class=LensModel(["SIE", "SHEAR"] + ["POINT_MASS"] * 25),
        source_model_class=LightModel(["SERSIC_ELLIPSE"]),
        kwargs_numerics={"supersampling_factor": ss, "supersampling_convolution": False},
    )
    g = {k: v.double().numpy() for k, v in res.params.items()}
    rng = np.random.default_rng(seed)
    t0 = 0.0
    for i in range(-1, n_images):  # i = -1: warm-up (lenstronomy builds its grids lazily)
        if i == 0:
            t0 = time.perf_counter()
        i = max(i, 0)
        kl = [
            {
                "theta_E": g["theta_E"][i],
                "e1": g["e1"][i],
                "e2": g["e2"][i],
                "center_x": g["center_x"][i],
                "center_y": g["center_y"][i],
            },
            {"gamma1": g["gamma1"][i], "gamma2": g["gamma2"][i]},
        ]
        kl += [
            {
                "theta_E": g["subhalo_theta_E"][i, k],
                "center_x": g["subhalo_x"][i, k],
                "center_y": g["subhalo_y"][i, k],
            }
            for k in range(25)
        ]
        ks = [
            {
                "amp": g["source_amp"][i],
                "R_sersic": g["source_R_sersic"][i],
                "n_sersic": g["source_n_sersic"][i],
                "e1": g["source_e1"][i],
                "e2": g["source_e2"][i],
                "center_x": g["source_center_x"][i],
                "center_y": g["source_center_y"][i],
            }
        ]
        img = model.image(kl, ks)
        img = rng.poisson(np.clip(img, 0, None) * 2260.0) / 2260.0 + rng.normal(0, 0.01, img.shape)
    dt = (time.perf_counter() - t0) / n_images
    return {
        "preset": name,
        "supersampling": ss,
        "ms_per_image": dt * 1e3,
        "images_per_s": 1.0 / dt,
        "n_images": n_images,
    }


_COLS = [
    "draw",
    "render_eager_cdm",
    "render_compiled_cdm",
    "simulate_eager_mix",
    "simulate_eager_cdm",
    "simulate_compiled_mix",
    "simulate_compiled_cdm",
]


def _fmt_row(row) -> str:
    vals = " ".join(f"{row.get(c, float('nan')):>12.0f}" for c in _COLS)
    return f"{row['preset']:<9} ss={row['supersampling']} bs={row['batch_size']:>6} {vals}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="lens simulator throughput")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--quick", action="store_true", help="tiny CPU-sized run (smoke test)")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=None)
    ap.add_argument("--presets", nargs="*", default=["model_ii", "model_i"])
    ap.add_argument("--supersampling", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--lenstronomy-images", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_simulate_kernel.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)  # OMP_NUM_THREADS=1 is for lenstronomy only
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.batch_sizes:
        batch_sizes = args.batch_sizes
    elif dev.type == "cuda":
        batch_sizes = [4096, 16384, 65536]
    else:
        batch_sizes = [64] if args.quick else [64, 256]
    repeats = args.repeats or (1 if args.quick else 3)
    n_batches = 1 if args.quick else (4 if dev.type == "cuda" else 1)
    n_lens = args.lenstronomy_images or (3 if args.quick else 20)
    do_compile = not args.no_compile and not (args.quick and dev.type == "cpu")

    print(f"device={dev} torch={torch.__version__} compile={do_compile} threads={torch.get_num_threads()}")
    print(f"{'config':<30} " + " ".join(f"{c[:12]:>12}" for c in _COLS) + "   [images/s]")
    rows, lens_rows = [], []
    for name in args.presets:
        for ss in args.supersampling:
            rows += bench_config(name, ss, dev, batch_sizes, repeats, do_compile, n_batches)
    print("\nlenstronomy, one CPU core (SIE + SHEAR + 25 POINT_MASS, SERSIC_ELLIPSE, GAUSSIAN PSF, noise):")
    for name in args.presets:
        for ss in args.supersampling:
            r = bench_lenstronomy(name, ss, n_lens)
            if r is None:
                print("  lenstronomy not installed: skipped")
                break
            lens_rows.append(r)
            print(f"  {name:<9} ss={ss}: {r['ms_per_image']:.2f} ms/image ({r['images_per_s']:.0f} images/s)")
    out = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "compile": do_compile,
        "units": "images per second (lenstronomy: ms per image on one core)",
        "columns": {c: c for c in _COLS},
        "results": rows,
        "lenstronomy": lens_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
