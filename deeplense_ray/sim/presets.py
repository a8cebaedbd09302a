"""Simulation presets as data: the one place that defines model_i, model_ii, model_iii, real_galaxy_tiny.

A ``Preset`` is a frozen dataclass of plain values (JSON/YAML-safe through ``to_dict``). Ranges are
``(low, high)`` pairs sampled uniformly (``low == high`` fixes the value). Angles in arcsec, masses in
Msun, magnitudes AB, times in seconds. The macro lens and the source are drawn from ONE class-independent
distribution; the class only decides the substructure:

- ``no_sub``: none;
- ``cdm``: with ``sigma_sub`` set (the physical presets), a normalised population (paltas / DG19, see
  ``sim/substructure.py``): d^2N/(dm dA) = (Sigma_sub / m_pivot)(m / m_pivot)^-subhalo_mass_slope, Sigma_sub
  uniform in ``sigma_sub`` [kpc^-2] per image (or with ``sigma_sub_normal`` a normal truncated to it,
  ``sim/priors.py``), m in ``subhalo_mass``, Poisson counts within
  ``subhalo_area_radius`` x theta_E, positions uniform in that disk, tNFW with the DG19 concentration and
  truncation (``subhalo_concentration_model="dg19"``) or point masses; with ``sigma_sub`` null (legacy,
  the published recipe) ``subhalo_count`` subhalos, masses dN/dm ~ m^-subhalo_mass_slope in
  ``subhalo_mass``, radius uniform in ``subhalo_radius`` around the lens centre, angle uniform;
- ``axion``: a uniform line segment (vortex) through the lens centre at a random angle, total mass
  ``vortex_mass``, half length ``vortex_half_length_ref * (1e-22 eV / m_axion)``,
  log10 m_axion uniform in ``axion_log10_mass`` (or a truncated normal: ``axion_log10_mass_normal``);
- ``cdm_smooth`` (a control, not in the default class list; with ``sigma_sub`` set): the cdm population
  averaged over angle about the lens centre, no clumps (``sim/compensation.py``);
- ``fdm`` (wave / fuzzy dark matter, not in the default class list): the host halo's granule convergence
  field, a zero-mean Gaussian random field with coherence length hbar / (m sigma_v) and the amplitude of
  ``sim/fdm.py``, log10 m uniform in ``fdm_log10_mass``, rms scaled by ``fdm_amplitude``.

Line-of-sight halos (``delta_los`` set; off in every built-in preset): paltas' LOSDG19 population between
observer and source, the same for every class of an image (part of the environment), rendered by multi-plane
ray tracing (``sim/los.py``).

``mass_compensation`` keeps the lens mass independent of the class: "monopole" (the default) subtracts each
image's substructure monopole about the lens centre, so the enclosed mass at every radius is the
substructure-free lens's and only clumps remain; "ring_slope" sets the main deflector's theta_E and gamma per
image so that the projected mass inside the Einstein ring and its slope there (the mean convergence of the
annulus 0.9-1.1 theta_E) do not depend on the class ("ring", or an SIE: theta_E alone, the mass); "none"
(the published presets) adds the substructure on top.

Noise (``noise``):
- ``"none"``: noise-free images;
- ``"snr"``: counts/s images with Poisson noise at exposure time 10^U(log10_exposure_time) and a Gaussian
  background of rms ``sigma_bkg`` [counts/s]; the source brightness is set so that a pixel at the source's
  peak surface brightness has signal-to-noise ``target_snr`` (class independent: lensing conserves surface
  brightness);
- ``"instrument"``: electrons/s images from magnitudes: zero point ``zero_point`` (1 e-/s), sky
  ``sky_brightness`` [mag/arcsec^2], ``num_exposures`` x ``exposure_time_single`` seconds, read noise
  ``read_noise`` [e-] per exposure; ``count_unit="ADU"`` divides by ``gain``. Source magnitude ``source_mag``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .cosmology import DISTANCE_KINDS
from .priors import MIN_MASS, NORMAL_PRIOR_FIELDS, normal_field, normal_mass

Range = tuple[float, float]
Normal = tuple[float, float]  # (mean, std)

#: the classes of a preset unless it names others
DEFAULT_CLASSES = ("no_sub", "axion", "cdm")
#: every class a preset may name: ``cdm_smooth`` is the control of the physical presets (module docstring)
KNOWN_CLASSES = (*DEFAULT_CLASSES, "cdm_smooth", "fdm")
SOURCE_KINDS = ("sersic", "real_galaxy")
NOISE_KINDS = ("none", "snr", "instrument", "deeplense_i", "deeplense_x2")
SUBHALO_PROFILES = ("point_mass", "tnfw")
CONCENTRATION_MODELS = ("fixed", "dg19")
VORTEX_PROFILES = ("segment", "point_chain")
COUNT_UNITS = ("e-", "ADU")
LENS_PROFILES = ("sie", "epl")
#: ``Preset.mass_compensation`` values (sim/compensation.py)
MASS_COMPENSATIONS = ("none", "ring", "ring_slope", "monopole")
SOURCE_MAG_DISTS = ("uniform", "counts")


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Everything that defines a simulated data set (see module docstring for the conventions)."""

    name: str
    # image
    num_pix: int
    delta_pix: float  # arcsec / pixel
    psf_fwhm: float | None  # arcsec; None = no PSF
    supersampling: int = 2
    psf_truncation: float = 5.0  # in sigma
    supersampling_convolution: bool = False  # PSF on the supersampled grid, then binned (lenstronomy's name)
    class_names: tuple[str, ...] = DEFAULT_CLASSES
    paired: bool = False
    # cosmology (flat LCDM)
    z_lens: float = 0.5
    z_source: float = 1.0
    H0: float = 70.0
    Om0: float = 0.3
    einstein_radius_distances: str = "angular_diameter"  # or "luminosity" (the published sets' flaw)
    # macro lens (SIE + external shear), class independent
    theta_E: Range = (1.2, 1.8)  # arcsec
    lens_mass: float | None = None  # Msun: if set, theta_E = point-mass Einstein radius of it (fixed)
    lens_q: Range = (0.6, 1.0)  # axis ratio
    lens_orientation: Range = (0.0, math.pi)  # rad: phi of (e1, e2)
    lens_center: Range = (-0.1, 0.1)  # arcsec, x and y each
    shear_gamma: Range = (0.0, 0.05)  # |gamma|
    shear_orientation: Range = (0.0, math.pi)  # rad: gamma1 = |gamma| cos 2phi, gamma2 = |gamma| sin 2phi
    # main-deflector profile: "sie", or "epl" (elliptical power law, 3D slope ``gamma``): lens_gamma is the
    # uniform range of gamma, or with lens_gamma_sd > 0 the truncation bounds of a normal of mean
    # (low + high) / 2 and sd lens_gamma_sd (paltas: N(2, 0.1))
    lens_profile: str = "sie"
    lens_gamma: Range = (2.0, 2.0)
    lens_gamma_sd: float = 0.0
    # circular multipoles m = 1, 3, 4 of the main deflector (lenstronomy MULTIPOLE, isothermal, centred on
    # the lens): a_m / theta_E uniform in the range (0, 0: none), orientation phi_m uniform in [0, 2 pi / m)
    lens_multipole_a1: Range = (0.0, 0.0)
    lens_multipole_a3: Range = (0.0, 0.0)
    lens_multipole_a4: Range = (0.0, 0.0)
    # lens light (optional Sersic at the lens centre, same ellipticity as the mass)
    lens_light: bool = False
    lens_light_R_sersic: Range = (0.6, 1.2)
    lens_light_n_sersic: Range = (3.0, 4.0)
    lens_light_mag: Range = (19.0, 21.0)  # instrument noise only
    lens_light_amp: Range = (0.5, 1.0)  # relative to the source peak, 'snr'/'none' noise
    lens_light_subtracted: bool = False  # the lens light's noise stays, its (PSF-convolved) model is removed
    # source
    source_kind: str = "sersic"
    source_library: str | None = None  # None: packaged HDF stamps; else a Galaxy10-layout HDF5 path
    source_offset: Range = (-0.35, 0.35)  # arcsec, x and y each, from the lens centre
    source_R_sersic: Range = (0.2, 0.3)
    source_n_sersic: Range = (0.8, 1.5)
    source_q: Range = (0.5, 1.0)
    source_orientation: Range = (0.0, math.pi)  # rad: phi of the source's (e1, e2)
    source_size: Range = (0.8, 1.4)  # real galaxies: full width of the stamp [arcsec]
    source_amp: Range = (1.0, 1.0)  # 'none' noise: Sersic amp [flux/arcsec^2]
    source_mag: Range = (21.0, 23.0)  # 'instrument' noise
    # "uniform" in source_mag, or "counts": p(m) ~ 10^(source_mag_count_slope m) on source_mag (galaxy counts)
    source_mag_dist: str = "uniform"
    source_mag_count_slope: float = 0.3  # dex per magnitude
    # noise
    noise: str = "snr"
    log10_exposure_time: Range = (3.0, 3.5)  # 'snr'
    sigma_bkg: float = 0.01  # 'snr' [counts/s]
    target_snr: Range = (20.0, 30.0)  # 'snr'
    exposure_time_single: float = 565.0  # 'instrument' [s]
    num_exposures: int = 4
    sky_brightness: float = 22.35  # mag/arcsec^2
    zero_point: float = 24.0  # mag giving 1 e-/s
    read_noise: float = 4.2  # e- per exposure
    gain: float = 3.1  # e- / ADU
    count_unit: str = "e-"
    # substructure
    subhalo_profile: str = "point_mass"
    subhalo_count: tuple[int, int] = (25, 25)
    subhalo_mass: Range = (1e6, 1e10)  # Msun
    subhalo_mass_slope: float = 1.9  # dN/dm ~ m^-slope
    subhalo_radius: Range = (0.25, 2.0)  # arcsec from the lens centre
    subhalo_concentration: float = 15.0  # tNFW only: c = r200/Rs
    subhalo_truncation: float = 5.0  # tNFW only: r_trunc = this * Rs
    # normalised population (sigma_sub set; sim/substructure.py): paltas / Wagner-Carena et al. 2022 values
    sigma_sub: Range | None = None  # Sigma_sub [kpc^-2], uniform per image; null: subhalo_count (legacy)
    # [mean, std]: Sigma_sub ~ N(mean, std^2) truncated to sigma_sub instead (sim/priors.py; paltas:
    # [2e-3, 1.1e-3]); the training prior an inference run records and a population inference divides out
    sigma_sub_normal: Normal | None = None
    subhalo_m_pivot: float = 1e10  # Msun
    subhalo_area_radius: float = 3.0  # subhalos within this x theta_E of the lens centre
    subhalo_concentration_model: str = "fixed"  # "fixed": subhalo_concentration/_truncation; "dg19"
    subhalo_c0: float = 17.0  # dg19: c = c0 (1+z)^zeta (nu/nu_ref)^-beta x 10^N(0, scatter)
    subhalo_conc_zeta: float = -0.25
    subhalo_conc_beta: float = 0.7
    subhalo_conc_m_ref: float = 1e8  # Msun
    subhalo_conc_scatter: float = 0.13  # dex
    subhalo_host_m200: float = 1e13  # Msun: host cored NFW (core r200/2, |z| < r200) of the DG19 depths
    axion_log10_mass: Range = (-24.0, -22.0)  # log10 eV
    axion_log10_mass_normal: Normal | None = None  # [mean, std]: a normal truncated to axion_log10_mass
    vortex_mass: float = 3e10  # Msun
    vortex_half_length_ref: float = 0.03  # arcsec at m_axion = 1e-22 eV
    vortex_profile: str = "segment"  # or "point_chain": vortex_points equal point masses on the segment
    vortex_points: int = 100
    # wave dark matter (class fdm, sim/fdm.py): particle mass, rms granule convergence x this factor, and the
    # field grid's margin beyond the image
    fdm_log10_mass: Range = (-22.5, -21.0)  # log10 eV
    fdm_amplitude: float = 1.0
    fdm_margin: float = 1.0  # arcsec
    # lens mass (sim/compensation.py): "monopole" subtracts each image's substructure monopole about the lens
    # centre (the enclosed mass at every radius does not depend on the class: what is left is clumps);
    # "ring_slope" sets the main deflector's theta_E and gamma per image so that the mass inside the Einstein
    # ring and the mean convergence of an annulus about it (the local slope) do not depend on the class (an
    # SIE: theta_E alone); "ring" lowers theta_E alone (the ring mass); "none" adds substructure and vortex
    # on top (the published recipe)
    mass_compensation: str = "monopole"
    # line-of-sight halos (sim/los.py: paltas LOSDG19, multi-plane): delta_los [low, high] uniform per image
    # (DG19 mass-function normalisation; null or [0, 0]: none), class independent; concentrations as dg19
    delta_los: Range | None = None
    los_mass: Range = (10**8.5, 1e10)  # Msun (M200), rendered range
    los_cone_angle: float = 8.0  # arcsec: full opening angle of the DG19 double cone at the lens plane
    los_dz: float = 0.01  # redshift slice width
    los_z_min: float = 0.01  # first slice

    # --------------------------------------------------------------------------- derived
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def max_subhalos(self) -> int:
        if "cdm" not in self.class_names and "cdm_smooth" not in self.class_names:
            return 0
        if self.sigma_sub is None:
            return int(self.subhalo_count[1])
        from .substructure import subhalo_capacity

        return subhalo_capacity(self)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, self.num_pix, self.num_pix)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (tuples become lists); ``resolve_preset(d)`` gives this preset back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def replace(self, **changes: Any) -> Preset:
        """A validated copy with some fields changed."""
        return resolve_preset(self, changes)


