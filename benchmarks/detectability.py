"""Detectability of dark-matter substructure: cdm-vs-no_sub AUC against the subhalo normalisation Sigma_sub.

On one GPU, for each subhalo profile (tNFW, point mass) and each Sigma_sub scale s (the model_ii prior
Sigma_sub ~ U(0, 4e-3) kpc^-2 becomes U(0, 4e-3 s)), and each seed: simulate a balanced no_sub / axion / cdm
training and test set of the model_ii preset in GPU memory (``simulate(device_output=True)``, no disk), train
each model (``deeplense_ray.models`` registry; the project's ``train_one_epoch`` / ``predict_batches``, bf16
autocast on CUDA, AdamW + cosine, random 90-degree rotations and flips, per-image standardisation) and
measure on the test set:
- ``auc_cdm``: ROC AUC of cdm against no_sub (score logit_cdm - logit_no_sub, no_sub and cdm test images);
- ``auc_axion_bins``: ROC AUC of axion against no_sub per log10 m_axion bin (logit_axion - logit_no_sub);
- with the wave-dark-matter class ``fdm`` among the classes (e.g. ``--preset model_ii_fdm``): ``auc_fdm`` and
  ``auc_fdm_bins`` (fdm against no_sub per log10 m bin of ``--fdm-bins`` over the preset's range);
- ``accuracy`` (3 classes), the mean subhalo count and projected subhalo mass fraction of the cdm test images;
- with the ``cdm_smooth`` control among ``--classes``: ``auc_cdm_smooth`` (cdm_smooth against no_sub: a
  network that sees clumps, not mass, sits at 0.5) and ``auc_cdm_vs_smooth`` (cdm against cdm_smooth: the
  clumps alone; the two classes of a paired group share the subhalo population);
- beside each point the ring-size observer (``deeplense_ray.sim.observers.ring_size_aucs``: the AUC of the
  brightness-weighted ring radius of noise-free paired images and of theta_E_eff, per class pair, on
  ``--test-per-class`` groups): what a classifier that sees only the ring size reaches.
``--compensation monopole|ring_slope|ring|none`` sets the preset's ``mass_compensation`` (monopole, the
physical presets' default: each image's substructure monopole is subtracted, so the enclosed mass at every
radius does not depend on the class and cdm_smooth equals no_sub; ring_slope: the lens mass inside the
Einstein ring and its slope there; ring: the mass alone; none: subhalo mass added on top, the leak).
Reports mean +- std over seeds per point, prints a table, writes JSON and a PNG (AUC against the scale, one
line per model and profile) and logs both to MLflow when mlflow imports (``--tracking-uri``, default
``sqlite:///<out dir>/mlflow.db``; ``--no-mlflow`` to skip).

    python benchmarks/detectability.py --quick --out /tmp/det.json            # CPU smoke test (~1 min)
    python benchmarks/detectability.py --out benchmarks/results/detectability_h200.json   # one H200, ~8 min
    python benchmarks/detectability.py --classes no_sub,cdm,cdm_smooth --scales 1 4 8 --profiles tnfw \
        --models ResNet18 --compensation ring --out benchmarks/results/detectability_controls.json  # one GPU

Each (profile, scale, seed) data set is simulated once and used by every model; the data seeds derive from
(seed, profile, scale index), so models see the same images. ``--time-budget`` stops starting new points
once exceeded (what ran is saved; the JSON lists what was skipped).
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deeplense_ray.config import parse_overrides  # noqa: E402
from deeplense_ray.data.augment import normalize_batch  # noqa: E402
from deeplense_ray.io import atomic_write_text  # noqa: E402
from deeplense_ray.models import build_model, count_parameters  # noqa: E402
from deeplense_ray.sim import resolve_preset, simulate  # noqa: E402
from deeplense_ray.sim.observers import PAIRS, ring_size_aucs  # noqa: E402
from deeplense_ray.sim.presets import MASS_COMPENSATIONS  # noqa: E402
from deeplense_ray.train.optim import autocast_dtype, build_optimizer, build_scheduler  # noqa: E402
from deeplense_ray.train.seeding import derive_seed  # noqa: E402
from deeplense_ray.train.steps import predict_batches, train_one_epoch  # noqa: E402

PROFILES = ("tnfw", "point_mass")
POINT_METRICS = ("auc_axion", "accuracy", "mean_subhalo_count_cdm", "mean_fsub_arc_cdm")
#: per-mass-bin AUCs of the wave-dark-matter classes against no_sub: result key -> (class, stored parameter,
#: whether it is the mass itself, not its log10)
MASS_BIN_KEYS = {
    "auc_axion_bins": ("axion", "axion_mass", True),
    "auc_fdm_bins": ("fdm", "fdm_log10_m", False),
}
NAN = {"mean": math.nan, "std": math.nan}
AUC_LABELS = {"auc_cdm": "cdm/no_sub", "auc_cdm_smooth": "cdm_smooth/no_sub",
              "auc_cdm_vs_smooth": "cdm/cdm_smooth", "auc_fdm": "fdm/no_sub"}  # fmt: skip
#: result key of each class pair's network AUC
AUC_KEYS = {("cdm", "no_sub"): "auc_cdm", ("cdm_smooth", "no_sub"): "auc_cdm_smooth",
            ("cdm", "cdm_smooth"): "auc_cdm_vs_smooth", ("fdm", "no_sub"): "auc_fdm"}  # fmt: skip
QUICK_MODEL_OVERRIDES = {"ResNet18": {"width": 8}, "ViT": {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64}}


def _batches(images, labels, batch_size, generator=None):
    """Batches {"image", "label"} of device tensors, shuffled by ``generator`` (None: in order)."""
    n = images.shape[0]
    order = torch.randperm(n, generator=generator, device="cpu") if generator is not None else torch.arange(n)
    order = order.to(images.device)
    for s in range(0, n, batch_size):
        idx = order[s : s + batch_size]
        yield {"image": images.index_select(0, idx), "label": labels.index_select(0, idx)}


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    return float(roc_auc_score(y, np.r_[pos, neg]))


#: images per simulate() call of make_data (a million-image set is drawn in parts of this size)
MAKE_DATA_PART = 1 << 18


def make_data(preset, n_per_class: int, seed: int, device: torch.device):
    """Standardised images [C n, 1, H, W] on ``device``, labels, and the CPU params (balanced classes).

    Sets larger than ``MAKE_DATA_PART`` images are simulated in parts, part i with seed (seed, i), so the
    CPU parameter draws of one call stay small; the images of a part do not depend on the others.
    """
    n = preset.num_classes * n_per_class
    xs, ys, ps = [], [], []
    for i, s in enumerate(range(0, n, MAKE_DATA_PART)):
        k = min(MAKE_DATA_PART, n - s)
        res = simulate(preset, k, seed if n <= MAKE_DATA_PART else derive_seed(seed, i), device=device,
                       device_output=True)  # fmt: skip
        xs.append(normalize_batch(res.images.to(device), "per_image_standard"))
        ys.append(res.labels.to(device))
        ps.append(res.params)
    if len(xs) == 1:
        return xs[0], ys[0], ps[0]
    keys = [k for k in ps[0] if all(isinstance(p.get(k), torch.Tensor) for p in ps)]
    same = [k for k in keys if all(p[k].shape[1:] == ps[0][k].shape[1:] for p in ps)]
    return torch.cat(xs), torch.cat(ys), {k: torch.cat([p[k] for p in ps]) for k in same}


def evaluate(model, x, y, params, class_names, *, device, amp_dtype, batch_size, mass_bins) -> dict[str, Any]:
    """Test metrics; ``mass_bins``: the log10 m bin edges of each key of ``MASS_BIN_KEYS``."""
    logits, labels = predict_batches(model, _batches(x, y, batch_size), device=device, amp_dtype=amp_dtype)
    c = {name: class_names.index(name) for name in class_names}
    no_sub = labels == c["no_sub"]
    out: dict[str, Any] = {"accuracy": float((logits.argmax(1) == labels).mean())}
    for a, b in PAIRS:  # AUC of class a against class b, score logit_a - logit_b
        if a in c and b in c:
            s_ab = logits[:, c[a]] - logits[:, c[b]]
            out[AUC_KEYS[(a, b)]] = _auc(s_ab[labels == c[a]], s_ab[labels == c[b]])
    cdm = labels == c.get("cdm", c.get("cdm_smooth"))
    if "axion" in c:
        s_ax = logits[:, c["axion"]] - logits[:, c["no_sub"]]
        out["auc_axion"] = _auc(s_ax[labels == c["axion"]], s_ax[no_sub])
    for key, (cls, param, linear) in MASS_BIN_KEYS.items():
        if cls not in c:
            continue
        s_cls = logits[:, c[cls]] - logits[:, c["no_sub"]]
        v = params[param].double().numpy()
        log_m = np.log10(np.maximum(v, 1e-300)) if linear else v
        is_cls = labels == c[cls]
        edges = mass_bins[key]
        out[key] = [
            _auc(s_cls[is_cls & (log_m >= lo) & (log_m < hi)], s_cls[no_sub])
            for lo, hi in zip(edges[:-1], edges[1:])
        ]
    cnt = params["subhalo_count"].double().numpy()[cdm]
    out["mean_subhalo_count_cdm"] = float(cnt.mean()) if cnt.size else math.nan
    if "subhalo_mass_fraction_arc" in params:
        out["mean_fsub_arc_cdm"] = float(params["subhalo_mass_fraction_arc"].double().numpy()[cdm].mean())
    return out


def train_model(name, x, y, *, args, seed, device, amp_dtype, num_classes, image_size):
    torch.manual_seed(seed)
    over = QUICK_MODEL_OVERRIDES.get(name, {}) if args.quick else {}
    model = build_model(name, image_size, 1, num_classes, pixel_scale=args.pixel_scale, **over).to(device)
    cfg = {
        "optimizer": "adamw", "lr": args.lr, "weight_decay": args.weight_decay, "epochs": args.epochs,
        "warmup_epochs": min(1, args.epochs - 1), "scheduler": "cosine",
    }  # fmt: skip
    opt = build_optimizer(model.parameters(), cfg)
    sched = build_scheduler(opt, cfg)
    g_shuffle = torch.Generator().manual_seed(seed)
    g_aug = torch.Generator(device=device).manual_seed(seed)
    images_seen, t_train = 0, 0.0
    for _ in range(args.epochs):
        r = train_one_epoch(
            model, _batches(x, y, args.batch_size, g_shuffle), opt, device=device, amp_dtype=amp_dtype,
            augment={"rot90": True, "flip": True}, generator=g_aug,
        )  # fmt: skip
        sched.step()
        images_seen += int(r["images"])
        t_train += r["seconds"]
    return model, {
        "params": count_parameters(model),
        "train_s": t_train,
        "train_img_s": images_seen / t_train,
    }


def _summary(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def plot(result: dict[str, Any], path: Path) -> None:
    """AUC against Sigma_sub (one line per model, profile and training-set size), AUC against the
    training-set size (one line per model and scale), and axion/no_sub AUC per log10 m bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    base = result["config"]["sigma_sub_default_mean"]
    pts_all = list(result["points"].values())
    sizes = sorted({p["n_train"] for p in pts_all})
    by_scale: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    by_size: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for pt in pts_all:
        by_scale.setdefault((pt["model"], pt["profile"], pt["n_train"]), []).append(pt)
        by_size.setdefault((pt["model"], pt["profile"], pt["scale"]), []).append(pt)
    observer_drawn = set()
    for (model, profile, n_train), pts in sorted(by_scale.items()):
        pts = sorted(pts, key=lambda p: p["scale"])
        xs = [base * p["scale"] for p in pts]
        style = "-o" if profile == "tnfw" else "--s"
        for k, what in ((k, AUC_LABELS[k]) for k in AUC_KEYS.values() if k in pts[0]):
            m = [p[k]["mean"] for p in pts]
            s = [p[k]["std"] for p in pts]
            axes[0].errorbar(
                xs, m, yerr=s, fmt=style, capsize=3, label=f"{model} {profile} n={n_train:.0e}: {what}"
            )
        if pts[0].get("ring_observer", {}).get("cdm_vs_no_sub") and profile not in observer_drawn:
            observer_drawn.add(profile)
            m = [p["ring_observer"]["cdm_vs_no_sub"]["auc_ring_radius"]["mean"] for p in pts]
            axes[0].plot(xs, m, ":x", color="grey", label=f"ring-size observer, {profile}: cdm/no_sub")
    for (model, profile, scale), pts in sorted(by_size.items()):
        if len(pts) < 2:
            continue
        pts = sorted(pts, key=lambda p: p["n_train"])
        k = "auc_cdm" if "auc_cdm" in pts[0] else "auc_cdm_vs_smooth"
        axes[1].errorbar(
            [p["n_train"] for p in pts], [p[k]["mean"] for p in pts], yerr=[p[k]["std"] for p in pts],
            fmt="-o", capsize=3, label=f"{model} {profile} x{scale:g}: {AUC_LABELS[k]}",
        )  # fmt: skip
    for key, (cls, _, _) in MASS_BIN_KEYS.items():
        wave = [p for p in pts_all if p.get(key)]
        if not wave:
            continue
        centres = result["config"][f"{cls}_bin_centres"]
        mid_scale = min(wave, key=lambda p: abs(math.log(p["scale"])))["scale"]  # the scale nearest 1
        for pt in sorted(wave, key=lambda p: (p["model"], p["n_train"])):
            if pt["scale"] != mid_scale:
                continue
            axes[2].errorbar(
                centres, [b["mean"] for b in pt[key]], yerr=[b["std"] for b in pt[key]],
                fmt="-o" if cls == "axion" else "--s", capsize=3,
                label=f"{cls}: {pt['model']} {pt['profile']} n={pt['n_train']:.0e} (x{pt['scale']:g})",
            )  # fmt: skip
    axes[0].set_xscale("log")
    axes[0].set_xlabel(r"mean $\Sigma_{\rm sub}$ [kpc$^{-2}$] (prior x scale)")
    axes[0].set_title(
        f"{result['config']['preset']}, {result['config']['mass_compensation']}: mean +- std over seeds"
    )
    axes[1].set_xscale("log")
    axes[1].set_xlabel(f"training images (all classes; sizes {', '.join(f'{n:.0e}' for n in sizes)})")
    axes[2].set_xlabel(r"log$_{10}$ m [eV] (axion: the vortex's m$_{\rm axion}$; fdm: the particle mass)")
    axes[2].set_ylabel("axion or fdm vs no_sub test AUC")
    for ax in axes:
        ax.axhline(0.5, color="grey", lw=0.8)
        if ax is not axes[2]:
            ax.set_ylabel("test AUC")
        if ax.get_legend_handles_labels()[0]:  # a panel without data stays empty
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_mlflow(result: dict[str, Any], png: Path, out: Path, tracking_uri: str | None) -> str | None:
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError:
        return None
    from deeplense_ray.tracking import get_or_create_experiment, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, base_dir=out.parent)
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(get_or_create_experiment("detectability", uri), run_name=out.stem)
    rid = run.info.run_id
    for k, v in result["config"].items():
        client.log_param(rid, k, json.dumps(v) if not isinstance(v, str) else v)
    for key, pt in result["points"].items():
        for k in (k for k in AUC_KEYS.values() if k in pt):
            client.log_metric(rid, f"{k}_mean.{key}", pt[k]["mean"])
            client.log_metric(rid, f"{k}_std.{key}", pt[k]["std"])
    client.log_artifact(rid, str(png))
    client.log_artifact(rid, str(out))
    client.set_terminated(rid)
    return uri


