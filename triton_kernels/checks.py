"""Argument checks of the Triton launchers: the promises of docs/kernels.md, in the order and
with the wording of the C++ ops' checks (TypeError for a dtype; ValueError for a shape,
layout, flag, device or a missing/extra stream). Cheap: they run on every launch.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..contract import (NUM_COLS, NUM_FLAGS, NUM_IN, NUM_OUT, NUM_SCALARS, TERM_COLS, Clip, Col,
                        Flag, In, Layout, Noise, NoiseStream, Out, Scalar, Var)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# plain ints of the contract's names (an enum member lookup costs a µs per launch)
_F_CLIP, _F_VAR, _F_NOISE, _F_LAYOUT, _F_TERMS, _F_STREAM = (
    int(Flag.CLIP), int(Flag.VAR), int(Flag.NOISE), int(Flag.LAYOUT), int(Flag.TERMS),
    int(Flag.NOISE_STREAM))
_S_CLIP = int(Scalar.CLIP)
_NOISE_NONE, _NOISE_EXTERNAL, _NOISE_PHILOX = (int(Noise.NONE), int(Noise.EXTERNAL),
                                               int(Noise.PHILOX))
_CLIP_STATIC, _CLIP_DYNAMIC = int(Clip.STATIC), int(Clip.DYNAMIC)
_VAR_FIXED = int(Var.FIXED)
_S_OR_E = 1 << int(Col.S) | 1 << int(Col.E)
_W_OR_R = 1 << int(Col.W) | 1 << int(Col.R)
_H_BIT = 1 << int(Col.H)
_X, _M, _MC, _V, _Z, _H = (int(i) for i in (In.X, In.M, In.MC, In.V, In.Z, In.H))
_Y = int(Out.Y)
_TERM_MASK = sum(1 << int(c) for c in TERM_COLS)
_TERM_NAMES = " ".join(c.name for c in TERM_COLS)
_IN_NAMES = " ".join(i.name for i in In)
_OUT_NAMES = " ".join(o.name for o in Out)


_CONTIGUOUS, _CHANNELS_LAST = int(Layout.CONTIGUOUS), int(Layout.CHANNELS_LAST)
_CL_FORMAT = {4: torch.channels_last, 5: torch.channels_last_3d}


def sample_dense(a: torch.Tensor, layout: int) -> bool:
    """Whether every sample a[b] is dense in ``layout``: contiguous, or contiguous in
    channels-last order (strides (1, …, C) for dims 1, 2, …); sizes of 1 constrain nothing."""
    if layout == _CONTIGUOUS:
        if a.is_contiguous():
            return True
        dims = range(a.dim() - 1, 0, -1)
    elif layout == _CHANNELS_LAST:
        fmt = _CL_FORMAT.get(a.dim())
        if fmt is not None and a.is_contiguous(memory_format=fmt):
            return True
        dims = [1, *range(a.dim() - 1, 1, -1)]
    else:
        raise ValueError(f"layout must be a Layout value, got {layout!r}")
    size, stride = a.shape, a.stride()
    expected = 1
    for d in dims:
        if size[d] != 1 and stride[d] != expected:
            return False
        expected *= size[d]
    return True


def _values(e) -> str:
    return ", ".join(f"{m.name} {int(m)}" for m in e)


def _flag(op: str, flags, flag: int, e) -> int:
    v = flags[flag]
    if v not in e._value2member_map_:
        raise ValueError(f"{op}: flags[{Flag(flag).name}] must be a {e.__name__} value, got "
                         f"{v!r}")
    return v


def _stream(op: str, name: str, v) -> None:
    if v not in NoiseStream._value2member_map_:
        raise ValueError(f"{op}: {name} must be a NoiseStream value ({_values(NoiseStream)}), "
                         f"got {v!r}")


def _count(op: str, name: str, value, n: int, what: str) -> None:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list, got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"{op}: {name} must have {n} entries ({what}), got {len(value)}")


def _is_tensor(op: str, name: str, a) -> None:
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(a).__name__}")


def _decode_flags(op: str, flags, scalars):
    """(clip, var, noise, layout, terms) after checking the flags and scalars lists."""
    _count(op, "flags", flags, NUM_FLAGS, "contract.Flag")
    _count(op, "scalars", scalars, NUM_SCALARS, "contract.Scalar")
    clip = _flag(op, flags, _F_CLIP, Clip)
    var = _flag(op, flags, _F_VAR, Var)
    noise = _flag(op, flags, _F_NOISE, Noise)
    layout = _flag(op, flags, _F_LAYOUT, Layout)
    terms = flags[_F_TERMS]
    if not isinstance(terms, int) or terms < 0 or terms & ~_TERM_MASK:
        raise ValueError(f"{op}: flags[TERMS] must be a mask of the term columns {_TERM_NAMES} "
                         f"(bits within {_TERM_MASK}), got {terms!r}")
    _stream(op, "flags[NOISE_STREAM]", flags[_F_STREAM])
    if noise == _NOISE_NONE and terms & _S_OR_E:
        raise ValueError(f"{op}: flags[NOISE] is NONE but the S or E bit of flags[TERMS] is set "
                         f"(those terms need z)")
    if clip == _CLIP_STATIC and not scalars[_S_CLIP] > 0.0:
        raise ValueError(f"{op}: scalars[CLIP] must be > 0 for Clip.STATIC, got "
                         f"{scalars[_S_CLIP]!r}")
    return clip, var, noise, layout, terms


class _Reference:
    """The tensor every stream must look like (ins[X], or the noise op's output)."""

    def __init__(self, op: str, name: str, a, layout: int):
        _is_tensor(op, name, a)
        if a.dtype not in _FLOATS:
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {a.dtype}")
        if a.dim() < 2:
            raise ValueError(f"{op}: {name} must have shape [B, C, *spatial], got "
                             f"{list(a.shape)}")
        self.op, self.x, self.layout = op, a, layout
        self.empty = a.numel() == 0
        self.n = a.numel() // a.shape[0] if a.shape[0] else 0
        self.dense(name, a)

    def dense(self, name: str, a) -> None:
        if not self.empty and not sample_dense(a, self.layout):
            raise ValueError(f"{self.op}: {name} must be sample-dense in layout "
                             f"{Layout(self.layout).name} (flags[LAYOUT]); got sizes "
                             f"{list(a.shape)} strides {list(a.stride())}")

    def like(self, name: str, a, output: bool = False) -> None:
        op, x = self.op, self.x
        _is_tensor(op, name, a)
        if a.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have dtype {x.dtype} (that of ins[X]), got "
                            f"{a.dtype}")
        if a.shape != x.shape:
            raise ValueError(f"{op}: {name} must have shape {list(x.shape)} (that of ins[X]), "
                             f"got {list(a.shape)}")
        if a.device != x.device:
            raise ValueError(f"{op}: {name} must be on {x.device} (with ins[X]), got {a.device}")
        self.dense(name, a)
        if output and not self.empty and a.shape[0] > 1 and a.stride(0) < self.n:
            raise ValueError(f"{op}: {name} is written, but its samples overlap in memory "
                             f"(batch stride {a.stride(0)} < {self.n} elements per sample)")

    def per_sample(self, name: str, a, dtype: torch.dtype) -> None:
        op, x = self.op, self.x
        _is_tensor(op, name, a)
        if a.dtype != dtype:
            raise TypeError(f"{op}: {name} must be {dtype}, got {a.dtype}")
        if a.dim() != 1 or a.shape[0] != x.shape[0]:
            raise ValueError(f"{op}: {name} must have shape [B] = [{x.shape[0]}], got "
                             f"{list(a.shape)}")
        if a.device != x.device:
            raise ValueError(f"{op}: {name} must be on {x.device} (with the tensors it goes "
                             f"with), got {a.device}")