_EUCLID = dict(
    num_pix=64,
    delta_pix=0.101,
    psf_fwhm=0.16,
    noise="instrument",
    exposure_time_single=565.0,
    num_exposures=4,
    sky_brightness=22.35,
    zero_point=24.0,
    read_noise=4.2,
    gain=3.1,
    theta_E=(1.0, 1.6),
    source_mag=(21.0, 23.0),
)


def _q_orientation(e1: float, e2: float) -> tuple[Range, Range]:
    """(q, phi) as fixed ranges giving lenstronomy ellipticity (e1, e2) (inverse of phi_q2_ellipticity)."""
    c = math.hypot(e1, e2)
    q, phi = (1.0 - c) / (1.0 + c), 0.5 * math.atan2(e2, e1)
    return (q, q), (phi, phi)


_LENS_Q, _LENS_PHI = _q_orientation(0.1, 0.0)
_SOURCE_Q, _SOURCE_PHI = _q_orientation(-0.1, 0.1)

#: The published DeepLense Model I/II/III recipe (DeepLenseSim, PHYSICS.md), flaws included: one fixed macro
#: lens (SIE theta_E(1e12 Msun) from LUMINOSITY distances, e1 0.1, e2 0, centre 0, shear gamma1 0.05),
#: fixed Sersic source shape at a random position, exactly 25 point-mass subhalos with dN/dm ~ m^-0.9,
#: the vortex as 100 equal point masses, no supersampling.
_PUBLISHED = dict(
    supersampling=1,
    einstein_radius_distances="luminosity",
    lens_mass=1e12,
    lens_q=_LENS_Q,
    lens_orientation=_LENS_PHI,
    lens_center=(0.0, 0.0),
    shear_gamma=(0.05, 0.05),
    shear_orientation=(0.0, 0.0),
    source_offset=(-0.35, 0.35),
    source_R_sersic=(0.25, 0.25),
    source_n_sersic=(1.0, 1.0),
    source_q=_SOURCE_Q,
    source_orientation=_SOURCE_PHI,
    subhalo_profile="point_mass",
    subhalo_count=(25, 25),
    subhalo_mass=(1e6, 1e10),
    subhalo_mass_slope=0.9,
    subhalo_radius=(0.25, 2.0),
    axion_log10_mass=(-24.0, -22.0),
    vortex_mass=3e10,
    vortex_half_length_ref=0.03,
    vortex_profile="point_chain",
    vortex_points=100,
    mass_compensation="none",
)

