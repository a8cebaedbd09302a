"""Fused Triton kernels for the CUDA fast path of ``simulate`` (optional: used only when triton imports).

``render_sersic`` computes, in ONE kernel per batch, what ``Renderer`` computes for Sersic sources
without lens light: SIE or EPL (``lens.alpha_epl``'s series, the number of terms compiled in) + multipoles
m = 1, 3, 4 + external shear + the image's point-mass or truncated-NFW subhalos + its vortex,
ray shooting on the supersampled grid, the elliptical Sersic source, and binning to flux per pixel. The
supersampled image never touches memory; subhalos and vortices are evaluated only for the images with them.
``psf_separable`` is the separable Gaussian PSF with edge replication (scipy ``mode='nearest'``) as two
element-wise tap sums. Every output element is computed by the same code whatever the batch size, so the
bytes of an image do not depend on how images are batched.

The per-image scalars are derived in torch (``derive_scalars``) and passed as one [B, F] float32 table.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:  # pragma: no cover - exercised on GPU machines
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any import problem means: no fast path
    HAVE_TRITON = False

# columns of the per-image scalar table
_COLS = (
    "cx", "cy", "cos_p", "sin_p", "q", "f", "b", "g1", "g2",
    "s_cx", "s_cy", "s_e1", "s_e2", "s_norm", "s_amp", "s_Rs", "s_bn", "s_inv_n",
    "v_cos", "v_sin", "v_h", "v_mu", "n_sub",
    "t", "epl_amp", "epl_c", "ln_b",
    "m1c", "m1s", "ln_rE", "m3c", "m3s", "m4c", "m4s",
)  # fmt: skip
NCOL = len(_COLS)
_FLOOR_F = 1e-15


def derive_scalars(p: dict[str, Tensor], *, has_vortex: bool) -> Tensor:
    """Per-image scalars [B, NCOL] float32 (same formulas as ``lens.alpha_sie`` / ``light.sersic_*``)."""
    e1, e2 = p["e1"], p["e2"]
    phi = 0.5 * torch.atan2(e2, e1)
    c = torch.clamp(torch.sqrt(e1 * e1 + e2 * e2), max=0.9999)
    q = (1.0 - c) / (1.0 + c)
    f = torch.sqrt((2.0 * c / (1.0 + c)) * (1.0 + q)).clamp_min(_FLOOR_F)
    b = p["theta_E"] * torch.sqrt(q)
    se1, se2 = p["source_e1"], p["source_e2"]
    norm = torch.sqrt(torch.clamp((1.0 - se1 * se1 - se2 * se2).abs(), min=1e-6))
    ns = p["source_n_sersic"]
    bn = (1.9992 * ns - 0.3271).clamp_min(1e-5)
    zero = torch.zeros_like(e1)
    if has_vortex:
        ang = p["vortex_angle"]
        h = p["vortex_half_length"].clamp_min(1e-12)
        vte = p["vortex_theta_E"]
        v_cos, v_sin, v_mu = torch.cos(ang), torch.sin(ang), vte * vte / (2.0 * h)
    else:
        v_cos = v_sin = h = v_mu = zero
    n_sub = p["subhalo_count"].to(e1.dtype) if "subhalo_count" in p else zero
    # EPL (``lens.alpha_epl``): t = gamma - 1, 2 b / (1+q), c = (1-q)/(1+q), ln b
    t = p["gamma"] - 1.0 if "gamma" in p else zero + 1.0
    epl = [t, 2.0 * b / (1.0 + q), c, torch.log(b.clamp_min(1e-30))]
    # multipoles (``lens.alpha_multipole``): m = 1 (a/2 cos phi_1, a/2 sin phi_1, ln r_E = ln theta_E);
    # m = 3, 4: a_m / (1 - m^2) (cos m phi_m, sin m phi_m)
    mp = [zero] * 7
    if "multipole_a1" in p:
        a1, f1 = 0.5 * p["multipole_a1"], p["multipole_phi1"]
        mp[:3] = [a1 * torch.cos(f1), a1 * torch.sin(f1), torch.log(p["theta_E"])]
        for i, m in ((3, 3), (5, 4)):
            am, fm = p[f"multipole_a{m}"] / (1.0 - m * m), m * p[f"multipole_phi{m}"]
            mp[i : i + 2] = [am * torch.cos(fm), am * torch.sin(fm)]
    cols = [
        p["center_x"], p["center_y"], torch.cos(phi), torch.sin(phi), q, f, b, p["gamma1"], p["gamma2"],
        p["source_center_x"], p["source_center_y"], se1, se2, norm, p["source_amp"],
        p["source_R_sersic"].clamp_min(1e-4), bn, 1.0 / ns,
        v_cos, v_sin, h, v_mu, n_sub, *epl, *mp,
    ]  # fmt: skip
    return torch.stack([t.to(torch.float32) for t in cols], dim=1).contiguous()


if HAVE_TRITON:  # pragma: no cover - compiled for the GPU

    @triton.jit
    def _atan(z):
        """arctan, float32 (Cephes atanf: reduction to |x| <= tan(pi/8), degree-9 odd polynomial)."""
        t = tl.abs(z)
        big = t > 2.414213562373095
        mid = t > 0.4142135623730950
        x = tl.where(big, -1.0 / tl.maximum(t, 1e-30), tl.where(mid, (t - 1.0) / (t + 1.0), t))
        y0 = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
        zz = x * x
        p = ((8.05374449538e-2 * zz - 1.38776856032e-1) * zz + 1.99777106478e-1) * zz - 3.33329491539e-1
        y = y0 + (p * zz * x + x)
        return tl.where(z < 0, -y, y)

    @triton.jit
    def _atan_pos_fast(t):
        """arctan of t >= 0 as ``_atan``, with the range reduction's division approximate (one ``fdiv``)."""
        big = t > 2.414213562373095
        mid = t > 0.4142135623730950
        num = tl.where(big, -1.0, tl.where(mid, t - 1.0, t))
        den = tl.where(big, t, tl.where(mid, t + 1.0, 1.0))
        x = tl.fdiv(num, den)
        y0 = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
        zz = x * x
        p = ((8.05374449538e-2 * zz - 1.38776856032e-1) * zz + 1.99777106478e-1) * zz - 3.33329491539e-1
        return y0 + (p * zz * x + x)

    @triton.jit
    def _atanh(z):
        """artanh for |z| < 1, float32: odd series below 0.1 (so artanh(z)/z -> 1 as z -> 0), else the log."""
        zz = z * z
        series = z * (1.0 + zz * (1.0 / 3.0 + zz * (0.2 + zz * (1.0 / 7.0 + zz * (1.0 / 9.0)))))
        logf = 0.5 * tl.log((1.0 + z) / (1.0 - z))
        return tl.where(tl.abs(z) < 0.1, series, logf)

    @triton.jit
    def _atan2(y, x):
        """atan2(y, x) in (-pi, pi] (torch conventions for x = 0 and y = +-0 with x < 0)."""
        safe_x = tl.where(x == 0.0, 1.0, x)
        a = _atan(y / safe_x)
        a = tl.where(x < 0.0, tl.where(y < 0.0, a - 3.141592653589793, a + 3.141592653589793), a)
        half = tl.where(y > 0.0, 1.5707963267948966, tl.where(y < 0.0, -1.5707963267948966, 0.0))
        return tl.where(x == 0.0, half, a)

    @triton.jit
    def _multipoles(ax, ay, dx, dy, m1c, m1s, ln_re, m3c, m3s, m4c, m4s):
        """(ax, ay) plus the circular multipoles m = 1, 3, 4 (``lens.alpha_multipole``) at (dx, dy) from the
        lens centre, cos/sin of m phi by Chebyshev polynomials of cos phi, sin phi (``derive_scalars``)."""
        r = tl.maximum(tl.sqrt(dx * dx + dy * dy), 1e-6)
        cp = dx / r
        sp = dy / r
        # m = 1: a/2 [ln(r/r_E) (cos phi_1, sin phi_1) + cos(phi - phi_1) (cos phi, sin phi)]
        ln = tl.log(r) - ln_re
        proj = cp * m1c + sp * m1s
        ax += m1c * ln + proj * cp
        ay += m1s * ln + proj * sp
        # m = 3, 4: A cos(m(phi - phi_m)) = cos(m phi) Ac + sin(m phi) As,
        # A sin(m(phi - phi_m)) = sin(m phi) Ac - cos(m phi) As
        c3 = cp * (4.0 * cp * cp - 3.0)
        s3 = sp * (3.0 - 4.0 * sp * sp)
        cc3 = c3 * m3c + s3 * m3s
        ss3 = 3.0 * (s3 * m3c - c3 * m3s)
        cc = cp * cp
        ss = sp * sp
        c4 = cc * cc - 6.0 * cc * ss + ss * ss
        s4 = 4.0 * cp * sp * (cc - ss)
        cc4 = c4 * m4c + s4 * m4s
        ss4 = 4.0 * (s4 * m4c - c4 * m4s)
        ax += cp * (cc3 + cc4) + sp * (ss3 + ss4)
        ay += sp * (cc3 + cc4) - cp * (ss3 + ss4)
        return ax, ay

    @triton.jit
    def _tnfw_w(ddx, ddy, o):
        """The TNFW deflection's factor w (alpha = w (ddx, ddy)) of the ``tnfw_table`` row at ``o`` (the same
        arithmetic as the subhalo loop of ``_render_kernel``)."""
        inv_rs = tl.load(o + 2)
        tau = tl.load(o + 3)
        t2m1 = tl.load(o + 4)
        b2 = tl.load(o + 5)
        ct = tl.load(o + 6)
        amp = tl.load(o + 7)
        X = tl.maximum(tl.sqrt(ddx * ddx + ddy * ddy) * inv_rs, 1e-3)
        X2 = X * X
        d = X2 - 1.0
        sd = tl.sqrt(tl.abs(d))
        ssafe = tl.where(sd < 1e-4, 1.0, sd)
        lx = tl.log(X)
        far = tl.where(d > 0, _atan_pos_fast(ssafe), tl.log(1.0 + ssafe) - lx)
        F = tl.where(sd < 1e-4, 1.0 - d / 3.0 + d * d / 5.0, tl.fdiv(far, ssafe))
        sq = tl.sqrt(tau * tau + X2)
        L = lx - tl.log(tau + sq)
        g = (t2m1 + 2.0 * X2) * F + ct + sq * (L * b2 - 3.141592653589793)
        return tl.fdiv(amp * g, X2)

    @triton.jit
    def _render_kernel(
        out_ptr,  # [B, N*N] float32
        sc_ptr,  # [B, NCOL] float32
        te2_ptr,  # [B, K] subhalo theta_E^2
        sx_ptr,  # [B, K]
        sy_ptr,  # [B, K]
        tn_ptr,  # [B, KT, TNFW_FIELDS] tNFW subhalos (``tnfw_table``)
        tcount_ptr,  # [B] int32: tNFW subhalos per image
        coord_ptr,  # [N*SS] sub-pixel centre coordinates [arcsec]
        rad_ptr,  # [B, R] float32: circularly symmetric deflection tables (mean radial, at j * dr)
        rdr_ptr,  # [B] float32: their node spacing dr (0: no table)
        scale,  # delta_pix^2 / SS^2
        los_ptr,  # [B, KL, 9] LOS halos by redshift (``los.triton_los_table``): tnfw_table row, then w
        lcount_ptr,  # [B, 2] int32: LOS halos in front of the lens, all LOS halos
        w_lens,  # chi(z_lens) / chi(z_source)
        N: tl.constexpr,
        SS: tl.constexpr,
        K: tl.constexpr,
        NC: tl.constexpr,
        HAS_SUB: tl.constexpr,
        HAS_VORTEX: tl.constexpr,
        HAS_TNFW: tl.constexpr,
        KT: tl.constexpr,  # slots per image of tn_ptr
        BLOCK: tl.constexpr,
        EPL_TERMS: tl.constexpr = -1,  # -1: SIE; else the EPL series' terms after the first
        HAS_MULTIPOLE: tl.constexpr = False,
        HAS_RADIAL: tl.constexpr = False,
        R: tl.constexpr = 2,  # nodes of a radial table
        HAS_LOS: tl.constexpr = False,  # multi-plane through LOS halos (``los.ray_shoot``)
        KL: tl.constexpr = 0,  # LOS slots per image of los_ptr
    ):
        NB: tl.constexpr = (N * N + BLOCK - 1) // BLOCK
        pid = tl.program_id(0)
        img = pid // NB
        blk = pid % NB
        pix = blk * BLOCK + tl.arange(0, BLOCK)
        mask = pix < N * N
        row = pix // N
        col = pix % N
        sc = sc_ptr + img.to(tl.int64) * NC
        cx = tl.load(sc + 0)
        cy = tl.load(sc + 1)
        cos_p = tl.load(sc + 2)
        sin_p = tl.load(sc + 3)
        q = tl.load(sc + 4)
        f = tl.load(sc + 5)
        b = tl.load(sc + 6)
        g1 = tl.load(sc + 7)
        g2 = tl.load(sc + 8)
        s_cx = tl.load(sc + 9)
        s_cy = tl.load(sc + 10)
        s_e1 = tl.load(sc + 11)
        s_e2 = tl.load(sc + 12)
        s_norm = tl.load(sc + 13)
        s_amp = tl.load(sc + 14)
        s_rs = tl.load(sc + 15)
        s_bn = tl.load(sc + 16)
        s_inv_n = tl.load(sc + 17)
        v_cos = tl.load(sc + 18)
        v_sin = tl.load(sc + 19)
        v_h = tl.load(sc + 20)
        v_mu = tl.load(sc + 21)
        n_sub = tl.load(sc + 22).to(tl.int32)
        e_t = tl.load(sc + 23)
        e_amp = tl.load(sc + 24)
        e_c = tl.load(sc + 25)
        e_lnb = tl.load(sc + 26)
        m1c = tl.load(sc + 27)
        m1s = tl.load(sc + 28)
        ln_re = tl.load(sc + 29)
        m3c = tl.load(sc + 30)
        m3s = tl.load(sc + 31)
        m4c = tl.load(sc + 32)
        m4s = tl.load(sc + 33)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for a in tl.static_range(SS):
            y = tl.load(coord_ptr + row * SS + a, mask=mask, other=0.0)
            for bb in tl.static_range(SS):
                x = tl.load(coord_ptr + col * SS + bb, mask=mask, other=0.0)
                if HAS_LOS:
                    # multi-plane (``los.ray_shoot``): X (comoving position / chi_s) and angle A through the
                    # LOS halos in front of the lens; x, y become the ray's position on the lens plane
                    los_nf = tl.load(lcount_ptr + img.to(tl.int64) * 2)
                    los_nt = tl.load(lcount_ptr + img.to(tl.int64) * 2 + 1)
                    lbase = los_ptr + img.to(tl.int64) * KL * 9
                    Ax = x + 0.0  # copies: the interpreter's -= works in place, and y serves SS sub-pixels
                    Ay = y + 0.0
                    Xx = x * 0.0
                    Xy = y * 0.0
                    wp = w_lens * 0.0
                    for k in range(KL):
                        if k < los_nf:  # uniform per program
                            o = lbase + k * 9
                            wk = tl.load(o + 8)
                            Xx += Ax * (wk - wp)
                            Xy += Ay * (wk - wp)
                            wp = wk
                            ldx = Xx / wk - tl.load(o)
                            ldy = Xy / wk - tl.load(o + 1)
                            lw = _tnfw_w(ldx, ldy, o)
                            Ax -= lw * ldx
                            Ay -= lw * ldy
                    Xx += Ax * (w_lens - wp)
                    Xy += Ay * (w_lens - wp)
                    x = Xx / w_lens
                    y = Xy / w_lens
                dx = x - cx
                dy = y - cy
                xr = cos_p * dx + sin_p * dy
                yr = -sin_p * dx + cos_p * dy
                if EPL_TERMS >= 0:
                    # EPL: 2b/(1+q) (b/R)^(t-1) sum_n a_n (-c)^n e^{i(2n+1) varphi}, each term the previous
                    # one rotated by 2 varphi (``lens.alpha_epl``)
                    er = tl.maximum(tl.sqrt(q * q * xr * xr + yr * yr), 1e-9)
                    cf = q * xr / er
                    sf = yr / er
                    c2 = cf * cf - sf * sf
                    s2 = 2.0 * sf * cf
                    ox = cf
                    oy = sf
                    wx = cf
                    wy = sf
                    for nn in tl.static_range(1, EPL_TERMS + 1):
                        kk = -e_c * (2.0 * nn - 2.0 + e_t) / (2.0 * nn + 2.0 - e_t)
                        nx = kk * (ox * c2 - oy * s2)
                        oy = kk * (oy * c2 + ox * s2)
                        ox = nx
                        wx += ox
                        wy += oy
                    eamp = e_amp * tl.exp((e_t - 1.0) * (e_lnb - tl.log(er)))
                    axr = eamp * wx
                    ayr = eamp * wy
                else:
                    # SIE
                    psi = tl.maximum(tl.sqrt(q * q * xr * xr + yr * yr), 1e-18)
                    axr = b * (_atan(f * (xr / psi)) / f)
                    ayr = b * (_atanh(f * (yr / psi)) / f)
                ax = cos_p * axr - sin_p * ayr
                ay = sin_p * axr + cos_p * ayr
                if HAS_MULTIPOLE:
                    ax, ay = _multipoles(ax, ay, dx, dy, m1c, m1s, ln_re, m3c, m3s, m4c, m4s)
                # shear about the origin
                ax += g1 * x + g2 * y
                ay += g2 * x - g1 * y
                if HAS_SUB:
                    sax = tl.zeros([BLOCK], dtype=tl.float32)
                    say = tl.zeros([BLOCK], dtype=tl.float32)
                    base = img.to(tl.int64) * K
                    for k in range(K):
                        if k < n_sub:  # uniform per program: images without subhalos skip the body
                            px = tl.load(sx_ptr + base + k)
                            py = tl.load(sy_ptr + base + k)
                            t2 = tl.load(te2_ptr + base + k)
                            ddx = x - px
                            ddy = y - py
                            w = t2 / tl.maximum(ddx * ddx + ddy * ddy, 1e-16)
                            sax += w * ddx
                            say += w * ddy
                    ax += sax
                    ay += say
                if HAS_TNFW:
                    tax = tl.zeros([BLOCK], dtype=tl.float32)
                    tay = tl.zeros([BLOCK], dtype=tl.float32)
                    tbase = img.to(tl.int64) * KT * 8
                    nt = tl.load(tcount_ptr + img)
                    for k in range(KT):
                        if k < nt:  # uniform per program: each image stops at its own count
                            o = tn_ptr + tbase + k * 8
                            ddx = x - tl.load(o)
                            ddy = y - tl.load(o + 1)
                            inv_rs = tl.load(o + 2)
                            tau = tl.load(o + 3)
                            t2m1 = tl.load(o + 4)
                            b2 = tl.load(o + 5)
                            ct = tl.load(o + 6)
                            amp = tl.load(o + 7)
                            X = tl.maximum(tl.sqrt(ddx * ddx + ddy * ddy) * inv_rs, 1e-3)
                            X2 = X * X
                            d = X2 - 1.0
                            sd = tl.sqrt(tl.abs(d))
                            ssafe = tl.where(sd < 1e-4, 1.0, sd)
                            # one log(X) serves both logs; approximate divisions (a few ulp, no
                            # IEEE division sequence) in the hottest loop
                            lx = tl.log(X)
                            far = tl.where(d > 0, _atan_pos_fast(ssafe), tl.log(1.0 + ssafe) - lx)
                            F = tl.where(sd < 1e-4, 1.0 - d / 3.0 + d * d / 5.0, tl.fdiv(far, ssafe))
                            sq = tl.sqrt(tau * tau + X2)
                            L = lx - tl.log(tau + sq)
                            g = (t2m1 + 2.0 * X2) * F + ct + sq * (L * b2 - 3.141592653589793)
                            w = tl.fdiv(amp * g, X2)
                            tax += w * ddx
                            tay += w * ddy
                    ax += tax
                    ay += tay
                if HAS_VORTEX:
                    if v_mu > 0:
                        u = v_cos * dx + v_sin * dy
                        v = -v_sin * dx + v_cos * dy
                        up = u + v_h
                        um = u - v_h
                        v2 = v * v
                        rp2 = tl.maximum(up * up + v2, 1e-16)
                        rm2 = tl.maximum(um * um + v2, 1e-16)
                        a_u = 0.5 * v_mu * tl.log(rp2 / rm2)
                        a_v = v_mu * (_atan2(v, um) - _atan2(v, up))
                        ax += v_cos * a_u - v_sin * a_v
                        ay += v_sin * a_u + v_cos * a_v
                if HAS_RADIAL:
                    rdr = tl.load(rdr_ptr + img)
                    if rdr > 0:  # uniform per program
                        # linear in the table (``compensation.alpha_radial_table``); beyond node R-1 the
                        # enclosed mass is held (alpha ~ 1/r)
                        rr = tl.maximum(tl.sqrt(dx * dx + dy * dy), 1e-12)
                        u = rr / rdr
                        fi = tl.minimum(tl.floor(u), R - 2.0)
                        t = tl.minimum(u - fi, 1.0)
                        ii = fi.to(tl.int32)
                        rbase = rad_ptr + img.to(tl.int64) * R
                        a0 = tl.load(rbase + ii, mask=mask, other=0.0)
                        a1 = tl.load(rbase + ii + 1, mask=mask, other=0.0)
                        ar = a0 * (1.0 - t) + a1 * t
                        alast = tl.load(rbase + (R - 1))
                        ar = tl.where(u > R - 1.0, alast * (rdr * (R - 1.0)) / rr, ar)
                        ax += ar * dx / rr
                        ay += ar * dy / rr
                if HAS_LOS:  # the lens plane's deflection, then the LOS halos behind it
                    inv_ls = 1.0 / (1.0 - w_lens)
                    Ax -= ax * inv_ls
                    Ay -= ay * inv_ls
                    wp = w_lens
                    for k in range(KL):
                        if k >= los_nf:
                            if k < los_nt:  # uniform per program
                                o = lbase + k * 9
                                wk = tl.load(o + 8)
                                Xx += Ax * (wk - wp)
                                Xy += Ay * (wk - wp)
                                wp = wk
                                ldx = Xx / wk - tl.load(o)
                                ldy = Xy / wk - tl.load(o + 1)
                                lw = _tnfw_w(ldx, ldy, o)
                                Ax -= lw * ldx
                                Ay -= lw * ldy
                    bx = Xx + Ax * (1.0 - wp)
                    by = Xy + Ay * (1.0 - wp)
                else:
                    bx = x - ax
                    by = y - ay
                # Sersic source at the source-plane position
                sdx = bx - s_cx
                sdy = by - s_cy
                xs = ((1.0 - s_e1) * sdx - s_e2 * sdy) / s_norm
                ys = (-s_e2 * sdx + (1.0 + s_e1) * sdy) / s_norm
                r = tl.maximum(tl.sqrt(xs * xs + ys * ys), 1e-4)
                frac = r / s_rs
                val = s_amp * tl.exp(-s_bn * (tl.exp(tl.log(frac) * s_inv_n) - 1.0))
                acc += tl.where(frac <= 1000.0, val, 0.0)
        tl.store(out_ptr + img.to(tl.int64) * (N * N) + pix, acc * scale, mask=mask)

    @triton.jit
    def _psf_pass_kernel(
        out_ptr,
        in_ptr,
        w_ptr,
        total,
        N: tl.constexpr,
        T: tl.constexpr,
        VERTICAL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        R: tl.constexpr = (T - 1) // 2
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        img = offs // (N * N)
        pix = offs % (N * N)
        row = pix // N
        col = pix % N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for t in tl.static_range(T):
            w = tl.load(w_ptr + t)
            if VERTICAL:
                rr = tl.minimum(tl.maximum(row + (t - R), 0), N - 1)
                src = img * (N * N) + rr * N + col
            else:
                cc = tl.minimum(tl.maximum(col + (t - R), 0), N - 1)
                src = img * (N * N) + row * N + cc
            acc += w * tl.load(in_ptr + src, mask=mask, other=0.0)
        tl.store(out_ptr + offs, acc, mask=mask)


def sub_pixel_coords(num_pix: int, delta_pix: float, ss: int, device) -> Tensor:
    """Sub-pixel centre coordinates [num_pix*ss] float32 (the 1-D axis of ``render.pixel_grid``)."""
    k = torch.arange(num_pix * ss, dtype=torch.float64)
    coord = -(num_pix - 1) / 2.0 * delta_pix + (k // ss) * delta_pix + ((k % ss + 0.5) / ss - 0.5) * delta_pix
    return coord.to(device=device, dtype=torch.float32)


def tnfw_table(x: Tensor, y: Tensor, Rs: Tensor, alpha_Rs: Tensor, r_trunc: Tensor) -> Tensor:
    """Per-subhalo constants [B, K, 8] float32 of the kernel's lenstronomy TNFW (``lens.alpha_tnfw``):
    (x, y, 1/Rs, tau, tau^2-1, (tau^2-1)/tau, pi tau + (tau^2-1) ln tau, A), tau = r_trunc/Rs, A = alpha_Rs /
    (Rs (1 + ln 1/2)) tau^2/(tau^2+1)^2; the kernel adds A g(X)/X^2 (dx, dy) with
    g = (tau^2-1+2X^2) F(X) + pi tau + (tau^2-1) ln tau + s (ln(X/(tau+s)) (tau^2-1)/tau - pi),
    s = sqrt(tau^2+X^2).
    Inputs [B, K] (zero-padded slots: alpha_Rs = 0), computed in float64."""
    f64 = torch.float64
    rs = Rs.to(f64).clamp_min(1e-6)
    tau = (r_trunc.to(f64).clamp_min(1e-6)) / rs
    t2 = tau * tau
    amp = alpha_Rs.to(f64) / (rs * (1.0 + math.log(0.5))) * t2 / (t2 + 1.0) ** 2
    cols = (x.to(f64), y.to(f64), 1.0 / rs, tau, t2 - 1.0, (t2 - 1.0) / tau,
            math.pi * tau + (t2 - 1.0) * torch.log(tau), amp)  # fmt: skip
    return torch.stack(cols, dim=-1).to(torch.float32).contiguous()


def tnfw_slots(largest_count: int, capacity: int, *, step: int = 32) -> int:
    """tNFW slots given to the kernel for a batch: its largest count rounded up to ``step`` (at most the
    capacity), so a few compiled variants serve every batch."""
    return min(int(capacity), -(-int(largest_count) // step) * step)


def render_sersic(
    scalars: Tensor,
    te2: Tensor | None,
    sub_x: Tensor | None,
    sub_y: Tensor | None,
    coord: Tensor,
    *,
    num_pix: int,
    supersampling: int,
    delta_pix: float,
    has_vortex: bool,
    tnfw: Tensor | None = None,
    tnfw_count: Tensor | None = None,
    block: int = 256,
    epl_terms: int = -1,
    has_multipole: bool = False,
    radial: Tensor | None = None,
    radial_dr: Tensor | None = None,
    los: Tensor | None = None,
    los_count: Tensor | None = None,
    w_lens: float = 0.0,
) -> Tensor:
    """Noise-free, PSF-free flux per pixel [B, N, N] float32 (see module docstring). ``tnfw`` [B, KT, 8]
    (``tnfw_table``) with ``tnfw_count`` [B] int32 adds truncated-NFW subhalos (each image loops over its own
    count; KT is compiled in, so callers round it up to a few sizes: ``tnfw_slots``). ``epl_terms`` >= 0
    renders an EPL main deflector with that many series terms (``simulate.macro_kind``; -1: the SIE);
    ``has_multipole`` adds the multipoles m = 1, 3, 4 (the scalars' m* columns); ``radial`` [B, R] float32
    with ``radial_dr`` [B] adds circularly symmetric deflections about the lens centre (mean radial
    deflection at radii j dr; images with dr = 0 skip it); ``los`` [B, KL, 9] (``los.triton_los_table``) with
    ``los_count`` [B, 2] int32 and ``w_lens`` ray-traces through line-of-sight halos on their own planes
    before and after the lens plane (``los.ray_shoot``)."""
    B = scalars.shape[0]
    N, ss = int(num_pix), int(supersampling)
    out = torch.empty((B, N, N), device=scalars.device, dtype=torch.float32)
    has_sub = te2 is not None and te2.shape[1] > 0
    if not has_sub:
        te2 = sub_x = sub_y = scalars  # never read
    K = te2.shape[1] if has_sub else 0
    has_tnfw = tnfw is not None and tnfw.shape[1] > 0
    if not has_tnfw:
        tnfw, tnfw_count = scalars, scalars  # never read
    KT = int(tnfw.shape[1]) if has_tnfw else 0
    has_radial = radial is not None
    if not has_radial:
        radial, radial_dr = scalars, scalars  # never read
    R = int(radial.shape[1]) if has_radial else 2
    has_los = los is not None and los.shape[1] > 0
    if not has_los:
        los, los_count = scalars, scalars  # never read
    KL = int(los.shape[1]) if has_los else 0
    nb = -(-N * N // block)
    _render_kernel[(B * nb,)](
        out, scalars, te2, sub_x, sub_y, tnfw, tnfw_count, coord, radial, radial_dr,
        float(delta_pix * delta_pix / (ss * ss)), los, los_count, float(w_lens),
        N=N, SS=ss, K=K, NC=NCOL, HAS_SUB=has_sub, HAS_VORTEX=bool(has_vortex), HAS_TNFW=has_tnfw, KT=KT,
        BLOCK=block, EPL_TERMS=int(epl_terms), HAS_MULTIPOLE=bool(has_multipole), HAS_RADIAL=has_radial, R=R,
        HAS_LOS=has_los, KL=KL,
    )  # fmt: skip
    return out


def psf_separable(images: Tensor, kernel_1d: Tensor, *, block: int = 1024) -> Tensor:
    """Separable convolution of [B, N, N] float32 images with edge replication (horizontal, then vertical)."""
    B, N = images.shape[0], images.shape[-1]
    T = int(kernel_1d.numel())
    if T <= 1:
        return images
    w = kernel_1d.to(device=images.device, dtype=torch.float32).contiguous()
    src = images.contiguous()
    tmp = torch.empty_like(src)
    out = torch.empty_like(src)
    total = B * N * N
    grid = (-(-total // block),)
    _psf_pass_kernel[grid](tmp, src, w, total, N=N, T=T, VERTICAL=False, BLOCK=block)
    _psf_pass_kernel[grid](out, tmp, w, total, N=N, T=T, VERTICAL=True, BLOCK=block)
    return out
