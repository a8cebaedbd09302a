"""``simulate``: draw parameters (seeded; on CPU or on the render device) and render batches of lens images
on any device."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .compensation import alpha_radial_table, radial_table_needed
from .fdm import FdmGrid, add_fdm_deflection
from .lens import (
    alpha_epl,
    alpha_line_segment,
    alpha_multipole,
    alpha_point_chain,
    alpha_point_masses_sum,
    alpha_shear,
    alpha_sie,
    alpha_tnfw,
    epl_series_terms,
    point_chain,
)
from .light import pixelated_source, sersic_elliptical
from .los import lens_plane_w, los_capacity, los_enabled, triton_los_table
from .los import ray_shoot as los_ray_shoot
from .presets import Preset, resolve_preset
from .render import (
    add_deeplense_model_i_noise,
    add_poisson_gaussian_noise,
    bin_supersampled,
    convolve_gaussian,
    convolve_supersampled,
    gaussian_kernel_1d,
    pixel_grid,
)
from .sampling import MULTIPOLE_FIELDS, draw_parameters, has_multipoles
from .sources import load_source_library

#: images per noise block, by device type: noise of block b comes from a generator on the device seeded by
#: (seed, b), so the bytes do not depend on the internal batch size (batches are whole blocks).
NOISE_BLOCK = {"cpu": 64, "cuda": 1024}


def noise_block(device: torch.device) -> int:
    """Images per noise block on this device type (64 on CPU, 1024 on CUDA)."""
    return NOISE_BLOCK.get(device.type, 64)


@dataclass(frozen=True)
class SimResult(Mapping):
    """Images [n,1,H,W] float32, labels [n] int64, params {name: [n, ...]} and class names (all on CPU)."""

    images: Tensor
    labels: Tensor
    params: dict[str, Tensor]
    class_names: tuple[str, ...]
    preset: Preset = field(repr=False)

    def __getitem__(self, key: str) -> Any:
        if key in ("images", "labels", "params", "class_names", "preset"):
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(("images", "labels", "params", "class_names", "preset"))

    def __len__(self) -> int:
        return 5


def _check_int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        raise ValueError(
            f"{name} = {v} is out of range; allowed: {lo} <= {name}" + (f" <= {hi}" if hi else "")
        )
    return v


def _noise_seed(seed: int, block: int) -> int:
    return int(
        np.random.SeedSequence([seed, block, 0x5EED]).generate_state(1, np.uint64)[0] & ((1 << 63) - 1)
    )


#: where ``simulate`` draws the parameters: "cpu" (the default: one CPU generator seeded with ``seed``) or
#: "device" (a generator on the render device seeded by ``device_draw_seed(seed)``: another stream)
DRAWS = ("cpu", "device")


def device_draw_seed(seed: int) -> int:
    """Seed of the device generator of ``draws="device"`` (a stream apart from the CPU draws' ``seed``)."""
    return int(np.random.SeedSequence([seed, 0xD7A5]).generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


def draw_generator(seed: int, device: torch.device, draws: str) -> torch.Generator:
    """The generator ``simulate`` draws the parameters from: CPU seeded with ``seed`` (``draws="cpu"``), or
    on ``device`` seeded with ``device_draw_seed(seed)`` (``draws="device"``)."""
    if draws not in DRAWS:
        raise ValueError(f"draws must be one of {list(DRAWS)}, got {draws!r}")
    if draws == "cpu":
        return torch.Generator().manual_seed(seed)
    return torch.Generator(device=indexed_device(device)).manual_seed(device_draw_seed(seed))


def indexed_device(device: torch.device | str) -> torch.device:
    """``device`` with its index: a bare ``cuda`` becomes the current CUDA device (device generators and
    ``torch.cuda.set_device`` on another thread need one)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_labels(
    preset: Preset, n: int, classes: Sequence[str] | None, labels: Tensor | Sequence[int] | None
) -> Tensor:
    """Class index per image (indices into ``preset.class_names``): given, or balanced over ``classes``."""
    C = preset.num_classes
    if classes is not None:
        if isinstance(classes, str) or len(classes) == 0:
            raise ValueError(
                f"classes must be a non-empty list of class names from {list(preset.class_names)}"
            )
        bad = [c for c in classes if c not in preset.class_names]
        if bad:
            raise ValueError(
                f"classes {bad} are not in preset {preset.name!r}; allowed: {list(preset.class_names)}"
            )
        allowed = torch.tensor([preset.class_names.index(c) for c in classes], dtype=torch.int64)
    else:
        allowed = torch.arange(C, dtype=torch.int64)
    if labels is None:
        return allowed[torch.arange(n) % allowed.numel()]
    lab = torch.as_tensor(labels)
    if lab.dtype.is_floating_point or lab.dtype == torch.bool or lab.dim() != 1 or lab.numel() != n:
        raise ValueError(
            f"labels must be an integer tensor of shape [{n}], got {lab.dtype} {tuple(lab.shape)}"
        )
    lab = lab.to(torch.int64).cpu()
    ok = torch.isin(lab, allowed)
    if not bool(ok.all()):
        bad = lab[~ok][:5].tolist()
        raise ValueError(
            f"labels {bad} are not allowed; allowed class indices: {allowed.tolist()} "
            f"of {list(preset.class_names)}"
        )
    return lab


def auto_batch_size(preset: Preset, device: torch.device, dtype: torch.dtype) -> int:
    """Images per internal batch: a multiple of the noise block that fits a working-memory budget."""
    p_ss = (preset.num_pix * preset.supersampling) ** 2
    per_image = (24 + min(preset.max_subhalos, 32)) * p_ss * torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(0.5 * free)
    else:
        budget = 256 * 2**20
    block = noise_block(device)
    blocks = max(1, budget // (per_image * block))
    return int(min(blocks, max(1, 2**17 // block)) * block)


class Renderer:
    """Noise-free batched renderer for one preset on one device (grid and PSF kernel built once).

    Eager mode evaluates subhalos / vortices only for the images that have them (index subsets);
    ``dense=True`` runs one function over every image (macro lens + all substructure + Sersic source;
    zero-padded components contribute nothing); ``compile=True`` (implies dense unless told otherwise)
    passes that function through ``torch.compile`` so that it fuses into a few kernels.
    """

    def __init__(
        self,
        *,
        preset: Preset,
        device: torch.device,
        dtype: torch.dtype,
        stamps: Tensor | None = None,
        compile: bool = False,
        dense: bool | None = None,
    ) -> None:
        self.preset = preset
        self.device = device
        self.dtype = dtype
        self.x, self.y = pixel_grid(
            preset.num_pix, preset.delta_pix, preset.supersampling, device=device, dtype=dtype
        )
        self.ss_conv = _ss_convolution(preset)
        self.kernel = (
            gaussian_kernel_1d(
                preset.psf_fwhm, _psf_pixel(preset), truncation=preset.psf_truncation, dtype=dtype
            ).to(device)
            if preset.psf_fwhm is not None
            else None
        )
        self.stamps = (
            stamps.to(device=device, dtype=torch.float32).unsqueeze(1) if stamps is not None else None
        )
        p_ss = self.x.numel()
        budget = 2**28 if device.type == "cuda" else 2**24  # elements of one [chunk, K, P] temporary
        self.sub_chunk = max(1, int(budget // max(1, p_ss * max(1, preset.max_subhalos))))
        self.dense = bool(compile) if dense is None else bool(dense)
        self.los_w = lens_plane_w(preset) if los_enabled(preset) else None
        self.dense = self.dense and self.los_w is None  # LOS halos: the eager multi-plane path (sim/los.py)
        # wave dark matter: the granule field's FFT deflection, eager path only (sim/fdm.py)
        self.fdm = FdmGrid(preset, device, dtype) if "fdm" in preset.class_names else None
        self.dense = self.dense and self.fdm is None
        self._dense = torch.compile(_dense_hot_path, dynamic=True) if compile else _dense_hot_path
        self._dense_binned = torch.compile(_dense_binned, dynamic=True) if compile else _dense_binned
        self.macro = macro_kind(preset)

    def lensed_surface_brightness(self, p: Mapping[str, Tensor]) -> Tensor:
        """Surface brightness [B, P] at the sub-pixel grid (source seen through the lens, plus lens light)."""
        pre = self.preset
        x, y = self.x, self.y
        col = {k: (v[:, None] if v.dim() == 1 else v) for k, v in p.items()}
        sersic = pre.source_kind == "sersic"
        if self.dense:
            hot = {k: col[k] for k in _hot_keys(pre)}
            out = self._dense(
                x, y, hot, pre.subhalo_profile, sersic, pre.max_subhalos > 0, _vortex_kind(pre), self.macro
            )
            if sersic:
                sb = out
            else:
                bx, by = out
        else:
            bx, by = self._ray_shoot_eager(x, y, p, col)
            if sersic:
                sb = _sersic_source(bx, by, col)
        if not sersic:
            st = self.stamps.index_select(0, p["source_index"])
            sb = pixelated_source(
                bx,
                by,
                st,
                p["source_flux"],
                p["source_size"],
                p["source_angle"],
                p["source_center_x"],
                p["source_center_y"],
            )
        if pre.lens_light:
            sb = sb + _lens_light(x, y, col)
        return sb

    def _ray_shoot_eager(self, x: Tensor, y: Tensor, p: Mapping[str, Tensor], col: Mapping[str, Tensor]):
        if self.los_w is not None:  # multi-plane: LOS halos in front of and behind the lens plane
            return los_ray_shoot(x, y, p, self.los_w, lambda xl, yl: self._lens_plane_alpha(xl, yl, p, col))
        ax, ay = self._lens_plane_alpha(x, y, p, col)
        return x - ax, y - ay

    def _lens_plane_alpha(self, x: Tensor, y: Tensor, p: Mapping[str, Tensor], col: Mapping[str, Tensor]):
        """Deflection [B, P] of everything on the main lens plane at positions x, y ([P] or [B, P])."""
        pre = self.preset
        rows = lambda ii: (x[ii], y[ii]) if x.dim() == 2 else (x, y)  # noqa: E731
        ax, ay = _macro_alpha(x, y, col, self.macro)
        count = p.get("subhalo_count")
        if count is not None and pre.max_subhalos > 0:
            clumpy = count > 0
            if "subhalo_smoothed" in p:  # cdm_smooth images: no clumps (their table below)
                clumpy = clumpy & (p["subhalo_smoothed"] == 0)
            idx = torch.nonzero(clumpy).squeeze(1)
            for s in range(0, idx.numel(), self.sub_chunk):
                ii = idx[s : s + self.sub_chunk]
                kb = int(count[ii].max())  # slots past the chunk's largest count are zero padding
                sub = {k: p[k][ii, :kb] for k in _SUB_KEYS[pre.subhalo_profile]}
                sx, sy = _subhalo_alpha(*rows(ii), sub, pre.subhalo_profile)
                ax = ax.index_add(0, ii, sx)
                ay = ay.index_add(0, ii, sy)
        if "vortex_theta_E" in p:
            ii = torch.nonzero(p["vortex_theta_E"] > 0).squeeze(1)
            if ii.numel():
                vx, vy = _vortex_alpha(*rows(ii), {k: col[k][ii] for k in _VORTEX_KEYS}, _vortex_kind(pre))
                ax = ax.index_add(0, ii, vx)
                ay = ay.index_add(0, ii, vy)
        if "radial_dr" in p:  # circularly symmetric tables: cdm_smooth, or minus a monopole
            ii = torch.nonzero(p["radial_dr"] > 0).squeeze(1)
            if ii.numel():
                rx, ry = _radial_alpha(*rows(ii), {k: col[k][ii] for k in _RADIAL_KEYS})
                ax = ax.index_add(0, ii, rx)
                ay = ay.index_add(0, ii, ry)
        if self.fdm is not None:  # wave dark matter: the granule field (sim/fdm.py)
            ax, ay = add_fdm_deflection(self.fdm, ax, ay, p, x, y)
        return ax, ay

    def lens_light_image(self, p: Mapping[str, Tensor]) -> Tensor:
        """The lens galaxy's light alone, flux per pixel [B, 1, N, N] through the same PSF and binning."""
        pre = self.preset
        col = {k: (v[:, None] if v.dim() == 1 else v) for k, v in p.items()}
        sb = _lens_light(self.x, self.y, col)
        if self.ss_conv:
            img = convolve_supersampled(sb, self.kernel, pre.num_pix, pre.supersampling, pre.delta_pix)
            return img.unsqueeze(1)
        img = bin_supersampled(sb, pre.num_pix, pre.supersampling, pre.delta_pix)
        return (convolve_gaussian(img, self.kernel) if self.kernel is not None else img).unsqueeze(1)

    def __call__(self, p: Mapping[str, Tensor]) -> Tensor:
        """Flux per pixel [B, 1, N, N] from parameters already on the device (1-D [B] or [B, K])."""
        pre = self.preset
        if self.ss_conv:  # PSF on the supersampled grid, then binned
            return convolve_supersampled(
                self.lensed_surface_brightness(p), self.kernel, pre.num_pix, pre.supersampling, pre.delta_pix
            ).unsqueeze(1)
        if self.dense and pre.source_kind == "sersic" and not pre.lens_light:
            # one fused function from parameters to binned flux (the supersampled image never hits memory)
            col = {k: (p[k][:, None] if p[k].dim() == 1 else p[k]) for k in _hot_keys(pre)}
            img = self._dense_binned(
                self.x,
                self.y,
                col,
                pre.subhalo_profile,
                pre.max_subhalos > 0,
                _vortex_kind(pre),
                pre.num_pix,
                pre.supersampling,
                pre.delta_pix,
                self.macro,
            )
        else:
            img = bin_supersampled(
                self.lensed_surface_brightness(p), pre.num_pix, pre.supersampling, pre.delta_pix
            )
        if self.kernel is not None:
            img = convolve_gaussian(img, self.kernel)
        return img.unsqueeze(1)


_MACRO_KEYS = ("theta_E", "e1", "e2", "center_x", "center_y", "gamma1", "gamma2")
_SOURCE_KEYS = (
    "source_amp",
    "source_R_sersic",
    "source_n_sersic",
    "source_e1",
    "source_e2",
    "source_center_x",
    "source_center_y",
)
_SUB_KEYS = {
    "point_mass": ("subhalo_theta_E", "subhalo_x", "subhalo_y"),
    "tnfw": ("subhalo_Rs", "subhalo_alpha_Rs", "subhalo_r_trunc", "subhalo_x", "subhalo_y"),
}
_TNFW_KERNEL_KEYS = ("subhalo_x", "subhalo_y", "subhalo_Rs", "subhalo_alpha_Rs", "subhalo_r_trunc")
_VORTEX_KEYS = ("vortex_theta_E", "vortex_half_length", "vortex_angle", "center_x", "center_y")
_RADIAL_KEYS = ("radial_alpha", "radial_dr", "center_x", "center_y")


def _hot_keys(pre: Preset) -> tuple[str, ...]:
    keys = _MACRO_KEYS + macro_shape_keys(pre)
    if pre.source_kind == "sersic":
        keys = keys + _SOURCE_KEYS
    if pre.max_subhalos > 0:
        keys = keys + _SUB_KEYS[pre.subhalo_profile]
    if "axion" in pre.class_names:
        keys = keys + _VORTEX_KEYS[:3]
    if radial_table_needed(pre):
        keys = keys + _RADIAL_KEYS[:2] + ("subhalo_smoothed",)
    return keys


def _radial_alpha(x: Tensor, y: Tensor, c: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Deflection [B, P] of the images' circularly symmetric tables (``compensation.lens_mass_model``)."""
    return alpha_radial_table(x, y, c["center_x"], c["center_y"], c["radial_dr"], c["radial_alpha"])


def macro_kind(pre: Preset) -> tuple[int, tuple[int, ...]]:
    """(EPL series terms, -1 for the SIE; multipole orders) of the preset's main deflector. The terms
    bound the series' relative error by 1e-6 over the preset's lens_q and lens_gamma ranges
    (``epl_series_terms``)."""
    terms = epl_series_terms(pre.lens_q[0], pre.lens_gamma[1]) if pre.lens_profile == "epl" else -1
    return terms, tuple(m for m, _ in MULTIPOLE_FIELDS) if has_multipoles(pre) else ()


def macro_shape_keys(pre: Preset) -> tuple[str, ...]:
    """Per-image parameters of the main deflector beyond the SIE's: gamma (EPL), multipole a_m, phi_m."""
    terms, orders = macro_kind(pre)
    keys = ("gamma",) if terms >= 0 else ()
    return keys + tuple(f"multipole_{k}{m}" for m in orders for k in ("a", "phi"))


def _macro_alpha(
    x: Tensor, y: Tensor, c: Mapping[str, Tensor], macro: tuple[int, tuple[int, ...]] = (-1, ())
) -> tuple[Tensor, Tensor]:
    """Main deflector (SIE, or EPL with ``macro[0]`` series terms, plus multipoles of orders ``macro[1]``
    centred on it, r_E = theta_E for m = 1) and external shear [arcsec]."""
    terms, orders = macro
    cx, cy = c["center_x"], c["center_y"]
    if terms < 0:
        ax, ay = alpha_sie(x, y, c["theta_E"], c["e1"], c["e2"], cx, cy)
    else:
        ax, ay = alpha_epl(x, y, c["theta_E"], c["gamma"], c["e1"], c["e2"], cx, cy, n_terms=terms)
    for m in orders:
        mx, my = alpha_multipole(x, y, m, c[f"multipole_a{m}"], c[f"multipole_phi{m}"], cx, cy, c["theta_E"])
        ax, ay = ax + mx, ay + my
    sx, sy = alpha_shear(x, y, c["gamma1"], c["gamma2"])
    return ax + sx, ay + sy


def _subhalo_alpha(x: Tensor, y: Tensor, sub: Mapping[str, Tensor], profile: str) -> tuple[Tensor, Tensor]:
    """Summed deflection [B, P] of K subhalos per image (parameters [B, K], zero-padded)."""
    if profile == "point_mass":
        return alpha_point_masses_sum(x, y, sub["subhalo_theta_E"], sub["subhalo_x"], sub["subhalo_y"])
    ex = lambda k: sub[k][..., None]  # noqa: E731 - [B, K, 1]
    sx, sy = alpha_tnfw(
        x.unsqueeze(-2),
        y.unsqueeze(-2),
        ex("subhalo_Rs").clamp_min(1e-6),
        ex("subhalo_alpha_Rs"),
        ex("subhalo_r_trunc").clamp_min(1e-6),
        ex("subhalo_x"),
        ex("subhalo_y"),
    )
    return sx.sum(-2), sy.sum(-2)


def _vortex_kind(pre: Preset) -> tuple[str, int] | None:
    """(vortex_profile, vortex_points) when the preset has axion images, else None."""
    return (pre.vortex_profile, pre.vortex_points) if "axion" in pre.class_names else None


def _vortex_alpha(
    x: Tensor, y: Tensor, c: Mapping[str, Tensor], kind: tuple[str, int]
) -> tuple[Tensor, Tensor]:
    args = (c["vortex_theta_E"], c["vortex_half_length"], c["vortex_angle"], c["center_x"], c["center_y"])
    if kind[0] == "point_chain":
        return alpha_point_chain(x, y, *args, kind[1])
    return alpha_line_segment(x, y, *args)


def _lens_light(x: Tensor, y: Tensor, c: Mapping[str, Tensor]) -> Tensor:
    """Surface brightness of the lens galaxy (Sersic at the lens centre, the mass's ellipticity)."""
    return sersic_elliptical(
        x, y, c["lens_light_amp"], c["lens_light_R_sersic"], c["lens_light_n_sersic"], c["e1"], c["e2"],
        c["center_x"], c["center_y"],
    )  # fmt: skip


def _sersic_source(bx: Tensor, by: Tensor, c: Mapping[str, Tensor]) -> Tensor:
    return sersic_elliptical(
        bx,
        by,
        c["source_amp"],
        c["source_R_sersic"],
        c["source_n_sersic"],
        c["source_e1"],
        c["source_e2"],
        c["source_center_x"],
        c["source_center_y"],
    )


def _dense_binned(
    x: Tensor,
    y: Tensor,
    c: dict[str, Tensor],
    profile: str,
    with_sub: bool,
    vortex: tuple[str, int] | None,
    num_pix: int,
    ss: int,
    delta_pix: float,
    macro: tuple[int, tuple[int, ...]] = (-1, ()),
) -> Tensor:
    """``_dense_hot_path`` for Sersic sources followed by binning to flux per pixel [B, N, N]."""
    sb = _dense_hot_path(x, y, c, profile, True, with_sub, vortex, macro)
    return bin_supersampled(sb, num_pix, ss, delta_pix)


def _dense_hot_path(
    x: Tensor,
    y: Tensor,
    c: dict[str, Tensor],
    profile: str,
    sersic: bool,
    with_sub: bool,
    vortex: tuple[str, int] | None,
    macro: tuple[int, tuple[int, ...]] = (-1, ()),
):
    """Macro lens + every image's substructure (zero-padded) + Sersic source: the part torch.compile fuses.

    ``vortex``: None (no axion class) or (vortex_profile, vortex_points); ``macro``: ``macro_kind``."""
    ax, ay = _macro_alpha(x, y, c, macro)
    if with_sub:
        sub = {k: c[k] for k in _SUB_KEYS[profile]}
        sx, sy = _subhalo_alpha(x, y, sub, profile)
        if "subhalo_smoothed" in c:  # cdm_smooth images: no clumps (their table below)
            keep = c["subhalo_smoothed"] == 0
            sx, sy = torch.where(keep, sx, 0.0), torch.where(keep, sy, 0.0)
        ax, ay = ax + sx, ay + sy
    if vortex is not None:
        vx, vy = _vortex_alpha(x, y, c, vortex)
        ax, ay = ax + vx, ay + vy
    if "radial_dr" in c:  # zero tables add nothing
        rx, ry = _radial_alpha(x, y, c)
        ax, ay = ax + rx, ay + ry
    bx, by = x - ax, y - ay
    if sersic:
        return _sersic_source(bx, by, c)
    return bx, by


def simulate(
    preset: str | Preset | Mapping[str, Any],
    n: int,
    seed: int,
    device: str | torch.device | None = None,
    classes: Sequence[str] | None = None,
    *,
    labels: Tensor | Sequence[int] | None = None,
    paired: bool | None = None,
    dtype: torch.dtype = torch.float32,
    overrides: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    compile: bool = False,
    device_output: bool = False,
    draws: str = "cpu",
) -> SimResult:
    """Simulate ``n`` lens images of ``preset`` (a name, a ``Preset`` or a dict; ``overrides`` apply on top).

    Parameters are drawn on CPU from ``torch.Generator().manual_seed(seed)`` (``draws="cpu"``, the default),
    or with ``draws="device"`` on the render device from a generator seeded by ``device_draw_seed(seed)``
    (the same code and distributions, another random stream: other images for the same seed; the same
    bytes for the same seed on the same device type; fast on CUDA, where CPU draws dominate a call).
    Either way all n images are drawn at once, so draws do not depend on ``batch_size``. Images are
    rendered on ``device`` (default: CUDA if available, else CPU) in internal batches (``batch_size``,
    rounded to whole noise blocks of ``noise_block(device)`` images); the noise of block b comes from a
    generator on the device seeded from (seed, b). The same (preset, n, seed, labels) gives the same bytes
    on the same device type for any batch size.

    ``labels`` (int64 [n], indices into the preset's class_names) fix the classes; otherwise they are
    balanced (arange(n) % C over ``classes`` or all classes). ``paired`` (default: the preset's) gives
    consecutive groups of C images the same macro lens, source and observation. On CUDA in float32,
    Sersic presets without lens light render through fused Triton kernels
    (``sim/_triton.py``) when triton is installed; ``compile=True`` asks instead for the torch.compile
    path (deflections + Sersic source fused by inductor). Returns CPU tensors; images float32 (on the
    render device instead with ``device_output=True``: for callers that post-process there, e.g. the
    dataset writer's float16 cast and checksums; with ``draws="device"`` too, the params stay there).
    """
    return simulate_with_backend(
        preset, n, seed, device, classes, labels=labels, paired=paired, dtype=dtype,
        overrides=overrides, batch_size=batch_size, backend="compile" if compile else None,
        device_output=device_output, draws=draws,
    )  # fmt: skip


BACKENDS = ("eager", "compile", "triton")


def triton_supported(preset: Preset, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused Triton renderer covers this preset on this device (else the torch renderer)."""
    from ._triton import HAVE_TRITON

    return (
        HAVE_TRITON
        and device.type == "cuda"
        and dtype == torch.float32
        and preset.source_kind == "sersic"
        and not preset.lens_light
        and "fdm" not in preset.class_names  # wave dark matter: the torch FFT deflection (sim/fdm.py)
    )


def _ss_convolution(pre: Preset) -> bool:
    """Whether the PSF is applied on the supersampled grid (``supersampling_convolution``, ss > 1, a PSF)."""
    return pre.supersampling_convolution and pre.supersampling > 1 and pre.psf_fwhm is not None


def _psf_pixel(pre: Preset) -> float:
    """Pixel [arcsec] the PSF kernel is built for (a sub-pixel with supersampled convolution)."""
    return pre.delta_pix / pre.supersampling if _ss_convolution(pre) else pre.delta_pix


def simulate_with_backend(
    preset: str | Preset | Mapping[str, Any],
    n: int,
    seed: int,
    device: str | torch.device | None = None,
    classes: Sequence[str] | None = None,
    *,
    labels: Tensor | Sequence[int] | None = None,
    paired: bool | None = None,
    dtype: torch.dtype = torch.float32,
    overrides: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    backend: str | None = None,
    device_output: bool = False,
    draws: str = "cpu",
) -> SimResult:
    """``simulate`` with an explicit renderer: ``backend`` in ``BACKENDS`` or None (triton where
    ``triton_supported``, else eager). Used by the benchmark to compare the renderers."""
    pre = resolve_preset(preset, overrides)
    n = _check_int("n", n, 1)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(dev)!r} requested but CUDA is not available")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {list(BACKENDS)}")
    if draws not in DRAWS:
        raise ValueError(f"draws {draws!r} is not one of {list(DRAWS)}")
    if backend is None:
        backend = "triton" if triton_supported(pre, dev, dtype) else "eager"
    elif backend == "triton" and not triton_supported(pre, dev, dtype):
        raise ValueError(f"the triton backend does not cover preset {pre.name!r} on {dev} in {dtype}")
    paired = pre.paired if paired is None else bool(paired)
    lab = resolve_labels(pre, n, classes, labels)

    stamps = peak = None
    if pre.source_kind == "real_galaxy":
        stamps = load_source_library(pre.source_library)
        S = stamps.shape[-1]
        peak = stamps.amax(dim=(1, 2)).to(torch.float64) * S * S
    gen = draw_generator(seed, dev, draws)
    params = draw_parameters(pre, lab, gen, paired=paired, library_peak=peak, compute_device=dev)

    block = noise_block(dev)
    if batch_size is None:
        bs = _triton_batch_size(pre, block) if backend == "triton" else auto_batch_size(pre, dev, dtype)
    else:
        bs = _check_int("batch_size", batch_size, 1)
        bs = max(block, (bs // block) * block)
    bs = min(bs, -(-n // block) * block)
    if backend == "triton":
        render_batch = _TritonBatches(pre, params, dev, seed)
    else:
        render_batch = _TorchBatches(pre, params, dev, dtype, stamps, seed, compile=backend == "compile")
    out_dev = dev if device_output else torch.device("cpu")
    images = torch.empty((n, 1, pre.num_pix, pre.num_pix), dtype=torch.float32, device=out_dev)
    with torch.inference_mode():
        sink = _PinnedSink(images, bs) if dev.type == "cuda" and out_dev.type == "cpu" else None
        for start in range(0, n, bs):
            stop = min(n, start + bs)
            img = render_batch(start, stop)
            if sink is not None:
                sink.put(img, start, stop)
            else:
                images[start:stop] = img.to(out_dev, torch.float32)
        if sink is not None:
            sink.close()
    out_params = {k: (v.to(dtype) if v.dtype.is_floating_point else v) for k, v in params.items()}
    if not device_output:  # device draws come back to CPU with the images (a no-op for CPU draws)
        out_params = {k: v.cpu() for k, v in out_params.items()}
    return SimResult(images=images, labels=lab, params=out_params, class_names=pre.class_names, preset=pre)


def _triton_batch_size(pre: Preset, block: int) -> int:
    """Images per batch of the Triton path: about 64 MiB of float32 images, whole noise blocks."""
    per_image = pre.num_pix * pre.num_pix * 4
    return max(block, (2**26 // per_image) // block * block)


class _TorchBatches:
    """Renders [start, stop) with the torch Renderer (eager or torch.compile) plus noise and units."""

    def __init__(self, pre, params, dev, dtype, stamps, seed, *, compile: bool) -> None:
        self.pre, self.params, self.dev, self.dtype, self.seed = pre, params, dev, dtype, seed
        self.render = Renderer(preset=pre, device=dev, dtype=dtype, stamps=stamps, compile=compile)

    def __call__(self, start: int, stop: int) -> Tensor:
        dev, dtype, pre = self.dev, self.dtype, self.pre
        pb = {
            k: (
                v[start:stop].to(device=dev, dtype=dtype)
                if v.dtype.is_floating_point
                else v[start:stop].to(device=dev)
            )
            for k, v in self.params.items()
        }
        out = _observe(self.render(pb), pb, pre, self.seed, start)
        if pre.lens_light and pre.lens_light_subtracted:  # the lens light's noise stays, its model goes
            ll = self.render.lens_light_image(pb)
            out = out - (ll / pre.gain if pre.count_unit == "ADU" else ll)
        return out


class _TritonBatches:
    """Renders [start, stop) with the fused Triton kernels (render + PSF), then torch noise and units.

    The parameters the kernels need go to the device as one pinned float32 table per batch (drawn on the
    device, they are one device table).
    """

    def __init__(self, pre: Preset, params: Mapping[str, Tensor], dev: torch.device, seed: int) -> None:
        from . import _triton

        self.tk = _triton
        self.pre, self.dev, self.seed = pre, dev, seed
        self.has_vortex = "axion" in pre.class_names
        keys = list(_MACRO_KEYS + _SOURCE_KEYS + macro_shape_keys(pre))
        self.macro = macro_kind(pre)
        if self.has_vortex:
            keys += list(_VORTEX_KEYS[:3])
        keys += ["subhalo_count"]
        keys += list(NOISE_KEYS[pre.noise])
        self.K = pre.max_subhalos
        # a 'point_chain' vortex is rendered as vortex_points more point-mass slots after the subhalos
        self.chain = pre.vortex_points if self.has_vortex and pre.vortex_profile == "point_chain" else 0
        self.count = params["subhalo_count"]
        if "subhalo_smoothed" in params:  # cdm_smooth images render their table, not their clumps
            self.count = torch.where(params["subhalo_smoothed"] > 0, 0, self.count)
        cols = [(self.count if k == "subhalo_count" else params[k]).reshape(-1, 1) for k in keys]
        self.pm = self.K > 0 and pre.subhalo_profile == "point_mass"
        if self.pm:
            cols += [params["subhalo_theta_E"], params["subhalo_x"], params["subhalo_y"]]
        # tNFW subhalos go per batch, cut to the batch's largest count (a population pads to its capacity)
        self.tnfw = [params[k] for k in _TNFW_KERNEL_KEYS] if self.K > 0 and not self.pm else None
        self.count_cpu = self.count.cpu()  # per-batch largest counts without a host sync per batch
        # circularly symmetric tables (cdm_smooth, minus a monopole), float32 on the device per batch
        self.radial = (
            (params["radial_alpha"].to(torch.float32), params["radial_dr"].to(torch.float32))
            if "radial_dr" in params
            else None
        )
        # LOS halos (multi-plane in the kernel), per batch cut to its largest count rounded up to 8
        self.los = params if los_enabled(pre) else None
        self.los_cpu = params["los_count"].cpu() if self.los is not None else None
        self.los_w = lens_plane_w(pre) if self.los is not None else 0.0
        table = torch.cat([c.to(torch.float32) for c in cols], dim=1)
        self.table = table.pin_memory() if table.device.type == "cpu" and dev.type == "cuda" else table
        self.keys = keys
        self.coord = _triton.sub_pixel_coords(pre.num_pix, pre.delta_pix, pre.supersampling, dev)
        self.ss_conv = _ss_convolution(pre)
        self.kernel = (
            gaussian_kernel_1d(pre.psf_fwhm, _psf_pixel(pre), truncation=pre.psf_truncation).to(
                device=dev, dtype=torch.float32
            )
            if pre.psf_fwhm is not None
            else None
        )

    def __call__(self, start: int, stop: int) -> Tensor:
        pre, tk = self.pre, self.tk
        t = self.table[start:stop].to(self.dev, non_blocking=True)
        nk = len(self.keys)
        p = {k: t[:, i] for i, k in enumerate(self.keys)}
        te2 = sx = sy = tn = tcount = None
        if self.tnfw is not None:
            kb = tk.tnfw_slots(int(self.count_cpu[start:stop].max()), self.K)
            if kb > 0:
                f = torch.stack([v[start:stop, :kb].to(torch.float32) for v in self.tnfw]).to(self.dev)
                tn = tk.tnfw_table(*f)
                tcount = self.count[start:stop].to(self.dev, torch.int32)
            p = {**p, "subhalo_count": torch.zeros_like(p["subhalo_count"])}  # the point-mass loop's count
        if self.pm:
            K = self.K
            te = t[:, nk : nk + K]
            te2 = (te * te).contiguous()
            sx = t[:, nk + K : nk + 2 * K].contiguous()
            sy = t[:, nk + 2 * K : nk + 3 * K].contiguous()
        if self.chain:
            te2, sx, sy, p = _append_point_chain(te2, sx, sy, p, self.K if self.pm else 0, self.chain)
        sc = tk.derive_scalars(p, has_vortex=self.has_vortex and not self.chain)
        rad = rdr = None
        if self.radial is not None:
            rad = self.radial[0][start:stop].to(self.dev).contiguous()
            rdr = self.radial[1][start:stop].to(self.dev).contiguous()
        los = lcount = None
        if self.los is not None:
            kl = tk.tnfw_slots(int(self.los_cpu[start:stop].max()), los_capacity(pre), step=8)
            if kl > 0:
                los, lcount = triton_los_table(self.los, start, stop, kl, self.dev)
        ss = pre.supersampling
        # with supersampled convolution the kernel renders every sub-pixel as a pixel of delta_pix / ss
        n_out, ss_k, d_k = (pre.num_pix, ss, pre.delta_pix)
        if self.ss_conv:
            n_out, ss_k, d_k = pre.num_pix * ss, 1, pre.delta_pix / ss
        img = tk.render_sersic(
            sc, te2, sx, sy, self.coord, num_pix=n_out, supersampling=ss_k, delta_pix=d_k,
            has_vortex=self.has_vortex and not self.chain, tnfw=tn, tnfw_count=tcount,
            epl_terms=self.macro[0], has_multipole=bool(self.macro[1]), radial=rad, radial_dr=rdr,
            los=los, los_count=lcount, w_lens=self.los_w,
        )  # fmt: skip
        if self.kernel is not None:
            img = tk.psf_separable(img, self.kernel)
        if self.ss_conv:
            n = pre.num_pix
            img = img.reshape(-1, n, ss, n, ss).sum(dim=(2, 4))
        nz = {k: p[k].contiguous() for k in NOISE_KEYS[pre.noise]}
        return _observe(img.unsqueeze(1), nz, pre, self.seed, start)


def _append_point_chain(te2, sx, sy, p: dict[str, Tensor], K: int, n: int):
    """Point-mass slots (theta_E^2, x, y [B, K + n]) with each image's point-chain vortex after its K
    subhalo slots; the slot count of an image with a vortex becomes K + n (zero-mass slots add nothing)."""
    te, cx, cy = point_chain(
        p["vortex_theta_E"], p["vortex_half_length"], p["vortex_angle"], p["center_x"], p["center_y"], n
    )
    parts = [(te * te, cx, cy)] if K == 0 else [(te2, sx, sy), (te * te, cx, cy)]
    te2, sx, sy = (torch.cat(c, dim=1).contiguous() for c in zip(*parts))
    count = torch.where(p["vortex_theta_E"] > 0, float(K + n), p["subhalo_count"])
    return te2, sx, sy, {**p, "subhalo_count": count}


def _observe(img: Tensor, pb: Mapping[str, Tensor], pre: Preset, seed: int, start: int) -> Tensor:
    """Noise-free flux per pixel [B, 1, N, N] -> the stored image: the preset's noise, then its units."""
    if pre.noise == "deeplense_x2":
        return img + img  # the published Model II/III sets stored image_model + image_model, no noise
    if pre.noise != "none":
        img = _add_noise_blocks(img, pb, seed, start, pre)
    if pre.count_unit == "ADU":
        img = img / pre.gain
    return img


#: per-image parameters each noise mode reads
NOISE_KEYS = {
    "none": (),
    "deeplense_x2": (),
    "snr": ("exposure_time", "background_rate", "read_noise_rms"),
    "instrument": ("exposure_time", "background_rate", "read_noise_rms"),
    "deeplense_i": ("exposure_time",),
}


class _PinnedSink:
    """Copies device batches into the CPU result through two pinned staging buffers, asynchronously:
    the copy of batch i to pageable memory runs on the CPU while the GPU renders batch i + 1."""

    def __init__(self, images: Tensor, bs: int) -> None:
        self.images = images
        shape = (bs,) + tuple(images.shape[1:])
        self.staging = [torch.empty(shape, dtype=torch.float32, pin_memory=True) for _ in range(2)]
        self.slot = 0
        self.pending: tuple[int, int, int, torch.cuda.Event] | None = None

    def put(self, img: Tensor, start: int, stop: int) -> None:
        buf = self.staging[self.slot][: stop - start]
        buf.copy_(img.to(torch.float32), non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._drain()
        self.pending = (self.slot, start, stop, ev)
        self.slot ^= 1

    def _drain(self) -> None:
        if self.pending is None:
            return
        slot, start, stop, ev = self.pending
        ev.synchronize()
        self.images[start:stop].copy_(self.staging[slot][: stop - start])
        self.pending = None

    def close(self) -> None:
        self._drain()


def _add_noise_blocks(img: Tensor, pb: Mapping[str, Tensor], seed: int, start: int, pre: Preset) -> Tensor:
    out = torch.empty_like(img)
    block = noise_block(img.device)
    for s in range(0, img.shape[0], block):
        e = min(img.shape[0], s + block)
        g = torch.Generator(device=img.device).manual_seed(_noise_seed(seed, (start + s) // block))
        if pre.noise == "deeplense_i":
            out[s:e] = add_deeplense_model_i_noise(img[s:e], pb["exposure_time"][s:e], pre.sigma_bkg, g)
        else:
            out[s:e] = add_poisson_gaussian_noise(
                img[s:e], pb["exposure_time"][s:e], pb["background_rate"][s:e], pb["read_noise_rms"][s:e], g
            )
    return out
