"""Which elements a program handles, and their in-kernel noise (shared by every kernel).

Every tensor of a launch is sample-dense in one layout (docs/kernels.md), so a sample is
walked as one dense vector of N = C·S elements in storage order; only the batch stride
differs between tensors. The walk only matters for in-kernel noise, whose counter is the
*logical* (row-major) index i of an element, not its storage position s:

* ``FLAT``: programs take BLOCK consecutive storage positions of one sample. Right for every
  launch without in-kernel noise, and for contiguous samples (i = s), where one Philox call
  serves 4 consecutive elements.
* ``CL_TILE``: channels-last samples with S % 4 == 0. A program takes rows of 4·K
  consecutive spatial positions × all C channels (4·K·C consecutive storage elements in
  4·NP lanes, NP a power of two); the 4 positions 4q .. 4q + 3 of a row in one channel are 4
  consecutive logical indices, so one Philox call serves them. With C a power of two, K = 1
  and NP = C, and the normals reach their storage lanes by a transpose; otherwise by an
  in-row gather (C = 3: K = 5, NP = 16 for fp32, K = 10, NP = 32 for 16-bit dtypes, so
  15 of 16 lanes are used and rows start 16-byte aligned).
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
# Channels-last tiles of C not a power of two: at most this many counters per row (the
# in-row gather grows with the row).
CL_GATHER_MAX_NP = 32
# Channels-last tiles of C not a power of two touching more streams than this take
# GPU_BLOCK_ELEM.
GATHER_MAX_STREAMS = 4
# The largest second grid dimension (CUDA): more samples take a flat grid.
GRID_MAX_Y = 65535
# Samples of more elements than this use int64 in-sample offsets (room for a block's overrun).
IDX32_LIMIT = 2 ** 31 - 2 ** 20
# Channels-last tiles of a power-of-two C hold up to this many channels (others up to 64).
CL_TILE_MAX_C = 256
# Box–Muller with sin.approx/cos.approx on NVIDIA GPUs (the 1e-5 of GPU fast math);
# FUSED_DDPM_TRITON_ACCURATE_SINCOS=1 selects the accurate libdevice versions.
FAST_SINCOS = (not INTERPRET and torch.version.hip is None
               and os.environ.get("FUSED_DDPM_TRITON_ACCURATE_SINCOS", "0") != "1")


@triton.jit
def _sample_and_block(n, PER: tl.constexpr, IDX64: tl.constexpr, GRID2D: tl.constexpr):
    """(sample, block of PER of its n units) of this program: the grid is (blocks, B), or,
    for more samples than a grid's second axis takes, one flat axis of B·blocks."""
    if GRID2D:
        b = tl.program_id(1)
        blk = tl.program_id(0)
    else:
        pid = tl.program_id(0)
        nblk = tl.cdiv(n, PER)
        b = pid // nblk
        blk = pid - b * nblk
    if IDX64:
        blk = blk.to(tl.int64)
    return b, blk


@triton.jit
def program_elements(N, S, WALK: tl.constexpr, CL_C: tl.constexpr, CL_K: tl.constexpr,
                     CL_NP: tl.constexpr, IDX64: tl.constexpr, EVEN: tl.constexpr,
                     GRID2D: tl.constexpr, BLOCK: tl.constexpr):
    """(b, start, offs, mask): this program's sample b, the first element (FLAT, CL_ELEM)
    or spatial position (CL_TILE) it takes, and the in-sample storage offsets (a [BLOCK]
    vector, or [GB, 4·CL_NP] rows of 4·CL_K positions × C channels) with their bounds mask
    (all true when EVEN: every program's elements are in bounds)."""
    if WALK == CL_TILE:
        LANES: tl.constexpr = 4 * CL_NP
        P: tl.constexpr = 4 * CL_K
        GB: tl.constexpr = BLOCK // LANES
        b, blk = _sample_and_block(S, P * GB, IDX64, GRID2D)
        start = blk * (P * GB)
        row = start + P * tl.arange(0, GB)[:, None]          # first position of each row
        col = tl.arange(0, LANES)[None, :]
        offs = row * CL_C + col
        if EVEN:
            mask = tl.full(offs.shape, 1, tl.int1)
        elif CL_K == 1 and CL_C == CL_NP:
            mask = row < S                                   # (S is a multiple of 4)
        else:
            # positions < S ⇔ lanes < (S − row)·C: a multiple of 4 lanes (S % 4 == 0), so
            # the mask is constant over each 4-lane vector
            mask = (col < P * CL_C) & (col < (tl.multiple_of(S, 4) - row) * CL_C)
    else:
        b, blk = _sample_and_block(N, BLOCK, IDX64, GRID2D)
        start = blk * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if EVEN:
            mask = tl.full(offs.shape, 1, tl.int1)
        else:
            mask = offs < N
    return b, start, offs, mask


@triton.jit
def _quad(g, tword, sword, k0, k1, IDX64: tl.constexpr, FAST: tl.constexpr):
    """Counters g → normals shaped [*g.shape, 4] (the four elements of each counter)."""
    z0, z1, z2, z3 = normals4(g, tword, sword, k0, k1, IDX64, FAST)
    z = tl.join(tl.join(z0, z2), tl.join(z1, z3))    # [..., 2, 2]: element 2a + b at [a, b]
    if len(g.shape) == 1:
        return tl.reshape(z, (g.shape[0], 4))
    else:
        return tl.reshape(z, (g.shape[0], g.shape[1], 4))


