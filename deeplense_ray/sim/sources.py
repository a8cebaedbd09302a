"""Real-galaxy source libraries: packaged Hubble Deep Field stamps or a user Galaxy10-layout HDF5.

A library is a float32 tensor [N, S, S] of non-negative stamps, each normalised to unit sum, row index
= +y, column index = +x. The packaged default (``data/hdf_galaxies.npz``) is cut from
``skimage.data.hubble_deep_field()`` by ``scripts/prepare_hdf_galaxies.py``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch

DEFAULT_LIBRARY = "hdf_galaxies.npz"
STAMP_SIZE = 64  # stamps of user HDF5 libraries are area-averaged down to this size


def default_library_path() -> Path:
    """Path of the packaged Hubble Deep Field stamps."""
    return Path(str(resources.files("deeplense_ray.sim").joinpath("data", DEFAULT_LIBRARY)))


def normalise_stamps(stamps: np.ndarray) -> np.ndarray:
    """Clip at zero and scale every stamp [N, S, S] to unit sum; ValueError if a stamp is empty."""
    s = np.clip(np.asarray(stamps, dtype=np.float64), 0.0, None)
    tot = s.sum(axis=(1, 2))
    if np.any(~np.isfinite(tot)) or np.any(tot <= 0):
        bad = np.nonzero(~(tot > 0) | ~np.isfinite(tot))[0][:5].tolist()
        raise ValueError(f"source stamps {bad} are empty or not finite after clipping at zero")
    return (s / tot[:, None, None]).astype(np.float32)


def _load_npz(path: Path) -> np.ndarray:
    with np.load(path) as z:
        if "stamps" not in z:
            raise ValueError(f"{path}: no 'stamps' array (found {list(z.keys())})")
        return normalise_stamps(z["stamps"].astype(np.float32))


def galaxy10_to_stamps(images: np.ndarray, *, stamp_size: int = STAMP_SIZE) -> np.ndarray:
    """Galaxy10 DECals cut-outs uint8 [N, H, W, 3] -> background-subtracted grey stamps [N, s, s] (unit sum).

    Grey = mean of the three bands; background = median of the outer 8-pixel frame, subtracted;
    the image is area-averaged to ``stamp_size`` (H must be a multiple of it).
    """
    a = np.asarray(images)
    if a.ndim != 4 or a.shape[-1] != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"expected images [N, H, H, 3], got shape {a.shape}")
    n, h = a.shape[0], a.shape[1]
    if h % stamp_size:
        raise ValueError(f"image size {h} is not a multiple of stamp size {stamp_size}")
    grey = a.astype(np.float32).mean(axis=-1)
    frame = np.concatenate(
        [
            grey[:, :8, :].reshape(n, -1),
            grey[:, -8:, :].reshape(n, -1),
            grey[:, :, :8].reshape(n, -1),
            grey[:, :, -8:].reshape(n, -1),
        ],
        axis=1,
    )
    grey = grey - np.median(frame, axis=1)[:, None, None]
    f = h // stamp_size
    grey = grey.reshape(n, stamp_size, f, stamp_size, f).mean(axis=(2, 4))
    return grey


def _load_galaxy10(path: Path, *, chunk: int = 512) -> np.ndarray:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"cannot open source library {path} as HDF5: {e}") from None
    with f:
        if "images" not in f:
            raise ValueError(f"{path}: no 'images' dataset (Galaxy10 layout: images uint8 [N,256,256,3])")
        ds = f["images"]
        if ds.ndim != 4 or ds.shape[-1] != 3 or ds.shape[1] != ds.shape[2] or ds.shape[0] < 1:
            raise ValueError(f"{path}: 'images' has shape {ds.shape}; expected [N, H, H, 3] with N >= 1")
        parts = [galaxy10_to_stamps(ds[i : i + chunk]) for i in range(0, ds.shape[0], chunk)]
    stamps = np.concatenate(parts, axis=0)
    s = np.clip(stamps, 0.0, None)
    keep = s.sum(axis=(1, 2)) > 0
    if not keep.any():
        raise ValueError(f"{path}: every image is empty after background subtraction")
    return normalise_stamps(stamps[keep])


@lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int) -> torch.Tensor:
    p = Path(path)
    arr = _load_npz(p) if p.suffix == ".npz" else _load_galaxy10(p)
    t = torch.from_numpy(arr)
    t.requires_grad_(False)
    return t


def load_source_library(path: str | os.PathLike | None = None) -> torch.Tensor:
    """Unit-sum stamps [N, S, S] float32 (CPU). ``None``: the packaged HDF stamps; ``.npz`` with a
    'stamps' array; anything else is read as a Galaxy10-layout HDF5 (``images`` uint8 [N, H, H, 3])."""
    p = default_library_path() if path is None else Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"source library {str(p)!r} does not exist")
    return _load_cached(str(p.resolve()), p.stat().st_mtime_ns)
