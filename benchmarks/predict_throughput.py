"""jobs/predict.py over a large dataset: images/s end to end through Ray Data (read tasks + GPU actor pool).

Simulates a dataset (``--preset``, ``--num-per-class``; skipped when ``--data`` exists), writes a
checkpoint of ``--model`` (seeded initial weights: throughput does not depend on training), then runs
``run_prediction(..., ray_threshold=0)`` on every split into a Parquet file and reports images/s (reading
and predicting, from the start of the Ray Data pipeline to the last probability; ``wall_s_...`` adds the
model load, the input check and the Parquet write). Prints and saves JSON. Examples:

    python benchmarks/predict_throughput.py --quick --out /tmp/pt.json        # CPU smoke test
    python benchmarks/predict_throughput.py --num-per-class 100000 --out benchmarks/results/predict_h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_checkpoint(
    model: str, image_shape: list[int], class_names: list[str], pixel_scale, out: Path
) -> Path:
    import torch

    from deeplense_ray.train.checkpoint import save_checkpoint
    from deeplense_ray.train.modules import build_classifier

    arch = {
        "model": model,
        "model_size": "default",
        "model_overrides": {},
        "image_shape": image_shape,
        "class_names": class_names,
        "pixel_scale": pixel_scale,
        "normalize": "per_image_standard",
    }
    torch.manual_seed(0)
    net = build_classifier(arch)
    opt = torch.optim.AdamW(net.parameters())
    return save_checkpoint(
        out, model=net, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0),
        scaler=None, epoch=1, config={**arch, "seed": 0}, metrics={}, history=[],
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="dataset directory (default: simulate one in a temp dir)")
    ap.add_argument("--preset", default="model_ii")
    ap.add_argument("--num-per-class", type=int, default=100_000)
    ap.add_argument("--model", default="ViT")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--actors", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny CPU run (the code path, not the numbers)")
    ap.add_argument("--out", required=True, help="JSON result file")
    args = ap.parse_args()

    import ray
    import torch

    from deeplense_ray.config import describe_dataset
    from deeplense_ray.data import DatasetConfig, build_dataset
    from deeplense_ray.infer import run_prediction

    tmp = Path(tempfile.mkdtemp(prefix="predict-bench-"))
    gpus = torch.cuda.device_count()
    ray.init(num_cpus=None if gpus else 4, log_to_driver=False)
    data = Path(args.data) if args.data else tmp / "data"
    t0 = time.perf_counter()
    if not (data / "manifest.json").is_file():
        n = 30 if args.quick else args.num_per_class
        overrides = {"num_pix": 16} if args.quick else {}
        cfg = DatasetConfig(preset=args.preset, preset_overrides=overrides, num_per_class=n, seed=0)
        build_dataset(cfg, data, gpus_per_worker=1.0 if gpus else 0.0, progress=False)
    simulate_s = time.perf_counter() - t0
    info = describe_dataset(data)
    model = "ResNetSimple" if args.quick else args.model
    ckpt = make_checkpoint(
        model, list(info.image_shape), list(info.class_names), info.pixel_scale, tmp / "ckpt"
    )
    t1 = time.perf_counter()
    res = run_prediction(
        str(ckpt), data, tmp / "p.parquet", ray_threshold=0, batch_size=args.batch_size, actors=args.actors,
        log_mlflow=False, tracking_uri=f"sqlite:///{tmp}/mlflow.db",
    )  # fmt: skip
    wall = time.perf_counter() - t1
    result = {
        "model": model,
        "image_shape": list(info.image_shape),
        "images": res.num_images,
        "predict_s": res.seconds,
        "images_per_s": res.images_per_s,
        "wall_s_incl_load_check_write": wall,
        "batch_size": args.batch_size,
        "gpus": gpus,
        "gpu_name": torch.cuda.get_device_name(0) if gpus else None,
        "accuracy_untrained": res.metrics["accuracy"] if res.metrics else None,
        "simulate_s": simulate_s,
        "host": platform.node(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
