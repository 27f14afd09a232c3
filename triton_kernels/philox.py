"""In-kernel Philox4x32-10 noise (DESIGN.md §3, spec and oracle: ``fused_ddpm/philox.py``).

For sample b with seed k and timestep t, the element of logical index i draws
z_{i mod 4} of Philox4x32-10(counter=(i//4 lo, i//4 hi, t lo, 0), key=(k lo, k hi)) after
uniforms ((o >> 8) + ½)·2⁻²⁴ and Box–Muller on the pairs (o0, o1), (o2, o3).

``philox_normal4`` serves four consecutive elements with one Philox call (the contiguous
layout); ``philox_normal_at`` computes one element from an arbitrary logical index (used
for channels-last storage, where consecutive storage positions are not consecutive indices).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
TWO_PI_F32 = tl.constexpr(6.2831854820251465)  # float32(2π), as every backend
TWO_POW_M24 = tl.constexpr(5.9604644775390625e-08)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds; all arguments uint32 (tensors or scalars). Returns 4 uint32."""
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_c2, PHILOX_M1) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, PHILOX_M0) ^ c3 ^ k1
        c1 = tl.mul(_c2, PHILOX_M1, sanitize_overflow=False)
        c3 = tl.mul(_c0, PHILOX_M0, sanitize_overflow=False)
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def philox_key(seed):
    """int64 seed (scalar) → (k0, k1) uint32: the low and high 32 bits of its two's complement."""
    k0 = seed.to(tl.uint32)            # truncation: low 32 bits
    k1 = (seed >> 32).to(tl.uint32)    # bits 32..63 (arithmetic shift, then truncate)
    return k0, k1


@triton.jit
def philox_raw(g, tword, k0, k1):
    """Philox outputs for the int64 counter index g = i // 4 (≥ 0) and uint32 timestep word."""
    c0 = g.to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + tword
    c3 = tl.zeros_like(c0)
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def uniform_from_uint32(o):
    """uint32 → float32 in (0, 1), exact: ((o >> 8) + ½)·2⁻²⁴."""
    return ((o >> 8).to(tl.float32) + 0.5) * TWO_POW_M24


@triton.jit
def _cos_sin(theta, FAST: tl.constexpr):
    """cos θ, sin θ for θ in (0, 2π). FAST (NVIDIA only): sin.approx/cos.approx, absolute
    error < 2⁻²⁰ — within the spec's 1e-5 for GPU fast math once scaled by ρ < 6."""
    if FAST:
        return libdevice.fast_cosf(theta), libdevice.fast_sinf(theta)
    else:
        return tl.cos(theta), tl.sin(theta)


@triton.jit
def box_muller(o0, o1, FAST: tl.constexpr):
    u0 = uniform_from_uint32(o0)
    u1 = uniform_from_uint32(o1)
    rho = tl.sqrt(-2.0 * tl.log(u0))
    theta = u1 * TWO_PI_F32
    c, s = _cos_sin(theta, FAST)
    return rho * c, rho * s


@triton.jit
def philox_normal4(g, tword, k0, k1, FAST: tl.constexpr):
    """One Philox call per counter g: the four normals of elements 4g .. 4g+3, interleaved
    back into element order (result has 4× the length of g)."""
    o0, o1, o2, o3 = philox_raw(g, tword, k0, k1)
    z0, z1 = box_muller(o0, o1, FAST)
    z2, z3 = box_muller(o2, o3, FAST)
    # interleave(interleave(z0, z2), interleave(z1, z3)) = z0[0], z1[0], z2[0], z3[0], z0[1], ...
    return tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))


@triton.jit
def philox_normal_at(i, tword, k0, k1, FAST: tl.constexpr):
    """The normal of logical element index i (int64 or int32 tensor, ≥ 0), element by element."""
    g = (i >> 2).to(tl.int64)
    rsel = i & 3
    o0, o1, o2, o3 = philox_raw(g, tword, k0, k1)
    lo = rsel < 2
    ua = uniform_from_uint32(tl.where(lo, o0, o2))
    ub = uniform_from_uint32(tl.where(lo, o1, o3))
    rho = tl.sqrt(-2.0 * tl.log(ua))
    theta = ub * TWO_PI_F32
    c, s = _cos_sin(theta, FAST)
    return tl.where((rsel & 1) == 0, rho * c, rho * s)


@triton.jit
def _philox_uint32_kernel(out_ptr, seed_ptr, t_ptr, s_seed, s_t, numel,
                          BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nblk = tl.cdiv(numel, BLOCK)
    b = pid // nblk
    blk = pid - b * nblk
    k0, k1 = philox_key(tl.load(seed_ptr + b * s_seed))
    tword = tl.load(t_ptr + b * s_t).to(tl.uint32)
    g = blk * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    o0, o1, o2, o3 = philox_raw(g, tword, k0, k1)
    o = tl.interleave(tl.interleave(o0, o2), tl.interleave(o1, o3))
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + b * numel + offs, o.to(tl.int64), mask=offs < numel)


def philox_uint32(seeds: torch.Tensor, t: torch.Tensor, numel: int) -> torch.Tensor:
    """The raw stream: int64 ``[B, numel]`` of uint32 values on ``seeds``' device, element i
    taking output i mod 4 of Philox4x32-10((i//4 lo, i//4 hi, t[b], 0), key=seeds[b])."""
    B = seeds.shape[0]
    numel = int(numel)
    out = torch.empty((B, numel), dtype=torch.int64, device=seeds.device)
    if B == 0 or numel == 0:
        return out
    t = t.to(device=seeds.device, dtype=torch.int64)
    seeds = seeds.to(torch.int64)
    BLOCK = 1024
    grid = (B * triton.cdiv(numel, BLOCK),)
    _philox_uint32_kernel[grid](out, seeds, t, seeds.stride(0), t.stride(0), numel, BLOCK=BLOCK)
    return out
