"""Train the published CvT configuration (and optionally ResNet18) on the as-published DeepLense presets at
the published size; compare with the published numbers (CvT accuracy 91.54 / 99.41 / 99.04 % on Model I /
II / III).

Where the recipe comes from: github.com/ML4SCI/DeepLense,
Transformers_Classification_DeepLense_Kartik_Sachdev/ (commit a0a90ad, 2022-07-30, "added various
Transformers' code and results"):

- The epoch counts are 7 for Model I and 10 for Model II and III. They come from the published runs' own
  logs, results/1_CvT/Model_I/log_2022-06-25-00-58-24.txt, Model_II/log_2022-06-25-20-46-03.txt and
  Model_III/log_2022-06-25-23-35-16.txt. Their last epoch's val_acc is the published accuracy (0.9154,
  0.9941, 0.9904). config/cvt_config.py (num_epochs 15) came later (2022-10-01) and was not what those
  runs used.
- The learning rate is AdamW lr 1e-3, weight decay 0.01, batch 128. main.py builds
  ``transformers.get_cosine_schedule_with_warmup`` stepped every batch: a linear warm-up from 0 over
  3 epochs, then a cosine to 0 at the last step. The logged LR columns match it: Model I 3.3e-4, 6.7e-4,
  1e-3, 8.5e-4, 5e-4, 1.5e-4, 0; Model II/III 9.5e-4 at epoch 4. The ``step_lr`` block of cvt_config.py
  is never read by main.py.
- Inputs are per-image min-max normalised (utils/dataset.py) and resized to 224 (bilinear). Training
  flips left-right and up-down, each with p = 0.25 (albumentations ``transform_effective`` in
  utils/augmentation.py). There is no other augmentation.
- The network is the two-stage CvT of config/cvt_config.py (it did not change): stage 1 emb 64, conv kernel
  7 stride 4, kv-proj stride 2, 2 heads, depth 2, mlp x4. Stage 2 emb 128, kernel 3 stride 2, 3 heads,
  depth 2, mlp x4. Head MLP 256, dropout 0.1. vit-pytorch's CvT (the registry's) has three fixed stages,
  so this one is assembled here from vit-pytorch's CvT blocks. ResNet18 comes from the registry.

Differences, on purpose: bf16 autocast (DeepLense trained in fp32). The test set is 5,000 independent images
per class. DeepLense's main.py instead validated on a random 25 % of the 30,000-per-class training folder
(so it trained on 22,500 per class); ``--train-per-class 22500 --test-per-class 7500`` mimics that split's
sizes. The data are simulated on the device, in memory (``simulate(..., device_output=True)``: no disk,
no Ray), from one data seed per preset (train and test from independent seeds, balanced classes).
``--seeds`` repeats the training with different model and shuffling seeds on the same data. The training
step and the evaluation are the project's (``train_one_epoch``, ``predict_batches``,
``classification_metrics``).

Time: one seed trains epochs x 3 x train-per-class images: 630k (Model I) or 900k (Model II/III) at the
published size. That is 360 / 515 s at the 1.75k img/s the einsum CvT reached on an H200, and 120 / 171 s
at 3x that. ``--time-budget`` (seconds per preset, simulation included) starts a further seed only when
the previous seed's measured time says it will finish within the budget. A skipped seed is recorded as
such; epochs are never cut. A run longer than one call may take (a machine's time limit) is trained in
several calls: ``--state-dir DIR --stop-after SECONDS`` keeps each run's full training state (weights,
optimizer, schedule, random streams, history) in DIR after every epoch and pauses the run after the epoch
past which the next would end later than SECONDS of training; the same command run again continues it, to
the same weights as one uninterrupted call (tests/test_reproduce_published.py). A paused run refuses other
settings; continued on another kind of GPU, its data are re-simulated there (a note says so).

Prints a table (test accuracy per seed, mean over seeds, per-class one-vs-rest AUC, next to the published
numbers) and writes JSON (rewritten after every run, so a run cut short keeps what finished). Examples:

    python benchmarks/reproduce_published.py --quick --out /tmp/rp.json        # CPU smoke test (~1 min)
    python benchmarks/reproduce_published.py --presets deeplense_model_ii --seeds 0,1,2 --time-budget 560 \
        --out benchmarks/results/reproduce_published_full_model_ii_h200.json
    python benchmarks/reproduce_published.py --presets deeplense_model_ii --state-dir state --stop-after 480
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplense_ray.io import atomic_path, atomic_write_text  # noqa: E402
from deeplense_ray.models import build_model, count_parameters  # noqa: E402
from deeplense_ray.models._vitlib import import_vit_module  # noqa: E402
from deeplense_ray.models.attention import IMPLEMENTATIONS, set_attention  # noqa: E402
from deeplense_ray.sim import simulate  # noqa: E402
from deeplense_ray.train.batchnorm import recalibrate_batch_norm  # noqa: E402
from deeplense_ray.train.metrics import classification_metrics  # noqa: E402
from deeplense_ray.train.modules import NormalizedClassifier  # noqa: E402
from deeplense_ray.train.optim import autocast_dtype, build_optimizer  # noqa: E402
from deeplense_ray.train.seeding import seed_everything  # noqa: E402
from deeplense_ray.train.steps import predict_batches, probabilities, train_one_epoch  # noqa: E402

PRESETS = ("deeplense_model_i", "deeplense_model_ii", "deeplense_model_iii")
MODELS = ("CvT", "ResNet18")
#: published epochs per preset (the published runs' logs; see the module docstring)
PUBLISHED_EPOCHS = {"deeplense_model_i": 7, "deeplense_model_ii": 10, "deeplense_model_iii": 10}
#: published test results on the published sets (CvT; PHYSICS.md): accuracy and AUC of no_sub
PUBLISHED = {
    ("CvT", "deeplense_model_i"): {"accuracy": 0.9154, "auc_no_sub": 0.9991},
    ("CvT", "deeplense_model_ii"): {"accuracy": 0.9941, "auc_no_sub": 1.0},
    ("CvT", "deeplense_model_iii"): {"accuracy": 0.9904, "auc_no_sub": 1.0},
}
#: the published training configuration (per-batch warm-up + cosine: see published_lr_factor)
RECIPE = {
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.01,
    "warmup_epochs": 3,
    "scheduler": "cosine per batch (transformers.get_cosine_schedule_with_warmup)",
    "batch_size": 128,
    "normalize": "per_image_minmax",
    "flip_p": 0.25,
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
    flip_p: float = 0.0,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Mini-batches {"image": [B, 1, size, size] (bilinear resize), "label"} from device tensors; shuffled
    with ``generator`` (None: in order). ``flip_p``: each image is mirrored left-right and, independently,
    up-down with this probability (draws from ``generator``). ``drop_last``: skip a last, smaller batch."""
    n = labels.numel()
    order = (
        torch.randperm(n, generator=generator, device=generator.device).to(labels.device)
        if generator is not None
        else torch.arange(n, device=labels.device)
    )
    stop = n - n % batch_size if drop_last else n
    for s in range(0, stop, batch_size):
        idx = order[s : s + batch_size]
        x = images.index_select(0, idx)
        if flip_p > 0 and generator is not None:
            u = torch.rand(2, idx.numel(), 1, 1, 1, generator=generator, device=generator.device).to(x.device)
            x = torch.where(u[0] < flip_p, x.flip(-1), x)
            x = torch.where(u[1] < flip_p, x.flip(-2), x)
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        yield {"image": x, "label": labels.index_select(0, idx)}