#: HST WFC3 F160W, Gaussian PSF (lenstronomy's HST GAUSSIAN settings): model_iii and the published Model III.
_HST_F160W = dict(
    num_pix=64,
    delta_pix=0.08,
    psf_fwhm=0.08,
    exposure_time_single=5400.0,
    num_exposures=1,
    sky_brightness=22.3,
    zero_point=25.96,
    read_noise=4.0,
    gain=2.5,
)

#: Euclid VIS as the installed lenstronomy has it now (``SimulationAPI/ObservationConfig/Euclid.py``:
#: 4 x 566 s, sky 22.3 mag/arcsec^2, zero point 25.72, seeing 0.16", read noise 4.2 e-, gain 3.1,
#: 0.101"/px); ``_EUCLID`` keeps the 2022 values the published DeepLense Model II used.
_EUCLID_VIS_NOW = {**_EUCLID, "exposure_time_single": 566.0, "sky_brightness": 22.3, "zero_point": 25.72}

#: Substructure and PSF numerics of the physical presets: the paltas / Wagner-Carena et al. 2022 prior
#: (Sigma_sub ~ N(2e-3, 1.1e-3) there; U(0, 4e-3) here has the same mean and a 1.15e-3 spread), slope 1.9,
#: m_pivot 1e10, within 3 theta_E, DG19 tNFW; rendered masses 10^8.5-1e10 (paltas: 1e7-1e10; the lighter
#: ones, 96% of the number and 42% of the mass, each perturb the arcs by < 0.1 sigma at these resolutions
#: and would make rendering ~20x slower; docs/simulator.md). PSF convolved on the supersampled grid.
_PHYSICAL_SUB = dict(
    subhalo_profile="tnfw",
    sigma_sub=(0.0, 4e-3),
    subhalo_mass=(10**8.5, 1e10),
    subhalo_mass_slope=1.9,
    subhalo_concentration_model="dg19",
    supersampling_convolution=True,
)

