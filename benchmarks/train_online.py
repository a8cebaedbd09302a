"""Online simulation vs training from memory: throughput, and learning at equal steps.

1. Throughput: for each model x preset, images/s of the training step (the loop's ``train_one_epoch``: AdamW,
   bf16 autocast on CUDA, dihedral augmentation) fed three ways on one device:
   - ``memory``: images rendered once beforehand, batches cut from the in-memory tensor;
   - ``online``: ``train/online.py``'s stream as the Ray Train loop uses it (chunks rendered by ``simulate``
     on the device, the next chunk on a background thread / CUDA side stream);
   - ``online_serial``: the same stream rendered then trained chunk by chunk (no overlap).
   ``slowdown_pct`` = 100 (1 - online / memory); the issue's target is <= 10 % for every model and preset.
2. Learning at equal steps (``--learn``): one model trained for ``--learn-steps`` steps on a fixed set of
   ``--learn-fixed`` images (epochs over it) and on the online stream (never the same image twice), same
   init, optimizer and batch size; test AUC (macro) on a fixed simulated test set every ``--eval-every``
   steps. Writes the curves to the JSON and a PNG.

No Ray (one device, the per-rank work). Prints a table and writes JSON (rewritten after every configuration).

    python benchmarks/train_online.py --quick --out /tmp/online.json              # CPU smoke test
    python benchmarks/train_online.py --out benchmarks/results/train_online_h200.json --learn
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_throughput import QUICK_OVERRIDES  # noqa: E402
from deeplense_ray.train.metrics import classification_metrics  # noqa: E402
from deeplense_ray.train.modules import build_classifier  # noqa: E402
from deeplense_ray.train.online import eval_batches, eval_chunks, online_batches, render, resolve_sim_preset  # noqa: E402
from deeplense_ray.train.optim import autocast_dtype  # noqa: E402
from deeplense_ray.train.seeding import derive_seed  # noqa: E402
from deeplense_ray.train.steps import predict_batches, probabilities, train_one_epoch  # noqa: E402

MODELS = ("ResNet18", "ViT", "CvT", "Lensiformer")
PRESETS = ("model_ii", "model_i")
#: --quick: tiny models and images (the code path on a CPU, not the numbers)
QUICK_MODEL_OVERRIDES: dict[str, dict[str, Any]] = {m: QUICK_OVERRIDES[m] for m in MODELS}
QUICK_PRESET_OVERRIDES = {"num_pix": 32, "supersampling": 1}
AUGMENT = {"rot90": True, "flip": True, "free_rotation": False}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(name: str, pre, overrides: dict[str, Any], device: torch.device, seed: int):
    torch.manual_seed(seed)
    cfg = {
        "model": name,
        "image_shape": list(pre.image_shape),
        "class_names": list(pre.class_names),
        "pixel_scale": float(pre.delta_pix),
        "model_overrides": overrides,
        "normalize": "per_image_standard",
    }
    model = build_classifier(cfg).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)


def memory_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled epochs over an in-memory set (indices drawn on the CPU, gathers on the device)."""
    n = int(labels.shape[0])
    for epoch in itertools.count():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch))).to(
            images.device
        )
        for s in range(0, n - batch_size + 1, batch_size):
            idx = perm[s : s + batch_size]
            yield {"image": images[idx], "label": labels[idx]}


def online_stream(
    pre, *, seed: int, batch_size: int, device, chunk_batches: int, prefetch: bool, per_epoch: int
):
    """Endless online batches, epoch after epoch (``per_epoch`` batches each), as the Ray Train loop draws."""
    for epoch in itertools.count(1):
        yield from online_batches(
            pre, seed=seed, epoch=epoch, rank=0, num_batches=per_epoch, batch_size=batch_size, device=device,
            chunk_batches=chunk_batches, prefetch=prefetch,
        )  # fmt: skip


def timed_steps(model, opt, stream, steps: int, device, amp) -> dict[str, float]:
    """``steps`` training steps from ``stream`` with the loop's step; images/s and the data-wait share."""
    gen = torch.Generator(device=device).manual_seed(1)
    out = train_one_epoch(
        model,
        itertools.islice(stream, steps),
        opt,
        device=device,
        amp_dtype=amp,
        augment=AUGMENT,
        generator=gen,
    )
    return {
        "images_per_s": out["images"] / out["seconds"],
        "seconds": out["seconds"],
        "data_wait_frac": out["data_wait_s"] / out["seconds"],
        "loss": out["loss_sum"] / max(out["images"], 1),
    }