#: config entries that must agree for --extend to add to a result (the grid axes may differ)
EXTEND_MUST_MATCH = (
    "preset",
    "test_per_class",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "precision",
    "class_names",
    "mass_compensation",
    "num_pix",
    "supersampling",
    "axion_bins",
    "quick",
    "delta_los",
)


def load_extend(path: Path, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-seed runs of an earlier result with the same settings, keyed as this run keys them."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--extend {path}: cannot read a result JSON ({e})") from None
    diff = [k for k in EXTEND_MUST_MATCH if old.get("config", {}).get(k) != config[k]]
    if diff:
        raise SystemExit(f"--extend {path}: settings differ in {', '.join(diff)}")
    raw = {}
    for key, pt in old.get("points", {}).items():
        fields = ("model", "profile", "scale", "train_per_class", "n_train")
        raw[key] = {**{k: pt[k] for k in fields}, "runs": list(pt["runs"])}
    return raw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="cdm / axion detectability against Sigma_sub (one GPU)")
    ap.add_argument("--preset", default="model_ii")
    ap.add_argument(
        "--classes", type=lambda v: v.split(","), default=None,
        help="comma-separated classes (default: the preset's), e.g. no_sub,cdm,cdm_smooth",
    )  # fmt: skip
    ap.add_argument("--compensation", choices=list(MASS_COMPENSATIONS), default=None,
                    help="mass_compensation of the preset (default: the preset's)")  # fmt: skip
    ap.add_argument("--no-observer", action="store_true", help="skip the ring-size observer")
    ap.add_argument(
        "--preset-override", action="append", default=[], metavar="KEY=VALUE",
        help="preset field, e.g. delta_los=[0,2] (line-of-sight halos on); repeatable",
    )  # fmt: skip
    ap.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4, 8])
    ap.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=PROFILES)
    ap.add_argument("--models", nargs="+", default=["ResNet18", "ViT"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--train-per-class",
        type=int,
        nargs="+",
        default=None,
        help="training images per class (default 6144, --quick 48); several: the training-set-size axis",
    )
    ap.add_argument(
        "--extend",
        type=Path,
        default=None,
        help="a result JSON of the same settings: its points are kept and not recomputed",
    )
    ap.add_argument("--test-per-class", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--axion-bins", type=int, default=4, help="equal log10 m_axion bins over the prior")
    ap.add_argument("--fdm-bins", type=int, default=5, help="equal log10 m bins of the fdm class's prior")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; stop starting new points after")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke test")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--no-mlflow", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("runs/detectability.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.scales, args.seeds = args.scales[:2] if len(args.scales) > 2 else args.scales, min(args.seeds, 2)
        args.test_per_class, args.epochs, args.batch_size = 32, 1, 32
        args.axion_bins = args.fdm_bins = 2
    args.train_per_class = args.train_per_class or ([48] if args.quick else [6144])
    if args.seeds < 1 or args.epochs < 1 or min(args.train_per_class) < 1 or args.test_per_class < 2:
        raise SystemExit(f"bad sizes: seeds={args.seeds} epochs={args.epochs} train/test per class "
                         f"{args.train_per_class}/{args.test_per_class}")  # fmt: skip
    if any(not (s > 0 and math.isfinite(s)) for s in args.scales):
        raise SystemExit(f"--scales must be positive numbers, got {args.scales}")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = autocast_dtype(args.precision, dev)
    # --quick: 32x32 without supersampling, so the CPU smoke test takes about a minute
    over0: dict[str, Any] = {"num_pix": 32, "supersampling": 1} if args.quick else {}
    if args.classes:
        over0["class_names"] = args.classes
    if args.compensation:
        over0["mass_compensation"] = args.compensation
    try:
        over0.update(parse_overrides(args.preset_override, "--preset-override"))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        base = resolve_preset(args.preset, over0)
    except (KeyError, ValueError) as exc:
        raise SystemExit(f"error: preset {args.preset!r}: {exc}") from None
    if (
        base.sigma_sub is None
        or "no_sub" not in base.class_names
        or not {"cdm", "cdm_smooth"} & set(base.class_names)
    ):
        raise SystemExit(f"preset {args.preset!r} needs sigma_sub, no_sub and cdm or cdm_smooth")
    observer_classes = [c for c in base.class_names if c in ("no_sub", "cdm", "cdm_smooth", "fdm")]
    lo_ax, hi_ax = base.axion_log10_mass
    bins = np.linspace(lo_ax, hi_ax, args.axion_bins + 1)
    bins[-1] += 1e-9
    fdm_bins = np.linspace(*base.fdm_log10_mass, args.fdm_bins + 1)
    fdm_bins[-1] += 1e-9
    mass_bins = {"auc_axion_bins": bins, "auc_fdm_bins": fdm_bins}
    args.pixel_scale = base.delta_pix
    config = {
        "preset": args.preset, "scales": args.scales, "profiles": args.profiles, "models": args.models,
        "seeds": args.seeds, "train_per_class": args.train_per_class, "test_per_class": args.test_per_class,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay,
        "precision": args.precision, "normalize": "per_image_standard", "augment": "rot90+flip",
        "sigma_sub_default": list(base.sigma_sub), "sigma_sub_default_mean": float(np.mean(base.sigma_sub)),
        "subhalo_mass": list(base.subhalo_mass), "axion_bins": bins.tolist(),
        "axion_bin_centres": (0.5 * (bins[1:] + bins[:-1])).tolist(), "quick": args.quick,
        "fdm_bins": fdm_bins.tolist(), "fdm_bin_centres": (0.5 * (fdm_bins[1:] + fdm_bins[:-1])).tolist(),
        "num_pix": base.num_pix, "supersampling": base.supersampling,
        "class_names": list(base.class_names), "mass_compensation": base.mass_compensation,
        "observer": not args.no_observer, "preset_override": args.preset_override,
        "delta_los": list(base.delta_los) if base.delta_los else None,
    }  # fmt: skip
    print(f"device={dev} torch={torch.__version__} config={json.dumps(config)}", flush=True)
    t_start = time.perf_counter()
    raw: dict[str, dict[str, Any]] = load_extend(args.extend, config) if args.extend else {}
    skipped: list[str] = []
    sim_s = 0.0

    def summarise() -> dict[str, Any]:
        """The result so far (rewritten after every point, so a run cut short keeps what finished)."""
        points = {}
        for key, r in raw.items():
            runs = r["runs"]
            pt = {k: r[k] for k in ("model", "profile", "scale", "train_per_class", "n_train")}
            pt["sigma_sub_mean"] = config["sigma_sub_default_mean"] * r["scale"]
            for m in (*AUC_KEYS.values(), *POINT_METRICS):
                if m in runs[0]:
                    pt[m] = _summary([x[m] for x in runs])
            if runs[0].get("ring_observer"):
                pt["ring_observer"] = {
                    pair: {k: _summary([x["ring_observer"][pair][k] for x in runs]) for k in v}
                    for pair, v in runs[0]["ring_observer"].items()
                    if pair != "mean_theta_E_compensation"
                }
            for mk in (k for k in MASS_BIN_KEYS if k in runs[0]):
                pt[mk] = [_summary([x[mk][b] for x in runs]) for b in range(len(mass_bins[mk]) - 1)]
            pt["runs"] = runs
            points[key] = pt
        wall = time.perf_counter() - t_start
        result = {
            "config": config,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "host": {"hostname": platform.node(), "time": time.strftime("%Y-%m-%d %H:%M")},
            "wall_s": wall,
            "simulate_s": sim_s,
            "skipped": skipped,
            "points": points,
        }
        return result

    def done(key: str, seed: int) -> bool:
        return any(r["seed"] == seed for r in raw.get(key, {}).get("runs", ()))

    for profile in args.profiles:
        p_i = PROFILES.index(profile)
        for scale in args.scales:
            s_id = int(round(scale * 1e6))  # data seeds follow the values, not their place in the lists
            over = {
                "sigma_sub": [base.sigma_sub[0] * scale, base.sigma_sub[1] * scale],
                "subhalo_profile": profile,
            }
            pre = resolve_preset(base, over)
            for seed in range(args.seeds):
                todo = [
                    (n_pc, name, f"{name}/{profile}/x{scale:g}/n{pre.num_classes * n_pc}")
                    for n_pc in args.train_per_class
                    for name in args.models
                ]
                todo = [t for t in todo if not done(t[2], seed)]
                if not todo:
                    continue
                if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                    skipped.extend(f"{key}/seed{seed}" for *_, key in todo)
                    continue
                t0 = time.perf_counter()
                xte, yte, pte = make_data(pre, args.test_per_class, derive_seed(seed, p_i, s_id, 1), dev)
                sim_s += time.perf_counter() - t0
                obs = None
                if not args.no_observer:
                    obs = ring_size_aucs(
                        pre, args.test_per_class, derive_seed(seed, p_i, s_id, 2), classes=observer_classes,
                        device=dev,
                    )  # fmt: skip
                    print(f"{profile}/x{scale:g} seed {seed}: ring-size observer {json.dumps(obs)}")
                for n_pc in dict.fromkeys(t[0] for t in todo):
                    if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                        skipped.extend(f"{key}/seed{seed}" for n, _, key in todo if n == n_pc)
                        continue
                    t0 = time.perf_counter()
                    xtr, ytr, _ = make_data(pre, n_pc, derive_seed(seed, p_i, s_id, n_pc, 0), dev)
                    sim_s += time.perf_counter() - t0
                    for _, name, key in (t for t in todo if t[0] == n_pc):
                        model, info = train_model(
                            name, xtr, ytr, args=args, seed=derive_seed(seed, 7), device=dev, amp_dtype=amp,
                            num_classes=pre.num_classes, image_size=pre.num_pix,
                        )  # fmt: skip
                        ev = evaluate(
                            model, xte, yte, pte, pre.class_names, device=dev, amp_dtype=amp,
                            batch_size=4 * args.batch_size, mass_bins=mass_bins,
                        )  # fmt: skip
                        raw.setdefault(key, {"model": name, "profile": profile, "scale": scale,
                                             "train_per_class": n_pc, "n_train": pre.num_classes * n_pc,
                                             "runs": []})  # fmt: skip
                        raw[key]["runs"].append({"seed": seed, **ev, **info, "ring_observer": obs})
                        aucs = "  ".join(f"{k} {ev[k]:.3f}" for k in AUC_KEYS.values() if k in ev)
                        print(
                            f"{key:<34} seed {seed}: {aucs}  acc {ev['accuracy']:.3f}  "
                            f"<N_sub> {ev['mean_subhalo_count_cdm']:.0f}  "
                            f"f_sub {ev.get('mean_fsub_arc_cdm', 0):.4f}  "
                            f"train {info['train_s']:.1f} s  [{time.perf_counter() - t_start:.0f} s]",
                            flush=True,
                        )
                        del model
                        args.out.parent.mkdir(parents=True, exist_ok=True)
                        atomic_write_text(args.out, json.dumps(summarise(), indent=2), fsync=False)
                    del xtr, ytr
                del xte, yte
    result = summarise()
    points, wall = result["points"], result["wall_s"]
    cols = ["auc_cdm", "auc_cdm_smooth", "auc_cdm_vs_smooth", "auc_axion", "auc_fdm"]
    head = "".join(f"{c:>19}" for c in cols)
    print(f"\n{'model/profile/scale/n_train':<34} {'Sigma_sub':>10}{head} {'ring obs':>9} {'<N_sub>':>8}")
    for key, pt in points.items():
        vals = "".join(f"{pt.get(c, NAN)['mean']:>10.3f} +- {pt.get(c, NAN)['std']:.3f}" for c in cols)
        ring = pt.get("ring_observer", {}).get("cdm_vs_no_sub", {}).get("auc_ring_radius", NAN)["mean"]
        n_sub = pt["mean_subhalo_count_cdm"]["mean"]
        print(f"{key:<34} {pt['sigma_sub_mean']:>10.2e}{vals} {ring:>9.3f} {n_sub:>8.0f}")
    print(f"wall {wall:.0f} s (simulation {sim_s:.0f} s); skipped {len(skipped)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(result, png)
    atomic_write_text(args.out, json.dumps(result, indent=2), fsync=False)
    print(f"wrote {args.out} and {png}")
    if not args.no_mlflow:
        uri = log_mlflow(result, png, args.out, args.tracking_uri)
        print(f"MLflow: {uri}" if uri else "MLflow not importable: not logged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
