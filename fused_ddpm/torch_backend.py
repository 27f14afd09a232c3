"""The kernel contract (``docs/kernels.md``) in plain torch ops: the ``"torch"`` backend.

Same launches, same arguments, same results as the compiled kernels, computed from the
table with tensor ops: float32 math (float64 for float64 inputs, on any device). It is the
fallback for float64 on a GPU, for other devices and for pure-Python installs; it reads
only the launch arguments (never the reference). Noise comes from :mod:`fused_ddpm.philox`,
the implementation of the noise spec. Terms whose TERMS bit is clear are left out.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import philox
from .contract import Clip, Col, Flag, In, Noise, Out, Scalar, Var

__all__ = ["step_forward", "step_backward", "philox_uint32", "philox_normal", "raw_x0",
           "per_sample_rows", "guided_model", "term_bits"]


def per_sample_rows(table: Tensor, t: Tensor, like: Tensor):
    """``col(c)``: column c of each sample's row, shaped ``[B, 1, ...]`` to broadcast
    against ``like``, in the compute dtype (float64 for float64 inputs, else float32)."""
    cdt = torch.float64 if like.dtype == torch.float64 else torch.float32
    rows = table[t.clamp(0, table.shape[0] - 1)].to(cdt)
    shape = (-1,) + (1,) * (like.dim() - 1)
    return lambda c: rows[:, c].reshape(shape)


def _compute(a: Optional[Tensor], cdt: torch.dtype) -> Optional[Tensor]:
    return None if a is None else a.to(cdt)


def term_bits(flags: Sequence[int]):
    """``has(c)``: whether column c's TERMS bit is set."""
    terms = flags[int(Flag.TERMS)]      # int(): traced by torch.compile in the pre-pass
    return lambda c: bool(terms >> int(c) & 1)


def _sum(terms: List[Tensor], like: Tensor) -> Tensor:
    out = torch.zeros_like(like)
    for term in terms:
        out = out + term
    return out


def guided_model(ins, gscale, scalars, cdt, shape) -> Optional[Tensor]:
    """m = M, or guided: k_b·((1 − g)·M + g·MC)."""
    m = _compute(ins[int(In.M)], cdt)   # int(): traced by torch.compile in the pre-pass
    if m is None or ins[int(In.MC)] is None:
        return m
    g = scalars[int(Scalar.GUIDANCE)]
    m = (1 - g) * m + g * ins[int(In.MC)].to(cdt)
    if gscale is not None:
        m = gscale.to(cdt).reshape(shape) * m
    return m


def _noise(ins, seeds, t, flags, x: Tensor, cdt) -> Optional[Tensor]:
    mode = flags[Flag.NOISE]
    if mode == Noise.NONE:
        return None
    if mode == Noise.EXTERNAL:
        return ins[In.Z].to(cdt)
    if mode == Noise.PHILOX:
        z = philox.philox_normal(seeds, t, x.shape, stream=flags[Flag.NOISE_STREAM])
        return z.to(device=x.device, dtype=cdt)
    raise ValueError(f"flags[NOISE]={mode} is not a Noise")


class _Step:
    """The per-element quantities of one launch, in the compute dtype."""

    def __init__(self, ins, t, seeds, table, thresh, gscale, flags, scalars):
        x = ins[In.X]
        self.cdt = cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.shape = (-1,) + (1,) * (x.dim() - 1)
        self.col = per_sample_rows(table, t, x)
        self.has = term_bits(flags)
        self.flags, self.scalars = flags, scalars
        self.x = x.to(cdt)
        self.m = guided_model(ins, gscale, scalars, cdt, self.shape)
        self.v = _compute(ins[In.V], cdt)
        self.h = _compute(ins[In.H], cdt)
        self.z = _noise(ins, seeds, t, flags, x, cdt)
        self.xr = raw_x0(self.col, self.has, self.x, self.m, self.z)
        clip = flags[Flag.CLIP]
        if clip == Clip.NONE:
            self.lo = self.hi = self.scale = None
        elif clip == Clip.STATIC:
            c = scalars[Scalar.CLIP]
            self.lo, self.hi, self.scale = -c, c, None
        elif clip == Clip.DYNAMIC:
            s = thresh.to(cdt).reshape(self.shape)
            self.lo, self.hi, self.scale = -s, s, s
        else:
            raise ValueError(f"flags[CLIP]={clip} is not a Clip")

    def clipped(self) -> Tensor:
        """xh: x̂0 after clipping (clamp semantics: NaN stays NaN)."""
        clip = self.flags[Flag.CLIP]
        if clip == Clip.NONE:
            return self.xr
        if clip == Clip.STATIC:
            return torch.clamp(self.xr, self.lo, self.hi)
        return torch.minimum(torch.maximum(self.xr, self.lo), self.hi) / self.scale

    def dclip(self) -> Tensor:
        """d xh / d xr."""
        if self.lo is None:
            return torch.ones_like(self.xr)
        inside = ((self.xr >= self.lo) & (self.xr <= self.hi)).to(self.cdt)
        return inside if self.scale is None else inside / self.scale

    def sigma(self) -> Tensor:
        """σ per element (or per sample, for Var.FIXED)."""
        mode, col = self.flags[Flag.VAR], self.col
        if mode == Var.FIXED:
            return col(Col.S)
        if mode == Var.SQRT:
            return col(Col.S) * torch.sqrt(self.v)
        if mode == Var.EXP:
            return col(Col.S) * torch.exp(col(Col.VA) + col(Col.VB) * self.v)
        raise ValueError(f"flags[VAR]={mode} is not a Var")


