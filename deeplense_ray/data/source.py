"""Reading a dataset back: a Ray Data datasource (for Ray Train ingestion) and a torch IterableDataset.

Both stream: a read task / iterator holds one block of one shard at a time, never the whole split. Both check
on open that each shard they will read holds the rows its manifest entry says (HDF5 metadata only), and
every block read checks it again (the file may change in between).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deeplense_ray.data.augment import NORMALIZE_MODES, augment_batch, normalize_batch
from deeplense_ray.data.manifest import MANIFEST_NAME, check_row_counts, load_manifest, shard_paths
from deeplense_ray.data.shards import read_shard

DEFAULT_BLOCK_ROWS = 1024


def _check_params(manifest: Mapping[str, Any], params: Sequence[str], data_dir: Path) -> list[str]:
    names = list(params)
    known = manifest.get("params", {})
    unknown = [p for p in names if p not in known]
    if unknown:
        raise KeyError(f"params {unknown} not in dataset {data_dir}; have {sorted(known)}")
    return names


IMAGE_DTYPES = ("float32", "stored")


def _shard_blocks(
    path: str, rows: int, block_rows: int, params: Sequence[str], image_dtype: str = "float32"
) -> Iterator[dict[str, np.ndarray]]:
    """Yield numpy batches of one shard, ``block_rows`` at a time (each a separate HDF5 read).

    ``image_dtype``: "float32" converts float16 storage to float32; "stored" keeps the stored dtype.
    """
    as_float32 = image_dtype == "float32"
    for start in range(0, rows, block_rows):
        part = read_shard(
            path,
            params=list(params),
            start=start,
            stop=min(start + block_rows, rows),
            as_float32=as_float32,
            expect_rows=rows,
        )
        batch = {"image": part["images"], "label": part["labels"]}
        for name, value in part["params"].items():
            batch[name] = value
        yield batch


def _make_datasource_class():
    """Build the Datasource subclass lazily so importing this module does not import Ray."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockAccessor, BlockMetadata

    class LensShardDatasource(Datasource):
        """One ReadTask per shard of one split; each task yields blocks of ``block_rows`` rows.

        Columns: ``image`` [1, H, W] (float32, or the stored dtype with ``image_dtype="stored"``),
        ``label`` int64, plus the requested ``params`` columns.
        """

        def __init__(
            self,
            data_dir: str | Path,
            split: str,
            *,
            params: Sequence[str] = (),
            block_rows: int = DEFAULT_BLOCK_ROWS,
            image_dtype: str = "float32",
            shards: Sequence[int] | None = None,
        ):
            if image_dtype not in IMAGE_DTYPES:
                raise ValueError(f"image_dtype must be one of {list(IMAGE_DTYPES)}, got {image_dtype!r}")
            root = Path(data_dir).resolve()
            manifest = load_manifest(root)
            self._paths = [str(p) for p in shard_paths(root, split, manifest)]
            self._rows = [int(s["rows"]) for s in manifest["splits"][split]["shards"]]
            if shards is not None:  # a subset, by position in the manifest's shard list
                bad = [i for i in shards if not 0 <= int(i) < len(self._paths)]
                if bad:
                    raise IndexError(
                        f"shards {bad} out of range: split {split!r} of {root} has {len(self._paths)}"
                    )
                self._paths = [self._paths[int(i)] for i in shards]
                self._rows = [self._rows[int(i)] for i in shards]
            check_row_counts(self._paths, self._rows, root / MANIFEST_NAME)
            self._params = _check_params(manifest, params, root)
            self._block_rows = int(block_rows)
            c, h, w = manifest["image_shape"]
            stored = str(manifest.get("image_dtype", "float32"))
            itemsize = 2 if image_dtype == "stored" and stored == "float16" else 4
            self._row_bytes = itemsize * c * h * w + 8
            self._image_dtype = image_dtype
            self._split = split

        def get_name(self) -> str:
            return f"LensShards[{self._split}]"

        def estimate_inmemory_data_size(self) -> int:
            return sum(self._rows) * self._row_bytes

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
        ) -> list[ReadTask]:
            tasks = []
            for path, rows in zip(self._paths, self._rows):
                block_rows, params, dtype = self._block_rows, self._params, self._image_dtype

                def read_fn(path=path, rows=rows, block_rows=block_rows, params=params, dtype=dtype):
                    for batch in _shard_blocks(path, rows, block_rows, params, dtype):
                        yield BlockAccessor.batch_to_block(batch)

                meta = BlockMetadata(
                    num_rows=rows, size_bytes=rows * self._row_bytes, exec_stats=None, input_files=[path]
                )
                tasks.append(ReadTask(read_fn, meta, per_task_row_limit=per_task_row_limit))
            return tasks

    return LensShardDatasource


_DATASOURCE_CLS = None


