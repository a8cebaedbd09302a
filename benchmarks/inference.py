"""Parameter inference benchmark: per-lens calibrated posteriors of Sigma_sub and of the axion mass.

On one device, for each task, model and training-set size: simulate a training and a held-out test set in
device memory (``simulate(device_output=True)``, no disk; only the images the target exists on), train a
regression network of the model registry with the Gaussian head of task 'inference' (train/gaussian.py:
mean and precision Cholesky factor, Gaussian negative log-likelihood; the project's ``train_one_epoch``,
bf16 autocast on CUDA, AdamW + cosine, random 90-degree rotations and flips, per-image standardisation),
and measure on the held-out lenses, in physical units:

- ``rmse``, ``bias`` (mean of posterior mean - truth), ``rmse_over_prior`` (RMSE / the prior's std: 1 is
  what predicting the prior mean gives), ``nll`` (mean per lens, standardised units), ``coverage_68`` /
  ``coverage_95`` (fraction of true values inside the marginal 68 % / 95 % intervals) and ``calibrated``
  (both within +-5 points of nominal).

Tasks: ``sigma_sub`` (Sigma_sub [kpc^-2] on the cdm images of the physical ``model_ii`` preset, uniform
prior ``preset.sigma_sub``) and ``log10_m_axion`` (log10 m_axion [eV] on the axion images of ``model_iii``,
uniform prior ``preset.axion_log10_mass``). The targets are standardised with the prior's mean and std. Each
test set's posteriors are written as a posterior file (``deeplense_ray/infer/posteriors.py``), one per task,
model and size, beside ``--out`` (``<out stem>.<task>.<model>.n<size>.npz``): ``jobs/population.py`` reads
them. Prints a table, writes JSON (atomically).

    python benchmarks/inference.py --quick --out /tmp/inference_quick.json     # CPU smoke test (~1-2 min)
    (--quick: 24x24 images, 192 training and 64 test lenses, 2 epochs of tiny models, and for Sigma_sub
    point-mass subhalos without supersampling: a check that it runs, not a measurement)
    python benchmarks/inference.py --out benchmarks/results/inference_h100.json  # one GPU
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deeplense_ray.config import parse_overrides  # noqa: E402
from deeplense_ray.data.augment import normalize_batch  # noqa: E402
from deeplense_ray.infer.posteriors import gaussian_posteriors, write_posteriors  # noqa: E402
from deeplense_ray.io import atomic_write_text  # noqa: E402
from deeplense_ray.models import build_model, count_parameters  # noqa: E402
from deeplense_ray.sim import resolve_preset, simulate  # noqa: E402
from deeplense_ray.train.gaussian import num_outputs, regression_metrics  # noqa: E402
from deeplense_ray.train.optim import autocast_dtype, build_optimizer, build_scheduler  # noqa: E402
from deeplense_ray.train.regression import predict_outputs  # noqa: E402
from deeplense_ray.train.seeding import derive_seed  # noqa: E402
from deeplense_ray.train.steps import train_one_epoch  # noqa: E402
from deeplense_ray.train.targets import KNOWN_TARGETS, preset_prior, target_spec, target_values  # noqa: E402

#: task -> (preset, the class the target exists on)
TASKS = {"sigma_sub": ("model_ii", "cdm"), "log10_m_axion": ("model_iii", "axion")}
#: --quick: cheaper cdm images on a CPU (no supersampling, point-mass subhalos: the same Sigma_sub prior)
QUICK_PRESET_OVERRIDES = {"supersampling": 1, "subhalo_profile": "point_mass"}
QUICK_MODEL_OVERRIDES = {"ResNet18": {"width": 8}, "ViT": {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64}}


def make_data(preset, n: int, seed: int, device: torch.device, spec: dict[str, Any]):
    """``n`` standardised images [n, 1, H, W] on ``device`` and their standardised targets [n, T] (the
    preset holds one class: the target's), simulated in parts of at most 2^16 images."""
    xs, ys = [], []
    draws = "device" if device.type == "cuda" else "cpu"
    for i, s in enumerate(range(0, n, 1 << 16)):
        k = min(1 << 16, n - s)
        res = simulate(preset, k, derive_seed(seed, i), device=device, device_output=True, draws=draws)
        xs.append(normalize_batch(res.images.to(device), "per_image_standard"))
        values = target_values({k_: v.to(device) for k_, v in res.params.items()}, spec["targets"])
        loc = torch.as_tensor(spec["target_loc"], dtype=torch.float64, device=device)
        scale = torch.as_tensor(spec["target_scale"], dtype=torch.float64, device=device)
        ys.append(((values.double() - loc) / scale).float())
    return torch.cat(xs), torch.cat(ys)


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None):
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order.to(x.device)
    for s in range(0, n, batch_size):
        idx = order[s : s + batch_size]
        yield {"image": x.index_select(0, idx), "label": idx, "target": y.index_select(0, idx)}


