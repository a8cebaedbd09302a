"""``build_dataset``: render shards with Ray Data actors and write them with a custom Datasink.

Data flow (one Ray Data row per shard):

    from_items(shard specs) --map_batches(ShardRenderer, ActorPoolStrategy(size=workers), batch_size=1)-->
        one row per shard: the shard's tensors as Arrow tensor cells (rendered on GPU or CPU)
    --write_datasink(HDF5ShardDatasink)--> DIR/<split>/shard-00000.h5 (HDF5 straight to a temp file,
        sha256 read back while fsync runs, os.replace); on_write_complete (driver) writes DIR/manifest.json.

Throughput: each renderer actor runs ``RENDER_CALLS_PER_ACTOR`` calls at once (threads), so one shard renders
on the GPU while the previous one is copied to pinned host memory and put in the object store; the actor
warms up (imports, CUDA, kernel JIT) in its constructor. Write tasks take ``WRITE_CPUS`` CPUs each.

One build at a time per directory: ``build_dataset`` holds :func:`deeplense_ray.data.manifest.dataset_lock`
(``DIR/.lock``) from before it deletes or writes anything until it returns; a second build of the same
directory fails at once naming it.

A shard's content depends only on (config, split, shard index), so the bytes do not depend on how many
workers or GPUs render it. Write tasks are retried by Ray (``WRITE_RETRIES``); a failed attempt leaves no
file behind. Fault injection for tests: ``faults={"train/1": 1}`` (or the environment variable
``DEEPLENSE_DATA_FAULTS="train/1:1"`` read by the driver) makes the first write attempt(s) of that shard
fail half-way, counted across processes with marker files in ``DIR/.faults/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deeplense_ray.data.config import DatasetConfig
from deeplense_ray.data.manifest import (
    LOCK_NAME,
    MANIFEST_NAME,
    build_manifest,
    dataset_lock,
    load_manifest,
    write_manifest,
)
from deeplense_ray.data.plan import ShardSpec, plan_shards
from deeplense_ray.data.shards import (
    ShardReadError,
    fletcher32_chunks,
    image_chunk_rows,
    read_shard,
    sha256_file,
    shard_attrs,
    write_shard,
)
from deeplense_ray.io import atomic_write_text, remove_stale_tmp

BUILDING_NAME = ".building.json"
FAULTS_DIR = ".faults"
FAULTS_ENV = "DEEPLENSE_DATA_FAULTS"
WRITE_RETRIES = 2
WRITE_CPUS = 1
RENDER_CALLS_PER_ACTOR = 2
#: Ray Data actor pools (renderers here, predictors in deeplense_ray.infer) are not restarted. Ray Data asks
#: for endless restarts by default but passes its actors' constructor arguments through the object store,
#: where Ray 2.60 does not keep them for a restart (it prints an error line for every such actor, and a
#: restart can fail on an evicted argument). A lost renderer fails the build; ``--resume`` then renders only
#: the shards not yet written.
ACTOR_POOL_REMOTE_ARGS: dict[str, Any] = {"max_restarts": 0}
PREVIEW_NAME = "preview.png"
_PARAM_PREFIX = "p__"
_TIMING_KEYS = ("render_s", "to_arrow_s", "from_arrow_s", "encode_s", "hash_s", "write_s")
#: A shard file a build writes: ``<split>/shard-NNNNN.h5`` (split names: letters, digits, '_' and '-').
SHARD_RE = re.compile(r"^[A-Za-z0-9_-]+/shard-[0-9]{5,}\.h5$")
#: The fault-injection marker files in DIR/.faults (``<split>-<index>.<k>``).
_FAULT_MARKER_RE = re.compile(r"^[A-Za-z0-9_-]+-[0-9]+\.[0-9]+$")


# ----------------------------------------------------------------------------------------------------------
# Pure helpers (no Ray)


def parse_faults(text: str | None) -> dict[str, int]:
    """Parse ``"train/1:1,val/0:5"`` (shard key ``split/index``, failures) into a dict. Empty -> {}."""
    out: dict[str, int] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, _, times = item.rpartition(":")
        if not key or "/" not in key or not times.isdigit():
            raise ValueError(
                f"bad fault spec {item!r} in {text!r}: expected SPLIT/INDEX:TIMES, e.g. train/1:1"
            )
        out[key] = int(times)
    return out


def resolved_config(cfg: DatasetConfig, preset_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``config``: the dataset config plus the fully resolved preset."""
    d = cfg.to_dict()
    d["preset_resolved"] = dict(preset_dict)
    return d


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty output dir unless resume/overwrite; ValueError naming the dir."""
    if resume and overwrite:
        raise ValueError("choose one of resume and overwrite, not both")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()) and not (resume or overwrite):
        raise ValueError(
            f"output directory {out} is not empty: pass --resume to finish it or --overwrite to replace it"
        )


def _config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [k for k in keys if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]


def _check_resume_config(out: Path, config: Mapping[str, Any]) -> None:
    for name in (MANIFEST_NAME, BUILDING_NAME):
        path = out / name
        if not path.is_file():
            continue
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        old_cfg = old.get("config", {})
        diff = _config_diff(old_cfg, config)
        if diff:
            raise ValueError(
                f"--resume: {path} was made with a different config (fields {diff} differ); "
                "use --overwrite or another --out"
            )


def _remove_fault_markers(out: Path) -> int:
    """Delete the fault-injection markers in ``out/.faults`` (and the folder once empty). Returns how many."""
    folder = out / FAULTS_DIR
    if not folder.is_dir():
        return 0
    markers = [p for p in folder.iterdir() if p.is_file() and _FAULT_MARKER_RE.match(p.name)]
    for p in markers:
        p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()  # only if empty
    return len(markers)


def clear_dataset_dir(out: Path) -> list[Path]:
    """Remove the files a build writes and nothing else: the manifest, preview and build marker, the shard
    files the manifest lists (inside ``out``) or named ``<split>/shard-NNNNN.h5``, temporary files of
    atomic writes in ``out`` and its split folders, fault markers. Split folders left empty go too. Any
    other file or folder stays. Returns the files removed."""
    removed = [out / n for n in (MANIFEST_NAME, PREVIEW_NAME, BUILDING_NAME) if (out / n).is_file()]
    listed: set[str] = set()
    with contextlib.suppress(FileNotFoundError, ValueError):  # no manifest, or one this package refuses
        listed = {s["path"] for info in load_manifest(out)["splits"].values() for s in info["shards"]}
    for sub in out.iterdir():
        if not sub.is_dir() or sub.is_symlink():
            continue
        for f in sub.iterdir():
            rel = f"{sub.name}/{f.name}"
            if f.is_file() and not f.is_symlink() and (rel in listed or SHARD_RE.match(rel)):
                removed.append(f)
    for f in removed:
        f.unlink(missing_ok=True)
    _remove_fault_markers(out)
    removed += remove_stale_tmp(out, max_depth=1)
    for sub in {f.parent for f in removed if f.parent != out}:
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    return removed


def expected_attrs(
    spec: ShardSpec, cfg: DatasetConfig, preset_dict: Mapping[str, Any], class_names: tuple[str, ...]
) -> dict[str, Any]:
    return shard_attrs(
        preset=preset_dict,
        class_names=class_names,
        seed=spec.seed,
        dataset_seed=cfg.seed,
        split=spec.split,
        shard_index=spec.index,
        rows=spec.rows,
        image_dtype=cfg.dtype,
    )


def existing_shard_ok(
    path: Path, spec: ShardSpec, attrs: Mapping[str, Any], manifest_sha: str | None
) -> str | None:
    """sha256 of an existing shard if it is complete and belongs to this plan, else None.

    With a manifest entry the file's sha256 must match it; without one (a build that crashed before its
    manifest) every dataset is read back (Fletcher-32 checksums) and the attributes must match the plan.
    """
    if not path.is_file():
        return None
    digest = sha256_file(path)
    if manifest_sha is not None:
        return digest if digest == manifest_sha else None
    try:
        shard = read_shard(path, params=True, as_float32=False)
    except ShardReadError:
        return None
    got = shard["attrs"]
    for key, value in attrs.items():
        want = value.item() if isinstance(value, np.generic) else value
        if key != "package_version" and got.get(key) != want:
            return None
    if not np.array_equal(shard["labels"], spec.label_array()):
        return None
    return digest


def shard_param_meta(path: Path) -> tuple[list[int], dict[str, dict[str, Any]]]:
    """(image shape [C,H,W], {param: {shape: per-row shape, dtype}}) read from a shard file."""
    import h5py

    with h5py.File(path, "r") as f:
        meta = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in f["params"].items()}
        return list(f["images"].shape[1:]), meta


# ----------------------------------------------------------------------------------------------------------
# Ray pieces


class ShardRenderer:
    """Ray Data callable class: one input row (a shard spec) -> one output row holding the whole shard.

    The output row carries the shard's tensors as Arrow tensor cells ([rows,1,H,W] images etc.), so a shard
    is never split across blocks or write tasks.
    """

    def __init__(self, *, preset: Mapping[str, Any], dtype: str, device: str, warmup: bool = True):
        t0, wall0 = time.perf_counter(), time.time()
        import torch

        from deeplense_ray.sim import resolve_preset, simulate

        # One CPU thread, the actor's CPU share (num_cpus=1), for the parameter draws: a worker that imported
        # torch before Ray assigned it (preloaded, see start_local_ray) would otherwise use every core
        # and fight the write tasks for them.
        threads_found = torch.get_num_threads()
        torch.set_num_threads(1)
        t1 = time.perf_counter()
        self.preset = resolve_preset(dict(preset))
        self.dtype = dtype
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.init()
            torch.empty(1, device=self.device)
        t2 = time.perf_counter()
        if warmup:  # compile / load the kernels now, not in the first shard
            n = max(2 * len(self.preset.class_names), 8)
            simulate(
                self.preset,
                n=n,
                seed=0,
                device=self.device,
                labels=torch.arange(n) % len(self.preset.class_names),
            )
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        t3 = time.perf_counter()
        self.init_timings = {
            "import_s": t1 - t0,
            "device_init_s": t2 - t1,
            "warmup_s": t3 - t2,
            "torch_threads_found": threads_found,
            "t_start": wall0,  # wall clock: the start-up timeline in build stats
            "t_ready": time.time(),
        }
        self._init_reported = False

    def _to_host(self, t):
        """Tensor -> numpy; from CUDA through pinned memory (one fast DMA, no pageable staging)."""
        import torch

        if t.device.type != "cuda":
            return t.detach().numpy()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t.detach(), non_blocking=True)
        return host

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa
        import torch
        from ray.data.extensions import ArrowTensorArray

        from deeplense_ray.sim import simulate

        if len(batch["index"]) != 1:
            raise ValueError(f"ShardRenderer expects one shard per batch, got {len(batch['index'])}")
        labels = np.frombuffer(batch["labels"][0], dtype="<i8").astype(np.int64)
        seed, rows = int(batch["seed"][0]), int(batch["stop"][0] - batch["start"][0])
        t0, wall0 = time.perf_counter(), time.time()
        cuda = self.device.type == "cuda"
        # Concurrent calls (threads) each get their own CUDA stream, so one renders while another copies.
        stream = torch.cuda.Stream(self.device) if cuda else None
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            res = simulate(
                self.preset,
                n=rows,
                seed=seed,
                device=self.device,
                labels=torch.from_numpy(labels),
                device_output=True,  # images stay on the GPU: float16 cast and checksums happen there
            )
            images = res["images"]
            if self.dtype == "float16":
                images = images.to(torch.float16)  # on the device: the host gets half the bytes
            host = [self._to_host(images), self._to_host(res["labels"].to(torch.int64))]
            if cuda:  # the image chunks' Fletcher-32 on the GPU: write tasks then only copy bytes
                chunk = image_chunk_rows(rows, tuple(images.shape[1:]), images.element_size())
                host.append(self._to_host(fletcher32_chunks(images, chunk)))
            host += [self._to_host(v) for v in res["params"].values()]
        if cuda:
            stream.synchronize()
        host = [h.numpy() if isinstance(h, torch.Tensor) else h for h in host]
        images, out_labels = host[0], host[1]
        checksums = host.pop(2) if cuda else None
        params = dict(zip(res["params"].keys(), host[2:]))
        if not np.array_equal(out_labels, labels):
            raise RuntimeError(f"simulate returned labels different from the requested ones (seed {seed})")
        t1 = time.perf_counter()
        columns = {
            "split": pa.array([str(batch["split"][0])]),
            "index": pa.array([int(batch["index"][0])], pa.int64()),
            "seed": pa.array([seed], pa.uint64()),
            "rows": pa.array([rows], pa.int64()),
            "images": ArrowTensorArray.from_numpy(images[None]),
            "labels": ArrowTensorArray.from_numpy(out_labels[None]),
        }
        if checksums is not None:
            columns["image_fletcher32"] = ArrowTensorArray.from_numpy(checksums[None])
        for name, value in params.items():
            columns[_PARAM_PREFIX + name] = ArrowTensorArray.from_numpy(np.ascontiguousarray(value)[None])
        t2 = time.perf_counter()
        columns["render_s"] = pa.array([t1 - t0], pa.float64())
        columns["to_arrow_s"] = pa.array([t2 - t1], pa.float64())
        columns["t_render"] = pa.array([wall0], pa.float64())
        report = not self._init_reported  # the actor's start-up timings ride on its first shard
        self._init_reported = True
        columns["actor_init"] = pa.array([json.dumps(self.init_timings) if report else ""])
        return pa.table(columns)


def _make_datasink_class():
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class HDF5ShardDatasink(Datasink):
        """Writes each incoming row (one whole shard) to ``DIR/<split>/shard-NNNNN.h5`` atomically.

        ``on_write_complete`` (driver) merges the results with shards kept from an earlier run and writes
        ``DIR/manifest.json`` atomically.
        """

        def __init__(
            self,
            *,
            out_dir: str,
            preset: Mapping[str, Any],
            class_names: tuple[str, ...],
            dataset_seed: int,
            dtype: str,
            faults: Mapping[str, int],
            on_complete,
        ):
            self.out_dir = out_dir
            self.preset = dict(preset)
            self.class_names = tuple(class_names)
            self.dataset_seed = int(dataset_seed)
            self.dtype = dtype
            self.faults = dict(faults)
            self._on_complete = on_complete  # driver-side only (not shipped to write tasks)

        def __getstate__(self):
            state = dict(self.__dict__)
            state["_on_complete"] = None
            return state

        def get_name(self) -> str:
            return "HDF5Shards"

        def _injected_failure(self, key: str) -> bool:
            times = self.faults.get(key, 0)
            marker_dir = Path(self.out_dir) / FAULTS_DIR
            marker_dir.mkdir(parents=True, exist_ok=True)
            for k in range(times):
                try:
                    fd = os.open(
                        marker_dir / f"{key.replace('/', '-')}.{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY
                    )
                except FileExistsError:
                    continue
                os.close(fd)
                return True
            return False

        def write(self, blocks, ctx) -> list[dict[str, Any]]:
            results = []
            t_task = time.time()
            for block in blocks:
                t0 = time.perf_counter()
                cols = BlockAccessor.for_block(block).to_numpy()
                from_arrow = time.perf_counter() - t0
                for r in range(len(cols["index"])):
                    results.append(self._write_one(cols, r, from_arrow / len(cols["index"]), t_task))
            return results

        def _write_one(
            self, cols: Mapping[str, np.ndarray], r: int, from_arrow_s: float, t_task: float
        ) -> dict[str, Any]:
            split, index = str(cols["split"][r]), int(cols["index"][r])
            seed, rows = int(cols["seed"][r]), int(cols["rows"][r])
            rel = f"{split}/shard-{index:05d}.h5"
            params = {k[len(_PARAM_PREFIX) :]: cols[k][r] for k in cols if k.startswith(_PARAM_PREFIX)}
            images, labels = cols["images"][r], cols["labels"][r]
            attrs = shard_attrs(
                preset=self.preset,
                class_names=self.class_names,
                seed=seed,
                dataset_seed=self.dataset_seed,
                split=split,
                shard_index=index,
                rows=rows,
                image_dtype=self.dtype,
            )
            fail = rows * images[0].nbytes // 2 if self._injected_failure(f"{split}/{index}") else None
            timings: dict[str, float] = {}
            digest, size = write_shard(
                Path(self.out_dir) / rel,
                images,
                labels,
                params,
                attrs,
                fail_after_bytes=fail,
                timings=timings,
                image_checksums=cols["image_fletcher32"][r] if "image_fletcher32" in cols else None,
            )
            return {
                "split": split,
                "index": index,
                "path": rel,
                "rows": rows,
                "sha256": digest,
                "seed": seed,
                "bytes": size,
                "image_shape": list(images.shape[1:]),
                "params_meta": {
                    k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in params.items()
                },
                "render_s": float(cols["render_s"][r]),
                "to_arrow_s": float(cols["to_arrow_s"][r]),
                "from_arrow_s": from_arrow_s,
                **timings,
                "actor_init": str(cols["actor_init"][r]) if "actor_init" in cols else "",
                "t_render": float(cols["t_render"][r]),
                "t_write": t_task,
                "t_done": time.time(),
            }

        def on_write_complete(self, write_result) -> None:
            """Driver side, after every write task succeeded: pass the shard entries on (manifest)."""
            written = [entry for ret in write_result.write_returns for entry in ret]
            self._on_complete(written)

    return HDF5ShardDatasink


def _steady_state(written: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """Start-up (pipeline start -> first shard on disk) and the rate after it (start-up excluded).

    ``startup``: seconds from ``t0`` (wall clock, pipeline start) to the first renderer actor starting its
    constructor, being ready, the first render call, the first write task starting, the first shard on disk.
    """
    if not written:
        return {}
    done = sorted(written, key=lambda w: w["t_done"])
    out: dict[str, Any] = {"first_shard_s": done[0]["t_done"] - t0}
    inits = [json.loads(w["actor_init"]) for w in written if w.get("actor_init")]
    marks = {
        "actor_start": min((i["t_start"] for i in inits if "t_start" in i), default=None),
        "actor_ready": min((i["t_ready"] for i in inits if "t_ready" in i), default=None),
        "first_render": min(w.get("t_render", float("inf")) for w in written),
        "first_write_task": min(w.get("t_write", float("inf")) for w in written),
        "first_shard_done": done[0]["t_done"],
    }
    out["startup"] = {k: round(v - t0, 3) for k, v in marks.items() if v is not None and v != float("inf")}
    if len(done) >= 2 and done[-1]["t_done"] > done[0]["t_done"]:
        images = sum(w["rows"] for w in done[1:])
        out["steady_images_per_s"] = images / (done[-1]["t_done"] - done[0]["t_done"])
        out["steady_MB_per_s"] = (
            sum(w["bytes"] for w in done[1:]) / (done[-1]["t_done"] - done[0]["t_done"]) / 1e6
        )
    return out


#: Modules the renderer actors and write tasks import, pre-imported by every Ray worker of a local runtime
#: started on a GPU machine (see :func:`start_local_ray`).
WORKER_PRELOAD_MODULES = ("torch", "h5py", "ray.data", "deeplense_ray.sim", "deeplense_ray.data.pipeline")


def start_local_ray(**init_kwargs: Any) -> str:
    """Start a fresh local Ray runtime for dataset builds (:func:`deeplense_ray.runtime.start_local_ray`).

    On a machine with a GPU, the runtime's workers import torch, h5py, ray.data and the simulator as they
    start (Ray's ``preload_python_modules``, given through the ``RAY_preload_python_modules`` environment
    variable, which a user setting wins over), while the driver is still planning: the renderer actor and
    the first write tasks then land in workers that are ready, instead of spending seconds importing
    (measured on an H100 host: 3.6 s of torch import in the actor). On a CPU-only machine, where the
    renderer itself is the bottleneck and cores are few, workers start light.
    """
    from deeplense_ray.runtime import start_local_ray as start

    return start(preload_modules=WORKER_PRELOAD_MODULES, **init_kwargs)


def map_batches_on_actors(ds: Any, fn: type, **kwargs: Any) -> Any:
    """``ds.map_batches(fn, **kwargs)`` for a callable class on an actor pool, with
    :data:`ACTOR_POOL_REMOTE_ARGS`. Ray 2.60 takes ``max_restarts`` only as a loose remote argument, which it
    marks deprecated: that warning is not shown."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, **kwargs, **ACTOR_POOL_REMOTE_ARGS)