def lens_shard_datasource(data_dir: str | Path, split: str, **kwargs: Any):
    """A ``ray.data.Datasource`` over the shards of one split (see :func:`read_split`)."""
    global _DATASOURCE_CLS
    if _DATASOURCE_CLS is None:
        _DATASOURCE_CLS = _make_datasource_class()
    return _DATASOURCE_CLS(data_dir, split, **kwargs)


def read_split(
    data_dir: str | Path,
    split: str,
    *,
    params: Sequence[str] = (),
    block_rows: int = DEFAULT_BLOCK_ROWS,
    image_dtype: str = "float32",
    shards: Sequence[int] | None = None,
    ray_remote_args: Mapping[str, Any] | None = None,
):
    """A streaming ``ray.data.Dataset`` of one split: columns ``image`` float32 [1,H,W], ``label`` int64.

    One read task per shard (each yielding blocks of ``block_rows`` rows); ``params`` adds simulator
    parameter columns by name. ``image_dtype="stored"`` keeps float16 images float16 (half the bytes
    through Ray Data; the training input path converts them on the GPU). ``shards``: only these shards, by
    position in the manifest's list for the split (a rank's share with ``ingest="per_rank"``). Lazy:
    nothing is read until the dataset is consumed, so it can be handed to a Ray Train trainer
    (``datasets={"train": read_split(d, "train"), "val": read_split(d, "val")}``).
    The manifest, the split and the shards' row counts are checked here, before any Ray work:
    FileNotFoundError / KeyError / ValueError naming them. A shard that fails to read (or holds other rows
    than its manifest entry) raises an error naming the file when the dataset is consumed.
    """
    import ray

    source = lens_shard_datasource(
        data_dir, split, params=params, block_rows=block_rows, image_dtype=image_dtype, shards=shards
    )
    return ray.data.read_datasource(
        source,
        ray_remote_args=dict(ray_remote_args or {}),
        override_num_blocks=max(1, len(source._paths)),
    )


class LensShardDataset(torch.utils.data.IterableDataset):
    """Torch dataset over one split, streaming shard by shard (for notebooks and plain DataLoaders).

    Yields ``(image [1,H,W] float32, label int64 scalar)``. ``shuffle=True`` shuffles the shard order and
    the rows inside each block with ``seed`` (+ epoch via :meth:`set_epoch`); DataLoader workers each take
    every k-th shard. ``augment``: None, True (rot90 + flips) or a dict of :func:`augment_batch` options;
    ``normalize``: one of 'none', 'per_image_minmax', 'per_image_standard'.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        *,
        augment: bool | Mapping[str, Any] | None = None,
        normalize: str = "none",
        shuffle: bool = False,
        seed: int = 0,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        params: Sequence[str] = (),
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.data_dir = Path(data_dir).resolve()
        self.manifest = load_manifest(self.data_dir)
        self.split = split
        self.paths = shard_paths(self.data_dir, split, self.manifest)
        self.shard_rows = [int(s["rows"]) for s in self.manifest["splits"][split]["shards"]]
        check_row_counts(self.paths, self.shard_rows, self.data_dir / MANIFEST_NAME)
        self.class_names = list(self.manifest["class_names"])
        self.params = _check_params(self.manifest, params, self.data_dir)
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {list(NORMALIZE_MODES)}, got {normalize!r}")
        if augment is True:
            augment = {}
        if augment not in (None, False) and not isinstance(augment, Mapping):
            raise ValueError(
                f"augment must be None, True or a dict of augment_batch options, got {augment!r}"
            )
        self.augment = dict(augment) if isinstance(augment, Mapping) else None
        self.normalize = normalize
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.block_rows = int(block_rows)
        self.transform = transform
        self.epoch = 0

    def __len__(self) -> int:
        return int(sum(self.shard_rows))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, 0x5348])
        order = rng.permutation(len(self.paths)) if self.shuffle else np.arange(len(self.paths))
        gen = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, self.epoch, worker]).generate_state(1)[0])
        )
        for i in order[worker::num_workers]:
            path, rows = str(self.paths[i]), self.shard_rows[i]
            for batch in _shard_blocks(path, rows, self.block_rows, self.params):
                images = torch.from_numpy(batch["image"])
                labels = torch.from_numpy(batch["label"])
                if self.augment is not None:
                    images = augment_batch(images, gen, **self.augment)
                images = normalize_batch(images, self.normalize)
                idx = (
                    torch.randperm(len(labels), generator=gen) if self.shuffle else torch.arange(len(labels))
                )
                for j in idx.tolist():
                    image = images[j] if self.transform is None else self.transform(images[j])
                    if self.params:
                        yield image, labels[j], {p: torch.as_tensor(batch[p][j]) for p in self.params}
                    else:
                        yield image, labels[j]