#: Main deflector of the physical presets: EPL with gamma ~ N(2, 0.1) truncated at 3 sd (paltas,
#: Wagner-Carena et al. 2022); isothermal circular multipoles with a_m / theta_E ~ U(0, 0.01) for m = 3, 4
#: (galaxy isophotes: ~0.5-1 %, O'Riordan & Vegetti 2024, Oh et al. 2024) and U(0, 0.005) for m = 1
#: (docs/simulator.md).
_PHYSICAL_MACRO = dict(
    lens_profile="epl",
    lens_gamma=(1.7, 2.3),
    lens_gamma_sd=0.1,
    lens_multipole_a1=(0.0, 0.005),
    lens_multipole_a3=(0.0, 0.01),
    lens_multipole_a4=(0.0, 0.01),
)

#: HST WFC3/IR F160W PSF FWHM of the physical model_iii [arcsec]: the instrument's PSF at 1.6 um (WFC3
#: Instrument Handbook; lenstronomy ``HST.py``: "undrizzled PSF FWHM ~ 0.15 (Windhorst et al. 2011)"), not
#: the 0.08" drizzled pixel that lenstronomy's GAUSSIAN setting (and deeplense_model_iii) uses as the FWHM.
_F160W_PSF_FWHM = 0.151

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="model_i",
            num_pix=150,
            delta_pix=0.05,
            psf_fwhm=0.087,
            noise="snr",
            theta_E=(1.2, 1.8),
            **_PHYSICAL_SUB,
            **_PHYSICAL_MACRO,
        ),
        Preset(name="model_ii", **_EUCLID_VIS_NOW, **_PHYSICAL_SUB, **_PHYSICAL_MACRO),
        # model_ii with a Sersic lens galaxy (VIS 19-21 mag) in the image (lens_light_subtracted: false)
        Preset(
            name="model_ii_lens_light", **_EUCLID_VIS_NOW, **_PHYSICAL_SUB, **_PHYSICAL_MACRO, lens_light=True
        ),
        Preset(
            name="model_iii",
            **{**_HST_F160W, "psf_fwhm": _F160W_PSF_FWHM},
            noise="instrument",
            theta_E=(0.9, 1.5),
            subhalo_radius=(0.25, 1.8),
            source_mag=(22.0, 24.0),
            **_PHYSICAL_SUB,
            **_PHYSICAL_MACRO,
        ),
        Preset(
            name="real_galaxy_tiny",
            class_names=("no_sub", "cdm"),
            source_kind="real_galaxy",
            **_EUCLID_VIS_NOW,
            **_PHYSICAL_SUB,
            **_PHYSICAL_MACRO,
        ),
        # model_ii with wave dark matter (sim/fdm.py) in place of the axion vortex; masses from 10^-23.5 eV
        # (granules resolved, excluded by other probes) to 1e-21 eV, to locate the detection limit
        Preset(
            name="model_ii_fdm",
            class_names=("no_sub", "cdm", "fdm"),
            fdm_log10_mass=(-23.5, -21.0),
            **_EUCLID_VIS_NOW,
            **_PHYSICAL_SUB,
            **_PHYSICAL_MACRO,
        ),
        # as published: lenstronomy ImageModel, amp 20, Model I's noise recipe (integer counts)
        Preset(
            name="deeplense_model_i",
            num_pix=150,
            delta_pix=0.05,
            psf_fwhm=0.087,
            psf_truncation=3.0,
            noise="deeplense_i",
            source_amp=(20.0, 20.0),
            log10_exposure_time=(3.0, 3.5),
            sigma_bkg=0.01,
            **_PUBLISHED,
        ),
        # as published: SimAPI Euclid VIS (lenstronomy 2022), magnitude 20, stored image = 2 x model, no noise
        Preset(
            name="deeplense_model_ii",
            **{k: v for k, v in _EUCLID.items() if k not in ("noise", "theta_E", "source_mag")},
            noise="deeplense_x2",
            source_mag=(20.0, 20.0),
            **_PUBLISHED,
        ),
        # as Model II with HST WFC3 F160W (GAUSSIAN PSF)
        Preset(
            name="deeplense_model_iii",
            **_HST_F160W,
            noise="deeplense_x2",
            source_mag=(20.0, 20.0),
            **_PUBLISHED,
        ),
    )
}


