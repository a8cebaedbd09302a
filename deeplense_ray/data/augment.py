"""Batched image augmentations and per-image normalisation (torch; run on whatever device the images are on).

Lens images have no preferred orientation, so the field augments with the dihedral group (90-degree rotations
and flips, exact on the pixel grid), optionally free rotations and mild scalings (bilinear resampling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NORMALIZE_MODES: tuple[str, ...] = ("none", "per_image_minmax", "per_image_standard")


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64).to(device)


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    rot90: bool = True,
    flip: bool = True,
    free_rotation: bool = False,
    scale: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Randomly transform each image of a batch [B, C, H, W] independently; returns a new tensor.

    rot90: rotate by k*90 degrees, k uniform in {0,1,2,3} (needs H == W). flip: mirror left-right with
    probability 1/2 (with rot90 this covers all 8 symmetries of the square; without rot90 it also flips
    up-down with probability 1/2). free_rotation: rotate by an angle uniform in [0, 2 pi) and
    scale=(lo, hi): zoom by a factor uniform in [lo, hi] (> 1 magnifies), both in one bilinear resampling
    (affine_grid + grid_sample, reflection padding). Random draws come from ``generator`` (any device)
    in a fixed order, so the same generator state gives the same output.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if scale is not None:
        lo, hi = (float(scale[0]), float(scale[1]))
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {scale!r}")
    b, _, h, w = images.shape
    dev = images.device
    out = images
    # Draw every random number first, in a fixed order, whatever options are on.
    u_rot = _uniform(b, generator, dev)
    u_flip_x = _uniform(b, generator, dev)
    u_flip_y = _uniform(b, generator, dev)
    u_angle = _uniform(b, generator, dev)
    u_scale = _uniform(b, generator, dev)
    if rot90:
        if h != w:
            raise ValueError(f"rot90 needs square images, got H={h}, W={w}")
        k = torch.floor(u_rot * 4).clamp(max=3).long()
        rotated = [out] + [torch.rot90(out, j, dims=(-2, -1)) for j in (1, 2, 3)]
        stacked = torch.stack(rotated)  # [4, B, C, H, W]
        out = stacked[k, torch.arange(b, device=dev)]
    if flip:
        fx = (u_flip_x < 0.5).view(b, 1, 1, 1)
        out = torch.where(fx, out.flip(-1), out)
        if not rot90:
            fy = (u_flip_y < 0.5).view(b, 1, 1, 1)
            out = torch.where(fy, out.flip(-2), out)
    if free_rotation or scale is not None:
        angle = u_angle * (2 * math.pi) if free_rotation else torch.zeros(b, device=dev, dtype=torch.float64)
        if scale is not None:
            zoom = lo + (hi - lo) * u_scale
        else:
            zoom = torch.ones(b, device=dev, dtype=torch.float64)
        # Output pixel x samples input at R(-angle) x / zoom (normalised coordinates, square-pixel aspect).
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros(b, 2, 3, device=dev, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
        theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
        work = out if out.is_floating_point() else out.float()
        grid = F.affine_grid(theta.to(work.dtype), list(work.shape), align_corners=False)
        out = F.grid_sample(work, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.contiguous() if out is not images else out.clone()


def normalize_batch(images: torch.Tensor, mode: str = "none", *, eps: float = 1e-8) -> torch.Tensor:
    """Per-image normalisation of [B, C, H, W] (statistics over C, H, W of each image).

    'none': unchanged; 'per_image_minmax': (x - min) / (max - min) in [0, 1];
    'per_image_standard': (x - mean) / std (zero mean, unit variance). Constant images map to 0.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize mode must be one of {list(NORMALIZE_MODES)}, got {mode!r}")
    if mode == "none":
        return images
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    x = images if images.is_floating_point() else images.float()
    flat = x.reshape(x.shape[0], -1)
    if mode == "per_image_minmax":
        lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
        hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
        return (x - lo) / (hi - lo).clamp_min(eps)
    mean = flat.mean(dim=1).view(-1, 1, 1, 1)
    std = flat.std(dim=1, unbiased=False).view(-1, 1, 1, 1)
    return (x - mean) / std.clamp_min(eps)
