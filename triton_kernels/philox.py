"""In-kernel Philox4x32-10 noise (docs/kernels.md, "Noise"; oracle: ``fused_ddpm/philox.py``).

For sample b with seed k, row index t and stream word s, the element of logical index i
draws z_{i mod 4} of Philox4x32-10(counter=(i//4 lo, i//4 hi, t lo, s), key=(k lo, k hi))
after uniforms ((o >> 8) + ½)·2⁻²⁴ and Box–Muller on the pairs (o0, o1), (o2, o3).

The uint32 words are bit-identical to the oracle. The normals use a branch-free −2·ln u
(range reduction to [√½, √2) and a degree-7 polynomial, exact-rounded FMAs: within one
float32 ulp of ρ = √(−2 ln u) for every one of the 2²⁴ possible uniforms) instead of
libdevice's ``logf``; on NVIDIA GPUs sin/cos and √ are the hardware approximations (the
documented 1e-5 tolerance of GPU fast math).

``normals4`` serves four consecutive logical elements with one Philox call; ``normal_at``
computes one element from an arbitrary logical index (the channels-last fallback).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
TWO_PI_F32 = tl.constexpr(6.2831854820251465)   # float32(2π), as every backend
TWO_POW_M24 = tl.constexpr(5.9604644775390625e-08)
TWO_POW_M25 = tl.constexpr(2.98023223876953125e-08)
# −2·ln u = e·(−2 ln 2) + f·P(f) for u = 2^e·(1 + f), 1 + f in [√½, √2): the bit pattern of √½
# splits the exponent; P is a degree-7 fit of −2·ln(1 + f)/f (float32 coefficients).
SQRT_HALF_BITS = tl.constexpr(0x3F3504F3)
NEG_TWO_LN2 = tl.constexpr(-1.3862943611198906)
LOGP0 = tl.constexpr(-1.9999998807907104)
LOGP1 = tl.constexpr(1.0000072717666626)
LOGP2 = tl.constexpr(-0.6667028665542603)
LOGP3 = tl.constexpr(0.4994019865989685)
LOGP4 = tl.constexpr(-0.39795398712158203)
LOGP5 = tl.constexpr(0.344913512468338)
LOGP6 = tl.constexpr(-0.32481205463409424)
LOGP7 = tl.constexpr(0.20293177664279938)


@triton.jit
def _mulhilo(a, M: tl.constexpr):
    """(hi, lo) uint32 halves of the 64-bit product a·M: one wide multiply."""
    p = a.to(tl.uint64) * M
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds; uint32 arguments, each a tensor or a scalar (scalar words stay
    scalar for as long as the rounds allow). Returns the 4 output words."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
            k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def philox_key(seed):
    """int64 seed (scalar) → (k0, k1) uint32: the low and high 32 bits of its two's complement."""
    k0 = seed.to(tl.uint32)            # truncation: low 32 bits
    k1 = (seed >> 32).to(tl.uint32)    # bits 32..63 (arithmetic shift, then truncate)
    return k0, k1


@triton.jit
def philox_words(g, tword, sword, k0, k1, IDX64: tl.constexpr):
    """Philox outputs for counter index g = i // 4 (≥ 0; int32 unless IDX64), row word tword
    and stream word sword (uint32 scalars)."""
    if IDX64:
        g = g.to(tl.int64)
        c0 = g.to(tl.uint32)
        c1 = (g >> 32).to(tl.uint32)
    else:
        c0 = g.to(tl.uint32)
        c1 = tl.full((), 0, tl.uint32)
    return philox4x32_10(c0, c1, tword, sword, k0, k1)


@triton.jit
def uniform_from_uint32(o):
    """uint32 → float32 in (0, 1]: ((o >> 8) + ½)·2⁻²⁴ as one exact-rounded FMA (the same
    value as adding ½ and scaling)."""
    return tl.fma((o >> 8).to(tl.float32), TWO_POW_M24, TWO_POW_M25)


@triton.jit
def neg_two_log(u):
    """−2·ln u for u in (0, 1], without branches."""
    bits = u.to(tl.int32, bitcast=True)
    e = (bits - SQRT_HALF_BITS) >> 23
    f = (bits - (e << 23)).to(tl.float32, bitcast=True) - 1.0
    p = tl.fma(tl.full(f.shape, LOGP7, tl.float32), f, LOGP6)
    p = tl.fma(p, f, LOGP5)
    p = tl.fma(p, f, LOGP4)
    p = tl.fma(p, f, LOGP3)
    p = tl.fma(p, f, LOGP2)
    p = tl.fma(p, f, LOGP1)
    p = tl.fma(p, f, LOGP0)
    return tl.fma(e.to(tl.float32), NEG_TWO_LN2, p * f)


@triton.jit
def _cos_sin(theta, FAST: tl.constexpr):
    """cos θ, sin θ for θ in (0, 2π]. FAST (NVIDIA only): cos.approx/sin.approx, absolute
    error < 2⁻²⁰ — within the 1e-5 of GPU fast math once scaled by ρ < 6."""
    if FAST:
        return libdevice.fast_cosf(theta), libdevice.fast_sinf(theta)
    else:
        return tl.cos(theta), tl.sin(theta)


@triton.jit
def box_muller(oa, ob, FAST: tl.constexpr):
    """Two uint32 words → two float32 normals: ρ cos θ, ρ sin θ."""
    rho = tl.sqrt(neg_two_log(uniform_from_uint32(oa)))
    theta = uniform_from_uint32(ob) * TWO_PI_F32
    c, s = _cos_sin(theta, FAST)
    return rho * c, rho * s


@triton.jit
def normals4(g, tword, sword, k0, k1, IDX64: tl.constexpr, FAST: tl.constexpr):
    """One Philox call per counter g: the four normals z0..z3 of elements 4g .. 4g+3."""
    o0, o1, o2, o3 = philox_words(g, tword, sword, k0, k1, IDX64)
    z0, z1 = box_muller(o0, o1, FAST)
    z2, z3 = box_muller(o2, o3, FAST)
    return z0, z1, z2, z3


@triton.jit
def interleave4(a0, a1, a2, a3):
    """[n] × 4 → [4n]: a0[0], a1[0], a2[0], a3[0], a0[1], ..."""
    return tl.interleave(tl.interleave(a0, a2), tl.interleave(a1, a3))


@triton.jit
def normal_at(i, tword, sword, k0, k1, IDX64: tl.constexpr, FAST: tl.constexpr):
    """The normal of logical element index i (≥ 0; int64 when IDX64), element by element."""
    o0, o1, o2, o3 = philox_words(i >> 2, tword, sword, k0, k1, IDX64)
    lane = (i & 3).to(tl.int32)
    lo = lane < 2
    rho = tl.sqrt(neg_two_log(uniform_from_uint32(tl.where(lo, o0, o2))))
    theta = uniform_from_uint32(tl.where(lo, o1, o3)) * TWO_PI_F32
    c, s = _cos_sin(theta, FAST)
    return rho * tl.where((lane & 1) == 0, c, s)
