"""Memory layouts of the kernels' streams (``docs/kernels.md``, "Layout promise").

A stream is *sample-dense* in a :class:`~fused_ddpm.contract.Layout` when every sample
``A[b]`` is one dense block: contiguous (CONTIGUOUS), or contiguous in channels-last order
(CHANNELS_LAST: strides ``(1, …, C)`` for the sample ``[C, *spatial]``). Only the batch
stride may differ between streams. The layout of a launch is decided once, here, from x.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .contract import Layout

__all__ = ["dense_strides", "is_sample_dense", "layout_of", "to_layout", "empty_in_layout"]


def dense_strides(sample_shape: Sequence[int], layout: Layout) -> List[int]:
    """Strides of a dense sample of ``sample_shape`` (``[C, *spatial]``) in ``layout``."""
    n = len(sample_shape)
    if layout == Layout.CONTIGUOUS:
        order = list(range(n - 1, -1, -1))            # the last dim is innermost
    elif layout == Layout.CHANNELS_LAST:
        order = [0] + list(range(n - 1, 0, -1))       # C innermost, then the spatial dims
    else:
        raise ValueError(f"layout must be a Layout value, got {layout!r}")
    strides = [0] * n
    acc = 1
    for d in order:
        strides[d] = acc
        acc *= sample_shape[d]
    return strides


_CL_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def is_sample_dense(t: Tensor, layout: Layout) -> bool:
    """Whether every sample ``t[b]`` is dense in ``layout`` (only sizes > 1 constrain)."""
    if layout == Layout.CONTIGUOUS:
        if t.is_contiguous():
            return True
    elif layout == Layout.CHANNELS_LAST:
        fmt = _CL_FORMATS.get(t.dim())
        if fmt is not None and t.is_contiguous(memory_format=fmt):
            return True
    shape = t.shape[1:]
    want = dense_strides(shape, layout)
    return all(s == w for n, s, w in zip(shape, t.stride()[1:], want) if n > 1)


def layout_of(x: Tensor) -> Layout:
    """The layout a launch on ``x`` uses: channels-last when x is stored so (rank 4/5)
    and not also contiguous, else contiguous."""
    if x.is_contiguous() or is_sample_dense(x, Layout.CONTIGUOUS):
        return Layout.CONTIGUOUS
    if x.dim() in (4, 5) and is_sample_dense(x, Layout.CHANNELS_LAST):
        return Layout.CHANNELS_LAST
    return Layout.CONTIGUOUS


def _cl_perm(rank: int) -> List[int]:
    """The dims of a ``[B, C, *spatial]`` tensor in channels-last storage order."""
    return [0] + list(range(2, rank)) + [1]


def _inverse(perm: Sequence[int]) -> List[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def to_layout(t: Optional[Tensor], layout: Layout) -> Optional[Tensor]:
    """``t`` itself when sample-dense in ``layout``, else a copy that is (None stays).
    Channels-last works for any rank >= 3 (for 4 and 5 it is torch's channels_last(_3d))."""
    if t is None or is_sample_dense(t, layout):
        return t
    if layout == Layout.CHANNELS_LAST and t.dim() >= 3:
        perm = _cl_perm(t.dim())
        return t.permute(perm).contiguous().permute(_inverse(perm))
    return t.contiguous()


def empty_in_layout(like: Tensor, layout: Layout, shape: Optional[Sequence[int]] = None
                    ) -> Tensor:
    """An uninitialised tensor of ``shape`` (default: like's) in like's dtype and device,
    stored in ``layout``."""
    shape = list(like.shape if shape is None else shape)
    if layout == Layout.CHANNELS_LAST and len(shape) >= 3:
        perm = _cl_perm(len(shape))
        stored = torch.empty([shape[p] for p in perm], dtype=like.dtype, device=like.device)
        return stored.permute(_inverse(perm))
    return torch.empty(shape, dtype=like.dtype, device=like.device)
