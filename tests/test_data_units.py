"""Data module, no Ray: plan, config validation, shard schema and bytes, augmentations, readers."""

from __future__ import annotations

import math
import time

import h5py
import numpy as np
import pytest
import torch

from deeplense_ray.data import (
    DatasetConfig,
    ShardReadError,
    augment_batch,
    normalize_batch,
    parse_splits,
    read_shard,
)
from deeplense_ray.data.config import apportion
from deeplense_ray.data.plan import plan_shards, shard_seed, split_labels
from deeplense_ray.data.shards import (
    encode_shard,
    fletcher32,
    fletcher32_chunks,
    image_chunk_rows,
    shard_attrs,
    write_shard,
)
from deeplense_ray.io import atomic_write_bytes

PINNED_SEED = 3323333105444932653


# ---------------------------------------------------------------------------------------------------- plan
def test_apportion_sums_exactly_and_is_proportional():
    assert apportion(10, {"train": 0.8, "val": 0.1, "test": 0.1}) == {"train": 8, "val": 1, "test": 1}
    assert apportion(7, {"a": 0.5, "b": 0.5}) == {"a": 4, "b": 3}  # tie goes to the first split
    for total in range(1, 200, 7):
        parts = apportion(total, {"train": 0.7, "val": 0.2, "test": 0.1})
        assert sum(parts.values()) == total
        assert abs(parts["train"] - 0.7 * total) < 1


def test_shard_seed_is_a_stable_hash_of_seed_split_index():
    # Pinned values: a change here changes every dataset ever built (bump FORMAT_VERSION if intended).
    seeds = {shard_seed(s, sp, i) for s in (0, 1) for sp in ("train", "val") for i in range(20)}
    assert len(seeds) == 80
    assert all(0 <= v < 2**63 for v in seeds)
    # Pinned: a change here silently changes every dataset ever built (bump FORMAT_VERSION if intended).
    assert shard_seed(7, "train", 3) == PINNED_SEED


def test_split_labels_balanced_and_seeded():
    a = split_labels(3, "train", 50, 3)
    assert np.bincount(a).tolist() == [50, 50, 50]
    assert np.array_equal(a, split_labels(3, "train", 50, 3))
    assert not np.array_equal(a, split_labels(4, "train", 50, 3))
    assert not np.array_equal(a, split_labels(3, "val", 50, 3))


def test_plan_covers_every_row_once_and_ignores_worker_count():
    cfg = DatasetConfig(preset="model_ii", num_per_class=25, shard_size=8, seed=5)
    specs = plan_shards(cfg, 3)
    rows = {s: 0 for s in cfg.splits}
    for spec in specs:
        assert 1 <= spec.rows <= 8
        assert len(spec.label_array()) == spec.rows
        rows[spec.split] += spec.rows
    assert rows == {"train": 60, "val": 9, "test": 6}  # 20/3/2 per class
    labels = np.concatenate([s.label_array() for s in specs if s.split == "train"])
    assert np.bincount(labels).tolist() == [20, 20, 20]
    assert [s.path for s in specs[:2]] == ["train/shard-00000.h5", "train/shard-00001.h5"]
    assert plan_shards(cfg, 3) == specs


# -------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_per_class": -5}, "-5"),
        ({"num_per_class": 0}, "num_per_class"),
        ({"shard_size": 0}, "shard_size"),
        ({"splits": {"train": 0.8, "val": 0.3}}, "sum to 1"),
        ({"splits": {"train": 1.2}}, "1.2"),
        ({"splits": {"tr ain": 1.0}}, "tr ain"),
        ({"dtype": "float64"}, "float64"),
        ({"seed": -1}, "-1"),
        ({"num_per_class": 3}, "gets 0 images"),
        ({"preset_overrides": {"num_pixx": 3}}, "num_pixx"),
        ({"preset_overrides": {"num_pix": -3}}, "num_pix"),
    ],
)
def test_config_validate_names_the_bad_value(kwargs, needle):
    with pytest.raises(ValueError, match=None) as exc:
        DatasetConfig(**kwargs).validate()
    assert needle in str(exc.value)


def test_config_unknown_preset_lists_names():
    with pytest.raises(KeyError) as exc:
        DatasetConfig(preset="model_iv").validate()
    assert "model_iv" in str(exc.value) and "model_ii" in str(exc.value)


def test_parse_splits():
    assert parse_splits("train=0.8,val=0.1,test=0.1") == {"train": 0.8, "val": 0.1, "test": 0.1}
    for bad in ("train", "train=x", "=0.5", "a=0.5,a=0.5", ""):
        with pytest.raises(ValueError):
            parse_splits(bad)