_IN_WHAT = f"contract.In: {_IN_NAMES}"
_IN_LABELS = [f"ins[{i.name}]" for i in In]
_GRAD_LABELS = [f"grads[{i.name}]" for i in In]
_OUT_LABELS = [f"outs[{o.name}]" for o in Out]
_OTHER_INS = [int(i) for i in In if i != In.X]
_REQUIRED_WHY = {In.M: "the W or R bit of flags[TERMS] is set", In.V: "flags[VAR] is not FIXED",
                 In.Z: "flags[NOISE] is EXTERNAL", In.H: "the H bit of flags[TERMS] is set"}
_NONE_WHY = {In.V: "flags[VAR] is FIXED", In.Z: "flags[NOISE] is not EXTERNAL",
             In.H: "the H bit of flags[TERMS] is clear"}


def _common(op: str, ins, t, seeds, table, thresh, gscale, flags, scalars) -> _Reference:
    """Checks shared by the forward and backward launches; returns the reference checker."""
    clip, var, noise, layout, terms = _decode_flags(op, flags, scalars)
    _count(op, "ins", ins, NUM_IN, _IN_WHAT)
    if ins[_X] is None:
        raise ValueError(f"{op}: ins[X] is required")
    ref = _Reference(op, "ins[X]", ins[_X], layout)
    need = (True, bool(terms & _W_OR_R), ins[_MC] is not None, var != _VAR_FIXED,
            noise == _NOISE_EXTERNAL, bool(terms & _H_BIT))
    for i in _OTHER_INS:
        a = ins[i]
        if need[i] and a is None:
            raise ValueError(f"{op}: ins[{In(i).name}] is required by this launch "
                             f"({_REQUIRED_WHY[i]})")
        if a is not None:
            if not need[i] and i != _M:
                raise ValueError(f"{op}: ins[{In(i).name}] must be None for this launch "
                                 f"({_NONE_WHY[i]})")
            ref.like(_IN_LABELS[i], a)
    ref.per_sample("t", t, torch.int64)
    if noise == _NOISE_PHILOX:
        if seeds is None:
            raise ValueError(f"{op}: seeds is required when flags[NOISE] is PHILOX")
        ref.per_sample("seeds", seeds, torch.int64)
    elif seeds is not None:
        raise ValueError(f"{op}: seeds must be None unless flags[NOISE] is PHILOX")
    if clip == _CLIP_DYNAMIC:
        if thresh is None:
            raise ValueError(f"{op}: thresh is required when flags[CLIP] is DYNAMIC")
        ref.per_sample("thresh", thresh, torch.float32)
    elif thresh is not None:
        raise ValueError(f"{op}: thresh must be None unless flags[CLIP] is DYNAMIC")
    if gscale is not None:
        if ins[_MC] is None:
            raise ValueError(f"{op}: gscale is given but ins[MC] is None (not a guided step)")
        ref.per_sample("gscale", gscale, torch.float32)
    _is_tensor(op, "table", table)
    x = ins[_X]
    if table.dtype != torch.float32:
        raise TypeError(f"{op}: table must be {torch.float32} for {x.dtype} inputs, got "
                        f"{table.dtype}")
    if table.dim() != 2 or table.shape[1] != NUM_COLS or table.shape[0] < 1:
        raise ValueError(f"{op}: table must have shape [R, {NUM_COLS}] with R >= 1, got "
                         f"{list(table.shape)}")
    if not table.is_contiguous():
        raise ValueError(f"{op}: table must be contiguous")
    if table.device != x.device:
        raise ValueError(f"{op}: table must be on {x.device}, got {table.device}")
    return ref


