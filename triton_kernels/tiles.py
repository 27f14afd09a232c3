"""Which elements a program handles, and their in-kernel noise (shared by every kernel).

Every tensor of a launch is sample-dense in one layout (docs/kernels.md), so a sample is
walked as one dense vector of N = C·S elements in storage order; only the batch stride
differs between tensors. The walk only matters for in-kernel noise, whose counter is the
*logical* (row-major) index i of an element, not its storage position s:

* ``FLAT``: programs take BLOCK consecutive storage positions of one sample. Right for every
  launch without in-kernel noise, and for contiguous samples (i = s), where one Philox call
  serves 4 consecutive elements.
* ``CL_TILE``: channels-last samples with S % 4 == 0. A program takes 4·GB consecutive
  spatial positions × all C channels (a [GB, 4, CB] tile, CB = C rounded up to a power of
  two, channel lanes ≥ C masked); the 4 positions of one channel are 4 consecutive logical
  indices, so one Philox call serves them.
* ``CL_ELEM``: other channels-last samples: i = (s % C)·S + s // C per element, one Philox
  call per element (the fallback).

Offsets within a sample are int32 unless IDX64 (samples of ≥ IDX32_LIMIT elements); batch
offsets are always int64.
"""
from __future__ import annotations

import enum
import math
import os
from typing import Any, Dict, NamedTuple, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..contract import Layout
from .philox import normal_at, normals4, philox_key



class Walk(enum.IntEnum):
    """How programs walk the samples (module docstring)."""

    FLAT = 0
    CL_TILE = 1
    CL_ELEM = 2


FLAT = tl.constexpr(int(Walk.FLAT))
CL_TILE = tl.constexpr(int(Walk.CL_TILE))
CL_ELEM = tl.constexpr(int(Walk.CL_ELEM))

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Elements per program under the interpreter (no tuning there; a power of two ≥ 8); tests
# may change it.
INTERPRET_BLOCK = 256
# On a GPU: 16 elements per thread on 4 warps (four 128-bit accesses per fp32 stream).
GPU_BLOCK, GPU_WARPS = 2048, 4
# The per-element fallback, samples of sizes not divisible by 16 and tiles of C < CB
# channels with many streams keep fewer elements per thread.
GPU_BLOCK_ELEM, GPU_WARPS_ELEM = 1024, 4
# Channels-last tiles of C < CB channels touching more streams than this take GPU_BLOCK_ELEM.
GATHER_MAX_STREAMS = 4
# Samples of more elements than this use int64 in-sample offsets (room for a block's overrun).
IDX32_LIMIT = 2 ** 31 - 2 ** 20
# Channels-last tiles hold the channels of 4 positions in one program: up to this many.
CL_TILE_MAX_C = 256
# Box–Muller with sin.approx/cos.approx on NVIDIA GPUs (the 1e-5 of GPU fast math);
# FUSED_DDPM_TRITON_ACCURATE_SINCOS=1 selects the accurate libdevice versions.
FAST_SINCOS = (not INTERPRET and torch.version.hip is None
               and os.environ.get("FUSED_DDPM_TRITON_ACCURATE_SINCOS", "0") != "1")


@triton.jit
def program_elements(N, S, WALK: tl.constexpr, CL_C: tl.constexpr, CB: tl.constexpr,
                     IDX64: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr):
    """(b, start, offs, mask): this program's sample b, the first element (FLAT, CL_ELEM)
    or spatial position (CL_TILE) it takes, and the in-sample storage offsets (a [BLOCK]
    vector, or [GB, 4·CB] rows of 4 positions × C channels) with their bounds mask (None
    when EVEN: every program's elements are all in bounds)."""
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    if WALK == CL_TILE:
        GB: tl.constexpr = BLOCK // (4 * CB)
        ntile = tl.cdiv(S, 4 * GB)
        b = pid // ntile
        start = (pid - b * ntile) * (4 * GB)
        # rows of 4 positions × C channels: 4·C contiguous elements each (4·CB lanes)
        p = start + 4 * tl.arange(0, GB)[:, None]
        col = tl.arange(0, 4 * CB)[None, :]
        offs = p * CL_C + col
        if EVEN:
            mask = tl.full(offs.shape, 1, tl.int1)
        elif CL_C == CB:
            mask = p < S
        else:
            mask = (p < S) & (col < 4 * CL_C)
    else:
        nblk = tl.cdiv(N, BLOCK)
        b = pid // nblk
        start = (pid - b * nblk) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if EVEN:
            mask = tl.full(offs.shape, 1, tl.int1)
        else:
            mask = offs < N
    return b, start, offs, mask


@triton.jit
def _quad(g, tword, sword, k0, k1, IDX64: tl.constexpr, FAST: tl.constexpr):
    """[n] counters → [n, 4] normals (the four elements of each counter in order)."""
    z0, z1, z2, z3 = normals4(g, tword, sword, k0, k1, IDX64, FAST)
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (g.shape[0], 4))


