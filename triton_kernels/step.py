"""Triton kernels of the fused DDPM/DDIM step, forward and backward (contract: docs/kernels.md).

Per element, with the table row c = table[clamp(t[b], 0, T-1)] (columns:
``fused_ddpm/coefficients.py``)::

    xr = c.u·x + c.w·m;  xh = xr | clamp(xr, ±clip) | clamp(xr, ±s_b)/s_b
    σ  = c.s | c.s·√v | c.s·exp(½(f·c.lb + (1−f)·c.lt)), f = (v+1)/2
    y  = c.p·xh + c.q·x + c.r·m + σ·z;   x0 = xh

Grid: one flat axis of B · cdiv(N, BLOCK) programs; program k handles the contiguous chunk
k mod nblk of sample k // nblk (N = elements per sample, walked as one dense vector; only the
batch stride differs between tensors). The coefficient row is loaded once per program as
scalars; math is fp32, storage in the tensors' dtype.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .philox import philox_key, philox_normal4, philox_normal_at

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Block size used under the interpreter (no autotuning there); tests may change it.
INTERPRET_BLOCK = 256
# Samples of at least this many elements use int64 index math for the channels-last mapping.
_IDX32_LIMIT = 2 ** 31
# Box–Muller with sin.approx/cos.approx on NVIDIA GPUs (DESIGN.md §3 allows 1e-5 for GPU fast
# math); FUSED_DDPM_TRITON_ACCURATE_SINCOS=1 selects the accurate libdevice versions.
FAST_SINCOS = (not INTERPRET and torch.version.hip is None
               and os.environ.get("FUSED_DDPM_TRITON_ACCURATE_SINCOS", "0") != "1")


@triton.jit
def _row(table_ptr, t_ptr, s_t, b, T):
    tb = tl.load(t_ptr + b * s_t)
    row = tl.minimum(tl.maximum(tb, 0), T - 1).to(tl.int64)
    return table_ptr + row * 8, tb


@triton.jit
def _noise(z_ptr, sz, b, start, offs, mask, seed_ptr, s_seed, tb, N, C, S,
           EXT_NOISE: tl.constexpr, CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr,
           FAST: tl.constexpr, BLOCK: tl.constexpr):
    if EXT_NOISE:
        z = tl.load(z_ptr + b * sz + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        k0, k1 = philox_key(tl.load(seed_ptr + b * s_seed))
        tword = tb.to(tl.uint32)
        if CHANNELS_LAST:
            # storage position s → logical index (s % C)·S + s // C
            if IDX64:
                sidx = offs
            else:
                sidx = offs.to(tl.int32)
            i = (sidx % C) * S + sidx // C
            z = philox_normal_at(i, tword, k0, k1, FAST)
        else:
            # BLOCK is a multiple of 4 and chunks start at multiples of BLOCK: one Philox
            # call per 4 consecutive elements.
            g = start // 4 + tl.arange(0, BLOCK // 4)
            z = philox_normal4(g, tword, k0, k1, FAST)
    return z


@triton.jit
def _program_block(N, BLOCK: tl.constexpr):
    """This program's chunk: sample b, elements [start, start + BLOCK) of its N (masked)."""
    pid = tl.program_id(0).to(tl.int64)
    nblk = tl.cdiv(N, BLOCK)
    b = pid // nblk
    start = (pid - b * nblk) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    return b, start, offs, offs < N


@triton.jit
def _sigma(v_ptr, sv, b, offs, mask, cb, cs, VAR_MODE: tl.constexpr):
    """(σ, v): fixed σ = s; learned σ = s·√v; learned_range σ = s·exp(½(f·lb + (1−f)·lt)),
    f = (v+1)/2 (docs/kernels.md). v is the loaded variance half (a dummy when fixed)."""
    if VAR_MODE == 1:
        v = tl.load(v_ptr + b * sv + offs, mask=mask, other=1.0).to(tl.float32)
        sigma = cs * tl.sqrt(v)
    elif VAR_MODE == 2:
        v = tl.load(v_ptr + b * sv + offs, mask=mask, other=0.0).to(tl.float32)
        f = (v + 1.0) * 0.5
        sigma = cs * tl.exp(0.5 * (f * tl.load(cb + 6) + (1.0 - f) * tl.load(cb + 7)))
    else:
        v = cs
        sigma = cs
    return sigma, v


