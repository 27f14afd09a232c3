"""Dynamic thresholding (Imagen; diffusers' ``thresholding=True``): the per-sample scale.

The fused step clamps x̂0 to [−s_b, s_b] and divides by s_b; s_b needs a quantile over the
whole sample, so it is a separate small pass before the step: :func:`threshold_scale`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .contract import Col, In
from .torch_backend import guided_model, per_sample_rows, raw_x0, term_bits

__all__ = ["threshold_scale", "step_threshold"]


def threshold_scale(xr: Tensor, ratio: float, max_value: float) -> Tensor:
    """s_b = clamp(q_b, 1, max_value), q_b the ``ratio`` quantile of |xr[b]| (linear
    interpolation between the order statistics, as ``torch.quantile``); NaN anywhere in a
    sample makes its s_b NaN. ``xr``: ``[B, ...]``; returns float32 ``[B]`` (computed in
    float64 for float64 inputs, else float32)."""
    B = xr.shape[0]
    cdt = torch.float64 if xr.dtype == torch.float64 else torch.float32
    a = xr.detach().reshape(B, -1).to(cdt).abs()
    n = a.shape[1]
    if n == 0 or B == 0:
        return torch.ones(B, dtype=torch.float32, device=xr.device)
    pos = ratio * (n - 1)
    lo = int(math.floor(pos))
    frac = pos - lo
    q = torch.kthvalue(a, lo + 1, dim=1).values
    if frac > 0:
        q = q + frac * (torch.kthvalue(a, min(lo + 2, n), dim=1).values - q)
    q = torch.where(torch.isnan(a).any(dim=1), torch.full_like(q, math.nan), q)
    return q.clamp(min=1.0, max=max_value).to(torch.float32)


def step_threshold(ins: Sequence[Optional[Tensor]], t: Tensor, table: Tensor,
                   gscale: Optional[Tensor], flags: Sequence[int], scalars: Sequence[float],
                   ratio: float, max_value: float) -> Tensor:
    """s ``[B]`` of a launch (its arguments as in ``docs/kernels.md``), from its x̂0 before
    clipping, xr = U·x + W·m (m guided as the kernels form it)."""
    has = term_bits(flags)
    if has(Col.E):
        raise ValueError("dynamic thresholding of a step whose x̂0 has a noise term (E) is "
                         "not supported")
    x = ins[int(In.X)].detach()
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (-1,) + (1,) * (x.dim() - 1)
    ins = [None if a is None else a.detach() for a in ins]
    m = guided_model(ins, gscale, scalars, cdt, shape)
    xr = raw_x0(per_sample_rows(table, t, x), has, x.to(cdt), m, None)
    return threshold_scale(xr, ratio, max_value)
