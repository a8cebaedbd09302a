"""Flat LambdaCDM distances and lensing scales, written out (no astropy needed).

Distances in Mpc, angles in arcsec, masses in Msun. Radiation is neglected (astropy's
``FlatLambdaCDM(H0, Om0)`` with the default ``Tcmb0=0`` gives the same numbers).
The comoving distance integral is evaluated with 64-point Gauss-Legendre quadrature, which is exact to
double precision for the smooth integrand 1/E(z) over the redshift ranges of interest.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

#: speed of light [km/s]
C_KM_S = 299792.458
#: G M_sun / c^2 [m]
GM_SUN_OVER_C2_M = 1.32712440018e20 / 299792458.0**2
#: one megaparsec [m]
MPC_M = 3.0856775814913673e22
#: one arcsecond [rad]
ARCSEC = math.pi / (180.0 * 3600.0)

DEFAULT_H0 = 70.0
DEFAULT_OM0 = 0.3


@lru_cache(maxsize=8)
def _gauss_legendre(order: int = 64) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(order)


def efunc(z: float, *, om0: float = DEFAULT_OM0) -> float:
    """E(z) = H(z)/H0 of a flat LambdaCDM universe (no radiation)."""
    return math.sqrt(om0 * (1.0 + z) ** 3 + (1.0 - om0))


def comoving_distance(
    z: float, *, h0: float = DEFAULT_H0, om0: float = DEFAULT_OM0, z0: float = 0.0
) -> float:
    """Line-of-sight comoving distance between redshifts ``z0`` and ``z`` [Mpc]."""
    if not (z >= 0 and z0 >= 0 and math.isfinite(z) and math.isfinite(z0)):
        raise ValueError(f"redshifts must be finite and >= 0, got z0={z0!r}, z={z!r}")
    if not (h0 > 0 and 0 <= om0 <= 1):
        raise ValueError(f"need H0 > 0 and 0 <= Om0 <= 1, got H0={h0!r}, Om0={om0!r}")
    nodes, weights = _gauss_legendre()
    half = 0.5 * (z - z0)
    zz = z0 + half * (nodes + 1.0)
    integrand = 1.0 / np.sqrt(om0 * (1.0 + zz) ** 3 + (1.0 - om0))
    return float(C_KM_S / h0 * half * np.sum(weights * integrand))


def angular_diameter_distance(z: float, *, h0: float = DEFAULT_H0, om0: float = DEFAULT_OM0) -> float:
    """Angular-diameter distance to redshift ``z`` [Mpc] (flat universe)."""
    return comoving_distance(z, h0=h0, om0=om0) / (1.0 + z)


def angular_diameter_distance_z1z2(
    z1: float, z2: float, *, h0: float = DEFAULT_H0, om0: float = DEFAULT_OM0
) -> float:
    """Angular-diameter distance between ``z1 < z2`` [Mpc] (flat universe: (D_C2 - D_C1)/(1+z2))."""
    if not z2 > z1:
        raise ValueError(f"need z_source > z_lens, got z_lens={z1!r}, z_source={z2!r}")
    return comoving_distance(z2, h0=h0, om0=om0, z0=z1) / (1.0 + z2)


def luminosity_distance(z: float, *, h0: float = DEFAULT_H0, om0: float = DEFAULT_OM0) -> float:
    """Luminosity distance to redshift ``z`` [Mpc] (flat universe: (1 + z) D_C)."""
    return comoving_distance(z, h0=h0, om0=om0) * (1.0 + z)


#: how lensing distances are taken: "angular_diameter" (correct) or "luminosity" (the published DeepLense
#: sets: D_l, D_s luminosity distances and D_ls = D_s - D_l, see PHYSICS.md)
DISTANCE_KINDS = ("angular_diameter", "luminosity")


def lensing_distances(
    z_lens: float,
    z_source: float,
    *,
    h0: float = DEFAULT_H0,
    om0: float = DEFAULT_OM0,
    distances: str = "angular_diameter",
) -> tuple[float, float, float]:
    """(D_l, D_s, D_ls) [Mpc]: angular-diameter distances, or with ``distances="luminosity"`` the
    published DeepLense recipe's luminosity distances D_l, D_s and D_ls = D_s - D_l."""
    if distances == "luminosity":
        d_l = luminosity_distance(z_lens, h0=h0, om0=om0)
        d_s = luminosity_distance(z_source, h0=h0, om0=om0)
        if not d_s > d_l:
            raise ValueError(f"need z_source > z_lens, got z_lens={z_lens!r}, z_source={z_source!r}")
        return d_l, d_s, d_s - d_l
    if distances != "angular_diameter":
        raise ValueError(f"distances = {distances!r} is not one of {list(DISTANCE_KINDS)}")
    d_l = angular_diameter_distance(z_lens, h0=h0, om0=om0)
    d_s = angular_diameter_distance(z_source, h0=h0, om0=om0)
    d_ls = angular_diameter_distance_z1z2(z_lens, z_source, h0=h0, om0=om0)
    return d_l, d_s, d_ls


def einstein_radius_point_mass(
    mass_msun, z_lens: float, z_source: float, *, h0: float = DEFAULT_H0, om0: float = DEFAULT_OM0
):
    """Einstein radius of a point mass [arcsec]: theta_E^2 = 4 G M / c^2 * D_ls / (D_l D_s).

    ``mass_msun`` may be a float, numpy array or torch tensor (the result has the same type).
    """
    return point_mass_theta_e_coefficient(z_lens, z_source, h0=h0, om0=om0) * mass_msun**0.5


def point_mass_theta_e_coefficient(
    z_lens: float,
    z_source: float,
    *,
    h0: float = DEFAULT_H0,
    om0: float = DEFAULT_OM0,
    distances: str = "angular_diameter",
) -> float:
    """theta_E of a 1 Msun point mass [arcsec]; theta_E(M) = this * sqrt(M / Msun).

    ``distances``: see ``lensing_distances`` ("luminosity" gives 1.2815" for 1e12 Msun at z 0.5 / 1.0,
    the published DeepLense main lens; the correct angular-diameter value is 1.665").
    """
    d_l, d_s, d_ls = lensing_distances(z_lens, z_source, h0=h0, om0=om0, distances=distances)
    theta2 = 4.0 * GM_SUN_OVER_C2_M * d_ls / (d_l * d_s * MPC_M)
    return math.sqrt(theta2) / ARCSEC


def sigma_crit_msun_per_arcsec2(
    z_lens: float, z_source: float, *, h0: float = DEFAULT_H0, om0: float = DEFAULT_OM0
) -> float:
    """Critical surface density Sigma_crit = c^2 D_s / (4 pi G D_l D_ls) [Msun / arcsec^2]."""
    d_l, d_s, d_ls = lensing_distances(z_lens, z_source, h0=h0, om0=om0)
    sigma_m = d_s / (4.0 * math.pi * GM_SUN_OVER_C2_M * d_l * d_ls * MPC_M)  # Msun / m^2
    return sigma_m * (d_l * MPC_M * ARCSEC) ** 2


def critical_density_msun_per_mpc3(z: float, *, h0: float = DEFAULT_H0, om0: float = DEFAULT_OM0) -> float:
    """Critical density of the universe at redshift z, rho_c = 3 H(z)^2 / (8 pi G) [Msun / Mpc^3]."""
    g_mpc_msun = 4.30091727003628e-9  # G in Mpc (km/s)^2 / Msun
    hz = h0 * efunc(z, om0=om0)
    return 3.0 * hz**2 / (8.0 * math.pi * g_mpc_msun)
