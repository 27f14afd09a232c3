"""Triton kernels of the affine step, forward and backward (contract: docs/kernels.md).

Per element of sample b, with the row c = table[clamp(t[b], 0, R − 1)]::

    m  = M  |  k_b·((1 − g)·M + g·MC)            (guided)
    xr = c.U·x + c.W·m + c.E·z;   xh = xr | clamp(xr, ±clip) | clamp(xr, ±s_b)/s_b
    σ  = c.S | c.S·√v | c.S·exp(c.VA + c.VB·v)
    y  = c.P·xh + c.Q·x + c.R·m + c.H·h + σ·z;   x0 = xh

Which terms exist is the TERMS flag, a constexpr: a clear bit removes its term from the
code, a set bit computes it as c·value. Everything per sample (the row, t, the seed, the
guidance factors, the threshold) is loaded once per program as scalars; math is float32,
storage in the tensors' dtype. Programs walk the samples as described in :mod:`.tiles`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..contract import Flag, In, Noise, Out, Scalar
from .checks import check_backward, check_forward
from .consts import (CLIP_DYNAMIC, CLIP_NONE, CLIP_STATIC, COL_E, COL_H, COL_P, COL_Q, COL_R,
                     COL_S, COL_U, COL_VA, COL_VB, COL_W, IN_H, IN_M, IN_MC, IN_V, IN_X, IN_Z,
                     NCOLS, NOISE_PHILOX, VAR_EXP, VAR_FIXED, VAR_SQRT)
from .tiles import FAST_SINCOS, Launch, plan, program_elements, program_noise

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _bit(MASK: tl.constexpr, BIT: tl.constexpr):
    # (not MASK >> BIT: the interpreter hands constexpr arguments in as plain ints)
    return (MASK // 2 ** BIT) % 2


@triton.jit
def _add(acc, term, FIRST: tl.constexpr):
    """acc + term, or term alone when it is the first term of its sum."""
    if FIRST:
        return term
    else:
        return acc + term


@triton.jit
def _row(table_ptr, t_ptr, s_t, b, R):
    """(pointer to the coefficient row of sample b, raw t[b])."""
    tb = tl.load(t_ptr + b * s_t)
    row = tl.minimum(tl.maximum(tb, 0), R - 1)
    return table_ptr + row * NCOLS, tb


@triton.jit
def _load(ptr, stride, b, offs, mask):
    """The float32 values of one stream at this program's elements (``ptr`` of sample 0)."""
    return tl.load(ptr + b.to(tl.int64) * stride + offs, mask=mask).to(tl.float32)