@triton.jit
def _term(c, v):
    # A coefficient that is exactly 0 drops its term, even for inf/NaN inputs, as the formula
    # it stands for has no such term (e.g. r = 0 in a clipped DDPM step).
    return tl.where(c == 0.0, 0.0, c * v)


@triton.jit
def _step_fwd_kernel(x_ptr, m_ptr, v_ptr, z_ptr, y_ptr, x0_ptr,
                     seed_ptr, t_ptr, table_ptr, thresh_ptr,
                     sx, sm, sv, sz, sy, sx0, s_seed, s_t, s_thr,
                     N, C, S, T, clip, N_BUCKET,
                     CLIP_MODE: tl.constexpr, VAR_MODE: tl.constexpr,
                     EXT_NOISE: tl.constexpr, WRITE_X0: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr,
                     FAST: tl.constexpr, BLOCK: tl.constexpr):
    b, start, offs, mask = _program_block(N, BLOCK)

    cb, tb = _row(table_ptr, t_ptr, s_t, b, T)
    u = tl.load(cb + 0)
    w = tl.load(cb + 1)
    p = tl.load(cb + 2)
    q = tl.load(cb + 3)
    r = tl.load(cb + 4)
    cs = tl.load(cb + 5)

    x = tl.load(x_ptr + b * sx + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + b * sm + offs, mask=mask, other=0.0).to(tl.float32)

    xr = _term(u, x) + _term(w, m)
    if CLIP_MODE == 1:
        xh = tl.minimum(tl.maximum(xr, -clip, propagate_nan=tl.PropagateNan.ALL), clip,
                        propagate_nan=tl.PropagateNan.ALL)
    elif CLIP_MODE == 2:
        th = tl.load(thresh_ptr + b * s_thr).to(tl.float32)
        xh = tl.minimum(tl.maximum(xr, -th, propagate_nan=tl.PropagateNan.ALL), th,
                        propagate_nan=tl.PropagateNan.ALL) / th
    else:
        xh = xr

    sigma, v = _sigma(v_ptr, sv, b, offs, mask, cb, cs, VAR_MODE)

    z = _noise(z_ptr, sz, b, start, offs, mask, seed_ptr, s_seed, tb, N, C, S,
               EXT_NOISE, CHANNELS_LAST, IDX64, FAST, BLOCK)
    y = _term(p, xh) + _term(q, x) + _term(r, m) + sigma * z
    tl.store(y_ptr + b * sy + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + b * sx0 + offs, xh.to(x0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_bwd_kernel(gy_ptr, gx0_ptr, x_ptr, m_ptr, v_ptr, z_ptr,
                     seed_ptr, t_ptr, table_ptr, thresh_ptr,
                     gx_ptr, gm_ptr, gv_ptr, gz_ptr,
                     sgy, sgx0, sx, sm, sv, sz, s_seed, s_t, s_thr,
                     sgx, sgm, sgv, sgz,
                     N, C, S, T, clip, N_BUCKET,
                     CLIP_MODE: tl.constexpr, VAR_MODE: tl.constexpr,
                     EXT_NOISE: tl.constexpr, HAS_GX0: tl.constexpr,
                     HAS_GX: tl.constexpr, HAS_GM: tl.constexpr,
                     HAS_GV: tl.constexpr, HAS_GZ: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr,
                     FAST: tl.constexpr, BLOCK: tl.constexpr):
    b, start, offs, mask = _program_block(N, BLOCK)

    cb, tb = _row(table_ptr, t_ptr, s_t, b, T)
    cs = tl.load(cb + 5)
    gy = tl.load(gy_ptr + b * sgy + offs, mask=mask, other=0.0).to(tl.float32)

    if HAS_GX or HAS_GM:
        u = tl.load(cb + 0)
        w = tl.load(cb + 1)
        p = tl.load(cb + 2)
        q = tl.load(cb + 3)
        r = tl.load(cb + 4)
        if CLIP_MODE == 0:
            a = gy * p                      # dh = 1: x and m are not needed
        else:
            x = tl.load(x_ptr + b * sx + offs, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + b * sm + offs, mask=mask, other=0.0).to(tl.float32)
            xr = _term(u, x) + _term(w, m)
            if CLIP_MODE == 1:
                dh = ((xr >= -clip) & (xr <= clip)).to(tl.float32)
            else:
                th = tl.load(thresh_ptr + b * s_thr).to(tl.float32)
                dh = ((xr >= -th) & (xr <= th)).to(tl.float32) / th
            a = gy * p * dh
        if HAS_GX0:
            gx0 = tl.load(gx0_ptr + b * sgx0 + offs, mask=mask, other=0.0).to(tl.float32)
            if CLIP_MODE == 0:
                a = a + gx0
            else:
                a = a + gx0 * dh
        # grad_x = gy·q + (gy·p + gx0)·u·dh ; grad_m = gy·r + (gy·p + gx0)·w·dh
        if HAS_GX:
            gx = gy * q + a * u
            tl.store(gx_ptr + b * sgx + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        if HAS_GM:
            gm = gy * r + a * w
            tl.store(gm_ptr + b * sgm + offs, gm.to(gm_ptr.dtype.element_ty), mask=mask)

    if HAS_GV or HAS_GZ:
        sigma, v = _sigma(v_ptr, sv, b, offs, mask, cb, cs, VAR_MODE)
        if HAS_GZ:
            gz = gy * sigma
            tl.store(gz_ptr + b * sgz + offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)
        if HAS_GV:
            z = _noise(z_ptr, sz, b, start, offs, mask, seed_ptr, s_seed, tb, N, C, S,
                       EXT_NOISE, CHANNELS_LAST, IDX64, FAST, BLOCK)
            if VAR_MODE == 1:
                gv = gy * z * cs / (2.0 * tl.sqrt(v))               # dσ/dv = s/(2√v)
            else:
                lb = tl.load(cb + 6)
                lt = tl.load(cb + 7)
                gv = gy * z * sigma * ((lb - lt) * 0.25)           # dσ/dv = σ(lb − lt)/4
            tl.store(gv_ptr + b * sgv + offs, gv.to(gv_ptr.dtype.element_ty), mask=mask)


def _configs():
    # At most 8 elements per thread and 8 warps: BLOCK 4096 (16 per thread on 8 warps, or
    # 16 warps' 128-register cap) spills on sm_90 for channels_last in-kernel noise
    # (.ci/triton_compile_check.py compiles every variant and fails on spills).
    return [triton.Config({"BLOCK": bs}, num_warps=nw)
            for bs, nw in ((512, 2), (1024, 4), (2048, 8))]


# N_BUCKET (bit length of N, unused by the kernels) keys the tuning cache: one tuning per
# size class, not per exact size.
_FWD_KEY = ["N_BUCKET", "CLIP_MODE", "VAR_MODE", "EXT_NOISE", "WRITE_X0", "CHANNELS_LAST"]
_BWD_KEY = ["N_BUCKET", "CLIP_MODE", "VAR_MODE", "EXT_NOISE", "HAS_GX0", "HAS_GX", "HAS_GM",
            "HAS_GV", "HAS_GZ", "CHANNELS_LAST"]

if not INTERPRET:
    # Outputs are restored after each benchmark run so autotuning is safe even when an
    # output aliases an input (e.g. y written over x).
    _fwd_tuned = triton.autotune(_configs(), key=_FWD_KEY,
                                 restore_value=["y_ptr", "x0_ptr"])(_step_fwd_kernel)
    _bwd_tuned = triton.autotune(_configs(), key=_BWD_KEY,
                                 restore_value=["gx_ptr", "gm_ptr", "gv_ptr", "gz_ptr"]
                                 )(_step_bwd_kernel)


def _layout(x: torch.Tensor):
    """(B, N, C, S, channels_last, idx64) for a sample-dense tensor x [B, C, *spatial]."""
    B = x.shape[0]
    C = x.shape[1] if x.dim() >= 2 else 1
    N = x[0].numel() if B else 0
    S = N // C if C else 0
    cl = x.dim() >= 3 and C > 1 and S > 1 and x.stride(1) == 1
    return B, N, C, S, cl, N >= _IDX32_LIMIT


def _launch(fn_tuned, fn_plain, B, N, args, kwargs):
    if INTERPRET:
        BLOCK = INTERPRET_BLOCK
        fn_plain[(B * triton.cdiv(N, BLOCK),)](*args, **kwargs, BLOCK=BLOCK)
    else:
        grid = lambda meta: (B * triton.cdiv(N, meta["BLOCK"]),)  # noqa: E731
        fn_tuned[grid](*args, **kwargs)


def step_forward(x, m, v, noise, seeds, t, table, thresh, y, x0, clip, clip_mode, var_mode):
    """Forward step into ``y`` (and ``x0`` when given). See docs/kernels.md."""
    B, N, C, S, cl, idx64 = _layout(x)
    if B == 0 or N == 0:
        return None
    ext = noise is not None
    args = (x, m, v if var_mode else x, noise if ext else x, y, x0 if x0 is not None else y,
            seeds if seeds is not None else t, t, table, thresh if thresh is not None else table,
            x.stride(0), m.stride(0), v.stride(0) if var_mode else 0,
            noise.stride(0) if ext else 0, y.stride(0), x0.stride(0) if x0 is not None else 0,
            seeds.stride(0) if seeds is not None else 0, t.stride(0),
            thresh.stride(0) if thresh is not None else 0,
            N, C, S, table.shape[0], float(clip), N.bit_length())
    kwargs = dict(CLIP_MODE=int(clip_mode), VAR_MODE=int(var_mode), EXT_NOISE=ext,
                  WRITE_X0=x0 is not None, CHANNELS_LAST=cl, IDX64=idx64,
                  FAST=FAST_SINCOS and x.is_cuda)
    _launch(None if INTERPRET else _fwd_tuned, _step_fwd_kernel, B, N, args, kwargs)
    return None


def step_backward(grad_y, grad_x0, x, m, v, noise, seeds, t, table, thresh,
                  grad_x, grad_m, grad_v, grad_noise, clip, clip_mode, var_mode):
    """Backward of the step into the given ``grad_*`` (None ones are skipped)."""
    B, N, C, S, cl, idx64 = _layout(x)
    if B == 0 or N == 0:
        return None
    ext = noise is not None
    has_gv = grad_v is not None and var_mode != 0
    has_gz = grad_noise is not None and ext
    if grad_x is None and grad_m is None and not has_gv and not has_gz:
        return None
    d = grad_y  # dummy pointer for absent tensors (never dereferenced)

    def st(a):
        return a.stride(0) if a is not None else 0

    args = (grad_y, grad_x0 if grad_x0 is not None else d, x, m, v if var_mode else d,
            noise if ext else d, seeds if seeds is not None else t, t, table,
            thresh if thresh is not None else table,
            grad_x if grad_x is not None else d, grad_m if grad_m is not None else d,
            grad_v if has_gv else d, grad_noise if has_gz else d,
            grad_y.stride(0), st(grad_x0), x.stride(0), m.stride(0),
            v.stride(0) if var_mode else 0, st(noise), st(seeds), t.stride(0), st(thresh),
            st(grad_x), st(grad_m), st(grad_v) if has_gv else 0, st(grad_noise) if has_gz else 0,
            N, C, S, table.shape[0], float(clip), N.bit_length())
    kwargs = dict(CLIP_MODE=int(clip_mode), VAR_MODE=int(var_mode), EXT_NOISE=ext,
                  HAS_GX0=grad_x0 is not None, HAS_GX=grad_x is not None,
                  HAS_GM=grad_m is not None, HAS_GV=has_gv, HAS_GZ=has_gz,
                  CHANNELS_LAST=cl, IDX64=idx64,
                  FAST=FAST_SINCOS and x.is_cuda)
    _launch(None if INTERPRET else _bwd_tuned, _step_bwd_kernel, B, N, args, kwargs)
    return None