def _ensure_ray() -> None:
    """Join $RAY_ADDRESS (e.g. inside `ray job submit`), else start a local runtime, unless Ray is up."""
    from deeplense_ray.runtime import connect

    connect(join_running=False, preload_modules=WORKER_PRELOAD_MODULES, log_to_driver=False)


def _render_and_write(
    todo: list[ShardSpec],
    *,
    out: Path,
    preset_dict: Mapping[str, Any],
    class_names: tuple[str, ...],
    cfg: DatasetConfig,
    workers: int,
    gpus_per_worker: float,
    progress: bool,
    faults: Mapping[str, int],
    on_complete,
) -> None:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    _ensure_ray()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    items = [
        {
            "split": s.split,
            "index": s.index,
            "start": s.start,
            "stop": s.stop,
            "seed": s.seed,
            "labels": s.labels,
        }
        for s in todo
    ]
    sink = _make_datasink_class()(
        out_dir=str(out),
        preset=preset_dict,
        class_names=class_names,
        dataset_seed=cfg.seed,
        dtype=cfg.dtype,
        faults=faults,
        on_complete=on_complete,
    )
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = map_batches_on_actors(
        ds,
        ShardRenderer,
        fn_constructor_kwargs={
            "preset": dict(preset_dict),
            "dtype": cfg.dtype,
            "device": "cuda" if gpus_per_worker > 0 else "cpu",
        },
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=int(workers), max_concurrent_calls_per_actor=RENDER_CALLS_PER_ACTOR),
        num_gpus=float(gpus_per_worker),
        num_cpus=1,
    )
    ds.write_datasink(
        sink,
        ray_remote_args={"max_retries": WRITE_RETRIES, "retry_exceptions": True, "num_cpus": WRITE_CPUS},
    )