def published_lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """``transformers.get_cosine_schedule_with_warmup`` (0.5 cycles): ``step / warmup_steps`` during the
    warm-up, then ``0.5 (1 + cos(pi t))`` with t the fraction of the remaining steps done (0 at the end)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * t)))


def stepping(batches: Iterable[dict[str, torch.Tensor]], scheduler) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``batches`` and step the per-batch ``scheduler`` after each one's optimizer step (the next
    batch is asked for only after it)."""
    for b in batches:
        yield b
        scheduler.step()


def simulate_split(preset: str, per_class: int, seed: int, device: torch.device, overrides: dict | None):
    t0 = time.perf_counter()
    res = simulate(preset, 3 * per_class, seed=seed, device=device, device_output=True, overrides=overrides)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return res.images, res.labels.to(device), res.class_names, time.perf_counter() - t0


def run_state_file(args: argparse.Namespace, model_name: str, preset: str, seed: int) -> Path | None:
    """Where ``--state-dir`` keeps a run's training state between calls (None without it)."""
    if not args.state_dir:
        return None
    return Path(args.state_dir) / f"{model_name}_{preset}_s{seed}.pt"


def _run_settings(args: argparse.Namespace, epochs: int) -> dict[str, Any]:
    """What a paused run must be continued with: the same data and training settings."""
    keys = ("train_per_class", "test_per_class", "image_size", "data_seed", "precision", "augment", "compile")
    return {**{k: getattr(args, k) for k in keys}, "epochs": epochs}


