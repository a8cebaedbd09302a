"""Online simulation: each training rank renders fresh images on its device, never the same image twice.

Streams (all seeds from :func:`~deeplense_ray.train.seeding.derive_seed`, so a run is a pure function of its
config and seed):

- training: rank ``r`` renders its share of epoch ``e`` in chunks; chunk ``k`` is
  ``simulate(preset, n, seed=derive_seed(seed, TRAIN_STREAM, e, r, k))`` on the rank's device (output on the
  device), shuffled within the chunk by a permutation from the same seed, and cut into batches. The epoch
  index drives the seeds, so a run resumed at epoch e continues the same stream; ranks and epochs never share
  a seed. The stream of a rank depends on the number of workers (each rank draws its own images).
- validation / test: fixed sets of ``val_size`` / ``test_size`` images in chunks of :data:`EVAL_CHUNK`
  (chunk ``i`` from ``derive_seed(seed, VAL_STREAM|TEST_STREAM, i)``), rendered once; the chunks are dealt to
  the ranks like the val shards of a dataset (:func:`~deeplense_ray.train.ingest.deal_shards`), so every image
  is evaluated once whatever the number of workers. Their seeds never equal a training seed, so the sets are
  disjoint from training (and from each other) in their parameter draws.

The images are the device's bytes: the same seed gives the same images on the same device type (CPU and CUDA
differ in the noise generator and float rounding, and on CUDA the parameters are drawn on the GPU,
``simulate(draws="device")``, another random stream than the CPU's; see docs/simulator.md).

Overlap: the next chunk is rendered on a background thread (on CUDA in its own stream) while the current one
trains; the queue holds one chunk, so at most two chunks live on the device.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch

#: Stream tags mixed into the seeds (the issue number, then the split): training, validation, test.
TRAIN_STREAM, VAL_STREAM, TEST_STREAM = 1501, 1502, 1503
STREAMS = {"train": TRAIN_STREAM, "val": VAL_STREAM, "test": TEST_STREAM}
#: Images per validation / test chunk (the unit dealt to ranks).
EVAL_CHUNK = 512
#: Default images per training chunk, in per-worker batches.
CHUNK_BATCHES = 16


def resolve_sim_preset(name: str, overrides: Mapping[str, Any] | None = None):
    """The validated ``Preset`` for ``--simulate NAME`` plus overrides; ValueError naming the bad name or
    value (an unknown preset lists the valid ones)."""
    from deeplense_ray.sim import resolve_preset

    if not isinstance(name, str) or not name:
        raise ValueError(f"simulate must be a preset name, got {name!r}")
    try:
        return resolve_preset(name, dict(overrides or {}) or None)
    except KeyError as exc:
        raise ValueError(str(exc.args[0]) if exc.args else str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"simulate preset {name!r} with overrides {dict(overrides or {})}: {exc}") from None


def merge_sim_overrides(
    preset: str, config_file: str | None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The preset overrides of ``--simulate PRESET``: the fields of the YAML ``config_file`` (its optional
    ``preset: NAME`` must be ``preset``) under ``overrides`` (which win). ValueError / FileNotFoundError
    naming the file."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        from deeplense_ray.data.config import load_preset_yaml

        base, merged = load_preset_yaml(config_file)
        if base is not None and base != preset:
            raise ValueError(f"--simulate {preset!r} differs from 'preset: {base}' in {config_file}")
    return {**merged, **dict(overrides or {})}


def sim_hash(preset: Mapping[str, Any], **settings: Any) -> str:
    """sha256 of the resolved preset and the stream settings (the online run's 'manifest hash': a resume with
    another preset, override or set size is refused)."""
    blob = json.dumps({"preset": dict(preset), **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def chunk_seed(seed: int, epoch: int, rank: int, chunk: int) -> int:
    """Seed of training chunk ``chunk`` of ``rank`` in ``epoch``."""
    from deeplense_ray.train.seeding import derive_seed

    return derive_seed(seed, TRAIN_STREAM, epoch, rank, chunk)


def eval_seed(seed: int, split: str, chunk: int) -> int:
    """Seed of chunk ``chunk`` of the fixed ``split`` ('val' or 'test') set."""
    from deeplense_ray.train.seeding import derive_seed

    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    return derive_seed(seed, STREAMS[split], chunk)


def eval_chunks(n: int, chunk: int = EVAL_CHUNK) -> list[int]:
    """Sizes of the chunks of a fixed set of ``n`` images (all ``chunk`` but the last)."""
    return [min(chunk, n - s) for s in range(0, int(n), chunk)]


def steps_per_epoch(images_per_epoch: int, batch_size: int) -> int:
    """Optimizer steps per epoch: whole global batches (every rank takes the same number)."""
    return max(1, int(images_per_epoch) // int(batch_size))


def render(
    preset: Any,
    n: int,
    seed: int,
    device: torch.device,
    *,
    shuffle: bool,
    targets: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, ...]:
    """``n`` images [n,1,H,W] float32 and labels [n] int64 of ``preset`` on ``device`` (classes balanced),
    rows permuted by a generator seeded with ``seed`` if ``shuffle``. Plain (not inference) tensors. On CUDA
    the parameters are drawn on the device too (``draws="device"``: no CPU draw per chunk).

    ``targets`` (task 'inference': a loop config or checkpoint arch with ``targets``, ``target_loc``,
    ``target_scale``): the standardised targets [n, T] float32 come third (train/regression.py)."""
    from deeplense_ray.sim import simulate

    draws = "device" if torch.device(device).type == "cuda" else "cpu"
    res = simulate(preset, int(n), int(seed), device, device_output=True, draws=draws)
    out = [res.images, res.labels.to(device)]
    if targets is not None:
        from deeplense_ray.train.regression import standardized
        from deeplense_ray.train.targets import target_values

        out.append(standardized(target_values(res.params, targets["targets"]), targets).to(device))
    if shuffle:
        perm = torch.randperm(int(n), generator=torch.Generator().manual_seed(int(seed))).to(device)
        return tuple(t[perm] for t in out)
    return tuple(t.clone() for t in out)


def _batch(parts: Sequence[torch.Tensor], s: int, e: int) -> dict[str, torch.Tensor]:
    """Rows [s, e) of rendered (images, labels[, targets]) as a batch dict."""
    out = {"image": parts[0][s:e], "label": parts[1][s:e]}
    if len(parts) > 2:
        out["target"] = parts[2][s:e]
    return out


def online_batches(
    preset: Any,
    *,
    seed: int,
    epoch: int,
    rank: int,
    num_batches: int,
    batch_size: int,
    device: torch.device,
    chunk_batches: int = CHUNK_BATCHES,
    prefetch: bool = True,
    targets: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's ``num_batches`` training batches of ``epoch`` ({"image", "label"} on ``device``; with
    ``targets`` also "target", see :func:`render`), rendered in chunks of ``chunk_batches`` batches (chunk k
    from :func:`chunk_seed`). With ``prefetch`` the next chunk is rendered on a background thread (on CUDA in
    a side stream) while this one is consumed; the images are the same bytes either way."""
    sizes = [min(chunk_batches, num_batches - s) * batch_size for s in range(0, num_batches, chunk_batches)]

    def make(k: int) -> tuple[torch.Tensor, ...]:
        return render(
            preset, sizes[k], chunk_seed(seed, epoch, rank, k), device, shuffle=True, targets=targets
        )

    def cut(parts: Sequence[torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        for s in range(0, int(parts[1].shape[0]), batch_size):
            yield _batch(parts, s, s + batch_size)

    if not prefetch:
        for k in range(len(sizes)):
            yield from cut(make(k))
        return

    from deeplense_ray.sim.simulate import indexed_device

    device = indexed_device(device)  # the background thread's torch.cuda.set_device needs an index
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: tuple) -> bool:
        """Queue ``item`` unless the consumer has stopped; False once it has."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            if cuda:
                torch.cuda.set_device(device)
            with torch.cuda.stream(side) if cuda else nullcontext():
                for k in range(len(sizes)):
                    parts = make(k)
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(side)
                    if not put((parts, event)):
                        return
        except BaseException as exc:  # handed to the consumer, which raises it
            put((exc, None))

    thread = threading.Thread(target=produce, name=f"online-sim-r{rank}-e{epoch}", daemon=True)
    thread.start()
    try:
        for _ in range(len(sizes)):
            parts, event = q.get()
            if isinstance(parts, BaseException):
                raise RuntimeError(
                    f"online simulation failed on rank {rank}, epoch {epoch}: {parts}"
                ) from parts
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for t in parts:
                    t.record_stream(current)
            yield from cut(parts)
    finally:
        stop.set()
        thread.join()


def eval_batches(
    preset: Any,
    split: str,
    *,
    seed: int,
    size: int,
    positions: Sequence[int],
    device: torch.device,
    batch_size: int,
    targets: Mapping[str, Any] | None = None,
) -> dict[int, list[dict[str, torch.Tensor]]]:
    """The chunks ``positions`` of the fixed ``split`` set of ``size`` images, rendered on ``device`` and cut
    into batches: {chunk position: [batches]} (kept by the caller for every epoch); with ``targets`` the
    batches carry "target" (:func:`render`)."""
    sizes = eval_chunks(size)
    out: dict[int, list[dict[str, torch.Tensor]]] = {}
    for i in positions:
        parts = render(preset, sizes[i], eval_seed(seed, split, i), device, shuffle=False, targets=targets)
        out[i] = [_batch(parts, s, s + batch_size) for s in range(0, sizes[i], batch_size)]
    return out


def evaluate_simulated(
    checkpoint: Any,
    preset: Any,
    split: str,
    *,
    seed: int,
    size: int,
    batch_size: int = 256,
    device: str | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Metrics of a checkpoint's model on the fixed simulated ``split`` set (fp32; device default cuda if
    available, else cpu): what :func:`~deeplense_ray.train.evaluation.evaluate_checkpoint` is for a
    dataset."""
    import numpy as np

    from deeplense_ray.sim import resolve_preset
    from deeplense_ray.train.checkpoint import load_model_from_checkpoint, read_meta
    from deeplense_ray.train.metrics import bootstrap_auc_ci, classification_metrics
    from deeplense_ray.train.steps import predict_batches, probabilities

    pre = resolve_preset(preset)
    arch = read_meta(checkpoint)["arch"]
    if list(arch["class_names"]) != list(pre.class_names):
        raise ValueError(f"checkpoint classes {arch['class_names']} differ from preset {pre.name!r} classes")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model_from_checkpoint(checkpoint).to(dev)
    chunks = eval_batches(
        pre, split, seed=seed, size=size, positions=range(len(eval_chunks(size))), device=dev,
        batch_size=batch_size,
    )  # fmt: skip
    logits, labels = predict_batches(model, (b for i in sorted(chunks) for b in chunks[i]), device=dev)
    probs = probabilities(logits)
    out = classification_metrics(np.asarray(labels), probs, list(pre.class_names))
    out["auc_macro_ci"] = list(bootstrap_auc_ci(labels, probs))  # as evaluate_checkpoint
    out["split"] = split
    if return_predictions:
        out["y_true"] = labels
        out["probs"] = probs
    return out


def example_input(cfg: Any):
    """An input example for the logged model of a run of ``cfg``: the first image of its dataset, or one image
    of its preset (rendered on the CPU) for an online run without data."""
    from deeplense_ray.tracking.models import example_images

    if cfg.data_dir is not None:
        return example_images(cfg.data_dir)
    from deeplense_ray.sim import simulate

    return simulate(cfg.simulated_info().sim_preset, 1, 0, "cpu").images.numpy()


def check_online_memory(cfg: Any, image_shape: Sequence[int]) -> None:
    """ValueError, before Ray starts, when one rank of an online run of ``cfg`` (a TrainConfig with
    ``simulate``) would hold more float32 images at once than this machine has memory: its share of the fixed
    val set (rendered once, kept for every epoch) with two training chunks (one training, one prefetched), or
    the fixed test set (rendered on one device at the end). Without ``data_dir`` only; with it the val/test
    splits stream from the dataset. The message names the flags and their values."""
    from deeplense_ray.sizes import check_memory_room

    image = 4 * math.prod(int(v) for v in image_shape)
    workers = int(cfg.num_workers)
    chunks = (2 if cfg.sim_prefetch else 1) * int(cfg.sim_chunk_batches) * (int(cfg.batch_size) // workers)
    what = f"--sim-chunk-batches {cfg.sim_chunk_batches} x --batch-size {cfg.batch_size} / {workers} workers"
    if cfg.data_dir is not None:
        check_memory_room(chunks * image, what=f"a rank's training chunks ({what})")
        return
    val = -(-int(cfg.val_size) // workers)
    check_memory_room(
        (val + chunks) * image,
        what=f"a rank's share of --val-size {cfg.val_size} ({val} images) with its training chunks ({what})",
    )
    check_memory_room(int(cfg.test_size) * image, what=f"--test-size {cfg.test_size}: the fixed test set")


__all__ = [
    "EVAL_CHUNK",
    "STREAMS",
    "check_online_memory",
    "chunk_seed",
    "eval_batches",
    "eval_chunks",
    "eval_seed",
    "evaluate_simulated",
    "example_input",
    "merge_sim_overrides",
    "online_batches",
    "render",
    "resolve_sim_preset",
    "sim_hash",
    "steps_per_epoch",
]
