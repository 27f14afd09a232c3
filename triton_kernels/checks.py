"""Argument checks of the Triton launchers: the promises of docs/kernels.md, with the same
messages as the C++ ops (TypeError for a dtype, ValueError for a shape, layout, flag or a
missing/extra stream). Cheap: they run on every launch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..contract import (NUM_FLAGS, NUM_IN, NUM_OUT, NUM_SCALARS, TERM_COLS, Clip, Col, Flag,
                        In, Layout, Noise, NoiseStream, Out, Var)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TERM_MASK = sum(1 << int(c) for c in TERM_COLS)
_FLAG_ENUMS = ((Flag.CLIP, Clip), (Flag.VAR, Var), (Flag.NOISE, Noise), (Flag.LAYOUT, Layout),
               (Flag.NOISE_STREAM, NoiseStream))


def sample_dense(a: torch.Tensor, layout: int) -> bool:
    """Whether every sample a[b] is dense in ``layout`` (sizes of 1 constrain nothing)."""
    size, stride = a.shape, a.stride()
    expected = 1
    if layout == Layout.CONTIGUOUS:
        dims = range(a.dim() - 1, 0, -1)
    elif layout == Layout.CHANNELS_LAST:
        dims = [1, *range(a.dim() - 1, 1, -1)]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    for d in dims:
        if size[d] != 1 and stride[d] != expected:
            return False
        expected *= size[d]
    return True


def _enum_text(e) -> str:
    return f"{e.__name__} {{" + ", ".join(f"{m.name}={int(m)}" for m in e) + "}"


def _list(op: str, name: str, value, n: int) -> None:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of {n}, got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"{op}: {name} must have {n} entries, got {len(value)}")


def _tensor(op: str, name: str, a) -> None:
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor or None, got {type(a).__name__}")


def _flags(op: str, flags: Sequence[int], scalars: Sequence[float]) -> None:
    _list(op, "flags", flags, NUM_FLAGS)
    _list(op, "scalars", scalars, NUM_SCALARS)
    for idx, e in _FLAG_ENUMS:
        if flags[idx] not in e._value2member_map_:
            raise ValueError(f"{op}: flags[{idx.name}] must be one of {_enum_text(e)}, "
                             f"got {flags[idx]!r}")
    terms = flags[Flag.TERMS]
    if not isinstance(terms, int) or terms < 0 or terms & ~_TERM_MASK:
        raise ValueError(f"{op}: flags[TERMS] must be a bit mask over the columns "
                         f"{', '.join(c.name for c in TERM_COLS)} (0..{_TERM_MASK}), got "
                         f"{terms!r}")


def _bit(terms: int, col: Col) -> bool:
    return bool(terms >> int(col) & 1)


class _Like:
    """Checks tensors against the reference stream x: shape, dtype, device, layout."""

    def __init__(self, op: str, x: torch.Tensor, layout: int):
        self.op, self.x, self.layout = op, x, layout
        self.empty = x.numel() == 0

    def __call__(self, name: str, a, output: bool = False) -> None:
        op, x = self.op, self.x
        _tensor(op, name, a)
        if a.shape != x.shape:
            raise ValueError(f"{op}: {name} must have the shape of ins[X] {list(x.shape)}, "
                             f"got {list(a.shape)}")
        if a.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have the dtype of ins[X] ({x.dtype}), got "
                            f"{a.dtype}")
        if a.device != x.device:
            raise ValueError(f"{op}: {name} must be on the device of ins[X] ({x.device}), got "
                             f"{a.device}")
        if self.empty:
            return
        if not sample_dense(a, self.layout):
            raise ValueError(f"{op}: {name} must be sample-dense in the layout "
                             f"{Layout(self.layout).name}, got strides {list(a.stride())} for "
                             f"shape {list(a.shape)}")
        if output and a.shape[0] > 1 and a.stride(0) < a[0].numel():
            raise ValueError(f"{op}: {name} is an output whose samples overlap in memory "
                             f"(batch stride {a.stride(0)} < {a[0].numel()} elements per sample)")


def _per_sample(op: str, name: str, a, dtype: torch.dtype, x: torch.Tensor) -> None:
    _tensor(op, name, a)
    if a.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype}, got {a.dtype}")
    if a.dim() != 1 or a.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: {name} must have shape [B] = [{x.shape[0]}], got "
                         f"{list(a.shape)}")
    if a.device != x.device:
        raise ValueError(f"{op}: {name} must be on the device of ins[X] ({x.device}), got "
                         f"{a.device}")


def _presence(op: str, name: str, a, wanted: bool, why: str) -> None:
    if wanted and a is None:
        raise ValueError(f"{op}: {name} is missing: {why}")
    if not wanted and a is not None:
        raise ValueError(f"{op}: {name} must be None: {why}")


def check_step(op: str, ins, t, seeds, table, thresh, gscale, flags, scalars) -> _Like:
    """Checks shared by the forward and backward launches; returns the stream checker."""
    _list(op, "ins", ins, NUM_IN)
    _flags(op, flags, scalars)
    x = ins[In.X]
    if x is None:
        raise ValueError(f"{op}: ins[X] is missing: it is always given")
    _tensor(op, "ins[X]", x)
    if x.dtype not in _FLOATS:
        raise TypeError(f"{op}: ins[X] must be float16, bfloat16 or float32 on this backend, "
                        f"got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{op}: ins[X] must have shape [B, C, *spatial], got {list(x.shape)}")
    layout = flags[Flag.LAYOUT]
    if layout == Layout.CHANNELS_LAST and x.dim() < 3:
        raise ValueError(f"{op}: flags[LAYOUT] is CHANNELS_LAST but ins[X] has no spatial "
                         f"dimension (shape {list(x.shape)})")
    like = _Like(op, x, layout)
    like("ins[X]", x)

    terms = flags[Flag.TERMS]
    noise, var, clip = flags[Flag.NOISE], flags[Flag.VAR], flags[Flag.CLIP]
    needs_z = _bit(terms, Col.S) or _bit(terms, Col.E)
    if needs_z and noise == Noise.NONE:
        raise ValueError(f"{op}: flags[NOISE] is NONE but flags[TERMS] has the S or E bit set "
                         f"(those terms need z)")
    if not needs_z and noise != Noise.NONE:
        raise ValueError(f"{op}: flags[NOISE] must be NONE when flags[TERMS] has neither the S "
                         f"nor the E bit set, got {Noise(noise).name}")
    if ins[In.M] is None and (_bit(terms, Col.W) or _bit(terms, Col.R)):
        raise ValueError(f"{op}: ins[M] is missing: flags[TERMS] has the W or R bit set")
    if ins[In.MC] is not None and ins[In.M] is None:
        raise ValueError(f"{op}: ins[MC] must be None: a guided step needs ins[M] too")
    _presence(op, "ins[V]", ins[In.V], var != Var.FIXED, f"flags[VAR] is {Var(var).name}")
    _presence(op, "ins[Z]", ins[In.Z], noise == Noise.EXTERNAL,
              f"flags[NOISE] is {Noise(noise).name}")
    _presence(op, "ins[H]", ins[In.H], _bit(terms, Col.H),
              "flags[TERMS] has the H bit " + ("set" if _bit(terms, Col.H) else "clear"))
    for i in (In.M, In.MC, In.V, In.Z, In.H):
        if ins[i] is not None:
            like(f"ins[{In(i).name}]", ins[i])

    _per_sample(op, "t", t, torch.int64, x)
    _presence(op, "seeds", seeds, noise == Noise.PHILOX, f"flags[NOISE] is {Noise(noise).name}")
    if seeds is not None:
        _per_sample(op, "seeds", seeds, torch.int64, x)
    _presence(op, "thresh", thresh, clip == Clip.DYNAMIC, f"flags[CLIP] is {Clip(clip).name}")
    if thresh is not None:
        _per_sample(op, "thresh", thresh, torch.float32, x)
    if gscale is not None:
        if ins[In.MC] is None:
            raise ValueError(f"{op}: gscale must be None: the step is not guided (ins[MC] is "
                             f"None)")
        _per_sample(op, "gscale", gscale, torch.float32, x)

    _tensor(op, "table", table)
    if table.dtype != torch.float32:
        raise TypeError(f"{op}: table must be torch.float32 on this backend, got {table.dtype}")
    if table.dim() != 2 or table.shape[1] != len(Col) or table.shape[0] < 1:
        raise ValueError(f"{op}: table must have shape [R, {len(Col)}] with R >= 1, got "
                         f"{list(table.shape)}")
    if not table.is_contiguous():
        raise ValueError(f"{op}: table must be contiguous")
    if table.device != x.device:
        raise ValueError(f"{op}: table must be on the device of ins[X] ({x.device}), got "
                         f"{table.device}")
    return like


def check_forward(ins, t, seeds, table, thresh, gscale, outs, flags, scalars) -> None:
    """The promises of ``step_forward_kernel`` (docs/kernels.md, "Launch arguments")."""
    op = "step_forward_kernel"
    like = check_step(op, ins, t, seeds, table, thresh, gscale, flags, scalars)
    _list(op, "outs", outs, NUM_OUT)
    if outs[Out.Y] is None:
        raise ValueError(f"{op}: outs[Y] is missing: it is always given")
    for i in Out:
        if outs[i] is not None:
            like(f"outs[{i.name}]", outs[i], output=True)


def check_backward(ins, grad_y, grad_x0, t, seeds, table, thresh, gscale, grads, flags,
                   scalars) -> None:
    """The promises of ``step_backward_kernel`` (docs/kernels.md, "Launch arguments")."""
    op = "step_backward_kernel"
    like = check_step(op, ins, t, seeds, table, thresh, gscale, flags, scalars)
    if grad_y is None:
        raise ValueError(f"{op}: grad_y is missing: it is always given")
    like("grad_y", grad_y)
    if grad_x0 is not None:
        like("grad_x0", grad_x0)
    _list(op, "grads", grads, NUM_IN)
    for i in In:
        if grads[i] is None:
            continue
        if ins[i] is None:
            raise ValueError(f"{op}: grads[{i.name}] must be None: ins[{i.name}] is None")
        like(f"grads[{i.name}]", grads[i], output=True)


def _seeds_t(op: str, seeds, t, batch: Optional[int]) -> None:
    for name, a in (("seeds", seeds), ("t", t)):
        _tensor(op, name, a)
        if a.dtype != torch.int64:
            raise TypeError(f"{op}: {name} must be torch.int64, got {a.dtype}")
    if seeds.dim() != 1 or t.dim() != 1 or seeds.shape[0] != t.shape[0]:
        raise ValueError(f"{op}: seeds and t must have shape [B], got {list(seeds.shape)} and "
                         f"{list(t.shape)}")
    if batch is not None and seeds.shape[0] != batch:
        raise ValueError(f"{op}: seeds and t must have shape [B] = [{batch}], got "
                         f"{list(seeds.shape)}")
    if seeds.device != t.device:
        raise ValueError(f"{op}: seeds and t must be on one device, got {seeds.device} and "
                         f"{t.device}")


def _stream(op: str, stream) -> None:
    if stream not in NoiseStream._value2member_map_:
        raise ValueError(f"{op}: stream must be one of {_enum_text(NoiseStream)}, got "
                         f"{stream!r}")


def check_philox_uint32(seeds, t, numel, stream) -> None:
    """The promises of ``philox_uint32``."""
    op = "philox_uint32"
    _seeds_t(op, seeds, t, None)
    if not isinstance(numel, int) or isinstance(numel, bool):
        raise TypeError(f"{op}: numel must be an int, got {type(numel).__name__}")
    if numel < 0:
        raise ValueError(f"{op}: numel must be >= 0, got {numel}")
    _stream(op, stream)


def check_philox_normal(seeds, t, stream, layout, out) -> None:
    """The promises of ``philox_normal_kernel``."""
    op = "philox_normal_kernel"
    _tensor(op, "out", out)
    if out.dtype not in _FLOATS:
        raise TypeError(f"{op}: out must be float16, bfloat16 or float32 on this backend, got "
                        f"{out.dtype}")
    if out.dim() < 2:
        raise ValueError(f"{op}: out must have shape [B, C, *spatial], got {list(out.shape)}")
    _seeds_t(op, seeds, t, out.shape[0])
    if seeds.device != out.device:
        raise ValueError(f"{op}: seeds must be on the device of out ({out.device}), got "
                         f"{seeds.device}")
    _stream(op, stream)
    if layout not in Layout._value2member_map_:
        raise ValueError(f"{op}: layout must be one of {_enum_text(Layout)}, got {layout!r}")
    if layout == Layout.CHANNELS_LAST and out.dim() < 3:
        raise ValueError(f"{op}: layout is CHANNELS_LAST but out has no spatial dimension "
                         f"(shape {list(out.shape)})")
    if out.numel() and not sample_dense(out, layout):
        raise ValueError(f"{op}: out must be sample-dense in the layout {Layout(layout).name}, "
                         f"got strides {list(out.stride())} for shape {list(out.shape)}")
    if out.numel() and out.shape[0] > 1 and out.stride(0) < out[0].numel():
        raise ValueError(f"{op}: out's samples overlap in memory (batch stride "
                         f"{out.stride(0)} < {out[0].numel()} elements per sample)")
