"""Controls of a substructure benchmark that need no network: the ring-size observer.

A classifier that sees only the size of the Einstein ring measures the lens's mass inside the ring, not its
clumps. For paired images (``simulate(paired=True)``: the same macro lens, source and observation in each
group of C images, one per class) it is computed from two numbers per image:

- ``ring_radius``: the brightness-weighted mean radius of the noise-free image about the lens centre,
  sum(I r) / sum(I) over pixels [arcsec] (the image as the network sees it: binned, PSF-convolved);
- ``theta_E_eff``: the effective Einstein radius of the whole lens (``sim/compensation.py``), a fit-free
  stand-in for a fitted one.

``ring_size_aucs`` returns the ROC AUC of each against the class, per class pair (the first class of a pair
the positive one). With the substructure's monopole subtracted (``mass_compensation = "monopole"``, the
default) theta_E_eff is the substructure-free lens's and the ring radius moves only by the clumps; with a
class-independent ring mass and slope (``"ring_slope"``) both sit near 0.5; with the ring mass alone
(``"ring"``) theta_E_eff does, the ring radius not quite (arcs stretched radially by the substructure's
sheet-like part).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .presets import resolve_preset
from .render import pixel_grid
from .simulate import simulate

#: class pairs (positive, negative) whose AUCs ``ring_size_aucs`` reports when their classes are simulated
PAIRS = (("cdm", "no_sub"), ("cdm_smooth", "no_sub"), ("cdm", "cdm_smooth"), ("fdm", "no_sub"))


def ring_radius(images: Tensor, center_x: Tensor, center_y: Tensor, delta_pix: float) -> Tensor:
    """Brightness-weighted mean radius [n] [arcsec] about (center_x, center_y) [n] of images [n, 1, N, N]
    (flux per pixel, noise free; the lenstronomy grid of ``sim/render.py``)."""
    n, N = images.shape[0], images.shape[-1]
    x, y = pixel_grid(N, delta_pix, 1, dtype=torch.float64)
    img = images.reshape(n, N * N).to(torch.float64)
    cx, cy = center_x.to(torch.float64)[:, None], center_y.to(torch.float64)[:, None]
    r = torch.hypot(x[None] - cx, y[None] - cy)
    return (img * r).sum(1) / img.sum(1)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC P(pos > neg) + P(pos = neg) / 2 (Mann-Whitney U over len(pos) len(neg), ties by mid-rank)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    both = np.concatenate([pos, neg])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size, dtype=np.float64)
    ranks[order] = np.arange(1, both.size + 1)
    _, inv, counts = np.unique(both, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # mid-ranks of ties
    ranks = first[inv] + (counts[inv] + 1) / 2.0
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


def ring_size_aucs(
    preset: Any,
    n_groups: int,
    seed: int,
    *,
    classes: Sequence[str] = ("no_sub", "cdm"),
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The ring-size observer on ``n_groups`` paired groups of noise-free images of ``preset`` with
    ``classes`` (also the preset's class list: one image per class in each group).

    Returns ``{"<pos>_vs_<neg>": {"auc_ring_radius", "auc_theta_E_eff", "mean_shift_ring_radius",
    "mean_shift_theta_E_eff"}}`` for each pair of ``PAIRS`` among the classes (shifts: mean over groups of
    the paired difference, arcsec) and ``"mean_theta_E_compensation"`` per class [arcsec]."""
    over = {**(overrides or {}), "class_names": list(classes), "noise": "none"}
    pre = resolve_preset(preset, over)
    C = len(classes)
    res = simulate(pre, n_groups * C, seed, device=device, paired=True)
    p = res.params
    rr = ring_radius(res.images, p["center_x"], p["center_y"], pre.delta_pix).numpy()
    te = p["theta_E_eff"].double().numpy()
    lab = res.labels.numpy()
    by = {c: lab == i for i, c in enumerate(classes)}
    out: dict[str, Any] = {
        "mean_theta_E_compensation": {
            c: float(p["theta_E_compensation"].double().numpy()[m].mean()) for c, m in by.items()
        }
    }
    for a, b in PAIRS:
        if a in by and b in by:
            out[f"{a}_vs_{b}"] = {
                "auc_ring_radius": auc(rr[by[a]], rr[by[b]]),
                "auc_theta_E_eff": auc(te[by[a]], te[by[b]]),
                "mean_shift_ring_radius": float((rr[by[a]] - rr[by[b]]).mean()),
                "mean_shift_theta_E_eff": float((te[by[a]] - te[by[b]]).mean()),
            }
    return out