@triton.jit
def _store(ptr, stride, b, offs, mask, value):
    tl.store(ptr + b.to(tl.int64) * stride + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _guidance(gscale_ptr, s_gs, b, guidance, GSCALE: tl.constexpr):
    """(a1, a2) with m = a1·M + a2·MC: a1 = k_b(1 − g), a2 = k_b·g."""
    a1 = 1.0 - guidance
    a2 = guidance
    if GSCALE:
        k = tl.load(gscale_ptr + b * s_gs)
        a1 = a1 * k
        a2 = a2 * k
    return a1, a2


@triton.jit
def _sigma(cb, v, VAR: tl.constexpr):
    """σ: c.S (a scalar), c.S·√v or c.S·2^(log2e·(c.VA + c.VB·v))."""
    cs = tl.load(cb + COL_S)
    if VAR == VAR_SQRT:
        return cs * tl.sqrt(v)
    elif VAR == VAR_EXP:
        va = tl.load(cb + COL_VA) * LOG2E
        vb = tl.load(cb + COL_VB) * LOG2E
        return cs * tl.exp2(va + vb * v)
    else:
        return cs


@triton.jit
def _clip(xr, clip, inv_s, s, CLIP: tl.constexpr):
    if CLIP == CLIP_STATIC:
        return tl.clamp(xr, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
    elif CLIP == CLIP_DYNAMIC:
        return tl.clamp(xr, -s, s, propagate_nan=tl.PropagateNan.ALL) * inv_s
    else:
        return xr


@triton.jit(do_not_specialize=["sword"])
def _step_fwd_kernel(x_ptr, m_ptr, mc_ptr, v_ptr, z_ptr, h_ptr, y_ptr, x0_ptr,
                     t_ptr, seed_ptr, table_ptr, thresh_ptr, gscale_ptr,
                     sx, sm, smc, sv, sz, sh, sy, sx0, s_t, s_seed, s_thr, s_gs,
                     N, C, S, R, clip, guidance, sword,
                     CLIP: tl.constexpr, VAR: tl.constexpr, NOISE: tl.constexpr,
                     TERMS: tl.constexpr, GUIDED: tl.constexpr, GSCALE: tl.constexpr,
                     WRITE_X0: tl.constexpr, WALK: tl.constexpr, CL_C: tl.constexpr,
                     CL_K: tl.constexpr, CL_NP: tl.constexpr, IDX64: tl.constexpr,
                     EVEN: tl.constexpr, GRID2D: tl.constexpr, FAST: tl.constexpr,
                     BLOCK: tl.constexpr):
    HU: tl.constexpr = _bit(TERMS, COL_U)
    HW: tl.constexpr = _bit(TERMS, COL_W)
    HE: tl.constexpr = _bit(TERMS, COL_E)
    HP: tl.constexpr = _bit(TERMS, COL_P)
    HQ: tl.constexpr = _bit(TERMS, COL_Q)
    HR: tl.constexpr = _bit(TERMS, COL_R)
    HH: tl.constexpr = _bit(TERMS, COL_H)
    HS: tl.constexpr = _bit(TERMS, COL_S)
    NEED_XH: tl.constexpr = HP or WRITE_X0
    GV: tl.constexpr = 32 // y_ptr.dtype.element_ty.primitive_bitwidth

    b, start, offs, mask = program_elements(N, S, WALK, CL_C, CL_K, CL_NP, IDX64, EVEN,
                                            GRID2D, BLOCK)
    cb, tb = _row(table_ptr, t_ptr, s_t, b, R)

    if HU or HQ:
        x = _load(x_ptr, sx, b, offs, mask)
    if HW or HR:
        m = _load(m_ptr, sm, b, offs, mask)
        if GUIDED:
            a1, a2 = _guidance(gscale_ptr, s_gs, b, guidance, GSCALE)
            m = a1 * m + a2 * _load(mc_ptr, smc, b, offs, mask)
    if HS or HE:
        if NOISE == NOISE_PHILOX:
            z = program_noise(b, start, offs, seed_ptr, s_seed, tb.to(tl.uint32),
                              sword.to(tl.uint32), C, S, WALK, CL_C, CL_K, CL_NP,
                              IDX64, FAST, BLOCK, GV)
        else:
            z = _load(z_ptr, sz, b, offs, mask)

    if NEED_XH:
        xr = 0.0
        if HU:
            xr = tl.load(cb + COL_U) * x
        if HW:
            xr = _add(xr, tl.load(cb + COL_W) * m, not HU)
        if HE:
            xr = _add(xr, tl.load(cb + COL_E) * z, not (HU or HW))
        if not (HU or HW or HE):
            xr = tl.zeros(offs.shape, tl.float32)
        s = 1.0
        inv_s = 1.0
        if CLIP == CLIP_DYNAMIC:
            s = tl.load(thresh_ptr + b * s_thr)
            inv_s = 1.0 / s
        xh = _clip(xr, clip, inv_s, s, CLIP)

    y = 0.0
    if HP:
        y = tl.load(cb + COL_P) * xh
    if HQ:
        y = _add(y, tl.load(cb + COL_Q) * x, not HP)
    if HR:
        y = _add(y, tl.load(cb + COL_R) * m, not (HP or HQ))
    if HH:
        y = _add(y, tl.load(cb + COL_H) * _load(h_ptr, sh, b, offs, mask), not (HP or HQ or HR))
    if HS:
        v = 0.0
        if VAR != VAR_FIXED:
            v = _load(v_ptr, sv, b, offs, mask)
        y = _add(y, _sigma(cb, v, VAR) * z, not (HP or HQ or HR or HH))
    if not (HP or HQ or HR or HH or HS):
        y = tl.zeros(offs.shape, tl.float32)
    _store(y_ptr, sy, b, offs, mask, y)
    if WRITE_X0:
        _store(x0_ptr, sx0, b, offs, mask, xh)


@triton.jit(do_not_specialize=["sword"])
def _step_bwd_kernel(x_ptr, m_ptr, mc_ptr, v_ptr, z_ptr, h_ptr, gy_ptr, g0_ptr,
                     gx_ptr, gm_ptr, gmc_ptr, gv_ptr, gz_ptr, gh_ptr,
                     t_ptr, seed_ptr, table_ptr, thresh_ptr, gscale_ptr,
                     sx, sm, smc, sv, sz, sh, sgy, sg0, sgx, sgm, sgmc, sgv, sgz, sgh,
                     s_t, s_seed, s_thr, s_gs,
                     N, C, S, R, clip, guidance, sword,
                     CLIP: tl.constexpr, VAR: tl.constexpr, NOISE: tl.constexpr,
                     TERMS: tl.constexpr, GUIDED: tl.constexpr, GSCALE: tl.constexpr,
                     HAS_G0: tl.constexpr, WANT: tl.constexpr, WALK: tl.constexpr,
                     CL_C: tl.constexpr, CL_K: tl.constexpr, CL_NP: tl.constexpr,
                     IDX64: tl.constexpr, EVEN: tl.constexpr, GRID2D: tl.constexpr,
                     FAST: tl.constexpr, BLOCK: tl.constexpr):
    HU: tl.constexpr = _bit(TERMS, COL_U)
    HW: tl.constexpr = _bit(TERMS, COL_W)
    HE: tl.constexpr = _bit(TERMS, COL_E)
    HP: tl.constexpr = _bit(TERMS, COL_P)
    HQ: tl.constexpr = _bit(TERMS, COL_Q)
    HR: tl.constexpr = _bit(TERMS, COL_R)
    HH: tl.constexpr = _bit(TERMS, COL_H)
    HS: tl.constexpr = _bit(TERMS, COL_S)
    WX: tl.constexpr = _bit(WANT, IN_X)
    WM: tl.constexpr = _bit(WANT, IN_M) or _bit(WANT, IN_MC)
    WV: tl.constexpr = _bit(WANT, IN_V)
    WZ: tl.constexpr = _bit(WANT, IN_Z)
    WH: tl.constexpr = _bit(WANT, IN_H)
    # a = (gy·P + g0)·dh exists when P or g0 does, and is needed by the U, W and E terms
    HA: tl.constexpr = HP or HAS_G0
    NEED_A: tl.constexpr = HA and ((WX and HU) or (WM and HW) or (WZ and HE))
    NEED_XR: tl.constexpr = NEED_A and CLIP != CLIP_NONE
    NEED_Z: tl.constexpr = (WV and HS) or (NEED_XR and HE)
    GV: tl.constexpr = 32 // gy_ptr.dtype.element_ty.primitive_bitwidth

    b, start, offs, mask = program_elements(N, S, WALK, CL_C, CL_K, CL_NP, IDX64, EVEN,
                                            GRID2D, BLOCK)
    cb, tb = _row(table_ptr, t_ptr, s_t, b, R)
    gy = _load(gy_ptr, sgy, b, offs, mask)
    if GUIDED:
        a1, a2 = _guidance(gscale_ptr, s_gs, b, guidance, GSCALE)
    if NEED_Z:
        if NOISE == NOISE_PHILOX:
            z = program_noise(b, start, offs, seed_ptr, s_seed, tb.to(tl.uint32),
                              sword.to(tl.uint32), C, S, WALK, CL_C, CL_K, CL_NP,
                              IDX64, FAST, BLOCK, GV)
        else:
            z = _load(z_ptr, sz, b, offs, mask)

    if NEED_A:
        a = 0.0
        if HP:
            a = gy * tl.load(cb + COL_P)
        if HAS_G0:
            a = _add(a, _load(g0_ptr, sg0, b, offs, mask), not HP)
        if NEED_XR:
            xr = 0.0
            if HU:
                xr = tl.load(cb + COL_U) * _load(x_ptr, sx, b, offs, mask)
            if HW:
                m = _load(m_ptr, sm, b, offs, mask)
                if GUIDED:
                    m = a1 * m + a2 * _load(mc_ptr, smc, b, offs, mask)
                xr = _add(xr, tl.load(cb + COL_W) * m, not HU)
            if HE:
                xr = _add(xr, tl.load(cb + COL_E) * z, not (HU or HW))
            if not (HU or HW or HE):
                xr = tl.zeros(offs.shape, tl.float32)
            if CLIP == CLIP_STATIC:
                a = tl.where((xr >= -clip) & (xr <= clip), a, 0.0)
            else:
                s = tl.load(thresh_ptr + b * s_thr)
                a = tl.where((xr >= -s) & (xr <= s), a * (1.0 / s), 0.0)

    if WZ or WV:
        v = 0.0
        if VAR != VAR_FIXED:
            if HS:
                # (out-of-bounds lanes read 1: no 0/0 in lanes that are never stored)
                v = tl.load(v_ptr + b.to(tl.int64) * sv + offs, mask=mask,
                            other=1.0).to(tl.float32)
        if HS:
            sigma = _sigma(cb, v, VAR)

    # every input is loaded above, so a gradient may be written over an input
    if WX:
        gx = 0.0
        if HQ:
            gx = gy * tl.load(cb + COL_Q)
        if HU and HA:
            gx = _add(gx, a * tl.load(cb + COL_U), not HQ)
        if not (HQ or (HU and HA)):
            gx = tl.zeros(offs.shape, tl.float32)
        _store(gx_ptr, sgx, b, offs, mask, gx)
    if WM:
        gm = 0.0
        if HR:
            gm = gy * tl.load(cb + COL_R)
        if HW and HA:
            gm = _add(gm, a * tl.load(cb + COL_W), not HR)
        if not (HR or (HW and HA)):
            gm = tl.zeros(offs.shape, tl.float32)
        if GUIDED:
            if _bit(WANT, IN_M):
                _store(gm_ptr, sgm, b, offs, mask, gm * a1)
            if _bit(WANT, IN_MC):
                _store(gmc_ptr, sgmc, b, offs, mask, gm * a2)
        else:
            _store(gm_ptr, sgm, b, offs, mask, gm)
    if WZ:
        gz = 0.0
        if HS:
            gz = gy * sigma
        if HE and HA:
            gz = _add(gz, a * tl.load(cb + COL_E), not HS)
        if not (HS or (HE and HA)):
            gz = tl.zeros(offs.shape, tl.float32)
        _store(gz_ptr, sgz, b, offs, mask, gz)
    if WH:
        if HH:
            gh = gy * tl.load(cb + COL_H)
        else:
            gh = tl.zeros(offs.shape, tl.float32)
        _store(gh_ptr, sgh, b, offs, mask, gh)
    if WV:
        if HS and VAR == VAR_SQRT:
            # dσ/dv = S/(2√v)
            gv = gy * z * (0.5 * tl.load(cb + COL_S)) / tl.sqrt(v)
        elif HS and VAR == VAR_EXP:
            # dσ/dv = σ·VB
            gv = gy * z * sigma * tl.load(cb + COL_VB)
        else:
            gv = tl.zeros(offs.shape, tl.float32)
        _store(gv_ptr, sgv, b, offs, mask, gv)


# ----------------------------------------------------------------------------- launchers
_X, _MC, _X0 = int(In.X), int(In.MC), int(Out.X0)
_F_CLIP, _F_VAR, _F_NOISE, _F_LAYOUT, _F_TERMS, _F_STREAM = (
    int(Flag.CLIP), int(Flag.VAR), int(Flag.NOISE), int(Flag.LAYOUT), int(Flag.TERMS),
    int(Flag.NOISE_STREAM))
_S_CLIP, _S_GUIDANCE = int(Scalar.CLIP), int(Scalar.GUIDANCE)
_PHILOX = int(Noise.PHILOX)


def _launch(kernel, ins, stream_outs, t, seeds, table, thresh, gscale, flags, scalars,
            **const) -> Launch:
    """The launch of ``kernel``: its arguments are, in order, the pointers of ``ins`` and
    ``stream_outs`` (tensors like X, or None: then X stands in, never read), of t, seeds,
    table, thresh and gscale (t or the table stands in), the batch strides of the same (0
    where absent), then N, C, S, R, clip, guidance and the stream word."""
    x = ins[_X]
    noise = flags[_F_NOISE]
    tensors = [*ins, *stream_outs]
    p = plan(x.shape, flags[_F_LAYOUT], noise == _PHILOX, x.element_size(),
             sum(a is not None for a in tensors))
    samples = (t, t if seeds is None else seeds, table, table if thresh is None else thresh,
               table if gscale is None else gscale)
    args = ([x if a is None else a for a in tensors] + list(samples)
            + [0 if a is None else a.stride(0) for a in tensors]
            + [0 if a is None else a.stride(0) for a in (t, seeds, thresh, gscale)]
            + [p.N, p.C, p.S, table.shape[0], float(scalars[_S_CLIP]),
               float(scalars[_S_GUIDANCE]), int(flags[_F_STREAM])])
    const.update(p.constexprs)
    const.update(CLIP=int(flags[_F_CLIP]), VAR=int(flags[_F_VAR]), NOISE=int(noise),
                 TERMS=int(flags[_F_TERMS]), GUIDED=ins[_MC] is not None,
                 GSCALE=gscale is not None, FAST=FAST_SINCOS and x.is_cuda,
                 num_warps=p.num_warps)
    return Launch(kernel, p.grid, args, const)


def forward_launch(ins, t, seeds, table, thresh, gscale, outs, flags, scalars
                   ) -> Optional[Launch]:
    """The kernel launch of :func:`step_forward` (arguments checked), or None when there is
    nothing to compute."""
    if ins[_X].numel() == 0:
        return None
    return _launch(_step_fwd_kernel, ins, outs, t, seeds, table, thresh, gscale, flags,
                   scalars, WRITE_X0=outs[_X0] is not None)


def backward_launch(ins, grad_y, grad_x0, t, seeds, table, thresh, gscale, grads, flags,
                    scalars) -> Optional[Launch]:
    """The kernel launch of :func:`step_backward` (arguments checked), or None when there is
    nothing to compute."""
    want = sum(1 << i for i, g in enumerate(grads) if g is not None)
    if ins[_X].numel() == 0 or not want:
        return None
    return _launch(_step_bwd_kernel, ins, [grad_y, grad_x0, *grads], t, seeds, table, thresh,
                   gscale, flags, scalars, HAS_G0=grad_x0 is not None, WANT=want)


def step_forward(ins: Sequence[Optional[torch.Tensor]], t: torch.Tensor,
                 seeds: Optional[torch.Tensor], table: torch.Tensor,
                 thresh: Optional[torch.Tensor], gscale: Optional[torch.Tensor],
                 outs: Sequence[Optional[torch.Tensor]], flags: Sequence[int],
                 scalars: Sequence[float]) -> None:
    """The forward step into ``outs`` (docs/kernels.md: ``step_forward_kernel``).

    ``ins``: [NUM_IN] streams ``[B, C, *spatial]`` fp16/bf16/fp32 or None; ``t``, ``seeds``:
    int64 ``[B]``; ``table``: float32 ``[R, NUM_COLS]``; ``thresh``, ``gscale``: float32
    ``[B]`` or None; ``outs``: [NUM_OUT] (Y always, X0 optional), written in place;
    ``flags``: [NUM_FLAGS] ints; ``scalars``: [NUM_SCALARS] floats.
    """
    check_forward(ins, t, seeds, table, thresh, gscale, outs, flags, scalars)
    step_forward_unchecked(ins, t, seeds, table, thresh, gscale, outs, flags, scalars)


def step_forward_unchecked(ins, t, seeds, table, thresh, gscale, outs, flags, scalars) -> None:
    """:func:`step_forward` without the argument checks, for arguments checked before."""
    launch = forward_launch(ins, t, seeds, table, thresh, gscale, outs, flags, scalars)
    if launch is not None:
        launch()


def step_backward(ins: Sequence[Optional[torch.Tensor]], grad_y: torch.Tensor,
                  grad_x0: Optional[torch.Tensor], t: torch.Tensor,
                  seeds: Optional[torch.Tensor], table: torch.Tensor,
                  thresh: Optional[torch.Tensor], gscale: Optional[torch.Tensor],
                  grads: Sequence[Optional[torch.Tensor]], flags: Sequence[int],
                  scalars: Sequence[float]) -> None:
    """The backward of the step into the given ``grads`` (docs/kernels.md:
    ``step_backward_kernel``): ``grad_y`` (and ``grad_x0``) like X; ``grads``: [NUM_IN],
    None where a gradient is not wanted; the other arguments as in :func:`step_forward`."""
    check_backward(ins, grad_y, grad_x0, t, seeds, table, thresh, gscale, grads, flags,
                   scalars)
    step_backward_unchecked(ins, grad_y, grad_x0, t, seeds, table, thresh, gscale, grads,
                            flags, scalars)


def step_backward_unchecked(ins, grad_y, grad_x0, t, seeds, table, thresh, gscale, grads,
                            flags, scalars) -> None:
    """:func:`step_backward` without the argument checks, for arguments checked before."""
    launch = backward_launch(ins, grad_y, grad_x0, t, seeds, table, thresh, gscale, grads,
                             flags, scalars)
    if launch is not None:
        launch()