def list_presets() -> list[str]:
    """Names of the built-in presets."""
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    """The built-in preset ``name``; KeyError listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown preset {name!r}; valid presets: {', '.join(list_presets())}") from None


# ------------------------------------------------------------------------------------------- validation

_FIELDS = {f.name: f for f in dataclasses.fields(Preset)}
_NORMAL_FIELDS = tuple(normal_field(f) for f in NORMAL_PRIOR_FIELDS)
_RANGE_FIELDS = {n for n, f in _FIELDS.items() if f.type in ("Range", "tuple[int, int]", "Range | None")}


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"preset field {name!r} = {value!r} is invalid; allowed: {allowed}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _coerce(name: str, value: Any) -> Any:
    """Lists -> tuples, ints stay ints; type errors name the field."""
    if name in ("sigma_sub", "delta_los", *_NORMAL_FIELDS) and value is None:
        return None
    if name in _NORMAL_FIELDS:
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_finite(v) for v in value):
            _fail(name, value, "null or a [mean, std] pair of finite numbers")
        if not value[1] > 0:
            _fail(name, value, "a [mean, std] pair with std > 0")
        return (float(value[0]), float(value[1]))
    if name in _RANGE_FIELDS:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            _fail(name, value, "a [low, high] pair of finite numbers")
        if not all(_finite(v) for v in value):
            _fail(name, value, "a [low, high] pair of finite numbers (no NaN/inf)")
        lo, hi = value
        if lo > hi:
            _fail(name, value, "low <= high")
        if name == "subhalo_count":
            if int(lo) != lo or int(hi) != hi:
                _fail(name, value, "integers")
            return (int(lo), int(hi))
        return (float(lo), float(hi))
    if name == "class_names":
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            _fail(name, value, f"a list of distinct names from {KNOWN_CLASSES}")
        return tuple(value)
    return value


def _in_range(name: str, value: Range, lo: float, hi: float, *, lo_open=False, hi_open=False) -> None:
    a, b = value
    ok_lo = a > lo if lo_open else a >= lo
    ok_hi = b < hi if hi_open else b <= hi
    if not (ok_lo and ok_hi):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        _fail(name, list(value), f"values in {lb}{lo}, {hi}{rb}")


def validate_preset(p: Preset) -> Preset:
    """Check every field; ValueError naming the field, the value and what is allowed."""
    if not isinstance(p.name, str) or not p.name:
        _fail("name", p.name, "a non-empty string")
    for name in ("num_pix", "supersampling", "num_exposures", "vortex_points"):
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, int):
            _fail(name, v, "an integer")
    if not 4 <= p.num_pix <= 2048:
        _fail("num_pix", p.num_pix, "an integer in [4, 2048]")
    if not 1 <= p.supersampling <= 16:
        _fail("supersampling", p.supersampling, "an integer in [1, 16]")
    if not p.num_exposures >= 1:
        _fail("num_exposures", p.num_exposures, "an integer >= 1")
    if not 2 <= p.vortex_points <= 10000:
        _fail("vortex_points", p.vortex_points, "an integer in [2, 10000]")
    if p.lens_mass is not None and (not _finite(p.lens_mass) or p.lens_mass <= 0):
        _fail("lens_mass", p.lens_mass, "null or a finite mass > 0 [Msun]")
    positive = (
        "delta_pix",
        "psf_truncation",
        "H0",
        "sigma_bkg",
        "exposure_time_single",
        "gain",
        "subhalo_concentration",
        "subhalo_truncation",
        "vortex_mass",
        "vortex_half_length_ref",
    )
    for name in positive:
        v = getattr(p, name)
        if not _finite(v) or v <= 0:
            _fail(name, v, "a finite number > 0")
    for name in ("read_noise", "sky_brightness", "zero_point", "subhalo_mass_slope"):
        v = getattr(p, name)
        if not _finite(v) or (name == "read_noise" and v < 0):
            _fail(name, v, "a finite number" + (" >= 0" if name == "read_noise" else ""))
    if p.psf_fwhm is not None and (not _finite(p.psf_fwhm) or p.psf_fwhm <= 0):
        _fail("psf_fwhm", p.psf_fwhm, "None or a finite number > 0 [arcsec]")
    if not _finite(p.Om0) or not 0 <= p.Om0 <= 1:
        _fail("Om0", p.Om0, "a number in [0, 1]")
    if not _finite(p.z_lens) or p.z_lens <= 0:
        _fail("z_lens", p.z_lens, "a finite number > 0")
    if not _finite(p.z_source) or p.z_source <= p.z_lens:
        _fail("z_source", p.z_source, f"a finite number > z_lens = {p.z_lens}")
    if (
        len(p.class_names) == 0
        or len(set(p.class_names)) != len(p.class_names)
        or any(c not in KNOWN_CLASSES for c in p.class_names)
    ):
        _fail(
            "class_names",
            list(p.class_names),
            f"a non-empty list of distinct names from {list(KNOWN_CLASSES)}",
        )
    for name, allowed in (
        ("source_kind", SOURCE_KINDS),
        ("noise", NOISE_KINDS),
        ("subhalo_profile", SUBHALO_PROFILES),
        ("subhalo_concentration_model", CONCENTRATION_MODELS),
        ("vortex_profile", VORTEX_PROFILES),
        ("einstein_radius_distances", DISTANCE_KINDS),
        ("count_unit", COUNT_UNITS),
    ):
        if getattr(p, name) not in allowed:
            _fail(name, getattr(p, name), f"one of {list(allowed)}")
    for name in ("paired", "lens_light", "supersampling_convolution"):
        if not isinstance(getattr(p, name), bool):
            _fail(name, getattr(p, name), "true or false")
    if p.source_library is not None and (not isinstance(p.source_library, str) or not p.source_library):
        _fail("source_library", p.source_library, "null or a path to a Galaxy10-layout HDF5 file")
    inf = math.inf
    _in_range("theta_E", p.theta_E, 0.0, inf, lo_open=True)
    _in_range("lens_q", p.lens_q, 0.0, 1.0, lo_open=True)
    _in_range("source_q", p.source_q, 0.0, 1.0, lo_open=True)
    _in_range("shear_gamma", p.shear_gamma, 0.0, 0.5, hi_open=True)
    for name in (
        "lens_light_R_sersic",
        "lens_light_n_sersic",
        "source_R_sersic",
        "source_n_sersic",
        "source_size",
        "source_amp",
        "lens_light_amp",
        "target_snr",
        "subhalo_mass",
        "subhalo_radius",
    ):
        _in_range(name, getattr(p, name), 0.0, inf, lo_open=True)
    _in_range("subhalo_count", p.subhalo_count, 0, 10000)
    _validate_population(p)
    _validate_macro(p)
    from .los import validate_los

    validate_los(p, _fail)
    _validate_fdm(p)
    _validate_normal_priors(p)
    for name in (
        "lens_center",
        "lens_orientation",
        "shear_orientation",
        "source_orientation",
        "source_offset",
        "log10_exposure_time",
        "source_mag",
        "lens_light_mag",
        "axion_log10_mass",
    ):
        _in_range(name, getattr(p, name), -inf, inf)
    if p.source_kind == "sersic" and p.source_library is not None:
        _fail("source_library", p.source_library, "null unless source_kind is 'real_galaxy'")
    if p.noise == "deeplense_i" and p.source_kind != "sersic":
        _fail("noise", p.noise, "'deeplense_i' only with source_kind 'sersic' (source_amp is its Sersic amp)")
    if p.einstein_radius_distances == "luminosity" and p.subhalo_profile != "point_mass":
        _fail(
            "einstein_radius_distances",
            p.einstein_radius_distances,
            "'luminosity' only with point-mass subhalos (it sets point-mass Einstein radii)",
        )
    return p


def _validate_macro(p: Preset) -> None:
    """Fields of the main deflector's profile, multipoles, lens-light subtraction and source magnitudes."""
    for name, allowed in (("lens_profile", LENS_PROFILES), ("source_mag_dist", SOURCE_MAG_DISTS)):
        if getattr(p, name) not in allowed:
            _fail(name, getattr(p, name), f"one of {list(allowed)}")
    if not isinstance(p.lens_light_subtracted, bool):
        _fail("lens_light_subtracted", p.lens_light_subtracted, "true or false")
    _in_range("lens_gamma", p.lens_gamma, 1.0, 3.0, lo_open=True, hi_open=True)
    if not _finite(p.lens_gamma_sd) or p.lens_gamma_sd < 0:
        _fail("lens_gamma_sd", p.lens_gamma_sd, "a finite number >= 0")
    if p.lens_profile == "sie" and (p.lens_gamma != (2.0, 2.0) or p.lens_gamma_sd != 0):
        _fail("lens_profile", p.lens_profile, "'epl' when lens_gamma is not [2, 2] or lens_gamma_sd > 0")
    for name in ("lens_multipole_a1", "lens_multipole_a3", "lens_multipole_a4"):
        _in_range(name, getattr(p, name), 0.0, 0.2)
    if not _finite(p.source_mag_count_slope):
        _fail("source_mag_count_slope", p.source_mag_count_slope, "a finite number [dex per magnitude]")
    if p.lens_light_subtracted and p.noise not in ("none", "snr", "instrument"):
        _fail("lens_light_subtracted", True, "only with noise 'none', 'snr' or 'instrument'")