def train_model(name, x, y, *, args, seed, device, amp_dtype, image_size, pixel_scale, num_targets):
    torch.manual_seed(seed)
    over = QUICK_MODEL_OVERRIDES.get(name, {}) if args.quick else {}
    model = build_model(name, image_size, 1, num_outputs(num_targets), pixel_scale=pixel_scale, **over)
    model = model.to(device)
    cfg = {
        "optimizer": "adamw", "lr": args.lr, "weight_decay": args.weight_decay, "epochs": args.epochs,
        "warmup_epochs": min(1, args.epochs - 1), "scheduler": "cosine",
    }  # fmt: skip
    opt = build_optimizer(model.parameters(), cfg)
    sched = build_scheduler(opt, cfg)
    g_shuffle = torch.Generator().manual_seed(seed)
    g_aug = torch.Generator(device=device).manual_seed(seed)
    seen, seconds, losses = 0, 0.0, []
    for _ in range(args.epochs):
        r = train_one_epoch(
            model, _batches(x, y, args.batch_size, g_shuffle), opt, device=device, amp_dtype=amp_dtype,
            augment={"rot90": True, "flip": True}, generator=g_aug, regression=True,
        )  # fmt: skip
        sched.step()
        seen += int(r["images"])
        seconds += r["seconds"]
        losses.append(r["loss_sum"] / max(r["images"], 1))
    return model, {"params": count_parameters(model), "train_s": seconds, "train_img_s": seen / seconds,
                   "train_loss": losses}  # fmt: skip