@triton.jit
def program_noise(b, start, offs, seed_ptr, s_seed, tword, sword, C, S,
                  WALK: tl.constexpr, CL_C: tl.constexpr, CL_K: tl.constexpr,
                  CL_NP: tl.constexpr, IDX64: tl.constexpr, FAST: tl.constexpr,
                  BLOCK: tl.constexpr, GV: tl.constexpr):
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
        P: tl.constexpr = 4 * CL_K
        GB: tl.constexpr = BLOCK // (4 * CL_NP)
        # pair pi = c·K + q of a row: channel c, positions row + 4q .. + 3, whose logical
        # indices c·S + row + 4q .. + 3 make one counter (pairs ≥ K·C are padding)
        pi = tl.arange(0, CL_NP)[None, :]
        if IDX64:
            pi = pi.to(tl.int64)
        g = (pi // CL_K) * (S // 4) + (start // 4 + CL_K * tl.arange(0, GB)[:, None]
                                       + pi % CL_K)
        z = _quad(g, tword, sword, k0, k1, IDX64, FAST)             # [GB, NP, 4]
        if CL_K == 1 and CL_C == CL_NP:
            # storage lane j·C + c of a row is element j of pair c: a transpose
            z = tl.reshape(tl.permute(z, (0, 2, 1)), (GB, 4 * CL_NP))
        else:
            # storage lane l = p·C + c (position p, channel c) is element p % 4 of pair
            # c·K + p // 4
            z = tl.reshape(z, (GB, 4 * CL_NP))
            lane = tl.arange(0, 4 * CL_NP)
            p = lane // CL_C
            src = tl.where(lane < P * CL_C, ((lane % CL_C) * CL_K + p // 4) * 4 + p % 4, 0)
            z = tl.gather(z, tl.broadcast_to(src[None, :], (GB, 4 * CL_NP)), 1)
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
    constexprs: Dict[str, Any]   # WALK CL_C CL_K CL_NP IDX64 EVEN GRID2D BLOCK (read only)


_PLANS: Dict[tuple, Plan] = {}


def plan(shape: Sequence[int], layout: int, philox: bool, itemsize: int = 4,
         streams: int = 3) -> Plan:
    """The walk for tensors of ``shape`` ([B, C, *spatial], no size 0) and element size
    ``itemsize`` stored in ``layout``, with (``philox``) or without in-kernel noise, touching
    ``streams`` tensors of that shape. Remembered per argument set (it runs per launch)."""
    key = (tuple(shape), layout, philox, itemsize, streams > GATHER_MAX_STREAMS,
           INTERPRET_BLOCK, IDX32_LIMIT, CL_TILE_MAX_C, GRID_MAX_Y)
    p = _PLANS.get(key)
    if p is None:
        if len(_PLANS) >= 4096:
            _PLANS.clear()
        p = _PLANS[key] = _plan(tuple(shape), layout, philox, streams > GATHER_MAX_STREAMS,
                                itemsize)
    return p


def cl_tile_geometry(C: int, itemsize: int):
    """(K, NP) of channels-last tiles of C channels: rows of 4·K positions × C channels in
    4·NP lanes, NP a power of two ≥ K·C, the fewest padding lanes (with rows that start
    16-byte aligned); None when C is too large for a tile."""
    if C & (C - 1) == 0:
        return (1, C) if C <= CL_TILE_MAX_C else None
    best = None
    for np_ in (8, 16, 32, 64):
        if np_ > max(CL_GATHER_MAX_NP, triton.next_power_of_2(C)):
            break
        for k in range(np_ // C, 0, -1):
            if 4 * k * C * itemsize % 16 == 0:
                if best is None or k * C * best[1] > best[0] * C * np_:
                    best = (k, np_)
                break
    return best


def _plan(shape, layout, philox, heavy, itemsize) -> Plan:
    B, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    N = C * S
    idx64 = N > IDX32_LIMIT
    walk, geometry = Walk.FLAT, None
    if philox and layout == Layout.CHANNELS_LAST and C > 1 and S > 1:
        geometry = cl_tile_geometry(C, itemsize) if S % 4 == 0 else None
        walk = Walk.CL_ELEM if geometry is None else Walk.CL_TILE
    k, np_, warps = 1, 1, GPU_WARPS
    if walk == Walk.CL_TILE:
        k, np_ = geometry
        gather = k != 1 or np_ != C
        # the in-row gather holds more registers: with many streams, half the elements per
        # thread
        block = (INTERPRET_BLOCK if INTERPRET else GPU_BLOCK_ELEM if (gather and heavy)
                 else GPU_BLOCK)
        block = max(block, 4 * np_)
        positions = block // np_ * k                  # 4·K per row of 4·NP lanes
        nblk = -(-S // positions)
        even = not gather and S % positions == 0
    else:
        if INTERPRET:
            block = max(INTERPRET_BLOCK, 8)
        elif walk == Walk.CL_ELEM or N % 16:
            # (sizes that allow no vector accesses need a 64-bit address per element: fewer)
            block, warps = GPU_BLOCK_ELEM, GPU_WARPS_ELEM
        else:
            block = GPU_BLOCK
        nblk = -(-N // block)
        even = N % block == 0
    grid2d = B <= GRID_MAX_Y
    return Plan(N, C, S, (nblk, B) if grid2d else (B * nblk,), warps,
                dict(WALK=int(walk), CL_C=C if walk == Walk.CL_TILE else 0, CL_K=k, CL_NP=np_,
                     IDX64=idx64, EVEN=even, GRID2D=grid2d, BLOCK=block))
