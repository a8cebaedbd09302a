"""Image-plane grid, supersampling, PSF convolution and noise (batched torch).

Grid convention (lenstronomy ``data_configure_simple(N, d, inverse=False)``): pixel (i, j) has centre
x = -(N-1)/2 d + j d, y = -(N-1)/2 d + i d (rows are y). With supersampling ss, sub-pixel centres are
offset by ((k + 1/2)/ss - 1/2) d, and a pixel's flux is the mean sub-pixel surface brightness times d^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def pixel_grid(
    num_pix: int, delta_pix: float, supersampling: int = 1, *, device=None, dtype=torch.float32
) -> tuple[Tensor, Tensor]:
    """Flattened sub-pixel coordinates [arcsec], each [(num_pix*ss)^2], row-major (y slow, x fast)."""
    ss = int(supersampling)
    n = num_pix * ss
    k = torch.arange(n, dtype=torch.float64)
    coord = -(num_pix - 1) / 2.0 * delta_pix + (k // ss) * delta_pix + ((k % ss + 0.5) / ss - 0.5) * delta_pix
    yy, xx = torch.meshgrid(coord, coord, indexing="ij")
    return xx.reshape(-1).to(device=device, dtype=dtype), yy.reshape(-1).to(device=device, dtype=dtype)


def bin_supersampled(sb: Tensor, num_pix: int, supersampling: int, delta_pix: float) -> Tensor:
    """Surface brightness [B, (N ss)^2] -> flux per pixel [B, N, N] = mean over sub-pixels * delta_pix^2."""
    B = sb.shape[0]
    ss = int(supersampling)
    img = sb.reshape(B, num_pix, ss, num_pix, ss) if ss > 1 else sb.reshape(B, num_pix, num_pix)
    if ss > 1:
        img = img.mean(dim=(2, 4))
    return img * (delta_pix * delta_pix)


def gaussian_kernel_1d(
    fwhm: float, delta_pix: float, *, truncation: float = 5.0, dtype=torch.float64
) -> Tensor:
    """1D Gaussian kernel as scipy.ndimage.gaussian_filter builds it (what lenstronomy's GAUSSIAN PSF uses).

    sigma = fwhm / (2 sqrt(2 ln 2)) / delta_pix [pixels]; radius = int(truncation sigma + 0.5); normalised.
    """
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / delta_pix
    radius = int(truncation * sigma + 0.5)
    xs = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * xs * xs / (sigma * sigma))
    return (k / k.sum()).to(dtype)


def convolve_gaussian(images: Tensor, kernel_1d: Tensor) -> Tensor:
    """Separable convolution of [B, H, W] (or [B, 1, H, W]) images with edge replication
    (scipy ``mode='nearest'``, as lenstronomy's GAUSSIAN PSF). Returns the input's shape.

    Written as a fixed-order sum over the kernel taps (no cuDNN/oneDNN algorithm choice), so every
    image's result is bit-identical whatever the batch size.
    """
    shape = images.shape
    H, W = shape[-2], shape[-1]
    r = (kernel_1d.numel() - 1) // 2
    if r == 0:
        return images
    taps = kernel_1d.tolist()
    x = F.pad(images.reshape(-1, 1, H, W), (r, r, r, r), mode="replicate")[:, 0]  # [B, H+2r, W+2r]
    h = taps[0] * x[:, :, 0:W]
    for k in range(1, len(taps)):
        h = h + taps[k] * x[:, :, k : k + W]
    v = taps[0] * h[:, 0:H, :]
    for k in range(1, len(taps)):
        v = v + taps[k] * h[:, k : k + H, :]
    return v.reshape(shape)


def convolve_supersampled(
    sb: Tensor, kernel_1d: Tensor, num_pix: int, supersampling: int, delta_pix: float
) -> Tensor:
    """Surface brightness [B, (N ss)^2] -> flux per pixel [B, N, N], the PSF applied on the supersampled grid
    before binning (lenstronomy ``supersampling_convolution=True``): sub-pixel flux sb (delta_pix/ss)^2,
    ``convolve_gaussian`` with ``kernel_1d`` built for pixels of delta_pix/ss, then summed over each pixel's
    ss x ss sub-pixels. As ss grows this tends to the pixel integral of the PSF-convolved sky."""
    B, ss = sb.shape[0], int(supersampling)
    fine = sb.reshape(B, num_pix * ss, num_pix * ss) * (delta_pix / ss) ** 2
    fine = convolve_gaussian(fine, kernel_1d)
    return fine.reshape(B, num_pix, ss, num_pix, ss).sum(dim=(2, 4))


def add_poisson_gaussian_noise(
    images: Tensor,
    exposure_time: Tensor,
    background_rate: Tensor,
    read_noise_rms: Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    """Noisy image [counts/s]: (Poisson((I + sky) t) - sky t + N(0, read_noise_rms)) / t.

    images: [B, ...] noise-free flux per pixel [counts/s]; exposure_time [B] [s]; background_rate [B]
    sky per pixel [counts/s] (its Poisson noise is added, its mean subtracted); read_noise_rms [B]
    Gaussian rms per pixel in counts (total over exposures).
    """
    view = (-1,) + (1,) * (images.dim() - 1)
    t = exposure_time.view(view)
    sky = background_rate.view(view)
    lam = ((images.clamp_min(0) + sky) * t).clamp_min(0)
    counts = torch.poisson(lam, generator=generator)
    gauss = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return (counts - sky * t + gauss * read_noise_rms.view(view)) / t


def add_deeplense_model_i_noise(
    images: Tensor, exposure_time: Tensor, sigma_bkg: float, generator: torch.Generator | None
) -> Tensor:
    """The published Model I noise recipe (DeepLenseSim ``simple_sim``): integer counts.

    counts = Poisson(clip(t (I + sqrt(|I| / t) z1 + sigma_bkg z2), 0)), z1, z2 ~ N(0, 1) per pixel:
    lenstronomy's ``add_poisson`` (a Gaussian approximation of the shot noise) and ``add_background``
    maps, then a Poisson draw on top (so the shot noise is counted twice). images: [B, ...] noise-free
    flux per pixel [counts/s]; exposure_time [B] [s]; sigma_bkg [counts/s]. Returns counts [B, ...]
    (integer values)."""
    t = exposure_time.view((-1,) + (1,) * (images.dim() - 1))
    z1 = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    z2 = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    mean = t * (images + torch.sqrt(images.abs() / t) * z1 + sigma_bkg * z2)
    return torch.poisson(mean.clamp_min(0), generator=generator)