def check_forward(ins: Sequence, t, seeds, table, thresh, gscale, outs: Sequence, flags,
                  scalars) -> None:
    """The promises of ``step_forward_kernel`` (docs/kernels.md, "Launch arguments")."""
    op = "step_forward_kernel"
    ref = _common(op, ins, t, seeds, table, thresh, gscale, flags, scalars)
    _count(op, "outs", outs, NUM_OUT, f"contract.Out: {_OUT_NAMES}")
    if outs[_Y] is None:
        raise ValueError(f"{op}: outs[Y] is required")
    for i, a in enumerate(outs):
        if a is not None:
            ref.like(_OUT_LABELS[i], a, output=True)


def check_backward(ins: Sequence, grad_y, grad_x0, t, seeds, table, thresh, gscale,
                   grads: Sequence, flags, scalars) -> None:
    """The promises of ``step_backward_kernel`` (docs/kernels.md, "Launch arguments")."""
    op = "step_backward_kernel"
    ref = _common(op, ins, t, seeds, table, thresh, gscale, flags, scalars)
    ref.like("grad_y", grad_y)
    if grad_x0 is not None:
        ref.like("grad_x0", grad_x0)
    _count(op, "grads", grads, NUM_IN, _IN_WHAT)
    for i, g in enumerate(grads):
        if g is None:
            continue
        if ins[i] is None:
            raise ValueError(f"{op}: grads[{In(i).name}] is given but ins[{In(i).name}] is None")
        ref.like(_GRAD_LABELS[i], g, output=True)


def _philox_args(op: str, seeds, t, stream) -> None:
    _is_tensor(op, "seeds", seeds)
    _is_tensor(op, "t", t)
    if seeds.dtype != torch.int64:
        raise TypeError(f"{op}: seeds must be int64, got {seeds.dtype}")
    if t.dtype != torch.int64:
        raise TypeError(f"{op}: t must be int64, got {t.dtype}")
    if seeds.dim() != 1 or t.dim() != 1 or seeds.shape[0] != t.shape[0]:
        raise ValueError(f"{op}: seeds and t must have shape [B], got {list(seeds.shape)} and "
                         f"{list(t.shape)}")
    if seeds.device != t.device:
        raise ValueError(f"{op}: seeds and t must be on one device, got {seeds.device} and "
                         f"{t.device}")
    _stream(op, "stream", stream)


def check_philox_uint32(seeds, t, numel, stream) -> None:
    """The promises of ``philox_uint32``."""
    op = "philox_uint32"
    _philox_args(op, seeds, t, stream)
    if not isinstance(numel, int) or isinstance(numel, bool):
        raise TypeError(f"{op}: numel must be an int, got {type(numel).__name__}")
    if numel < 0:
        raise ValueError(f"{op}: numel must be >= 0, got {numel}")


def check_philox_normal(seeds, t, stream, layout, out) -> None:
    """The promises of ``philox_normal_kernel``."""
    op = "philox_normal_kernel"
    _philox_args(op, seeds, t, stream)
    if layout not in Layout._value2member_map_:
        raise ValueError(f"{op}: layout must be a Layout value ({_values(Layout)}), got "
                         f"{layout!r}")
    ref = _Reference(op, "out", out, layout)
    ref.like("out", out, output=True)
    ref.per_sample("t", t, torch.int64)
    ref.per_sample("seeds", seeds, torch.int64)
