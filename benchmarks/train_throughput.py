"""Training throughput of every registered model: images/s and peak GPU memory.

For each model x image size (64, 150) x precision (fp32, bf16 autocast) x mode (eager, torch.compile) x
attention (``--attention``: fused SDPA and/or the original einsum, see deeplense_ray/models/attention.py) the
script runs ``--warmup`` then ``--steps`` AdamW training steps on a fixed random batch (single channel,
3 classes) and reports training images/s and peak allocated GPU memory. Prints a table and writes JSON
(rewritten atomically after every configuration, so a run cut short still leaves its numbers).

Needs only torch, einops and numpy (no Ray). Examples:

    python benchmarks/train_throughput.py --quick --out /tmp/tp.json          # CPU smoke test
    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json --compile on
    python benchmarks/train_throughput.py --attention einsum,sdpa --precisions bf16 --out /tmp/tp_attn.json

Models whose attention is the same both ways (CaiT keeps einsum; ResNet18, ResNetSimple, SISAutoencoder have
none) run once per configuration, with attention "n/a".
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplense_ray.io import atomic_write_text  # noqa: E402
from deeplense_ray.models import build_model, count_parameters, get_spec, list_models  # noqa: E402
from deeplense_ray.models.attention import IMPLEMENTATIONS, attention  # noqa: E402

#: models on which --attention changes nothing (run once, attention "n/a")
SAME_BOTH_WAYS = frozenset({"CaiT", "ResNet18", "ResNetSimple", "SISAutoencoder"})

# tiny overrides used by --quick (CPU smoke test: the code path, not the numbers)
QUICK_OVERRIDES: dict[str, dict[str, Any]] = {
    "ViT": {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64},
    "ViTSD": {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64},
    "CvT": {
        "s1_emb_dim": 16,
        "s2_emb_dim": 32,
        "s2_depth": 1,
        "s3_emb_dim": 32,
        "s3_depth": 1,
        "s3_heads": 1,
    },
    "CaiT": {"dim": 32, "depth": 1, "cls_depth": 1, "heads": 2, "mlp_dim": 64},
    "Lensiformer": {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64, "encoder_dim": 32, "encoder_depth": 1},
    "CCT": {"embedding_dim": 32, "num_layers": 1, "num_heads": 2},
    "TwinsSVT": {"s1_emb_dim": 16, "s2_emb_dim": 16, "s3_emb_dim": 32, "s3_depth": 1, "s4_emb_dim": 32},
    "LeViT": {"dim": (32, 32, 32), "depth": 1, "heads": (1, 1, 1)},
    "CrossViT": {"sm_dim": 32, "lg_dim": 32, "lg_enc_depth": 1, "depth": 1},
    "PiT": {"dim": 16, "depth": (1, 1, 1), "heads": 1, "mlp_dim": 32},
    "Swin": {"dim": 16, "depths": (1, 1, 1, 1), "heads": (1, 1, 1, 1)},
    "T2TViT": {"dim": 32, "depth": 1, "heads": 1, "mlp_dim": 64},
    "CrossFormer": {"dim": (32, 32, 64, 64), "depth": (1, 1, 1, 1)},
    "ResNet18": {"width": 8},
    "ResNetSimple": {"width": 8},
    # ae_width 16, not less: at 4 or 8 channels the encoder's compiled CPU code crashes (torch 2.13)
    "SISAutoencoder": {"ae_width": 16, "classifier_width": 8},
}


class ConfigTimeout(Exception):
    """A configuration ran past its time limit."""


@contextmanager
def time_limit(seconds: float):
    """Raise ConfigTimeout after ``seconds`` (SIGALRM; main thread, POSIX only; no limit if <= 0)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise ConfigTimeout(f"exceeded {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    name: str,
    image_size: int,
    precision: str,
    compiled: bool,
    *,
    device: torch.device,
    batch_size: int,
    warmup: int,
    steps: int,
    size: str,
    overrides: dict[str, Any],
    pixel_scale: float,
) -> dict[str, Any]:
    """One configuration -> result row (images_per_s, step_ms, peak_mem_mib, first_step_s, ...)."""
    torch.manual_seed(0)
    model = build_model(name, image_size, 1, 3, pixel_scale=pixel_scale, size=size, **overrides).to(device)
    n_params = count_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch_size, 1, image_size, image_size, generator=g).to(device)
    y = torch.randint(0, 3, (batch_size,), generator=g).to(device)
    if compiled:
        # one process compiles every model: without a reset, dynamo's per-frame recompile limit (8) is reached
        # by the shared wrapper's forward after 8 model classes, and later models silently run eager
        torch._dynamo.reset()
    fwd: nn.Module = torch.compile(model) if compiled else model
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = nn.functional.cross_entropy(fwd(x).float(), y)
        loss.backward()
        opt.step()
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    dt = time.perf_counter() - t0
    row = {
        "images_per_s": batch_size * steps / dt,
        "step_ms": 1e3 * dt / steps,
        "first_step_s": first,
        "peak_mem_mib": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
        "params": n_params,
        "final_loss": float(loss),
    }
    return row


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1), fsync=False)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    hdr = (
        f"{'model':15s} {'size':>4s} {'prec':>4s} {'mode':>7s} {'attn':>6s} {'params':>11s} {'img/s':>9s} "
        f"{'ms/step':>8s} "
    )
    hdr += f"{'peakMiB':>8s} {'1st s':>6s} status"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['model']:15s} {r['image_size']:4d} {r['precision']:>4s} {r['mode']:>7s} "
            f"{r.get('attention', 'sdpa'):>6s} "
            f"{_fmt(r.get('params'), ',d'):>11s} {_fmt(r.get('images_per_s'), '9.1f')} "
            f"{_fmt(r.get('step_ms'), '8.1f')} {_fmt(r.get('peak_mem_mib'), '8.0f')} "
            f"{_fmt(r.get('first_step_s'), '6.1f')} {r['status']}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="all", help="comma-separated names (case-insensitive) or 'all'")
    p.add_argument("--sizes", default="64,150", help="comma-separated image sizes")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    p.add_argument(
        "--compile", choices=("off", "on", "only"), default="off", help="also / only torch.compile"
    )
    p.add_argument("--model-size", choices=("default", "comparable"), default="default")
    p.add_argument(
        "--attention",
        default="sdpa",
        help="comma-separated: sdpa (fused, the default) and/or einsum (the original matrix products)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pixel-scale", type=float, default=0.101, help="arcsec/pixel for the physics models")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per configuration (compile included)"
    )
    p.add_argument(
        "--time-budget", type=float, default=0.0, help="stop starting configurations after this (s)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--quick", action="store_true", help="CPU smoke test: tiny models, batch 2, 1 step, size 64"
    )
    p.add_argument("--out", default="benchmarks/results/train_throughput.json", help="JSON output path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    names = (
        list_models() if args.models == "all" else [s.strip() for s in args.models.split(",") if s.strip()]
    )
    try:  # canonical names; an unknown one fails here, before any work, listing the valid names
        names = [get_spec(n).name for n in names]
    except ValueError as err:
        raise SystemExit(f"--models: {err}") from None
    sizes = [int(s) for s in args.sizes.split(",")]
    precisions = [s.strip() for s in args.precisions.split(",")]
    bad = [p for p in precisions if p not in ("fp32", "bf16")]
    if bad:
        raise SystemExit(f"--precisions: unknown {bad}; valid: fp32, bf16")
    modes = {"off": ["eager"], "on": ["eager", "compile"], "only": ["compile"]}[args.compile]
    impls = [s.strip() for s in args.attention.split(",") if s.strip()]
    bad = [a for a in impls if a not in IMPLEMENTATIONS]
    if bad or not impls:
        raise SystemExit(f"--attention: unknown {bad or impls}; valid: {', '.join(IMPLEMENTATIONS)}")
    batch, warmup, steps = args.batch_size, args.warmup, args.steps
    if args.quick:
        batch, warmup, steps = 2, 1, 1
        if args.sizes == "64,150":
            sizes = [64]
    for n in names:  # fail fast on bad names before any work
        build_model(n, min(sizes), 1, 3, **(QUICK_OVERRIDES.get(n, {}) if args.quick else {}))
    out = Path(args.out)
    meta = {
        "script": "benchmarks/train_throughput.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "batch_size": batch,
        "warmup": warmup,
        "steps": steps,
        "model_size": args.model_size,
        "attention": impls,
        "quick": args.quick,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name in names:
        overrides = QUICK_OVERRIDES.get(name, {}) if args.quick else {}
        for size in sizes:
            for precision in precisions:
                for mode, impl in [(m, a) for m in modes for a in impls]:
                    if name in SAME_BOTH_WAYS and impl != impls[0]:
                        continue
                    row: dict[str, Any] = {
                        "model": name,
                        "image_size": size,
                        "precision": precision,
                        "mode": mode,
                        "attention": "n/a" if name in SAME_BOTH_WAYS else impl,
                    }
                    if args.time_budget and time.perf_counter() - start > args.time_budget:
                        row["status"] = "skipped (time budget)"
                    else:
                        try:
                            with time_limit(args.timeout), attention(impl):
                                row.update(
                                    measure(
                                        name, size, precision, mode == "compile", device=device,
                                        batch_size=batch, warmup=warmup, steps=steps, size=args.model_size,
                                        overrides=overrides, pixel_scale=args.pixel_scale,
                                    )
                                )  # fmt: skip
                            row["status"] = "ok"
                        except torch.cuda.OutOfMemoryError:
                            row["status"] = "oom"
                        except ConfigTimeout as err:
                            row["status"] = f"timeout ({err})"
                        except Exception as err:  # a model that fails to compile etc. is reported, not fatal
                            msg = " | ".join(ln.strip() for ln in str(err).splitlines() if ln.strip())
                            row["status"] = f"error: {type(err).__name__}: {msg[:300]}"
                        finally:
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                    rows.append(row)
                    print(
                        f"[{time.perf_counter() - start:7.1f}s] {name} {size} {precision} {mode} "
                        f"{row['attention']}: "
                        f"{row.get('images_per_s', float('nan')):.1f} img/s, {row['status']}",
                        flush=True,
                    )
                    _write_json(out, {"meta": meta, "results": rows})
    print()
    print_table(rows)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