# -------------------------------------------------------------------------------------------------- shards
def _fake_shard(n=10, h=16, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 1, h, h)).astype(dtype)
    labels = (np.arange(n) % 3).astype(np.int64)
    params = {"theta_E": rng.uniform(0.8, 1.2, n), "subhalo_mass": np.zeros((n, 5), np.float32)}
    attrs = shard_attrs(
        preset={"name": "toy", "num_pix": h},
        class_names=("no_sub", "axion", "cdm"),
        seed=123,
        dataset_seed=1,
        split="train",
        shard_index=0,
        rows=n,
        image_dtype=np.dtype(dtype).name,
    )
    return images, labels, params, attrs


def test_encoded_shard_is_byte_identical_over_time_and_has_schema(tmp_path):
    images, labels, params, attrs = _fake_shard()
    a = encode_shard(images, labels, params, attrs)
    time.sleep(1.1)  # HDF5 would embed a different modification time here if times were tracked
    b = encode_shard(images, labels, params, attrs)
    assert a == b
    path = tmp_path / "s.h5"
    atomic_write_bytes(path, a)
    with h5py.File(path, "r") as f:
        assert f["images"].dtype == np.float32 and f["images"].shape == (10, 1, 16, 16)
        assert f["images"].chunks[0] == image_chunk_rows(10, (1, 16, 16), 4)
        assert f["images"].fletcher32 and f["images"].compression is None
        assert f["labels"].dtype == np.int64
        assert f["params/subhalo_mass"].shape == (10, 5) and f["params/theta_E"].compression == "gzip"
        for key in (
            "preset",
            "class_names",
            "seed",
            "split",
            "shard_index",
            "format_version",
            "package_version",
        ):
            assert key in f.attrs
    back = read_shard(path, params=True)
    np.testing.assert_array_equal(back["images"], images)
    np.testing.assert_array_equal(back["labels"], labels)
    np.testing.assert_array_equal(back["params"]["theta_E"], params["theta_E"])
    assert back["attrs"]["split"] == "train" and back["attrs"]["seed"] == 123


def test_float16_storage_reads_back_float32(tmp_path):
    images, labels, params, attrs = _fake_shard(dtype=np.float16)
    atomic_write_bytes(tmp_path / "s.h5", encode_shard(images, labels, params, attrs))
    back = read_shard(tmp_path / "s.h5")
    assert back["images"].dtype == np.float32
    np.testing.assert_array_equal(back["images"], images.astype(np.float32))


def test_failed_atomic_write_leaves_nothing(tmp_path):
    with pytest.raises(OSError, match="injected"):
        atomic_write_bytes(tmp_path / "x.h5", b"0123456789", fail_after_bytes=5)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_and_truncated_shards_raise_naming_the_file(tmp_path):
    images, labels, params, attrs = _fake_shard(n=64, h=32)
    data = encode_shard(images, labels, params, attrs)
    trunc = tmp_path / "truncated.h5"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardReadError, match="truncated.h5"):
        read_shard(trunc)
    # Flip bytes inside the image data: only the Fletcher-32 checksum can notice this.
    flipped = bytearray(data)
    raw = images.tobytes()
    pos = bytes(flipped).find(raw[4096:4160])
    assert pos > 0
    flipped[pos : pos + 8] = b"\xff" * 8
    bad = tmp_path / "flipped.h5"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ShardReadError, match="flipped.h5"):
        read_shard(bad)


