"""Differentiable SIS inverse lensing used by the Lensiformer and the SIS autoencoder (PINN).

Conventions follow lenstronomy (``data_configure_simple(N, d)``, ``inverse=False``): pixel (i, j) has its
centre at ``x = -(N-1)/2*d + j*d``, ``y = -(N-1)/2*d + i*d`` (rows are y), angles in arcsec.

Physics: with the SIS ansatz ``psi(theta) = k(theta) |theta|`` and ``grad k`` neglected (as in the PINN and
Lensiformer papers), the lens equation gives ``beta = theta - k(theta) theta/|theta|``: ``k`` is a local
Einstein radius [arcsec]. Surface brightness is conserved by lensing, so the source brightness at
``beta(theta)`` equals the image brightness at ``theta``. The source is rebuilt by *bilinear splatting*:
every image pixel deposits its value on the 4 source-plane pixels around ``beta`` with bilinear weights
(``scatter_add``), and the source pixel is the weight-normalised mean. The weights are smooth in ``beta``
so gradients flow to ``k`` (unlike rounding to integer pixels, which the published Lensiformer did).
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_PIXEL_SCALE = 0.101
"""Default pixel scale [arcsec/pixel] when none is given (Euclid VIS, the Real-Galaxy-Tiny / Model II
value)."""

DEFAULT_THETA_E = 1.2
"""Default SIS Einstein-radius scale [arcsec] around which k(x, y) is saturated."""


def pixel_grid(
    num_pix: int, delta_pix: float, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates ``(x, y)`` [arcsec], each [num_pix, num_pix], lenstronomy convention
    (``x`` varies along columns j, ``y`` along rows i)."""
    c = (torch.arange(num_pix, device=device, dtype=dtype) - (num_pix - 1) / 2.0) * delta_pix
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x, y


def sis_source_positions(
    x: torch.Tensor, y: torch.Tensor, k: torch.Tensor, *, r_min: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """SIS lens equation ``beta = theta - k theta/|theta|``.

    Args:
        x, y: image-plane positions [arcsec], broadcastable to ``k``.
        k: local Einstein radius [arcsec] (k(x, y) of the PINN / Lensiformer ansatz).
        r_min: floor on ``|theta|`` [arcsec] so the centre pixel has a finite direction.
    Returns:
        ``(beta_x, beta_y)`` [arcsec], the shape of the broadcast.
    """
    r = torch.sqrt(x * x + y * y).clamp_min(r_min)
    return x - k * x / r, y - k * y / r


def bilinear_splat(
    values: torch.Tensor,
    beta_x: torch.Tensor,
    beta_y: torch.Tensor,
    *,
    num_pix: int,
    delta_pix: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deposit image values at source positions onto a ``num_pix`` x ``num_pix`` grid of pixel size
    ``delta_pix`` [arcsec] (same lenstronomy convention as :func:`pixel_grid`).

    Args:
        values: [B, C, H, W] image brightness.
        beta_x, beta_y: [B, H, W] source-plane positions [arcsec] of each image pixel.
    Returns:
        ``(weighted_sum [B, C, N, N], weight [B, 1, N, N])``. Differentiable in ``values`` and ``beta``.
    """
    b, c, h, w = values.shape
    n = num_pix
    origin = -(n - 1) / 2.0 * delta_pix
    u = (beta_x - origin) / delta_pix  # continuous column index
    v = (beta_y - origin) / delta_pix  # continuous row index
    j0 = torch.floor(u.detach())
    i0 = torch.floor(v.detach())
    fu = u - j0
    fv = v - i0
    j0 = j0.long()
    i0 = i0.long()
    vals = values.reshape(b, c, h * w)
    num = values.new_zeros(b, c, n * n)
    den = values.new_zeros(b, 1, n * n)
    for di, dj, wt in (
        (0, 0, (1 - fv) * (1 - fu)),
        (0, 1, (1 - fv) * fu),
        (1, 0, fv * (1 - fu)),
        (1, 1, fv * fu),
    ):
        ii = i0 + di
        jj = j0 + dj
        inside = (ii >= 0) & (ii < n) & (jj >= 0) & (jj < n)
        idx = (ii.clamp(0, n - 1) * n + jj.clamp(0, n - 1)).reshape(b, 1, h * w)
        wt = (wt * inside).reshape(b, 1, h * w).to(values.dtype)
        num = num.scatter_add(2, idx.expand(b, c, h * w), vals * wt)
        den = den.scatter_add(2, idx, wt)
    return num.reshape(b, c, n, n), den.reshape(b, 1, n, n)


def saturate_k(raw: torch.Tensor, theta_E: torch.Tensor | float, saturation: float = 0.2) -> torch.Tensor:
    """Map an unbounded network output to ``k = theta_E (1 + saturation * tanh(raw))`` [arcsec], i.e. within
    +-``saturation`` (20 % by default, as in the Lensiformer paper) of the SIS Einstein radius ``theta_E``."""
    return theta_E * (1.0 + saturation * torch.tanh(raw))


class InverseLensLayer(nn.Module):
    """Reconstruct the source from a lensed image and a per-pixel ``k`` [arcsec] (SIS ansatz, differentiable).

    Args (keyword-only):
        num_pix: image side N [pixels]; the source grid has the same N and pixel size.
        pixel_scale: ``delta_pix`` [arcsec/pixel] of the data (from the dataset's preset).
        min_weight: source pixels whose summed splat weight is below this are undefined (set to 0).
    forward(image [B,C,N,N], k [B,1,N,N] or broadcastable) -> (source [B,C,N,N], defined mask [B,1,N,N]).
    """

    def __init__(self, *, num_pix: int, pixel_scale: float, min_weight: float = 1e-3) -> None:
        super().__init__()
        if pixel_scale is None or not pixel_scale > 0:
            raise ValueError(f"pixel_scale must be > 0 arcsec/pixel, got {pixel_scale!r}")
        self.num_pix = int(num_pix)
        self.pixel_scale = float(pixel_scale)
        self.min_weight = float(min_weight)
        x, y = pixel_grid(self.num_pix, self.pixel_scale)
        self.register_buffer("theta_x", x, persistent=False)
        self.register_buffer("theta_y", y, persistent=False)

    def forward(self, image: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = image.shape[0]
        k = k.to(torch.float32)
        if k.dim() == 4:
            k = k[:, 0]
        k = k.expand(b, self.num_pix, self.num_pix)
        beta_x, beta_y = sis_source_positions(self.theta_x, self.theta_y, k)
        num, den = bilinear_splat(
            image.to(torch.float32), beta_x, beta_y, num_pix=self.num_pix, delta_pix=self.pixel_scale
        )
        defined = den > self.min_weight
        source = torch.where(defined, num / den.clamp_min(self.min_weight), torch.zeros_like(num))
        return source.to(image.dtype), defined.to(image.dtype)
