"""Where a training step's time goes: torch.profiler over a few training steps of one model, by operator.

    python benchmarks/profile_step.py --model PublishedCvT --image-size 224 --batch-size 128 \
        --out benchmarks/results/profile_step_cvt224.json                  # one GPU, ~1 min
    python benchmarks/profile_step.py --model ViT --image-size 64 --quick --out /tmp/p.json   # CPU smoke test

``--model PublishedCvT`` is the two-stage CvT of the published DeepLense results (benchmarks/
reproduce_published.py); any other name comes from the model registry. The step is the training step of the
benchmarks (bf16 autocast on CUDA, AdamW, cross-entropy) on random images; ``--attention`` picks the fused
or the einsum attention. Prints the operators with the largest device time (self time, summed over the
profiled steps) and the share of attention kernels, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from deeplense_ray.io import atomic_write_text  # noqa: E402
from deeplense_ray.models import build_model  # noqa: E402
from deeplense_ray.models.attention import IMPLEMENTATIONS, attention  # noqa: E402

#: substrings of operator names that are attention kernels (fused or the einsum path's matmuls+softmax)
ATTENTION_OPS = ("scaled_dot_product", "flash", "efficient_attention", "_softmax", "softmax")


def build(name: str, image_size: int, num_classes: int) -> nn.Module:
    if name == "PublishedCvT":
        from reproduce_published import PublishedCvT

        return PublishedCvT(in_channels=1, num_classes=num_classes)
    return build_model(name, image_size, 1, num_classes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="PublishedCvT")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--attention", choices=IMPLEMENTATIONS, default="sdpa")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: batch 4, 1 + 2 steps")
    ap.add_argument("--out", type=Path, default=Path("runs/profile_step.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_size, args.warmup, args.steps = 4, 1, 2
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build(args.model, args.image_size, 3).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, 1, args.image_size, args.image_size, device=dev)
    y = torch.randint(0, 3, (args.batch_size,), device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step() -> None:
        with amp:
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with attention(args.attention):
        for _ in range(args.warmup):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        step_s = (time.perf_counter() - t0) / args.steps
        acts = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(args.steps):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
    use_cuda = dev.type == "cuda"
    rows = []
    for ev in prof.key_averages():
        t = ev.self_device_time_total if use_cuda else ev.self_cpu_time_total
        if t > 0:
            rows.append({"op": ev.key, "self_us": float(t), "calls": int(ev.count)})
    rows.sort(key=lambda r: -r["self_us"])
    total = sum(r["self_us"] for r in rows) or 1.0
    attn = sum(r["self_us"] for r in rows if any(a in r["op"].lower() for a in ATTENTION_OPS))
    for r in rows:
        r["share"] = r["self_us"] / total
    print(f"{args.model} {args.image_size}px batch {args.batch_size} attention={args.attention} on {dev}: "
          f"{step_s * 1e3:.1f} ms/step, {args.batch_size / step_s:,.0f} img/s; attention kernels "
          f"{attn / total:.1%} of the {'device' if use_cuda else 'CPU'} self time")
    print(f"{'operator':<70} {'share':>7} {'calls':>7}")
    for r in rows[: args.top]:
        print(f"{r['op'][:70]:<70} {r['share']:>7.1%} {r['calls']:>7}")
    result = {
        "benchmark": "profile_step",
        "argv": sys.argv[1:] if argv is None else argv,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if use_cuda else platform.processor(),
        "torch": torch.__version__,
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "attention": args.attention,
        "step_ms": step_s * 1e3,
        "images_per_s": args.batch_size / step_s,
        "attention_share": attn / total,
        "time_kind": "device self time" if use_cuda else "CPU self time",
        "top": rows[: args.top],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2), fsync=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