def save_run_state(state_file, model, optimizer, scheduler, gen, device, history, t_train, settings) -> None:
    """The run after an epoch: weights, optimizer, schedule, every random stream it draws from, history
    (written under a temporary name, then renamed)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "gen": gen.get_state(),
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0),
        "history": json.dumps(history),
        "train_seconds": float(t_train),
        "settings": json.dumps(settings),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    with atomic_path(state_file) as tmp:
        torch.save(state, tmp)


def check_run_state(saved: dict, state_file: Path, args: argparse.Namespace, epochs: int, device) -> None:
    """A paused run continues only with the settings it started with (SystemExit naming the file and the
    differing settings); on another kind of device the data are re-simulated there, which a note says."""
    settings, now = json.loads(saved["settings"]), _run_settings(args, epochs)
    differ = {k: (settings.get(k), v) for k, v in now.items() if settings.get(k) != v}
    if differ:
        raise SystemExit(
            f"{state_file}: a paused run of other settings {differ} (saved, now); continue it with its own "
            "settings or remove the file to start over"
        )
    here = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if saved.get("device") != here:
        print(f"  note: {state_file} was written on {saved.get('device')}, continued on {here}", flush=True)


def restore_rng(saved: dict, gen: torch.Generator, device) -> None:
    gen.set_state(saved["gen"])
    torch.set_rng_state(saved["cpu_rng"])
    if device.type == "cuda" and saved["cuda_rng"].numel():
        torch.cuda.set_rng_state(saved["cuda_rng"], device)


def run_one(
    model_name: str,
    preset: str,
    data: dict[str, Any],
    args: argparse.Namespace,
    device: torch.device,
    *,
    seed: int,
    epochs: int,
):
    seed_everything(seed)
    net = build_net(model_name, args.image_size, len(data["class_names"]), args.quick)
    model = NormalizedClassifier(net=net, normalize=RECIPE["normalize"], class_names=data["class_names"]).to(
        device
    )
    optimizer = build_optimizer(model.parameters(), {**RECIPE, "momentum": 0.9})
    n_train, bs = int(data["train_y"].numel()), RECIPE["batch_size"]
    # --compile: whole batches only, so the graph is compiled once (a last, smaller batch would recompile)
    drop_last = args.compile and n_train >= bs
    per_epoch = n_train // bs if drop_last else -(-n_train // bs)
    warmup, total = RECIPE["warmup_epochs"] * per_epoch, epochs * per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: published_lr_factor(step, warmup_steps=warmup, total_steps=total)
    )
    step_model = torch.compile(model) if args.compile else model
    amp = autocast_dtype(args.precision, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    history, t_train, start = [], 0.0, 0
    state_file = run_state_file(args, model_name, preset, seed)
    if state_file is not None and state_file.is_file():
        saved = torch.load(state_file, map_location="cpu", weights_only=True)
        check_run_state(saved, state_file, args, epochs, device)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        restore_rng(saved, gen, device)
        history = list(json.loads(saved["history"]))
        t_train, start = float(saved["train_seconds"]), len(history)
        print(f"  {model_name} {preset} seed {seed}: continues after epoch {start}: {state_file}", flush=True)
    t_call = time.perf_counter()
    for epoch in range(start, epochs):
        train = batches(
            data["train_x"],
            data["train_y"],
            batch_size=bs,
            size=args.image_size,
            generator=gen,
            flip_p=RECIPE["flip_p"] if args.augment else 0.0,
            drop_last=drop_last,
        )
        stats = train_one_epoch(
            step_model, stepping(train, scheduler), optimizer, device=device, amp_dtype=amp
        )
        t_train += stats["seconds"]
        history.append(
            {
                "epoch": epoch,
                "loss": stats["loss_sum"] / stats["images"],
                "acc": stats["correct"] / stats["images"],
                "images_per_s": stats["images"] / stats["seconds"],
                "lr": optimizer.param_groups[0]["lr"],
                "first_step_s": stats["first_step_s"],
            }
        )
        print(
            f"  {model_name} {preset} seed {seed} epoch {epoch + 1}/{epochs}: lr {history[-1]['lr']:.2e} "
            f"loss {history[-1]['loss']:.4f} "
            f"train acc {history[-1]['acc']:.4f} {history[-1]['images_per_s']:.0f} img/s",
            flush=True,
        )
        if state_file is not None and epoch + 1 < epochs:
            settings = _run_settings(args, epochs)
            save_run_state(state_file, model, optimizer, scheduler, gen, device, history, t_train, settings)
            spent = time.perf_counter() - t_call
            if args.stop_after and spent + spent / (epoch + 1 - start) > args.stop_after:
                print(
                    f"  {model_name} {preset} seed {seed}: paused after epoch {epoch + 1}/{epochs} "
                    f"({spent:.0f} s this call); run the same command again to continue",
                    flush=True,
                )
                return {"model": model_name, "preset": preset, "seed": seed, "epochs": epochs,
                        "status": f"paused after epoch {epoch + 1}", "history": history,
                        "published": PUBLISHED.get((model_name, preset))}  # fmt: skip
    if state_file is not None:
        state_file.unlink(missing_ok=True)  # trained to the end: a rerun starts afresh
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
        "seed": seed,
        "epochs": epochs,
        "train_images": n_train,
        "test_images": int(data["test_y"].numel()),
        "parameters": count_parameters(model),
        "test_accuracy": metrics["accuracy"],
        "test_auc": metrics["auc"],
        "test_auc_macro": metrics["auc_macro"],
        "confusion_matrix": metrics["confusion_matrix"],
        "published": PUBLISHED.get((model_name, preset)),
        "published_epochs": PUBLISHED_EPOCHS[preset],
        "batch_norm_recalibrated": n_bn,
        "test_accuracy_running_bn_stats": stale["accuracy"],
        "train_seconds": t_train,
        "eval_seconds": time.perf_counter() - t0,
        "history": history,
    }


def write_json(obj: Any, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1), fsync=False)


def table(runs: list[dict[str, Any]]) -> str:
    """One row per run, then per (model, preset) the mean and sample std of the test accuracy over seeds."""
    head = (
        "| model | preset | seed | epochs | test acc | publ. acc | AUC no_sub | axion | cdm "
        "| publ. AUC no_sub | train s |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, p=4: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    done = [r for r in runs if "test_accuracy" in r]
    for r in runs:
        pub = r["published"] or {}
        pub_acc = "-" if "accuracy" not in pub else f"{100 * pub['accuracy']:.2f} %"
        if "test_accuracy" not in r:
            lines.append(f"| {r['model']} | {r['preset']} | {r['seed']} | {r['epochs']} | {r['status']} |")
            continue
        a = r["test_auc"]
        lines.append(
            f"| {r['model']} | {r['preset']} | {r['seed']} | {r['epochs']} | "
            f"{100 * r['test_accuracy']:.2f} % | {pub_acc} | {fmt(a.get('no_sub'))} | "
            f"{fmt(a.get('axion'))} | {fmt(a.get('cdm'))} | "
            f"{fmt(pub.get('auc_no_sub'))} | {r['train_seconds']:.0f} |"
        )
    for key in dict.fromkeys((r["model"], r["preset"]) for r in done):
        accs = [100 * r["test_accuracy"] for r in done if (r["model"], r["preset"]) == key]
        std = f" +- {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        lines.append(
            f"| {key[0]} | {key[1]} | mean of {len(accs)} | | {statistics.mean(accs):.2f}{std} % | |"
        )
    return "\n".join(lines)


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, preset): test accuracy of every finished seed, their mean and sample std, the published."""
    out = []
    for key in dict.fromkeys((r["model"], r["preset"]) for r in runs):
        rs = [r for r in runs if (r["model"], r["preset"]) == key and "test_accuracy" in r]
        accs = [r["test_accuracy"] for r in rs]
        out.append(
            {
                "model": key[0],
                "preset": key[1],
                "seeds": [r["seed"] for r in rs],
                "test_accuracy": accs,
                "test_accuracy_mean": statistics.mean(accs) if accs else None,
                "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else None,
                "published": PUBLISHED.get(key),
            }
        )
    return out


