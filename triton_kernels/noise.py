"""The noise launches: raw Philox words and normals (docs/kernels.md, "Noise")."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import check_philox_normal, check_philox_uint32
from .philox import philox_key, philox_words
from .tiles import FAST_SINCOS, Launch, plan, program_elements, program_noise

PHILOX_BLOCK = 1024   # words per program of philox_uint32


@triton.jit(do_not_specialize=["sword"])
def _philox_uint32_kernel(out_ptr, seed_ptr, t_ptr, s_seed, s_t, numel, sword,
                          BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nblk = tl.cdiv(numel, BLOCK)
    b = pid // nblk
    blk = pid - b * nblk
    k0, k1 = philox_key(tl.load(seed_ptr + b * s_seed))
    tword = tl.load(t_ptr + b * s_t).to(tl.uint32)
    g = blk * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    o0, o1, o2, o3 = philox_words(g, tword, sword.to(tl.uint32), k0, k1, True)
    o = tl.interleave(tl.interleave(o0, o2), tl.interleave(o1, o3))
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + b * numel + offs, o.to(tl.int64), mask=offs < numel)


@triton.jit(do_not_specialize=["sword"])
def _philox_normal_kernel(out_ptr, seed_ptr, t_ptr, s_out, s_seed, s_t, N, C, S, sword,
                          WALK: tl.constexpr, CL_C: tl.constexpr, CL_K: tl.constexpr,
                          CL_NP: tl.constexpr, IDX64: tl.constexpr, EVEN: tl.constexpr,
                          GRID2D: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
    GV: tl.constexpr = 32 // out_ptr.dtype.element_ty.primitive_bitwidth
    b, start, offs, mask = program_elements(N, S, WALK, CL_C, CL_K, CL_NP, IDX64, EVEN,
                                            GRID2D, BLOCK)
    tword = tl.load(t_ptr + b * s_t).to(tl.uint32)
    z = program_noise(b, start, offs, seed_ptr, s_seed, tword, sword.to(tl.uint32), C, S,
                      WALK, CL_C, CL_K, CL_NP, IDX64, FAST, BLOCK, GV)
    tl.store(out_ptr + b.to(tl.int64) * s_out + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


def philox_uint32(seeds: torch.Tensor, t: torch.Tensor, numel: int, stream: int) -> torch.Tensor:
    """The raw words: int64 ``[B, numel]`` of uint32 values on ``seeds``' device; element i of
    sample b takes word i mod 4 of Philox4x32-10((i//4 lo, i//4 hi, t[b], stream), seeds[b]).
    ``seeds``, ``t``: int64 ``[B]`` (stride 0 allowed)."""
    check_philox_uint32(seeds, t, numel, stream)
    return philox_uint32_unchecked(seeds, t, numel, stream)


def philox_uint32_unchecked(seeds, t, numel, stream) -> torch.Tensor:
    """:func:`philox_uint32` without the argument checks, for arguments checked before."""
    out = torch.empty((seeds.shape[0], numel), dtype=torch.int64, device=seeds.device)
    launch = uint32_launch(seeds, t, stream, out)
    if launch is not None:
        launch()
    return out


def uint32_launch(seeds, t, stream, out) -> Optional[Launch]:
    """The kernel launch of :func:`philox_uint32` writing ``out`` [B, numel], or None when
    ``out`` is empty."""
    if out.numel() == 0:
        return None
    grid = (out.shape[0] * -(-out.shape[1] // PHILOX_BLOCK),)
    return Launch(_philox_uint32_kernel, grid,
                  (out, seeds, t, seeds.stride(0), t.stride(0), out.shape[1], int(stream)),
                  dict(BLOCK=PHILOX_BLOCK))


def philox_normal(seeds: torch.Tensor, t: torch.Tensor, stream: int, layout: int,
                  out: torch.Tensor) -> None:
    """Writes the in-kernel normals of every element of ``out`` (``[B, C, *spatial]``,
    fp16/bf16/fp32, sample-dense in ``layout``) for ``seeds``, ``t`` (int64 ``[B]``) and the
    noise ``stream``: the values the step kernels use as z."""
    check_philox_normal(seeds, t, stream, layout, out)
    philox_normal_unchecked(seeds, t, stream, layout, out)


def philox_normal_unchecked(seeds, t, stream, layout, out) -> None:
    """:func:`philox_normal` without the argument checks, for arguments checked before."""
    launch = normal_launch(seeds, t, stream, layout, out)
    if launch is not None:
        launch()


def normal_launch(seeds, t, stream, layout, out) -> Optional[Launch]:
    """The kernel launch of :func:`philox_normal` (arguments checked), or None when ``out``
    is empty."""
    if out.numel() == 0:
        return None
    p = plan(out.shape, layout, True, out.element_size())
    return Launch(_philox_normal_kernel, p.grid,
                  (out, seeds, t, out.stride(0), seeds.stride(0), t.stride(0), p.N, p.C, p.S,
                   int(stream)),
                  dict(FAST=FAST_SINCOS and out.is_cuda, **p.constexprs,
                       num_warps=p.num_warps))