def _validate_normal_priors(p: Preset) -> None:
    """A ``<field>_normal`` needs its range set and must put some mass inside it."""
    for field in NORMAL_PRIOR_FIELDS:
        normal = getattr(p, normal_field(field))
        rng = getattr(p, field)
        if normal is None:
            continue
        if rng is None:
            _fail(normal_field(field), list(normal), f"null unless {field} (its range) is set")
        if not rng[1] > rng[0]:
            _fail(normal_field(field), list(normal), f"null when {field} {list(rng)} is a single value")
        if normal_mass(*normal, *rng) < MIN_MASS:
            _fail(normal_field(field), list(normal), f"a normal with mass >= {MIN_MASS:g} inside {list(rng)}")


def _validate_fdm(p: Preset) -> None:
    """Fields of the wave-dark-matter class (sim/fdm.py), checked whatever the classes."""
    from .fdm import LOG10_MASS_LIMITS

    lo, hi = LOG10_MASS_LIMITS
    _in_range("fdm_log10_mass", p.fdm_log10_mass, lo, hi)
    if not _finite(p.fdm_amplitude) or not 0 < p.fdm_amplitude <= 100:
        _fail("fdm_amplitude", p.fdm_amplitude, "a number in (0, 100] (x the rms granule convergence)")
    if not _finite(p.fdm_margin) or not 0 <= p.fdm_margin <= 10:
        _fail("fdm_margin", p.fdm_margin, "a number in [0, 10] [arcsec]")