def run_point(task, model_name, n_train, data, *, args, device, amp_dtype, out_dir) -> dict[str, Any]:
    pre, spec, (x_all, y_all), (x_test, y_test) = data
    x, y = x_all[:n_train], y_all[:n_train]
    model, stats = train_model(
        model_name, x, y, args=args, seed=args.seed, device=device, amp_dtype=amp_dtype,
        image_size=int(pre.num_pix), pixel_scale=float(pre.delta_pix), num_targets=len(spec["targets"]),
    )  # fmt: skip
    outputs, truth = predict_outputs(model, _batches(x_test, y_test, 512), device=device, amp_dtype=amp_dtype)
    m = regression_metrics(
        outputs, truth, spec["targets"], spec["target_loc"], spec["target_scale"], prior_std=spec["prior_std"]
    )
    post = gaussian_posteriors(
        spec["targets"], m["mean"], m["cov"], [tuple(p) for p in spec["target_prior"]], truth=m["truth"],
        ids=tuple(f"{task}:test:{i}" for i in range(len(truth))),
        model_uri=f"benchmarks/inference.py:{model_name}:n{n_train}:seed{args.seed}",
    )  # fmt: skip
    path = write_posteriors(out_dir / f"{Path(args.out).stem}.{task}.{model_name}.n{n_train}.npz", post)
    t = spec["targets"][0]
    return {
        "task": task, "model": model_name, "n_train": n_train, "n_test": int(len(truth)), **stats,
        "rmse": m["rmse"][t], "bias": m["bias"][t], "rmse_over_prior": m["rmse_over_prior"][t],
        "std_mean": m["std_mean"][t], "nll": m["nll"], "coverage_68": m["coverage_68"][t],
        "coverage_95": m["coverage_95"][t], "calibrated": m["calibrated"],
        "calibration_curve": {str(k): v for k, v in m["calibration_curve"].items()}, "posteriors": str(path),
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON results (posterior files are written beside it)")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny images, sets and models")
    p.add_argument("--tasks", default="sigma_sub,log10_m_axion")
    p.add_argument("--models", default="ResNet18,ViT")
    p.add_argument("--sizes", default=None, help="training-set sizes (default 16384,65536; quick 192)")
    p.add_argument("--test-size", type=int, default=None, help="held-out lenses (default 4096; quick 64)")
    p.add_argument("--epochs", type=int, default=None, help="default 20; quick 2")
    p.add_argument("--batch-size", type=int, default=None, help="default 256; quick 64")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--num-pix", type=int, default=None, help="image size (default the preset's; quick 24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default cuda if available (quick: cpu)")
    p.add_argument(
        "--preset-override", action="append", default=[], metavar="KEY=VALUE",
        help="preset field of every task, e.g. delta_los=[0,2] (line-of-sight halos on); repeatable",
    )  # fmt: skip
    args = p.parse_args(argv)
    try:
        user_over = parse_overrides(args.preset_override, "--preset-override")
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    q = args.quick
    sizes = [int(v) for v in (args.sizes or ("192" if q else "16384,65536")).split(",")]
    args.test_size = args.test_size or (64 if q else 4096)
    args.epochs = args.epochs or (2 if q else 20)
    args.batch_size = args.batch_size or (64 if q else 256)
    num_pix = args.num_pix or (24 if q else None)
    device = torch.device(args.device or ("cpu" if q or not torch.cuda.is_available() else "cuda"))
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    amp_dtype = autocast_dtype("bf16", device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    data_s: dict[str, float] = {}

    def write() -> None:
        """The result so far (rewritten after every point, so a run cut short keeps what finished)."""
        result = {
            "config": {**{k: v for k, v in vars(args).items()}, "sizes": sizes, "num_pix": num_pix,
                       "device": str(device), "tasks": TASKS},  # fmt: skip
            "environment": {
                "torch": torch.__version__, "python": platform.python_version(),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            },
            "data_seconds": data_s,
            "rows": rows,
            "wall_s": time.time() - t0,
        }  # fmt: skip
        atomic_write_text(out, json.dumps(result, indent=2, default=str), fsync=False)

    for k, task in enumerate(args.tasks.split(",")):
        preset_name, cls = TASKS[task]
        over: dict[str, Any] = {"class_names": [cls], **(QUICK_PRESET_OVERRIDES if q else {}), **user_over}
        if num_pix:
            over["num_pix"] = num_pix
        try:
            pre = resolve_preset(preset_name, over)
        except (KeyError, ValueError) as exc:
            raise SystemExit(f"error: preset {preset_name!r}: {exc}") from None
        preset = pre.to_dict()
        assert preset_prior(task, preset) is not None and KNOWN_TARGETS[task][2] == cls
        spec = target_spec([task], preset, None)
        t = time.time()
        train = make_data(pre, max(sizes), derive_seed(args.seed, k, 1), device, spec)
        test = make_data(pre, args.test_size, derive_seed(args.seed, k, 2), device, spec)
        data_s[task] = time.time() - t
        for model_name in args.models.split(","):
            for n in sizes:
                row = run_point(task, model_name, n, (pre, spec, train, test), args=args, device=device,
                                amp_dtype=amp_dtype, out_dir=out.parent)  # fmt: skip
                row.update(preset=preset_name, preset_overrides=over, prior=spec["target_prior"][0],
                           prior_std=spec["prior_std"][0])  # fmt: skip
                rows.append(row)
                print(
                    f"{task:14s} {model_name:9s} n={n:<7d} rmse {row['rmse']:.4g} (x prior std "
                    f"{row['rmse_over_prior']:.3f})  bias {row['bias']:+.3g}  nll {row['nll']:+.3f}  "
                    f"cov68 {row['coverage_68']:.3f}  cov95 {row['coverage_95']:.3f}  "
                    f"{'calibrated' if row['calibrated'] else 'NOT calibrated'}  "
                    f"train {row['train_s']:.1f} s",
                    flush=True,
                )
                write()
    _table(rows)
    write()
    print(f"wrote {out} ({time.time() - t0:.0f} s)")
    return 0


def _table(rows: list[dict[str, Any]]) -> None:
    head = (
        "task",
        "model",
        "n_train",
        "rmse",
        "rmse/prior",
        "bias",
        "nll",
        "cov68",
        "cov95",
        "calib",
        "img/s",
    )
    print(" | ".join(head))
    for r in rows:
        vals = (r["task"], r["model"], r["n_train"], f"{r['rmse']:.4g}", f"{r['rmse_over_prior']:.3f}",
                f"{r['bias']:+.3g}", f"{r['nll']:+.3f}", f"{r['coverage_68']:.3f}", f"{r['coverage_95']:.3f}",
                "yes" if r["calibrated"] else "no", f"{r['train_img_s']:.0f}")  # fmt: skip
        print(" | ".join(str(v) for v in vals))
    if any(math.isnan(r["rmse"]) for r in rows):
        print("warning: a run diverged (NaN outputs)")


if __name__ == "__main__":
    sys.exit(main())
