"""Throughput of the batched lens simulator (images/s) beside lenstronomy's time per image on one CPU core.

    python benchmarks/simulate_kernel.py --quick --out runs/bench_sim_cpu.json          # CPU smoke test
    python benchmarks/simulate_kernel.py --out runs/bench_sim_gpu.json                  # GPU (< 2 min)
    python benchmarks/simulate_kernel.py --lenstronomy-only --out runs/lenstronomy.json # lenstronomy alone

Configurations: model_ii (64x64) and model_i (150x150), supersampling 1 and 2, Gaussian PSF and Poisson +
Gaussian noise, and the substructure of ``--population``: ``default`` (the presets as they are: the normalised
paltas / DG19 tNFW population, mean ~86 subhalos per cdm image for model_ii, PSF on the supersampled grid; the
mean count per cdm image is recorded as ``mean_subhalo_count_cdm``) or ``legacy25`` (25 point masses, PSF
after binning: the configuration of the 2026-11-22 numbers). For each it measures, in images/s:
- ``draw``: drawing all parameters on CPU (vectorised); ``draw_device``: the same draws on the device
  (``simulate(draws="device")``: the same code from a generator on the device, another stream);
- ``render_<backend>``: the noise-free renderer (PSF included) with parameters already on the device, every
  image cdm; backends ``eager`` (torch, subhalos only for cdm images), ``compile`` (torch.compile of the
  dense hot path) and ``triton`` (the fused kernels of ``sim/_triton.py``; CUDA only);
- ``sim_<backend>_cdm`` / ``sim_default_mix``: whole ``simulate()`` calls (draw + transfer + render + PSF +
  noise + copy back to CPU memory), every image cdm (the issue's target configuration) or the balanced
  no_sub/axion/cdm mix; ``default`` is what ``simulate()`` picks (triton on CUDA where it covers the preset);
- ``sim_devdraw_cdm`` / ``sim_devdraw_mix``: whole default ``simulate(draws="device", device_output=True)``
  calls (draw on the device + render + PSF + noise, images and params left on the device), n as ``default``;
- ``lenstronomy``: ImageModel.image (SIE + SHEAR + 25 POINT_MASS, SERSIC_ELLIPSE, GAUSSIAN PSF, same
  supersampling) + Poisson/Gaussian noise, per image on one CPU core: measured here (``--lenstronomy-images``)
  or read from a JSON written earlier by ``--lenstronomy-only`` (``--lenstronomy-json``; its host and time are
  printed with it; without lenstronomy installed the default is ``simulate_kernel_lenstronomy.json``, measured
  2026-11-22 on the idle 16-core CPU of the H100 machine, load 0.3, lenstronomy 1.14.2, one thread).
CPU timings are only meaningful on an idle machine: the load average is recorded.
``--profile DIR`` also writes torch.profiler tables of one default simulate() call (model_ii, ss=2, cdm), CPU
draws and CPU output, and of one with device draws and device output.
``--no-eager`` skips the eager (and compile) renders and simulate() calls: the Triton/default numbers alone.
The device-draw target (whole call with device draws and device output >= 1M images/s, model_ii on one H200):
    python benchmarks/simulate_kernel.py --presets model_ii --supersampling 2 --population legacy25 \
        --no-eager --out runs/bench_sim_devdraw_h200.json                     # then read sim_devdraw_cdm
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
from deeplense_ray.io import atomic_write_text  # noqa: E402
from deeplense_ray.sim import resolve_preset, simulate  # noqa: E402
from deeplense_ray.sim.sampling import draw_parameters  # noqa: E402
from deeplense_ray.sim.simulate import (  # noqa: E402
    Renderer,
    draw_generator,
    resolve_labels,
    simulate_with_backend,
    triton_supported,
)


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


def _param_batch(pre, bs, dev):
    p = draw_parameters(
        pre, resolve_labels(pre, bs, ["cdm"], None), torch.Generator().manual_seed(0), paired=False
    )
    return {k: (v.to(dev, torch.float32) if v.dtype.is_floating_point else v.to(dev)) for k, v in p.items()}


def _triton_render_fn(pre, pd, dev):
    """The Triton kernels alone (render, PSF, binning after a supersampled PSF); parameters on the device."""
    from deeplense_ray.sim import _triton as tk
    from deeplense_ray.sim.los import lens_plane_w, los_capacity, los_enabled, triton_los_table
    from deeplense_ray.sim.render import gaussian_kernel_1d
    from deeplense_ray.sim.simulate import _TNFW_KERNEL_KEYS, _psf_pixel, _ss_convolution

    coord = tk.sub_pixel_coords(pre.num_pix, pre.delta_pix, pre.supersampling, dev)
    kern = gaussian_kernel_1d(pre.psf_fwhm, _psf_pixel(pre), truncation=pre.psf_truncation).to(dev)
    te2 = sx = sy = tn = tcount = None
    if pre.subhalo_profile == "tnfw":
        kb = tk.tnfw_slots(int(pd["subhalo_count"].max()), pre.max_subhalos)
        tn = tk.tnfw_table(*(pd[k][:, :kb] for k in _TNFW_KERNEL_KEYS))
        tcount = pd["subhalo_count"].to(torch.int32)
        pd = {**pd, "subhalo_count": torch.zeros_like(pd["subhalo_count"])}
    else:
        te2, sx, sy = (pd["subhalo_theta_E"] ** 2).contiguous(), pd["subhalo_x"], pd["subhalo_y"]
    ss, n = pre.supersampling, pre.num_pix
    conv = _ss_convolution(pre)
    n_out, ss_k, d_k = (n * ss, 1, pre.delta_pix / ss) if conv else (n, ss, pre.delta_pix)
    los = {}
    if los_enabled(pre):  # line-of-sight halos (multi-plane in the kernel)
        kl = tk.tnfw_slots(int(pd["los_count"].max()), los_capacity(pre), step=8)
        tab, cnt = triton_los_table(pd, 0, int(pd["los_count"].shape[0]), kl, dev)
        los = {"los": tab, "los_count": cnt, "w_lens": lens_plane_w(pre)}

    def fn():
        sc = tk.derive_scalars(pd, has_vortex=True)
        img = tk.render_sersic(
            sc, te2, sx, sy, coord, num_pix=n_out, supersampling=ss_k, delta_pix=d_k, has_vortex=True,
            tnfw=tn, tnfw_count=tcount, **los,
        )  # fmt: skip
        img = tk.psf_separable(img, kern)
        return img.reshape(-1, n, ss, n, ss).sum(dim=(2, 4)) if conv else img

    return fn


#: ``--population legacy25``: the substructure and PSF numerics the earlier numbers were measured with
LEGACY25 = {
    "sigma_sub": None,
    "subhalo_count": [25, 25],
    "subhalo_profile": "point_mass",
    "subhalo_mass": [1e6, 1e10],
    "supersampling_convolution": False,
}


#: ``--population los``: the presets' own population plus line-of-sight halos (sim/los.py, delta_los U(0, 2))
LOS = {"delta_los": [0.0, 2.0]}


def _population(population: str) -> dict:
    return dict(LEGACY25) if population == "legacy25" else dict(LOS) if population == "los" else {}


def bench_config(
    name, ss, dev, n_fast, n_slow, render_bs, repeats, do_compile, batch_size=None, population="default",
    eager=True,
):  # fmt: skip
    """One row: draw, render-only per backend, whole simulate() per backend (images/s)."""
    pre = resolve_preset(name, {"supersampling": ss, **_population(population)})
    row = {"preset": name, "supersampling": ss, "num_pix": pre.num_pix, "device": str(dev)}
    row.update({"n_default": n_fast, "n_other": n_slow, "render_batch": render_bs, "batch_size": batch_size})
    row.update(population=population, subhalo_profile=pre.subhalo_profile, sigma_sub=pre.sigma_sub)
    row.update(subhalo_mass=list(pre.subhalo_mass), supersampling_convolution=pre.supersampling_convolution)
    lab = resolve_labels(pre, n_fast, None, None)
    t = _timeit(
        lambda: draw_parameters(pre, lab, torch.Generator().manual_seed(0), paired=False),
        torch.device("cpu"),
        repeats,
    )
    row["draw"] = n_fast / t
    gen_dev = lambda: draw_generator(0, dev, "device")  # noqa: E731
    t = _timeit(lambda: draw_parameters(pre, lab, gen_dev(), paired=False), dev, repeats)
    row["draw_device"] = n_fast / t
    cdm = draw_parameters(pre, resolve_labels(pre, n_fast, ["cdm"], None), torch.Generator().manual_seed(0),
                          paired=False)["subhalo_count"].double()  # fmt: skip
    row["mean_subhalo_count_cdm"] = float(cdm.mean())
    row["max_subhalo_count_cdm"] = int(cdm.max())
    row["subhalo_slots"] = pre.max_subhalos
    backends = (["eager"] + (["compile"] if do_compile else [])) if eager else []
    if triton_supported(pre, dev, torch.float32):
        backends.append("triton")
    default = "triton" if "triton" in backends else "eager"
    pd = _param_batch(pre, render_bs, dev)
    for be in backends:
        try:
            if be == "triton":
                fn = _triton_render_fn(pre, pd, dev)
            else:
                r = Renderer(preset=pre, device=dev, dtype=torch.float32, compile=be == "compile")
                fn = lambda r=r: r(pd)  # noqa: E731
            with torch.inference_mode():
                row[f"render_{be}"] = render_bs / _timeit(fn, dev, repeats)
        except Exception as e:  # a failing torch.compile must not lose the other numbers
            row[f"error_render_{be}"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  render {be} failed: {row[f'error_render_{be}']}", flush=True)
    runs = [("default", default, "mix", n_fast), ("default", default, "cdm", n_fast)]
    runs += [("devdraw", default, "mix", n_fast), ("devdraw", default, "cdm", n_fast)]
    runs += [(be, be, "cdm", n_slow) for be in backends if be != default or be == "eager"]
    for label, be, mix, n in runs:
        classes = ["cdm"] if mix == "cdm" else None
        dd = label == "devdraw"  # parameters drawn on the device, images and params left there
        try:
            t = _timeit(
                lambda be=be, n=n, classes=classes, dd=dd: simulate_with_backend(
                    pre, n, 0, device=dev, classes=classes, batch_size=batch_size, backend=be,
                    draws="device" if dd else "cpu", device_output=dd,
                ),
                dev,
                repeats if label in ("default", "devdraw") else 1,
            )  # fmt: skip
            row[f"sim_{label}_{mix}"] = n / t
        except Exception as e:
            row[f"error_sim_{label}_{mix}"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  simulate {be} failed: {row[f'error_sim_{label}_{mix}']}", flush=True)
    row["default_backend"] = default
    print(_fmt_row(row), flush=True)
    return row


def profile_default(dev, out_dir: Path, n: int, population: str = "default") -> None:
    """torch.profiler tables (CPU + CUDA time per op) of one default simulate() call, model_ii ss=2 cdm:
    ``profile_simulate.txt`` (CPU draws, CPU output) and ``profile_simulate_devdraw.txt`` (device draws and
    output)."""
    from torch.profiler import ProfilerActivity, profile

    pre = resolve_preset("model_ii", {"supersampling": 2, **_population(population)})
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    out_dir.mkdir(parents=True, exist_ok=True)
    for fname, kw in (
        ("profile_simulate.txt", {}),
        ("profile_simulate_devdraw.txt", {"draws": "device", "device_output": True}),
    ):
        simulate_with_backend(pre, n, 0, device=dev, classes=["cdm"], **kw)  # warm-up
        _sync(dev)
        with profile(activities=acts) as prof:
            simulate_with_backend(pre, n, 0, device=dev, classes=["cdm"], **kw)
            _sync(dev)
        (out_dir / fname).write_text(
            prof.key_averages().table(sort_by=key, row_limit=40)
            + "\n\nby CPU time\n"
            + prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
        )


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
    pre = resolve_preset(name, {"supersampling": ss, **LEGACY25, "noise": "none"})  # 25 POINT_MASS
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
    "draw_device",
    "render_eager",
    "render_compile",
    "render_triton",
    "sim_eager_cdm",
    "sim_compile_cdm",
    "sim_default_cdm",
    "sim_default_mix",
    "sim_devdraw_cdm",
    "sim_devdraw_mix",
]


def _fmt_row(row) -> str:
    vals = " ".join(f"{row.get(c, float('nan')):>15.0f}" for c in _COLS)
    sub = f"   <N_sub cdm> {row.get('mean_subhalo_count_cdm', float('nan')):.1f}"
    return f"{row['preset']:<9} ss={row['supersampling']}  {vals}{sub}"


_DEFAULT_LENS_JSON = Path(__file__).with_name("simulate_kernel_lenstronomy.json")


def _load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="lens simulator throughput")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--quick", action="store_true", help="tiny CPU-sized run (smoke test)")
    ap.add_argument("--presets", nargs="*", default=["model_ii", "model_i"])
    ap.add_argument("--supersampling", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--n", type=int, default=None, help="images per default simulate() call")
    ap.add_argument("--batch-size", type=int, default=None, help="simulate(batch_size=...) (default: auto)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    ap.add_argument(
        "--no-eager", action="store_true", help="skip the eager/compile renderers (Triton/default rows only)"
    )
    ap.add_argument(
        "--compile-ss", type=int, nargs="*", default=[2], help="supersamplings to torch.compile (it is slow)"
    )
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--lenstronomy-images", type=int, default=None, help="measure here; 0: skip")
    ap.add_argument("--lenstronomy-json", type=Path, default=None, help="timings from --lenstronomy-only")
    ap.add_argument("--lenstronomy-only", action="store_true", help="only time lenstronomy (CPU)")
    ap.add_argument("--profile", type=Path, default=None, help="write a torch.profiler table here")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument(
        "--population", choices=["default", "legacy25", "los"], default="default",
        help="substructure: the presets' own (normalised tNFW), the earlier 25 point masses, or the presets' "
        "own plus line-of-sight halos (delta_los U(0, 2))",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("runs/bench_simulate_kernel.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)  # OMP_NUM_THREADS=1 is for lenstronomy only
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    repeats = args.repeats or (1 if args.quick else 3)
    do_compile = not args.no_compile and not (args.quick and not gpu)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    host = {"hostname": platform.node(), "load_avg_1min": _load_avg(), "time": stamp}
    rows, lens_rows, lens_source = [], [], None
    if not args.lenstronomy_only:
        nth = torch.get_num_threads()
        print(f"device={dev} torch={torch.__version__} compile={do_compile} threads={nth}")
        print(f"{'config':<14} " + " ".join(f"{c:>15}" for c in _COLS) + "   [images/s]")
        for name in args.presets:
            for ss in args.supersampling:
                big = name != "model_i"
                if args.quick:
                    n_fast = n_slow = render_bs = 64
                elif gpu:
                    n_fast = args.n or (65536 if big else 16384)
                    n_slow = min(n_fast, 8192 if big else 2048)
                    render_bs = 16384 if big else 4096
                else:
                    n_fast = n_slow = render_bs = args.n or 256
                sizes = (n_fast, n_slow, render_bs)
                comp = do_compile and ss in args.compile_ss
                opts = {"batch_size": args.batch_size, "population": args.population}
                rows.append(
                    bench_config(name, ss, dev, *sizes, repeats, comp, eager=not args.no_eager, **opts)
                )
        if args.profile is not None:
            profile_default(dev, args.profile, 16384 if gpu else 64, args.population)
    lens_json = args.lenstronomy_json
    if lens_json is None and args.lenstronomy_images is None and not args.lenstronomy_only:
        try:
            import lenstronomy  # noqa: F401
        except ImportError:  # e.g. the GPU machine: timings measured earlier on an idle CPU
            lens_json = _DEFAULT_LENS_JSON
    if lens_json is not None:
        lj = json.loads(lens_json.read_text())
        lens_rows, lens_source = lj["lenstronomy"], lj.get("host")
    elif args.lenstronomy_images != 0:
        n_lens = args.lenstronomy_images or (3 if args.quick else 20)
        for name in args.presets:
            for ss in args.supersampling:
                r = bench_lenstronomy(name, ss, n_lens)
                if r is None:
                    print("  lenstronomy not installed: skipped")
                    break
                lens_rows.append(r)
        lens_source = host
    if lens_rows:
        print(
            "\nlenstronomy, one CPU core (SIE + SHEAR + 25 POINT_MASS, SERSIC_ELLIPSE, GAUSSIAN PSF, noise), "
            f"measured on {lens_source}:"
        )
        for r in lens_rows:
            print(
                f"  {r['preset']:<9} ss={r['supersampling']}: {r['ms_per_image']:.2f} ms/image "
                f"({r['images_per_s']:.0f} images/s)"
            )
    out = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if gpu else platform.processor(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "compile": do_compile,
        "host": host,
        "units": "images per second (lenstronomy: ms per image on one core)",
        "population": args.population,
        "columns": list(_COLS),
        "results": rows,
        "lenstronomy": lens_rows,
        "lenstronomy_measured_on": lens_source,
    }
    atomic_write_text(args.out, json.dumps(out, indent=2), fsync=False)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