def _settle_and_remove_tmp(out: Path, *, quiet_s: float = 1.0, timeout_s: float = 15.0) -> None:
    """After a failed build: remove the temporary files of write tasks that Ray killed mid-write.

    A write task cleans up its own temporary file on any exception, but one that Ray Data kills while the
    execution shuts down cannot; others may still be finishing. Poll until no temporary file has appeared
    for ``quiet_s`` (at most ``timeout_s``), removing what shows up. Complete shards are left: ``--resume``
    verifies them.
    """
    deadline = time.monotonic() + timeout_s
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        if remove_stale_tmp(out, max_depth=1):
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        time.sleep(0.1)
    remove_stale_tmp(out, max_depth=1)


def build_dataset(
    cfg: DatasetConfig,
    out_dir: str | Path,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    preview: bool = True,
    faults: Mapping[str, int] | None = None,
    stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Simulate a sharded HDF5 dataset into ``out_dir`` and return its manifest.

    Everything is validated before Ray starts (ValueError naming the value). Uses the current Ray runtime
    if initialised, else joins RAY_ADDRESS or starts a local one. ``workers`` renderer actors, each with
    ``gpus_per_worker`` GPUs (0 = CPU; fractions share a GPU). ``resume`` keeps shards already written
    and valid (sha256 vs the manifest, or internal checksums + attributes vs the plan when the earlier run
    died before its manifest) and renders the rest, keeping the earlier manifest until the new one
    replaces it; ``overwrite`` removes the files of an earlier dataset first (see :func:`clear_dataset_dir`).
    Holds the directory's lock (:func:`deeplense_ray.data.manifest.dataset_lock`) from the first write to
    the return: :class:`deeplense_ray.io.DirectoryLockedError` naming ``out`` if another build holds it.
    ``stats`` (if given) is filled with timings: per-stage seconds summed over shards, wall time, bytes.
    """
    from deeplense_ray.sim import resolve_preset

    cfg.validate()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if not isinstance(gpus_per_worker, (int, float)) or gpus_per_worker < 0:
        raise ValueError(f"gpus_per_worker must be >= 0, got {gpus_per_worker!r}")
    faults = dict(faults) if faults is not None else parse_faults(os.environ.get(FAULTS_ENV))
    preset = resolve_preset(cfg.preset, dict(cfg.preset_overrides) or None)
    out = Path(out_dir).resolve()
    check_out_dir(out, resume=resume, overwrite=overwrite)
    specs = plan_shards(cfg, len(preset.class_names), paired=bool(preset.paired))
    with dataset_lock(out):  # DirectoryLockedError naming ``out`` if another build holds it
        return _build_locked(
            cfg,
            out,
            preset,
            specs,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            preview=preview,
            faults=faults,
            stats=stats,
        )


def _build_locked(
    cfg: DatasetConfig,
    out: Path,
    preset: Any,
    specs: list[ShardSpec],
    *,
    workers: int,
    gpus_per_worker: float,
    resume: bool,
    overwrite: bool,
    progress: bool,
    preview: bool,
    faults: Mapping[str, int],
    stats: dict[str, Any] | None,
) -> dict[str, Any]:
    """:func:`build_dataset` once it holds the lock of ``out``: the directory checks again (another build
    may have finished in between), then clear or keep shards, render and write the rest, the manifest."""
    preset_dict = preset.to_dict()
    class_names = tuple(preset.class_names)
    check_out_dir(out, resume=resume, overwrite=overwrite)
    config = resolved_config(cfg, preset_dict)
    if resume:
        _check_resume_config(out, config)

    t_start = time.perf_counter()
    old_manifest: dict[str, Any] | None = None
    if resume and (out / MANIFEST_NAME).is_file():
        old_manifest = load_manifest(out)
    if overwrite:
        clear_dataset_dir(out)
    _remove_fault_markers(out)
    remove_stale_tmp(out, max_depth=1)
    atomic_write_text(out / BUILDING_NAME, json.dumps({"config": config}, indent=2) + "\n")
    # An earlier manifest (only --resume finds one: --overwrite cleared it) stays until the new one
    # replaces it atomically: it holds every shard's sha256, which a crash of this build must not lose.

    kept: list[dict[str, Any]] = []
    todo: list[ShardSpec] = []
    old_sha = {}
    if old_manifest is not None:
        old_sha = {s["path"]: s["sha256"] for info in old_manifest["splits"].values() for s in info["shards"]}
    for spec in specs:
        path = out / spec.path
        digest = None
        if resume:
            attrs = expected_attrs(spec, cfg, preset_dict, class_names)
            digest = existing_shard_ok(path, spec, attrs, old_sha.get(spec.path))
        if digest is None:
            path.unlink(missing_ok=True)
            todo.append(spec)
        else:
            kept.append(
                {
                    "split": spec.split,
                    "index": spec.index,
                    "path": spec.path,
                    "rows": spec.rows,
                    "sha256": digest,
                    "seed": spec.seed,
                }
            )

    t_plan = time.perf_counter()
    wall_plan = time.time()
    written: list[dict[str, Any]] = []
    split_rows = {split: per_class * len(class_names) for split, per_class in cfg.rows_per_class().items()}
    manifest: dict[str, Any] = {}

    def finalize(new_entries: list[dict[str, Any]]) -> None:
        """Write the manifest (from the Datasink's on_write_complete, or directly)."""
        if sorted(w["path"] for w in new_entries) != sorted(s.path for s in todo):
            raise RuntimeError(f"datasink reported {len(new_entries)} shards, expected {len(todo)}")
        written.extend(new_entries)
        if written:
            image_shape, params_meta = written[0]["image_shape"], written[0]["params_meta"]
        else:
            image_shape, params_meta = shard_param_meta(out / specs[0].path)
        manifest.update(
            build_manifest(
                config=config,
                class_names=class_names,
                image_shape=image_shape,
                image_dtype=cfg.dtype,
                params=params_meta,
                split_rows=split_rows,
                shards=kept + written,
            )
        )
        write_manifest(out, manifest)

    if todo:
        try:
            _render_and_write(
                todo,
                out=out,
                preset_dict=preset_dict,
                class_names=class_names,
                cfg=cfg,
                workers=workers,
                gpus_per_worker=gpus_per_worker,
                progress=progress,
                faults=faults,
                on_complete=finalize,
            )
        except BaseException:
            _settle_and_remove_tmp(out)
            raise
    else:
        finalize([])
    if not manifest:
        raise RuntimeError(f"the write to {out} finished without writing a manifest")
    t_write = time.perf_counter()
    if preview:
        from deeplense_ray.data.preview import write_preview

        write_preview(out, manifest)
    (out / BUILDING_NAME).unlink(missing_ok=True)
    faults_injected = _remove_fault_markers(out)
    t_end = time.perf_counter()

    if stats is not None:
        stats.clear()
        stats.update(
            {
                "shards_total": len(specs),
                "shards_written": len(written),
                "shards_kept": len(kept),
                "faults_injected": faults_injected,
                "images_written": int(sum(w["rows"] for w in written)),
                "bytes_written": int(sum(w["bytes"] for w in written)),
                "plan_s": t_plan - t_start,
                "pipeline_wall_s": t_write - t_plan,
                "finalize_s": t_end - t_write,
                "total_s": t_end - t_start,
                **{k: float(sum(w[k] for w in written)) for k in _TIMING_KEYS},
                **_steady_state(written, wall_plan),
                "actor_init": [json.loads(w["actor_init"]) for w in written if w.get("actor_init")],
            }
        )
    return manifest
