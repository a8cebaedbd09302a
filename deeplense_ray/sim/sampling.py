"""Draw every simulation parameter for n images, vectorised, from one torch.Generator, on its device.

``simulate`` draws on CPU by default; with ``draws="device"`` it passes a generator on the render device
(CUDA: Philox), so the same code runs there (the same distributions, another random stream).

The random stream depends only on (preset, n, seed): every quantity is drawn for every image in a fixed
order (substructure of all kinds too), then masked by class, so labels never shift the stream and the
macro lens + source of image i are the same whatever its class. In paired mode images i with the same
i // C (C = number of classes) share the macro lens, source and observation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import cosmology
from .compensation import lens_mass_model
from .fdm import draw_fdm
from .lens import phi_q_to_ellipticity
from .light import sersic_amp_from_flux, sersic_b_n
from .los import draw_los, los_enabled
from .presets import Preset
from .priors import draw_in_range, truncated_normal
from .substructure import draw_subhalos, power_law_masses

_F64 = torch.float64
#: noise modes whose source brightness is a magnitude (converted with the zero point, 1 e-/s)
MAGNITUDE_NOISE = ("instrument", "deeplense_x2")


def _u(g: torch.Generator, n: int, rng: tuple[float, float], *shape: int) -> Tensor:
    lo, hi = float(rng[0]), float(rng[1])
    r = torch.rand((n, *shape), generator=g, dtype=_F64, device=g.device)
    return lo + (hi - lo) * r


def snr_peak_flux(target_snr: Tensor, exposure_time: Tensor, sigma_bkg: float) -> Tensor:
    """Per-pixel flux x [counts/s] with x / sqrt(x/t + sigma^2) = snr (Poisson + Gaussian background)."""
    s2 = target_snr * target_snr
    return 0.5 * (s2 / exposure_time + torch.sqrt(s2 * s2 / exposure_time**2 + 4.0 * s2 * sigma_bkg**2))


def draw_parameters(
    preset: Preset,
    labels: Tensor,
    generator: torch.Generator,
    *,
    paired: bool,
    library_peak: Tensor | None = None,
    compute_device: torch.device | None = None,
) -> dict[str, Tensor]:
    """All parameters (float64 / int64, on the generator's device) for images with the given class labels.

    Last comes the lens-mass step (``sim/compensation.py``: the compensated ``theta_E``, the diagnostics
    ``theta_E_compensation`` and ``theta_E_eff``, the radial tables); its subhalo integrals run on
    ``compute_device`` (default: the generator's device; ``simulate`` passes the render device).

    The generator's device decides where everything is drawn and computed (labels and ``library_peak`` are
    moved there). ``library_peak``: for real-galaxy sources, max(stamp) * S^2 of each unit-sum S x S stamp
    [N_lib] (the peak surface brightness of a unit-flux source of unit angular size; also gives N_lib).
    """
    n = int(labels.shape[0])
    C = preset.num_classes
    g = generator
    dev = g.device
    labels = labels.to(dev)
    m = -(-n // C) if paired else n  # number of independent macro draws
    p: dict[str, Tensor] = {}

    coef = cosmology.point_mass_theta_e_coefficient(
        preset.z_lens, preset.z_source, h0=preset.H0, om0=preset.Om0,
        distances=preset.einstein_radius_distances,
    )  # fmt: skip

    # ---- macro lens (SIE + shear), class independent
    if preset.lens_mass is None:
        p["theta_E"] = _u(g, m, preset.theta_E)
    else:
        p["theta_E"] = torch.full((m,), coef * math.sqrt(preset.lens_mass), dtype=_F64, device=dev)
    q = _u(g, m, preset.lens_q)
    phi = _u(g, m, preset.lens_orientation)
    p["e1"], p["e2"] = phi_q_to_ellipticity(phi, q)
    p["center_x"] = _u(g, m, preset.lens_center)
    p["center_y"] = _u(g, m, preset.lens_center)
    gam = _u(g, m, preset.shear_gamma)
    gphi = _u(g, m, preset.shear_orientation)
    p["gamma1"], p["gamma2"] = gam * torch.cos(2 * gphi), gam * torch.sin(2 * gphi)

    # ---- source
    p["source_center_x"] = p["center_x"] + _u(g, m, preset.source_offset)
    p["source_center_y"] = p["center_y"] + _u(g, m, preset.source_offset)
    if preset.source_kind == "sersic":
        p["source_R_sersic"] = _u(g, m, preset.source_R_sersic)
        p["source_n_sersic"] = _u(g, m, preset.source_n_sersic)
        sq = _u(g, m, preset.source_q)
        sphi = _u(g, m, preset.source_orientation)
        p["source_e1"], p["source_e2"] = phi_q_to_ellipticity(sphi, sq)
        # peak surface brightness per unit amp (lenstronomy smoothing R = 1e-4)
        rs, ns = p["source_R_sersic"], p["source_n_sersic"]
        peak_per_amp = torch.exp(-sersic_b_n(ns) * ((1e-4 / rs) ** (1.0 / ns) - 1.0))
    else:
        if library_peak is None or library_peak.numel() == 0:
            raise ValueError("real-galaxy sources need a non-empty source library")
        library_peak = library_peak.to(dev)
        p["source_index"] = torch.randint(0, library_peak.numel(), (m,), generator=g, device=dev)
        p["source_size"] = _u(g, m, preset.source_size)
        p["source_angle"] = _u(g, m, (0.0, 2.0 * math.pi))

    # ---- brightness and observation
    d2 = preset.delta_pix**2
    if preset.noise in MAGNITUDE_NOISE:
        mag = source_magnitudes(torch.rand(m, generator=g, dtype=_F64, device=dev), preset)
        p["source_mag"] = mag
        flux = 10.0 ** (-0.4 * (mag - preset.zero_point))  # e-/s
    if preset.noise == "instrument":
        p["exposure_time"] = torch.full(
            (m,), preset.exposure_time_single * preset.num_exposures, dtype=_F64, device=dev
        )
        sky = 10.0 ** (-0.4 * (preset.sky_brightness - preset.zero_point)) * d2
        p["background_rate"] = torch.full((m,), sky, dtype=_F64, device=dev)
        p["read_noise_rms"] = torch.full(
            (m,), math.sqrt(preset.num_exposures) * preset.read_noise, dtype=_F64, device=dev
        )
    elif preset.noise == "deeplense_i":
        # the published Model I recipe: a fixed lenstronomy Sersic amp, exposure time for the noise
        p["exposure_time"] = 10.0 ** _u(g, m, preset.log10_exposure_time)
        amp, flux = _u(g, m, preset.source_amp), None
    elif preset.noise != "deeplense_x2":
        if preset.noise == "snr":
            t = 10.0 ** _u(g, m, preset.log10_exposure_time)
            snr = _u(g, m, preset.target_snr)
            p["exposure_time"], p["target_snr"] = t, snr
            peak_sb = snr_peak_flux(snr, t, preset.sigma_bkg) / d2  # flux / arcsec^2 at the source peak
            p["background_rate"] = torch.zeros(m, dtype=_F64, device=dev)
            p["read_noise_rms"] = preset.sigma_bkg * t  # counts; / t gives sigma_bkg
        else:
            peak_sb = _u(g, m, preset.source_amp)
        if preset.source_kind == "sersic":
            amp = peak_sb / peak_per_amp
            flux = None
        else:
            # surface brightness peak = flux * max(stamp) / (size/S)^2 = flux * library_peak / size^2
            flux = peak_sb * (p["source_size"] ** 2) / library_peak[p["source_index"]].to(_F64)
    if preset.source_kind == "sersic":
        if flux is not None:
            amp = sersic_amp_from_flux(flux, p["source_R_sersic"], p["source_n_sersic"])
        p["source_amp"] = amp
    else:
        p["source_flux"] = flux

    # ---- lens light (Sersic, lens centre and ellipticity)
    if preset.lens_light:
        p["lens_light_R_sersic"] = _u(g, m, preset.lens_light_R_sersic)
        p["lens_light_n_sersic"] = _u(g, m, preset.lens_light_n_sersic)
        if preset.noise in MAGNITUDE_NOISE:
            lmag = _u(g, m, preset.lens_light_mag)
            lflux = 10.0 ** (-0.4 * (lmag - preset.zero_point))
            p["lens_light_amp"] = sersic_amp_from_flux(
                lflux, p["lens_light_R_sersic"], p["lens_light_n_sersic"]
            )
        else:
            rel = _u(g, m, preset.lens_light_amp)
            ref = p["source_amp"] * peak_per_amp if preset.source_kind == "sersic" else peak_sb
            ln = p["lens_light_n_sersic"]
            lpeak = torch.exp(-sersic_b_n(ln) * ((1e-4 / p["lens_light_R_sersic"]) ** (1.0 / ln) - 1.0))
            p["lens_light_amp"] = rel * ref / lpeak

    if paired:
        idx = torch.arange(n, device=dev) // C
        p = {k: v[idx] for k, v in p.items()}

    # ---- substructure: drawn for every image, masked by class
    name_of = preset.class_names
    is_cdm = torch.zeros(n, dtype=torch.bool, device=dev)
    is_axion = torch.zeros(n, dtype=torch.bool, device=dev)
    if "cdm" in name_of:
        is_cdm = labels == name_of.index("cdm")
    if "axion" in name_of:
        is_axion = labels == name_of.index("axion")
    is_smooth, partner = _smooth_partners(name_of, labels, paired)
    # the population is drawn for cdm images and for cdm_smooth images without a cdm partner; a partnered
    # cdm_smooth image (paired mode, same group) gets a copy of its partner's population
    with_sub = is_cdm | (is_smooth & (partner < 0))

    K = preset.max_subhalos
    if K > 0 and preset.sigma_sub is not None:
        # normalised population (sim/substructure.py), drawn for cdm images only from its own generator,
        # seeded by one draw of the main stream (so the axion draws below do not depend on the labels)
        g_sub = torch.Generator(device=dev).manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=g, device=dev))
        )
        sub = draw_subhalos(preset, p["theta_E"], p["center_x"], p["center_y"], with_sub, g_sub)
        has = torch.nonzero(is_smooth & (partner >= 0)).squeeze(1)
        if has.numel():
            for v in sub.values():
                v[has] = v[partner[has]]
        p.update(sub)
    elif K > 0:
        lo, hi = preset.subhalo_count
        count = torch.randint(int(lo), int(hi) + 1, (n,), generator=g, device=dev)
        mass = power_law_masses(
            torch.rand((n, K), generator=g, dtype=_F64, device=dev),
            *preset.subhalo_mass,
            preset.subhalo_mass_slope,
        )
        r = _u(g, n, preset.subhalo_radius, K)
        ang = _u(g, n, (0.0, 2.0 * math.pi), K)
        count = torch.where(is_cdm, count, torch.zeros_like(count))
        present = torch.arange(K, device=dev)[None, :] < count[:, None]
        mass = torch.where(present, mass, torch.zeros_like(mass))
        p["subhalo_count"] = count
        p["subhalo_mass"] = mass
        p["subhalo_x"] = torch.where(
            present, p["center_x"][:, None] + r * torch.cos(ang), torch.zeros_like(r)
        )
        p["subhalo_y"] = torch.where(
            present, p["center_y"][:, None] + r * torch.sin(ang), torch.zeros_like(r)
        )
        p["subhalo_theta_E"] = coef * torch.sqrt(mass)
        if preset.subhalo_profile == "tnfw":
            p.update(tnfw_parameters(mass, preset))
    else:
        p["subhalo_count"] = torch.zeros(n, dtype=torch.int64, device=dev)
        p["subhalo_mass"] = torch.zeros((n, 0), dtype=_F64, device=dev)

    if "axion" in name_of:
        log_m = draw_in_range(_u(g, n, (0.0, 1.0)), preset.axion_log10_mass, preset.axion_log10_mass_normal)
        vang = _u(g, n, (0.0, math.pi))
        m_ax = torch.where(is_axion, 10.0**log_m, torch.zeros_like(log_m))
        p["axion_mass"] = m_ax
        p["vortex_angle"] = torch.where(is_axion, vang, torch.zeros_like(vang))
        p["vortex_half_length"] = torch.where(
            is_axion, preset.vortex_half_length_ref * 10.0 ** (-22.0 - log_m), torch.zeros_like(log_m)
        )
        p["vortex_theta_E"] = torch.where(
            is_axion, torch.full_like(log_m, coef * math.sqrt(preset.vortex_mass)), torch.zeros_like(log_m)
        )
    else:
        p["axion_mass"] = torch.zeros(n, dtype=_F64, device=dev)  # the same schema for every preset

    # ---- main-deflector slope and multipoles: class independent, drawn last (the draws above do not move)
    extra = draw_macro_shape(preset, g, m, p["theta_E"][::C] if paired else p["theta_E"])
    if paired:
        extra = {k: v[torch.arange(n, device=dev) // C] for k, v in extra.items()}
    p.update(extra)

    # ---- line-of-sight halos (sim/los.py): class independent (one draw per macro draw, shared by a paired
    # group), from their own generator seeded by one draw made last (the draws above do not move)
    if los_enabled(preset):
        p.update(draw_los(preset, g, m, n, C if paired else None))

    # ---- lens mass: compensation and diagnostics (no draws)
    p.update(
        lens_mass_model(
            preset, p, clumps=is_cdm, smooth=is_smooth, partner=partner,
            device=torch.device(compute_device) if compute_device is not None else dev,
        )
    )  # fmt: skip

    # ---- wave dark matter (sim/fdm.py): log10 m and a field seed drawn for every image (labels never shift
    # the stream), made last; the amplitude from the rendered theta_E and gamma
    if "fdm" in name_of:
        p.update(draw_fdm(preset, p, labels == name_of.index("fdm"), g))
    return p


def _smooth_partners(class_names, labels: Tensor, paired: bool) -> tuple[Tensor, Tensor]:
    """cdm_smooth images (bool [n]) and, in paired mode, the first cdm image of each one's group of C
    (int64 [n]; -1 without one: unpaired, no cdm class, or the group's cdm image beyond n)."""
    n, dev = labels.shape[0], labels.device
    partner = torch.full((n,), -1, dtype=torch.int64, device=dev)
    if "cdm_smooth" not in class_names:
        return torch.zeros(n, dtype=torch.bool, device=dev), partner
    smooth = labels == class_names.index("cdm_smooth")
    if paired and "cdm" in class_names:
        C = len(class_names)
        i = torch.arange(n, device=dev)
        grp = i // C
        cand = torch.where(labels == class_names.index("cdm"), i, torch.full_like(i, n))
        first = torch.full((grp.max().item() + 1,), n, dtype=torch.int64, device=dev)
        first = first.scatter_reduce(0, grp, cand, reduce="amin")
        partner = torch.where(smooth & (first[grp] < n), first[grp], partner)
    return smooth, partner


#: multipole orders of the main deflector and their preset fields (a_m / theta_E ranges)
MULTIPOLE_FIELDS = ((1, "lens_multipole_a1"), (3, "lens_multipole_a3"), (4, "lens_multipole_a4"))


def has_multipoles(preset: Preset) -> bool:
    """Whether the preset draws main-deflector multipoles (any a_m range above zero)."""
    return any(getattr(preset, f)[1] > 0 for _, f in MULTIPOLE_FIELDS)


def source_magnitudes(u: Tensor, preset: Preset) -> Tensor:
    """Unlensed source magnitudes from uniforms u: uniform in ``source_mag``, or (``source_mag_dist``
    "counts") p(m) ~ 10^(s m) on [lo, hi], s = ``source_mag_count_slope`` (galaxy number counts):
    m = lo + log10(1 + u (10^(s (hi - lo)) - 1)) / s."""
    lo, hi = preset.source_mag
    s = preset.source_mag_count_slope
    if preset.source_mag_dist == "uniform" or hi == lo or abs(s) < 1e-12:
        return lo + (hi - lo) * u
    return lo + torch.log10(1.0 + u * (10.0 ** (s * (hi - lo)) - 1.0)) / s


def draw_macro_shape(preset: Preset, g: torch.Generator, m: int, theta_E: Tensor) -> dict[str, Tensor]:
    """The main deflector's 3D slope ``gamma`` [m] (2 for the SIE, no draw) and, when the preset has them,
    its multipoles: ``multipole_a{1,3,4}`` [arcsec] (lenstronomy MULTIPOLE a_m = (a_m / theta_E) theta_E) and
    ``multipole_phi{1,3,4}`` [rad] in [0, 2 pi / m). Draw order: gamma (EPL), then a_m, phi_m per order."""
    dev = g.device
    if preset.lens_profile == "epl":
        u = torch.rand(m, generator=g, dtype=_F64, device=dev)
        lo, hi = preset.lens_gamma
        if preset.lens_gamma_sd > 0 and hi > lo:
            gamma = truncated_normal(u, 0.5 * (lo + hi), preset.lens_gamma_sd, lo, hi)
        else:
            gamma = lo + (hi - lo) * u
    else:
        gamma = torch.full((m,), 2.0, dtype=_F64, device=dev)
    out = {"gamma": gamma}
    if has_multipoles(preset):
        for order, field in MULTIPOLE_FIELDS:
            out[f"multipole_a{order}"] = _u(g, m, getattr(preset, field)) * theta_E.to(_F64)
            out[f"multipole_phi{order}"] = _u(g, m, (0.0, 2.0 * math.pi / order))
    return out


def tnfw_parameters(mass: Tensor, preset: Preset) -> dict[str, Tensor]:
    """lenstronomy TNFW (Rs, alpha_Rs, r_trunc) [arcsec] of subhalos of M200 ``mass`` [Msun].

    r200 from M200 = 200 rho_crit(z_lens) 4/3 pi r200^3; Rs = r200 / c; rho0 = M200 / (4 pi Rs^3 m(c)),
    m(c) = ln(1+c) - c/(1+c); alpha_Rs = 4 rho0 Rs^3 (1 + ln 1/2) / (Sigma_crit Rs) in angular units;
    r_trunc = ``subhalo_truncation`` * Rs. Zero masses give zero deflection (alpha_Rs = 0).
    """
    zl, zs = preset.z_lens, preset.z_source
    rho_c = cosmology.critical_density_msun_per_mpc3(zl, h0=preset.H0, om0=preset.Om0)
    d_l = cosmology.angular_diameter_distance(zl, h0=preset.H0, om0=preset.Om0)
    sigma_crit = cosmology.sigma_crit_msun_per_arcsec2(zl, zs, h0=preset.H0, om0=preset.Om0)
    c = preset.subhalo_concentration
    m_safe = mass.clamp_min(1.0)
    r200_mpc = (3.0 * m_safe / (4.0 * math.pi * 200.0 * rho_c)) ** (1.0 / 3.0)
    rs_arcsec = r200_mpc / c / d_l / cosmology.ARCSEC
    mc = math.log(1.0 + c) - c / (1.0 + c)
    # lenstronomy: rho0 [Msun/arcsec^3 / Sigma_crit-units] with alpha_Rs = 4 rho0 Rs^2 (1 + ln 1/2)
    rho0 = m_safe / (4.0 * math.pi * rs_arcsec**3 * mc) / sigma_crit
    alpha_rs = 4.0 * rho0 * rs_arcsec**2 * (1.0 + math.log(0.5))
    alpha_rs = torch.where(mass > 0, alpha_rs, torch.zeros_like(alpha_rs))
    return {
        "subhalo_Rs": rs_arcsec,
        "subhalo_alpha_Rs": alpha_rs,
        "subhalo_r_trunc": preset.subhalo_truncation * rs_arcsec,
    }