@pytest.mark.parametrize(
    "dtype,shape,n",
    [(np.float32, (1, 64, 64), 100), (np.float16, (1, 64, 64), 130), (np.float32, (1, 150, 150), 23)],
)
def test_fletcher32_matches_hdf5s_own_filter(dtype, shape, n):
    """Reference: the checksums HDF5's Fletcher-32 filter stores (read back with read_direct_chunk)."""
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(n, *shape)) * 1e3).astype(dtype)
    x[-3:] = 0  # an all-zero stretch in the padded last chunk
    chunk = image_chunk_rows(n, shape, np.dtype(dtype).itemsize)
    n_chunks = -(-n // chunk)
    with h5py.File("ref.h5", "w", driver="core", backing_store=False) as f:
        ds = f.create_dataset("images", data=x, chunks=(chunk, *shape), fletcher32=True)
        ref = [
            int.from_bytes(ds.id.read_direct_chunk((k * chunk, 0, 0, 0))[1][-4:], "little")
            for k in range(n_chunks)
        ]
    padded = np.zeros((n_chunks * chunk, *shape), dtype)
    padded[:n] = x
    assert [fletcher32(padded[k * chunk : (k + 1) * chunk]) for k in range(n_chunks)] == ref
    assert fletcher32_chunks(torch.from_numpy(x), chunk).tolist() == ref
    assert fletcher32(np.zeros(64, np.float32)) == 0


def test_precomputed_image_checksums_give_the_same_file_and_are_verified(tmp_path):
    images, labels, params, attrs = _fake_shard(n=150, h=32)
    chunk = image_chunk_rows(150, images.shape[1:], 4)
    digest, _ = write_shard(tmp_path / "a.h5", images, labels, params, attrs)
    sums = fletcher32_chunks(torch.from_numpy(images), chunk).numpy()
    digest_pre, _ = write_shard(tmp_path / "b.h5", images, labels, params, attrs, image_checksums=sums)
    assert digest_pre == digest
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    with pytest.raises(ValueError, match="checksums"):
        write_shard(tmp_path / "c.h5", images, labels, params, attrs, image_checksums=sums[:-1])
    wrong = sums.copy()
    wrong[1] ^= 1  # a checksum that does not match the bytes: the reader refuses the chunk
    write_shard(tmp_path / "d.h5", images, labels, params, attrs, image_checksums=wrong)
    with pytest.raises(ShardReadError, match="d.h5"):
        read_shard(tmp_path / "d.h5")


# --------------------------------------------------------------------------------------------- augmentation
def test_rot90_and_flip_are_exact_symmetries():
    x = torch.randn(64, 1, 9, 9)
    g = torch.Generator().manual_seed(0)
    y = augment_batch(x, g, rot90=True, flip=True)
    # Every output is one of the 8 dihedral transforms of its input, exactly.
    seen = set()
    for i in range(64):
        cands = []
        for k in range(4):
            r = torch.rot90(x[i], k, dims=(-2, -1))
            cands += [(k, 0, r), (k, 1, r.flip(-1))]
        hits = [(k, f) for k, f, c in cands if torch.equal(c, y[i])]
        assert hits, f"image {i} is not a dihedral transform of its input"
        seen.add(hits[0])
    assert len(seen) == 8  # all 8 group elements occur in 64 draws
    # Seeded: same generator state, same output; different seed, different output.
    y2 = augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(y, y2)
    assert not torch.equal(y, augment_batch(x, torch.Generator().manual_seed(1)))


def test_free_rotation_rotates_the_analytic_image_and_scale_zooms():
    # A free rotation of a smooth image by its drawn angle agrees with rotating the analytic image.
    n = 33
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    blob = torch.exp(-((xx - 0.3) ** 2 + yy**2) / 0.05)[None, None]
    out = augment_batch(
        blob.repeat(16, 1, 1, 1),
        torch.Generator().manual_seed(3),
        rot90=False,
        flip=False,
        free_rotation=True,
    )
    # Flux of a well-contained blob is conserved, its centroid stays at radius 0.3, and the image is the
    # analytic blob rotated to the centroid's angle (to interpolation accuracy); the angles cover the circle.
    angles = []
    for i in range(16):
        img = out[i, 0]
        assert img.sum().item() == pytest.approx(blob.sum().item(), rel=0.03)
        cx, cy = (img * xx).sum() / img.sum(), (img * yy).sum() / img.sum()
        assert math.hypot(cx, cy) == pytest.approx(0.3, abs=0.03)
        phi = math.atan2(cy, cx)
        rotated = torch.exp(-((xx - 0.3 * math.cos(phi)) ** 2 + (yy - 0.3 * math.sin(phi)) ** 2) / 0.05)
        inside = xx**2 + yy**2 < 0.9  # the corners sample the reflection padding
        assert float((img - rotated)[inside].abs().max()) < 0.06, (i, float((img - rotated).abs().max()))
        angles.append(phi % (2 * math.pi))
    ordered = sorted(angles)
    assert max(np.diff([*ordered, ordered[0] + 2 * math.pi])) < math.pi, ordered  # no half circle left empty
    small = torch.exp(-((xx - 0.2) ** 2 + yy**2) / 0.01)[None, None]
    zoomed = augment_batch(small, torch.Generator().manual_seed(0), rot90=False, flip=False, scale=(2.0, 2.0))
    cx = (zoomed[0, 0] * xx).sum() / zoomed[0, 0].sum()
    assert cx.item() == pytest.approx(0.4, abs=0.02)  # magnified by 2 about the centre
    assert zoomed.sum().item() == pytest.approx(4 * small.sum().item(), rel=0.05)  # area x4
    with pytest.raises(ValueError, match="scale"):
        augment_batch(blob, None, scale=(0.0, 1.0))


def test_normalize_modes():
    x = torch.randn(5, 1, 8, 8) * 3 + 7
    m = normalize_batch(x, "per_image_minmax")
    assert torch.allclose(m.amin(dim=(1, 2, 3)), torch.zeros(5)) and torch.allclose(
        m.amax(dim=(1, 2, 3)), torch.ones(5)
    )
    s = normalize_batch(x, "per_image_standard")
    assert torch.allclose(s.mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-5)
    assert torch.allclose(s.std(dim=(1, 2, 3), unbiased=False), torch.ones(5), atol=1e-4)
    assert normalize_batch(x, "none") is x
    assert torch.equal(normalize_batch(torch.ones(2, 1, 4, 4), "per_image_standard"), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="bogus"):
        normalize_batch(x, "bogus")