def _validate_population(p: Preset) -> None:
    """Fields of the normalised subhalo population (checked whatever sigma_sub is: overrides fail early)."""
    positive = (
        "subhalo_m_pivot", "subhalo_area_radius", "subhalo_c0", "subhalo_conc_m_ref", "subhalo_host_m200",
    )  # fmt: skip
    for name in positive:
        v = getattr(p, name)
        if not _finite(v) or v <= 0:
            _fail(name, v, "a finite number > 0")
    for name in ("subhalo_conc_zeta", "subhalo_conc_beta"):
        if not _finite(getattr(p, name)):
            _fail(name, getattr(p, name), "a finite number")
    if not _finite(p.subhalo_conc_scatter) or p.subhalo_conc_scatter < 0:
        _fail("subhalo_conc_scatter", p.subhalo_conc_scatter, "a finite number >= 0 [dex]")
    if p.mass_compensation not in MASS_COMPENSATIONS:
        _fail("mass_compensation", p.mass_compensation, f"one of {list(MASS_COMPENSATIONS)}")
    if "cdm_smooth" in p.class_names and p.sigma_sub is None:
        _fail("class_names", list(p.class_names), "'cdm_smooth' only with a normalised population: sigma_sub")
    if p.sigma_sub is None:
        return
    _in_range("sigma_sub", p.sigma_sub, 0.0, 1.0)  # kpc^-2; a negative Sigma_sub fails here
    lo, hi = p.subhalo_mass
    if not lo < hi:
        _fail("subhalo_mass", list(p.subhalo_mass), "m_min < m_max when sigma_sub is set")
    if p.subhalo_concentration_model == "dg19" and not (1e5 <= lo and hi <= 1e12):
        _fail("subhalo_mass", list(p.subhalo_mass), "masses in [1e5, 1e12] Msun with dg19 concentrations")
    if p.max_subhalos > 100_000:
        _fail("sigma_sub", list(p.sigma_sub), f"<= 100000 subhalos per image (got {p.max_subhalos} slots)")