@triton.jit
def program_noise(b, start, offs, seed_ptr, s_seed, tword, sword, C, S,
                  WALK: tl.constexpr, CL_C: tl.constexpr, CB: tl.constexpr, IDX64: tl.constexpr,
                  FAST: tl.constexpr, BLOCK: tl.constexpr, GV: tl.constexpr):
    """The in-kernel normals of this program's elements, shaped like ``offs``."""
    k0, k1 = philox_key(tl.load(seed_ptr + b * s_seed))
    if WALK == FLAT:
        # BLOCK is a multiple of 8 and blocks start at multiples of BLOCK. GV counters (1, or
        # 2 for 16-bit dtypes) per thread-contiguous run, so that the 4·GV normals of a run
        # fill one 128-bit access of the stored dtype without a layout conversion.
        g = start // 4 + GV * tl.arange(0, BLOCK // (4 * GV))
        z = _quad(g, tword, sword, k0, k1, IDX64, FAST)             # [BLOCK/GV/4, 4]
        if GV == 2:
            z1 = _quad(g + 1, tword, sword, k0, k1, IDX64, FAST)
            z = tl.permute(tl.join(z, z1), (0, 2, 1))                # [BLOCK/8, 2, 4]
        z = tl.reshape(z, (BLOCK,))
    elif WALK == CL_TILE:
        GB: tl.constexpr = BLOCK // (4 * CB)
        # channel c, positions start + 4j .. + 3: logical c·S + start + 4j, counter / 4
        g = tl.arange(0, CB)[None, :] * (S // 4) + (start // 4 + tl.arange(0, GB)[:, None])
        z0, z1, z2, z3 = normals4(g, tword, sword, k0, k1, IDX64, FAST)
        z = tl.join(tl.join(z0, z2), tl.join(z1, z3))          # [GB, CB, 2, 2]: z_(2a+b)
        z = tl.permute(tl.reshape(z, (GB, CB, 4)), (0, 2, 1))   # [GB, 4, CB]
        z = tl.reshape(z, (GB, 4 * CB))                          # lane j·CB + c
        if CL_C != CB:
            # storage lane j·C + c of a row takes lane j·CB + c
            col = tl.arange(0, 4 * CB)
            src = tl.where(col < 4 * CL_C, (col // CL_C) * CB + col % CL_C, 0)
            z = tl.gather(z, tl.broadcast_to(src[None, :], (GB, 4 * CB)), 1)
    else:
        z = normal_at((offs % C) * S + offs // C, tword, sword, k0, k1, IDX64, FAST)
    return z


class Launch(NamedTuple):
    """One kernel launch, ready to run: ``kernel[grid](*args, **kwargs)``."""

    kernel: Any
    grid: Tuple[int, ...]
    args: Sequence[Any]
    kwargs: Dict[str, Any]

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


class Plan(NamedTuple):
    """How one launch walks its samples (host side of :func:`program_elements`)."""

    N: int
    C: int
    S: int
    grid: Tuple[int]
    num_warps: int
    constexprs: Dict[str, Any]   # WALK, CL_C, CB, IDX64, EVEN, BLOCK (do not modify)


_PLANS: Dict[tuple, Plan] = {}


def plan(shape: Sequence[int], layout: int, philox: bool, streams: int = 3) -> Plan:
    """The walk for tensors of ``shape`` ([B, C, *spatial], no size 0) stored in ``layout``,
    with (``philox``) or without in-kernel noise, touching ``streams`` tensors of that shape.
    Remembered per argument set (it runs on every launch)."""
    key = (tuple(shape), layout, philox, streams > GATHER_MAX_STREAMS, INTERPRET_BLOCK,
           IDX32_LIMIT, CL_TILE_MAX_C)
    p = _PLANS.get(key)
    if p is None:
        if len(_PLANS) >= 4096:
            _PLANS.clear()
        p = _PLANS[key] = _plan(tuple(shape), layout, philox, streams > GATHER_MAX_STREAMS)
    return p


def _plan(shape, layout, philox, heavy) -> Plan:
    B, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    N = C * S
    idx64 = N > IDX32_LIMIT
    walk = Walk.FLAT
    if philox and layout == Layout.CHANNELS_LAST and C > 1 and S > 1:
        walk = Walk.CL_TILE if (S % 4 == 0 and C <= CL_TILE_MAX_C) else Walk.CL_ELEM
    cb, cl_c, warps = 1, 0, GPU_WARPS
    if walk == Walk.CL_TILE:
        cb, cl_c = triton.next_power_of_2(C), C
        # C < CB (the in-row gather) holds more registers: with many streams, half the
        # elements per thread
        block = (INTERPRET_BLOCK if INTERPRET else GPU_BLOCK_ELEM if (cb != C and heavy)
                 else GPU_BLOCK)
        block = max(block, 4 * cb)
        positions = block // cb                    # 4 per row of a tile
        grid = (B * -(-S // positions),)
        even = cb == C and S % positions == 0
    else:
        if INTERPRET:
            block = max(INTERPRET_BLOCK, 8)
        elif walk == Walk.CL_ELEM or N % 16:
            # (sizes that allow no vector accesses need a 64-bit address per element: fewer)
            block, warps = GPU_BLOCK_ELEM, GPU_WARPS_ELEM
        else:
            block = GPU_BLOCK
        grid = (B * -(-N // block),)
        even = N % block == 0
    return Plan(N, C, S, grid, warps, dict(WALK=int(walk), CL_C=cl_c, CB=cb, IDX64=idx64,
                                           EVEN=even, BLOCK=block))