def raw_x0(col, has, x: Tensor, m: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    """xr = U·x + W·m + E·z, the terms whose bits are set (``col``: per-sample columns,
    ``has``: whether a column's TERMS bit is set)."""
    terms = [col(c) * a for c, a in ((Col.U, x), (Col.W, m), (Col.E, z)) if has(c)]
    return _sum(terms, x)


def step_forward(ins, t: Tensor, seeds: Optional[Tensor], table: Tensor,
                 thresh: Optional[Tensor], gscale: Optional[Tensor], outs, flags: List[int],
                 scalars: List[float]) -> None:
    """``step_forward_kernel``: writes outs[Y] (and outs[X0])."""
    if ins[In.X].numel() == 0:
        return
    s = _Step(ins, t, seeds, table, thresh, gscale, flags, scalars)
    xh = s.clipped()
    col, has = s.col, s.has
    terms = [col(c) * a for c, a in ((Col.P, xh), (Col.Q, s.x), (Col.R, s.m), (Col.H, s.h))
             if has(c)]
    if has(Col.S):
        terms.append(s.sigma() * s.z)
    y = _sum(terms, s.x)
    if outs[Out.X0] is not None:
        outs[Out.X0].copy_(xh)
    outs[Out.Y].copy_(y)


def step_backward(ins, grad_y: Tensor, grad_x0: Optional[Tensor], t: Tensor,
                  seeds: Optional[Tensor], table: Tensor, thresh: Optional[Tensor],
                  gscale: Optional[Tensor], grads, flags: List[int],
                  scalars: List[float]) -> None:
    """``step_backward_kernel``: writes every given grads[i]."""
    if ins[In.X].numel() == 0:
        return
    s = _Step(ins, t, seeds, table, thresh, gscale, flags, scalars)
    col, has = s.col, s.has
    gy = grad_y.to(s.cdt)
    front = [gy * col(Col.P)] if has(Col.P) else []
    if grad_x0 is not None:
        front.append(grad_x0.to(s.cdt))
    a = _sum(front, s.x) * s.dclip()

    def lin(pairs) -> Tensor:
        return _sum([g * col(c) for c, g in pairs if has(c)], s.x)

    out = {In.X: lambda: lin([(Col.Q, gy), (Col.U, a)]),
           In.Z: lambda: lin([(Col.E, a)]) + (gy * s.sigma() if has(Col.S) else 0),
           In.H: lambda: lin([(Col.H, gy)])}
    gm = lin([(Col.R, gy), (Col.W, a)])
    if ins[In.MC] is None:
        out[In.M] = lambda: gm
    else:
        g = scalars[Scalar.GUIDANCE]
        k = gscale.to(s.cdt).reshape(s.shape) if gscale is not None else 1.0
        out[In.M] = lambda: gm * (k * (1 - g))
        out[In.MC] = lambda: gm * (k * g)
    if not has(Col.S):
        out[In.V] = lambda: torch.zeros_like(s.x)
    elif flags[Flag.VAR] == Var.SQRT:
        out[In.V] = lambda: gy * s.z * col(Col.S) / (2 * torch.sqrt(s.v))
    elif flags[Flag.VAR] == Var.EXP:
        out[In.V] = lambda: gy * s.z * s.sigma() * col(Col.VB)
    values = [None if g is None else out[In(i)]() for i, g in enumerate(grads)]
    for grad, value in zip(grads, values):      # written last: a grad may alias grad_y
        if grad is not None:
            grad.copy_(value)


def philox_uint32(seeds: Tensor, t: Tensor, numel: int, stream: int) -> Tensor:
    """``philox_uint32``: int64 ``[B, numel]`` of the raw words."""
    return philox.philox_uint32(seeds, t, int(numel), int(stream))


def philox_normal(seeds: Tensor, t: Tensor, stream: int, layout: int, out: Tensor) -> None:
    """``philox_normal_kernel``: the normals of every element of ``out``, written in place."""
    if out.numel():
        out.copy_(philox.philox_normal(seeds, t, out.shape, stream=int(stream)))
