"""Train the published CvT configuration and ResNet18 on the as-published DeepLense presets; compare with the
published numbers (CvT accuracy 91.54 / 99.41 / 99.04 % on Model I / II / III).

For each preset the data are simulated on the device, in memory (``simulate(..., device_output=True)``: no
disk, no Ray), train and test from independent seeds, balanced classes. Each model is trained as DeepLense
published it (PHYSICS.md "Published results"): images resized (bilinear) to ``--image-size`` (224), batch
128, AdamW lr 1e-3, weight decay 0.01, 3 linear warm-up epochs, then step LR (gamma 0.5 every 20 epochs),
per-image min-max normalisation (the module normalises raw images), bf16 autocast on CUDA, no augmentation.
The published CvT is the two-stage configuration of DeepLense's cvt_config.py: stage 1 emb 64, conv kernel 7
stride 4, kv-proj stride 2, 2 heads, depth 2, mlp x4; stage 2 emb 128, kernel 3 stride 2, 3 heads, depth 2,
mlp x4; head MLP 256; dropout 0.1. vit-pytorch's CvT (the registry's) has three fixed stages, so this one is
assembled here from vit-pytorch's CvT blocks; ResNet18 comes from the registry. The training step and the
evaluation are the project's (``train_one_epoch``, ``predict_batches``, ``classification_metrics``).

Prints a table (test accuracy, per-class one-vs-rest AUC, next to the published numbers) and writes JSON
(rewritten after every run, so a run cut short keeps what finished). Examples:

    python benchmarks/reproduce_published.py --quick --out /tmp/rp.json        # CPU smoke test (~1 min)
    python benchmarks/reproduce_published.py --out benchmarks/results/reproduce_published_h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplense_ray.io import atomic_write_text  # noqa: E402
from deeplense_ray.models import build_model, count_parameters  # noqa: E402
from deeplense_ray.models._vitlib import import_vit_module  # noqa: E402
from deeplense_ray.sim import simulate  # noqa: E402
from deeplense_ray.train.loop import (  # noqa: E402
    autocast_dtype,
    build_optimizer,
    build_scheduler,
    predict_batches,
    probabilities,
    recalibrate_batch_norm,
    seed_everything,
    train_one_epoch,
)
from deeplense_ray.train.metrics import classification_metrics  # noqa: E402
from deeplense_ray.train.modules import NormalizedClassifier  # noqa: E402

PRESETS = ("deeplense_model_i", "deeplense_model_ii", "deeplense_model_iii")
MODELS = ("CvT", "ResNet18")
#: published test results on the published sets (CvT; PHYSICS.md): accuracy and AUC of no_sub
PUBLISHED = {
    ("CvT", "deeplense_model_i"): {"accuracy": 0.9154, "auc_no_sub": 0.9991},
    ("CvT", "deeplense_model_ii"): {"accuracy": 0.9941, "auc_no_sub": 1.0},
    ("CvT", "deeplense_model_iii"): {"accuracy": 0.9904, "auc_no_sub": 1.0},
}
#: the published training configuration
RECIPE = {
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.01,
    "warmup_epochs": 3,
    "scheduler": "step",
    "step_size": 20,
    "step_gamma": 0.5,
    "batch_size": 128,
    "normalize": "per_image_minmax",
}
#: published CvT (DeepLense config/cvt_config.py): per-stage (emb, kernel, stride, heads, depth), mlp x4
CVT_STAGES = ((64, 7, 4, 2, 2), (128, 3, 2, 3, 2))
CVT_HEAD_MLP, CVT_DROPOUT = 256, 0.1


class PublishedCvT(nn.Module):
    """The two-stage CvT of the published DeepLense results, from vit-pytorch's CvT blocks (conv token
    embedding + LayerNorm + convolutional-projection transformer per stage), mean-pooled, MLP head."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        stages=CVT_STAGES,
        head_mlp=CVT_HEAD_MLP,
        dropout=CVT_DROPOUT,
    ) -> None:
        super().__init__()
        cvt = import_vit_module("cvt")
        layers, dim = [], in_channels
        for emb, kernel, stride, heads, depth in stages:
            layers += [
                nn.Conv2d(dim, emb, kernel_size=kernel, padding=kernel // 2, stride=stride),
                cvt.LayerNorm(emb),
                cvt.Transformer(
                    dim=emb,
                    proj_kernel=3,
                    kv_proj_stride=2,
                    depth=depth,
                    heads=heads,
                    mlp_mult=4,
                    dropout=dropout,
                ),
            ]
            dim = emb
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(dim, head_mlp),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(head_mlp, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


def build_net(name: str, image_size: int, num_classes: int, quick: bool) -> nn.Module:
    if name == "CvT":
        return PublishedCvT(in_channels=1, num_classes=num_classes)
    return build_model(name, image_size, 1, num_classes, **({"width": 8} if quick else {}))


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    size: int,
    generator: torch.Generator | None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Mini-batches {"image": [B, 1, size, size] (bilinear resize), "label"} from device tensors; shuffled
    with ``generator`` (None: in order)."""
    n = labels.numel()
    order = (
        torch.randperm(n, generator=generator, device=generator.device).to(labels.device)
        if generator is not None
        else torch.arange(n, device=labels.device)
    )
    for s in range(0, n, batch_size):
        idx = order[s : s + batch_size]
        x = images.index_select(0, idx)
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        yield {"image": x, "label": labels.index_select(0, idx)}


def simulate_split(preset: str, per_class: int, seed: int, device: torch.device, overrides: dict | None):
    t0 = time.perf_counter()
    res = simulate(preset, 3 * per_class, seed=seed, device=device, device_output=True, overrides=overrides)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return res.images, res.labels.to(device), res.class_names, time.perf_counter() - t0


def run_one(
    model_name: str, preset: str, data: dict[str, Any], args: argparse.Namespace, device: torch.device
):
    seed_everything(args.seed)
    net = build_net(model_name, args.image_size, len(data["class_names"]), args.quick)
    model = NormalizedClassifier(net=net, normalize=RECIPE["normalize"], class_names=data["class_names"]).to(
        device
    )
    cfg = {**RECIPE, "epochs": args.epochs, "momentum": 0.9}
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    amp = autocast_dtype("bf16", device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    history, t_train = [], 0.0
    for epoch in range(args.epochs):
        stats = train_one_epoch(
            model,
            batches(
                data["train_x"],
                data["train_y"],
                batch_size=RECIPE["batch_size"],
                size=args.image_size,
                generator=gen,
            ),
            optimizer,
            device=device,
            amp_dtype=amp,
        )
        scheduler.step()
        t_train += stats["seconds"]
        history.append(
            {
                "epoch": epoch,
                "loss": stats["loss_sum"] / stats["images"],
                "acc": stats["correct"] / stats["images"],
                "images_per_s": stats["images"] / stats["seconds"],
                "lr": optimizer.param_groups[0]["lr"],
            }
        )
        print(
            f"  {model_name} {preset} epoch {epoch}: loss {history[-1]['loss']:.4f} "
            f"train acc {history[-1]['acc']:.4f} {history[-1]['images_per_s']:.0f} img/s",
            flush=True,
        )
    t0 = time.perf_counter()

    def test():
        return batches(data["test_x"], data["test_y"], batch_size=512, size=args.image_size, generator=None)

    logits, y = predict_batches(model, test(), device=device, amp_dtype=amp)
    stale = classification_metrics(y, probabilities(logits), data["class_names"])
    train_images = batches(
        data["train_x"], data["train_y"], batch_size=512, size=args.image_size, generator=None
    )
    n_bn = recalibrate_batch_norm(  # over the whole training set: see its docstring for why
        model,
        (b["image"] for b in train_images),
        device=device,
        amp_dtype=amp,
    )
    logits, y = predict_batches(
        model,
        test(),
        device=device,
        amp_dtype=amp,
    )
    metrics = classification_metrics(y, probabilities(logits), data["class_names"])
    return {
        "model": model_name,
        "preset": preset,
        "parameters": count_parameters(model),
        "test_accuracy": metrics["accuracy"],
        "test_auc": metrics["auc"],
        "test_auc_macro": metrics["auc_macro"],
        "confusion_matrix": metrics["confusion_matrix"],
        "published": PUBLISHED.get((model_name, preset)),
        "batch_norm_recalibrated": n_bn,
        "test_accuracy_running_bn_stats": stale["accuracy"],
        "train_seconds": t_train,
        "eval_seconds": time.perf_counter() - t0,
        "history": history,
    }


def write_json(obj: Any, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1), fsync=False)


def table(runs: list[dict[str, Any]]) -> str:
    head = "| model | preset | test acc | publ. acc | AUC no_sub | axion | cdm | publ. AUC no_sub | train s |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        pub = r["published"] or {}
        a = r["test_auc"]
        fmt = lambda v, p=4: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        pub_acc = "-" if "accuracy" not in pub else f"{100 * pub['accuracy']:.2f} %"
        lines.append(
            f"| {r['model']} | {r['preset']} | {100 * r['test_accuracy']:.2f} % | "
            f"{pub_acc} | {fmt(a.get('no_sub'))} | {fmt(a.get('axion'))} | {fmt(a.get('cdm'))} | "
            f"{fmt(pub.get('auc_no_sub'))} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated as-published presets")
    ap.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated: CvT (published config), ResNet18"
    )
    ap.add_argument(
        "--train-per-class", type=int, default=None, help="training images per class (default 4000)"
    )
    ap.add_argument("--test-per-class", type=int, default=None, help="test images per class (default 2000)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs incl. the 3 warm-up epochs (default 10)")
    ap.add_argument(
        "--image-size", type=int, default=None, help="resize side [px] (default 224, as published)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quick", action="store_true", help="tiny CPU smoke test: 24/12 per class, 2 epochs, 48 px"
    )
    ap.add_argument("--out", default="benchmarks/results/reproduce_published.json")
    args = ap.parse_args(argv)
    quick = {"train_per_class": 24, "test_per_class": 12, "epochs": 2, "image_size": 48}
    full = {"train_per_class": 6000, "test_per_class": 2000, "epochs": 10, "image_size": 224}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("train_per_class", "test_per_class", "epochs", "image_size"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    args.presets = [p for p in args.presets.split(",") if p]
    args.models = [m for m in args.models.split(",") if m]
    bad = [p for p in args.presets if p not in PRESETS] + [m for m in args.models if m not in MODELS]
    if bad:
        ap.error(f"unknown preset(s)/model(s) {bad}; presets: {list(PRESETS)}, models: {list(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # --quick on CPU: the physics as published but a 48 px Model I grid, so the smoke test stays small
    overrides = {"deeplense_model_i": {"num_pix": 48}} if args.quick else {}
    out = {
        "benchmark": "reproduce_published",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "torch": torch.__version__,
        "recipe": RECIPE,
        "sizes": {
            "train_per_class": args.train_per_class,
            "test_per_class": args.test_per_class,
            "epochs": args.epochs,
            "image_size": args.image_size,
            "seed": args.seed,
            "quick": args.quick,
        },
        "simulation": {},
        "runs": [],
    }
    t_all = time.perf_counter()
    for preset in args.presets:
        train_x, train_y, names, t_tr = simulate_split(
            preset, args.train_per_class, args.seed, device, overrides.get(preset)
        )
        test_x, test_y, _, t_te = simulate_split(
            preset, args.test_per_class, args.seed + 1_000_003, device, overrides.get(preset)
        )
        out["simulation"][preset] = {
            "train_seconds": t_tr,
            "test_seconds": t_te,
            "shape": list(train_x.shape[1:]),
        }
        print(
            f"{preset}: simulated {train_x.shape[0]} + {test_x.shape[0]} images in {t_tr + t_te:.1f} s",
            flush=True,
        )
        data = {
            "train_x": train_x,
            "train_y": train_y,
            "test_x": test_x,
            "test_y": test_y,
            "class_names": names,
        }
        for model_name in args.models:
            out["runs"].append(run_one(model_name, preset, data, args, device))
            out["wall_seconds"] = time.perf_counter() - t_all
            write_json(out, Path(args.out))
        del data, train_x, test_x
    print(table(out["runs"]))
    print(f"wall {time.perf_counter() - t_all:.0f} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