def throughput(name: str, preset: str, args, device) -> dict[str, Any]:
    pre = resolve_sim_preset(preset, QUICK_PRESET_OVERRIDES if args.quick else None)
    overrides = QUICK_MODEL_OVERRIDES.get(name, {}) if args.quick else {}
    amp = autocast_dtype("bf16", device)
    bs, steps, warm = args.batch_size, args.steps, args.warmup
    per_epoch = steps + warm  # one epoch covers warm-up and timed steps: chunk boundaries as in training
    row: dict[str, Any] = {
        "model": name,
        "preset": preset,
        "image_shape": list(pre.image_shape),
        "batch_size": bs,
    }

    t0 = time.perf_counter()
    images, labels = render(pre, (steps + warm) * bs, derive_seed(args.seed, 99), device, shuffle=False)
    _sync(device)
    row["render_memory_set_s"] = time.perf_counter() - t0
    row["render_images_per_s"] = (steps + warm) * bs / row["render_memory_set_s"]
    for feed in ("memory", "online", "online_serial"):
        model, opt = _model(name, pre, overrides, device, args.seed)
        if feed == "memory":
            stream = memory_batches(images, labels, bs, args.seed)
        else:
            stream = online_stream(
                pre, seed=args.seed, batch_size=bs, device=device, chunk_batches=args.chunk_batches,
                prefetch=feed == "online", per_epoch=per_epoch,
            )  # fmt: skip
        timed_steps(model, opt, stream, warm, device, amp)  # warm-up (cudnn, allocator, first chunk)
        row[feed] = timed_steps(model, opt, stream, steps, device, amp)
        stream.close()
        del model, opt
    mem = row["memory"]["images_per_s"]
    for feed in ("online", "online_serial"):
        row[f"{feed}_slowdown_pct"] = 100.0 * (1.0 - row[feed]["images_per_s"] / mem)
    del images, labels
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _test_auc(model, test, pre, device, amp) -> float:
    logits, labels = predict_batches(
        model, (b for i in sorted(test) for b in test[i]), device=device, amp_dtype=amp
    )
    return float(classification_metrics(labels, probabilities(logits), list(pre.class_names))["auc_macro"])


