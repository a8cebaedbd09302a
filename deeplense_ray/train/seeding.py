"""Seeds and input digests: how a run derives its random streams, and how a test sees what it trained on.

:func:`derive_seed` turns integer tuples such as ``(seed, epoch, rank)`` into independent 63-bit seeds (the
loop re-seeds dropout, augmentation and shuffling from them at every epoch boundary; train/online.py seeds
its rendering chunks from them); :func:`seed_everything` seeds Python, NumPy and torch for model
initialisation. With the hooks' ``record_inputs`` directory (tests, train/worker_config.py ``LoopHooks``),
every rank writes the :func:`input_digest` of each batch it trained on (:func:`record_inputs`) and of each val
row it evaluated (:func:`row_digests`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch


def input_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of a batch's float32 image bytes and int64 label bytes (what :func:`record_inputs` writes)."""
    import hashlib

    h = hashlib.sha256(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(labels.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def row_digests(batches: Iterable[Mapping[str, torch.Tensor]]) -> list[str]:
    """The :func:`input_digest` of every row (image and label) of ``batches``, in order."""
    return [input_digest(x[None], y[None]) for b in batches for x, y in zip(b["image"], b["label"])]


def record_inputs(
    batches: Iterable[Mapping[str, torch.Tensor]], path: Path
) -> Iterator[Mapping[str, torch.Tensor]]:
    """``batches`` passed through; once they are all drawn, the :func:`input_digest` of each is written to
    ``path`` (a JSON list, in order)."""
    from deeplense_ray.io import atomic_write_json

    digests = []
    for batch in batches:
        digests.append(input_digest(batch["image"], batch["label"]))
        yield batch
    atomic_write_json(path, digests)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (``numpy.random.SeedSequence``; independent streams per tuple)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