def _ints(text: str, flag: str, ap: argparse.ArgumentParser) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ap.error(f"{flag} must be comma-separated integers, got {text!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated as-published presets")
    ap.add_argument("--models", default="CvT", help="comma-separated: CvT (published config), ResNet18")
    ap.add_argument(
        "--train-per-class", type=int, default=None, help="training images per class (default 30000)"
    )
    ap.add_argument("--test-per-class", type=int, default=None, help="test images per class (default 5000)")
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs incl. the 3 warm-up epochs (default: as published, 7 for Model I, 10 for II and III)",
    )
    ap.add_argument(
        "--image-size", type=int, default=None, help="resize side [px] (default 224, as published)"
    )
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (model init, shuffling)")
    ap.add_argument("--data-seed", type=int, default=0, help="simulation seed (test: this + 1000003)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast on CUDA")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step's model")
    ap.add_argument(
        "--attention", choices=IMPLEMENTATIONS, default="sdpa", help="fused SDPA or the original einsum"
    )
    ap.add_argument(
        "--no-augment", dest="augment", action="store_false", help="no random flips (published: p 0.25)"
    )
    ap.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        help="seconds per preset (simulation included): a further seed starts only if the last one's time "
        "says it ends within it (0: no limit)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="tiny CPU smoke test: 24/12 per class, 2 epochs, 48 px"
    )
    ap.add_argument(
        "--state-dir",
        default=None,
        help="keep each run's training state here after every epoch; the same command run again continues "
        "a run from it (a run longer than one session's time limit, in several calls)",
    )
    ap.add_argument(
        "--stop-after",
        type=float,
        default=0.0,
        help="with --state-dir: pause a run after the epoch past which the next would end later than this "
        "many seconds of training in this call (0: no pause)",
    )
    ap.add_argument("--out", default="benchmarks/results/reproduce_published.json")
    args = ap.parse_args(argv)
    if args.stop_after and not args.state_dir:
        ap.error("--stop-after needs --state-dir (where the paused run's state is kept)")
    if args.stop_after < 0:
        ap.error(f"--stop-after must be >= 0, got {args.stop_after}")
    quick = {"train_per_class": 24, "test_per_class": 12, "epochs": 2, "image_size": 48}
    full = {"train_per_class": 30000, "test_per_class": 5000, "image_size": 224}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("train_per_class", "test_per_class", "epochs", "image_size"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    args.seeds = _ints(args.seeds, "--seeds", ap)
    if not args.seeds:
        ap.error("--seeds: give at least one seed")
    args.presets = [p for p in args.presets.split(",") if p]
    args.models = [m for m in args.models.split(",") if m]
    bad = [p for p in args.presets if p not in PRESETS] + [m for m in args.models if m not in MODELS]
    if bad:
        ap.error(f"unknown preset(s)/model(s) {bad}; presets: {list(PRESETS)}, models: {list(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_attention(args.attention)
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
        "argv": sys.argv[1:] if argv is None else argv,
        "recipe": RECIPE,
        "recipe_source": "github.com/ML4SCI/DeepLense Transformers_Classification_DeepLense_Kartik_Sachdev: "
        "results/1_CvT/Model_*/log_2022-06-25-*.txt (epochs, LR), main.py + utils/augmentation.py at a0a90ad",
        "sizes": {
            "train_per_class": args.train_per_class,
            "test_per_class": args.test_per_class,
            "epochs": args.epochs or dict(PUBLISHED_EPOCHS),
            "image_size": args.image_size,
            "seeds": args.seeds,
            "data_seed": args.data_seed,
            "precision": args.precision,
            "compile": args.compile,
            "attention": args.attention,
            "augment": args.augment,
            "time_budget_s": args.time_budget,
            "quick": args.quick,
        },
        "simulation": {},
        "runs": [],
    }
    t_all = time.perf_counter()
    paused = False  # a run paused (--stop-after): this call starts no further run
    for preset in args.presets:
        t_preset = time.perf_counter()
        epochs = args.epochs or PUBLISHED_EPOCHS[preset]
        train_x, train_y, names, t_tr = simulate_split(
            preset, args.train_per_class, args.data_seed, device, overrides.get(preset)
        )
        test_x, test_y, _, t_te = simulate_split(
            preset, args.test_per_class, args.data_seed + 1_000_003, device, overrides.get(preset)
        )
        out["simulation"][preset] = {
            "train_seconds": t_tr,
            "test_seconds": t_te,
            "shape": list(train_x.shape[1:]),
        }
        print(
            f"{preset}: simulated {train_x.shape[0]} + {test_x.shape[0]} images in {t_tr + t_te:.1f} s; "
            f"{epochs} epochs",
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
            last = 0.0  # seconds the previous seed of this model took (train + evaluation)
            for seed in args.seeds:
                used = time.perf_counter() - t_preset
                if paused:
                    run = {"model": model_name, "preset": preset, "seed": seed, "epochs": epochs}
                    run["status"] = "not started: an earlier run of this call paused"
                    run["published"] = PUBLISHED.get((model_name, preset))
                elif args.time_budget and last and used + last > args.time_budget:
                    run = {"model": model_name, "preset": preset, "seed": seed, "epochs": epochs}
                    run["status"] = f"skipped (time budget: {used:.0f} s used + {last:.0f} s per seed)"
                    run["published"] = PUBLISHED.get((model_name, preset))
                    print(f"  {model_name} {preset} seed {seed}: {run['status']}", flush=True)
                else:
                    t_run = time.perf_counter()
                    run = run_one(model_name, preset, data, args, device, seed=seed, epochs=epochs)
                    last = time.perf_counter() - t_run
                    run.setdefault("status", "ok")
                    paused = run["status"] != "ok"
                out["runs"].append(run)
                out["summary"] = summary(out["runs"])
                out["wall_seconds"] = time.perf_counter() - t_all
                write_json(out, Path(args.out))
        out["simulation"][preset]["preset_seconds"] = time.perf_counter() - t_preset
        write_json(out, Path(args.out))
        del data, train_x, test_x
    print(table(out["runs"]))
    print(f"wall {time.perf_counter() - t_all:.0f} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