def learning(args, device) -> dict[str, Any]:
    """Equal steps, fixed set vs online stream: test AUC curves."""
    pre = resolve_sim_preset(args.learn_preset, QUICK_PRESET_OVERRIDES if args.quick else None)
    name = args.learn_model
    overrides = QUICK_MODEL_OVERRIDES.get(name, {}) if args.quick else {}
    amp = autocast_dtype("bf16", device)
    bs, steps, every = args.batch_size, args.learn_steps, args.eval_every
    per_epoch = max(1, args.learn_fixed // bs)
    test = eval_batches(
        pre, "test", seed=args.seed, size=args.test_size, positions=range(len(eval_chunks(args.test_size))),
        device=device, batch_size=256,
    )  # fmt: skip
    # the fixed set: the stream's epoch 0 (training epochs start at 1, so it is never drawn online)
    fixed = list(
        online_batches(
            pre, seed=args.seed, epoch=0, rank=0, num_batches=per_epoch, batch_size=bs, device=device,
            chunk_batches=args.chunk_batches, prefetch=False,
        )
    )  # fmt: skip
    fixed_x = torch.cat([b["image"] for b in fixed])
    fixed_y = torch.cat([b["label"] for b in fixed])
    del fixed
    out: dict[str, Any] = {
        "model": name, "preset": args.learn_preset, "steps": steps, "batch_size": bs,
        "fixed_images": int(fixed_y.shape[0]), "test_images": args.test_size, "eval_every": every,
        "curves": {},
    }  # fmt: skip
    for arm in ("fixed", "online"):
        model, opt = _model(name, pre, overrides, device, args.seed)
        if arm == "fixed":
            stream = memory_batches(fixed_x, fixed_y, bs, args.seed)
        else:
            stream = online_stream(
                pre, seed=args.seed, batch_size=bs, device=device, chunk_batches=args.chunk_batches,
                prefetch=True, per_epoch=per_epoch,
            )  # fmt: skip
        curve = []
        done, t0 = 0, time.perf_counter()
        while done < steps:
            k = min(every, steps - done)
            r = timed_steps(model, opt, stream, k, device, amp)
            done += k
            curve.append(
                {
                    "step": done,
                    "train_loss": r["loss"],
                    "test_auc_macro": _test_auc(model, test, pre, device, amp),
                }
            )
            print(
                f"  learn {arm:6s} step {done:6d}: train loss {r['loss']:.4f}, "
                f"test AUC {curve[-1]['test_auc_macro']:.4f}",
                flush=True,
            )
        stream.close()
        out["curves"][arm] = curve
        out[f"{arm}_seconds"] = time.perf_counter() - t0
        out[f"{arm}_final_test_auc"] = curve[-1]["test_auc_macro"]
        out[f"{arm}_best_test_auc"] = max(c["test_auc_macro"] for c in curve)
    return out


def plot_learning(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, style in (("fixed", "--"), ("online", "-")):
        c = result["curves"][arm]
        steps = [p["step"] for p in c]
        label = f"{arm} ({result['fixed_images']} images)" if arm == "fixed" else "online (fresh images)"
        a1.plot(steps, [p["test_auc_macro"] for p in c], style, label=label)
        a2.plot(steps, [p["train_loss"] for p in c], style, label=label)
    a1.set(
        xlabel="optimizer step", ylabel="test AUC (macro)", title=f"{result['model']} on {result['preset']}"
    )
    a2.set(xlabel="optimizer step", ylabel="train loss (last interval)", yscale="log")
    for a in (a1, a2):
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write(doc: dict[str, Any], path: Path) -> None:
    from deeplense_ray.io import atomic_write_json

    atomic_write_json(path, doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per feed")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--chunk-batches", type=int, default=16, help="batches per simulate() call (the loop's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-throughput", action="store_true", help="only the learning comparison")
    ap.add_argument("--learn", action="store_true", help="also the learning comparison at equal steps")
    ap.add_argument("--learn-model", default="ViT")
    ap.add_argument("--learn-preset", default="model_ii")
    ap.add_argument("--learn-steps", type=int, default=3000)
    ap.add_argument("--learn-fixed", type=int, default=30000, help="images of the fixed set")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--test-size", type=int, default=6000)
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: tiny models, 32x32, few steps")
    ap.add_argument("--out", default="benchmarks/results/train_online.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.chunk_batches = 16, 4, 2, 2
        args.learn_steps, args.learn_fixed, args.eval_every, args.test_size = 8, 32, 4, 48
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    doc: dict[str, Any] = {
        "benchmark": "train_online",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "quick": args.quick,
        "args": vars(args),
        "throughput": [],
    }
    if not args.no_throughput:
        print(
            f"{'model':12s} {'preset':9s} {'memory':>9s} {'online':>9s} {'serial':>9s} "
            f"{'slow%':>6s} {'serial%':>7s}"
        )
        for preset in args.presets:
            for name in args.models:
                row = throughput(name, preset, args, device)
                doc["throughput"].append(row)
                _write(doc, out)
                print(
                    f"{name:12s} {preset:9s} {row['memory']['images_per_s']:9.0f} "
                    f"{row['online']['images_per_s']:9.0f} {row['online_serial']['images_per_s']:9.0f} "
                    f"{row['online_slowdown_pct']:6.1f} {row['online_serial_slowdown_pct']:7.1f}",
                    flush=True,
                )
    if args.learn:
        doc["learning"] = learning(args, device)
        doc["learning"]["plot"] = str(plot_learning(doc["learning"], out.with_suffix(".png")))
        _write(doc, out)
        lr = doc["learning"]
        print(
            f"learning {lr['model']} {lr['preset']} {lr['steps']} steps: test AUC fixed "
            f"{lr['fixed_final_test_auc']:.4f} "
            f"(best {lr['fixed_best_test_auc']:.4f}), online {lr['online_final_test_auc']:.4f} "
            f"(best {lr['online_best_test_auc']:.4f})"
        )
    _write(doc, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