def resolve_preset(
    preset: str | Preset | Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> Preset:
    """A validated ``Preset`` from a name, a ``Preset`` or a dict (e.g. ``Preset.to_dict()``), plus overrides.

    A dict may omit fields (defaults apply) but must name ``name``; if its name is a built-in preset the
    built-in values are the base. Unknown keys are a ValueError listing the valid fields.
    """
    if isinstance(preset, Preset):
        base = dataclasses.asdict(preset)
    elif isinstance(preset, str):
        base = dataclasses.asdict(get_preset(preset))
    elif isinstance(preset, Mapping):
        _check_keys(preset)
        name = preset.get("name")
        base = dataclasses.asdict(PRESETS[name]) if isinstance(name, str) and name in PRESETS else {}
        base.update(preset)
        if "name" not in base:
            raise ValueError("preset mapping needs a 'name' field")
    else:
        raise TypeError(f"preset must be a name, a Preset or a mapping, got {type(preset).__name__}")
    if overrides:
        _check_keys(overrides)
        base.update(overrides)
    kwargs = {k: _coerce(k, v) for k, v in base.items()}
    for req in ("num_pix", "delta_pix", "psf_fwhm"):
        if req not in kwargs:
            raise ValueError(f"preset {kwargs.get('name')!r} lacks the required field {req!r}")
    return validate_preset(Preset(**kwargs))


def _check_keys(mapping: Mapping[str, Any]) -> None:
    unknown = sorted(set(mapping) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown preset field(s) {unknown}; valid fields: {', '.join(_FIELDS)}")
