"""Cut real-galaxy source stamps from the Hubble Deep Field image that scikit-image ships.

    python scripts/prepare_hdf_galaxies.py [--out deeplense_ray/sim/data/hdf_galaxies.npz]

Steps (deterministic, no download): grey = mean of the RGB bands of ``skimage.data.hubble_deep_field()``;
background = median, noise = 1.4826 * MAD of the grey image; segmentation = connected pixels above
background + 3 noise after a 1-pixel Gaussian smoothing; keep regions of at least 80 pixels whose
square cut-out (side 2.5 x the region's larger bounding-box side, at least 24 pixels) lies inside the
image; keep only the galaxy's own segment dilated by 3 pixels (other galaxies and sky noise are set to
zero), subtract the background, clip at zero, resample to 64 x 64 (anti-aliased), normalise to unit
sum, store float16 as ``stamps`` [N, 64, 64] with ``bbox`` (row0, col0, side) and ``area`` per stamp.
Rows of a stamp run along +y.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

STAMP = 64
MIN_AREA = 80
PAD_FACTOR = 2.5
MIN_SIDE = 24
THRESH_SIGMA = 3.0
DILATE = 3


def cut_stamps(image: np.ndarray) -> dict[str, np.ndarray]:
    """Stamps [N, 64, 64] float32 (unit sum) plus their bounding boxes and areas from an RGB image."""
    from skimage import filters, measure, morphology, transform

    grey = image.astype(np.float64).mean(axis=-1)
    bkg = float(np.median(grey))
    noise = float(1.4826 * np.median(np.abs(grey - bkg)))
    smooth = filters.gaussian(grey, sigma=1.0, preserve_range=True)
    labels = measure.label(smooth > bkg + THRESH_SIGMA * noise, connectivity=2)
    H, W = grey.shape
    stamps, boxes, areas = [], [], []
    for reg in measure.regionprops(labels):
        if reg.area < MIN_AREA:
            continue
        r0, c0, r1, c1 = reg.bbox
        side = int(max(MIN_SIDE, round(PAD_FACTOR * max(r1 - r0, c1 - c0))))
        cr, cc = reg.centroid
        top, left = int(round(cr - side / 2)), int(round(cc - side / 2))
        if top < 0 or left < 0 or top + side > H or left + side > W:
            continue
        cut = grey[top : top + side, left : left + side] - bkg
        lab = labels[top : top + side, left : left + side]
        keep = morphology.dilation(lab == reg.label, morphology.disk(DILATE))
        cut = np.where(keep, cut, 0.0)
        cut = np.clip(cut, 0.0, None)
        small = transform.resize(cut, (STAMP, STAMP), order=1, anti_aliasing=True, preserve_range=True)
        small = np.clip(small, 0.0, None)[::-1]  # image rows run downwards; stamp rows run along +y
        tot = small.sum()
        if not np.isfinite(tot) or tot <= 0:
            continue
        stamps.append(small / tot)
        boxes.append((top, left, side))
        areas.append(reg.area)
    if not stamps:
        raise RuntimeError("no galaxy passed the cuts")
    return {
        "stamps": np.stack(stamps).astype(np.float32),
        "bbox": np.asarray(boxes, dtype=np.int32),
        "area": np.asarray(areas, dtype=np.int32),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "deeplense_ray" / "sim" / "data" / "hdf_galaxies.npz"
    ap.add_argument("--out", type=Path, default=default)
    args = ap.parse_args(argv)
    from skimage import data

    out = cut_stamps(data.hubble_deep_field())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp.npz")
    np.savez_compressed(tmp, stamps=out["stamps"].astype(np.float16), bbox=out["bbox"], area=out["area"])
    os.replace(tmp, args.out)
    n = len(out["stamps"])
    print(f"wrote {n} stamps of {STAMP}x{STAMP} to {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
