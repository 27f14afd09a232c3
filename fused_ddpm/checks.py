"""The kernel-level contract checks (``docs/kernels.md``, "Checks"), in one place.

Every launch on a Python backend (Triton, torch) passes through :func:`check_forward`,
:func:`check_backward`, :func:`check_philox_uint32` or :func:`check_philox_normal` first; the
C++/CUDA ops make the same checks with the same messages (TORCH_CHECK_TYPE /
TORCH_CHECK_VALUE). A wrong dtype is a ``TypeError``; a wrong shape, device, layout, flag,
or a missing or extra stream is a ``ValueError``. Each message starts with the op's name
and names the argument (``ins[M]``, ``flags[VAR]``, ``table`` ...).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .contract import (NUM_COLS, NUM_FLAGS, NUM_IN, NUM_OUT, NUM_SCALARS, TERM_COLS, Clip,
                       Col, Flag, In, Layout, Noise, NoiseStream, Out, Var, terms_mask)
from .layout import is_sample_dense

__all__ = ["check_forward", "check_backward", "check_philox_uint32", "check_philox_normal",
           "stream_needed", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLAG_ENUMS = {Flag.CLIP: Clip, Flag.VAR: Var, Flag.NOISE: Noise, Flag.LAYOUT: Layout,
               Flag.NOISE_STREAM: NoiseStream}
_TERM_MASK = terms_mask(TERM_COLS)


def _bit(flags: Sequence[int], col: Col) -> bool:
    return bool(flags[Flag.TERMS] >> int(col) & 1)


def stream_needed(stream: In, flags: Sequence[int]) -> Optional[bool]:
    """Whether ``ins[stream]`` must be given for these flags (None: the caller decides —
    MC, which makes a step guided)."""
    if stream == In.X:
        return True
    if stream == In.M:
        return _bit(flags, Col.W) or _bit(flags, Col.R)
    if stream == In.MC:
        return None
    if stream == In.V:
        return flags[Flag.VAR] != Var.FIXED
    if stream == In.Z:
        return flags[Flag.NOISE] == Noise.EXTERNAL
    if stream == In.H:
        return _bit(flags, Col.H)
    raise ValueError(f"unknown stream {stream!r}")


def _dtype_names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _check_lengths(op: str, **lists) -> None:
    want = {"ins": NUM_IN, "outs": NUM_OUT, "grads": NUM_IN, "flags": NUM_FLAGS,
            "scalars": NUM_SCALARS}
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)) or len(value) != want[name]:
            got = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
            raise ValueError(f"{op}: {name} must be a list of {want[name]} entries, got {got}")


def _check_flags(op: str, flags: Sequence[int]) -> None:
    for flag, enum in _FLAG_ENUMS.items():
        if flags[flag] not in {int(e) for e in enum}:
            raise ValueError(f"{op}: flags[{flag.name}]={flags[flag]} is not a {enum.__name__} "
                             f"({', '.join(f'{e.name}={int(e)}' for e in enum)})")
    if flags[Flag.TERMS] & ~_TERM_MASK or flags[Flag.TERMS] < 0:
        raise ValueError(f"{op}: flags[TERMS]={flags[Flag.TERMS]} has bits outside the term "
                         f"columns {[c.name for c in TERM_COLS]}")
    has_noise = _bit(flags, Col.S) or _bit(flags, Col.E)
    if has_noise != (flags[Flag.NOISE] != Noise.NONE):
        raise ValueError(f"{op}: flags[NOISE] must be Noise.NONE exactly when the S and E term "
                         f"bits are clear, got flags[NOISE]={Noise(flags[Flag.NOISE]).name} "
                         f"with flags[TERMS]={flags[Flag.TERMS]}")


def _check_x(op: str, x, dtypes) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{op}: ins[X] must be given")
    if x.dtype not in dtypes:
        raise TypeError(f"{op}: ins[X] must be {_dtype_names(dtypes)}, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{op}: ins[X] must have shape [B, C, ...], got {list(x.shape)}")


def _check_like(op: str, name: str, a: Tensor, x: Tensor, layout: Layout) -> None:
    """``a`` has x's shape, dtype and device and is sample-dense in ``layout``."""
    if a.shape != x.shape:
        raise ValueError(f"{op}: {name} must have the shape of ins[X] {list(x.shape)}, got "
                         f"{list(a.shape)}")
    if a.dtype != x.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of ins[X] ({x.dtype}), got {a.dtype}")
    if a.device != x.device:
        raise ValueError(f"{op}: {name} must be on the device of ins[X] ({x.device}), got "
                         f"{a.device}")
    if not is_sample_dense(a, layout):
        raise ValueError(f"{op}: {name} is not sample-dense in layout {layout.name} (strides "
                         f"{list(a.stride())} for shape {list(a.shape)})")


def _check_per_sample(op: str, name: str, a, B: int, dtype: torch.dtype,
                      device: torch.device) -> None:
    if not isinstance(a, Tensor):
        raise ValueError(f"{op}: {name} must be a tensor")
    if a.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {str(dtype).replace('torch.', '')}, got "
                        f"{a.dtype}")
    if a.dim() != 1 or a.shape[0] != B:
        raise ValueError(f"{op}: {name} must have shape [B]=[{B}], got {list(a.shape)}")
    if a.device != device:
        raise ValueError(f"{op}: {name} must be on {device}, got {a.device}")


def _present(op: str, name: str, value, needed: bool, why: str) -> None:
    if needed and value is None:
        raise ValueError(f"{op}: {name} must be given {why}")
    if not needed and value is not None:
        raise ValueError(f"{op}: {name} must be None unless {why[3:]}")


def _check_common(op: str, ins, t, seeds, table, thresh, gscale, flags, dtypes) -> None:
    """Everything the forward and the backward launch share."""
    _check_flags(op, flags)
    x = ins[In.X]
    _check_x(op, x, dtypes)
    layout = Layout(flags[Flag.LAYOUT])
    why = {In.M: "iff the W or R term bit is set", In.V: "iff flags[VAR] != Var.FIXED",
           In.Z: "iff flags[NOISE] == Noise.EXTERNAL", In.H: "iff the H term bit is set"}
    for s in In:
        needed = stream_needed(s, flags)
        if needed is None:                       # MC: a guided step also needs M
            needed = ins[s] is not None
            if needed and ins[In.M] is None:
                raise ValueError(f"{op}: ins[MC] (guided) needs ins[M] too")
        elif s != In.X:
            _present(op, f"ins[{s.name}]", ins[s], needed, why[s])
        if needed and s != In.X:
            _check_like(op, f"ins[{s.name}]", ins[s], x, layout)
    if not is_sample_dense(x, layout):
        raise ValueError(f"{op}: ins[X] is not sample-dense in layout {layout.name} (strides "
                         f"{list(x.stride())} for shape {list(x.shape)})")
    B = x.shape[0]
    _check_per_sample(op, "t", t, B, torch.int64, x.device)
    _present(op, "seeds", seeds, flags[Flag.NOISE] == Noise.PHILOX,
             "iff flags[NOISE] == Noise.PHILOX")
    if seeds is not None:
        _check_per_sample(op, "seeds", seeds, B, torch.int64, x.device)
    want = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not isinstance(table, Tensor) or table.dtype != want:
        raise TypeError(f"{op}: table must be {str(want).replace('torch.', '')} for "
                        f"{x.dtype} inputs, got "
                        f"{table.dtype if isinstance(table, Tensor) else type(table).__name__}")
    if table.dim() != 2 or table.shape[1] != NUM_COLS or table.shape[0] < 1 or \
            not table.is_contiguous():
        raise ValueError(f"{op}: table must be a contiguous [R, NUM_COLS={NUM_COLS}] tensor "
                         f"with R >= 1, got shape {list(table.shape)}")
    if table.device != x.device:
        raise ValueError(f"{op}: table must be on {x.device}, got {table.device}")
    _present(op, "thresh", thresh, flags[Flag.CLIP] == Clip.DYNAMIC,
             "iff flags[CLIP] == Clip.DYNAMIC")
    if thresh is not None:
        _check_per_sample(op, "thresh", thresh, B, torch.float32, x.device)
    if gscale is not None:
        if ins[In.MC] is None:
            raise ValueError(f"{op}: gscale must be None unless the step is guided (ins[MC])")
        _check_per_sample(op, "gscale", gscale, B, torch.float32, x.device)


def check_forward(op: str, ins, t, seeds, table, thresh, gscale, outs, flags, scalars,
                  dtypes=KERNEL_DTYPES) -> None:
    """The checks of ``step_forward_kernel`` (``dtypes``: what the backend takes)."""
    _check_lengths(op, ins=ins, outs=outs, flags=flags, scalars=scalars)
    _check_common(op, ins, t, seeds, table, thresh, gscale, flags, dtypes)
    x = ins[In.X]
    layout = Layout(flags[Flag.LAYOUT])
    if outs[Out.Y] is None:
        raise ValueError(f"{op}: outs[Y] must be given")
    for o in Out:
        if outs[o] is not None:
            _check_like(op, f"outs[{o.name}]", outs[o], x, layout)


def check_backward(op: str, ins, grad_y, grad_x0, t, seeds, table, thresh, gscale, grads,
                   flags, scalars, dtypes=KERNEL_DTYPES) -> None:
    """The checks of ``step_backward_kernel``."""
    _check_lengths(op, ins=ins, grads=grads, flags=flags, scalars=scalars)
    _check_common(op, ins, t, seeds, table, thresh, gscale, flags, dtypes)
    x = ins[In.X]
    layout = Layout(flags[Flag.LAYOUT])
    if not isinstance(grad_y, Tensor):
        raise ValueError(f"{op}: grad_y must be given")
    _check_like(op, "grad_y", grad_y, x, layout)
    if grad_x0 is not None:
        _check_like(op, "grad_x0", grad_x0, x, layout)
    for s in In:
        if grads[s] is None:
            continue
        if ins[s] is None:
            raise ValueError(f"{op}: grads[{s.name}] must be None: ins[{s.name}] is absent")
        _check_like(op, f"grads[{s.name}]", grads[s], x, layout)


def check_philox_uint32(op: str, seeds, t, numel, stream) -> None:
    """The checks of ``philox_uint32``."""
    if not isinstance(seeds, Tensor):
        raise ValueError(f"{op}: seeds must be a tensor")
    B = seeds.shape[0] if seeds.dim() >= 1 else 1
    _check_per_sample(op, "seeds", seeds, B, torch.int64, seeds.device)
    _check_per_sample(op, "t", t, B, torch.int64, seeds.device)
    if int(numel) < 0:
        raise ValueError(f"{op}: numel must be >= 0, got {numel}")
    if not 0 <= int(stream) < 2 ** 32:
        raise ValueError(f"{op}: stream must be in [0, 2^32), got {stream}")


def check_philox_normal(op: str, seeds, t, stream, layout, out,
                        dtypes=KERNEL_DTYPES) -> None:
    """The checks of ``philox_normal_kernel``."""
    if layout not in {int(e) for e in Layout}:
        raise ValueError(f"{op}: layout={layout} is not a Layout")
    if not isinstance(out, Tensor):
        raise ValueError(f"{op}: out must be a tensor")
    if out.dtype not in dtypes:
        raise TypeError(f"{op}: out must be {_dtype_names(dtypes)}, got {out.dtype}")
    if out.dim() < 2:
        raise ValueError(f"{op}: out must have shape [B, C, ...], got {list(out.shape)}")
    if not is_sample_dense(out, Layout(layout)):
        raise ValueError(f"{op}: out is not sample-dense in layout {Layout(layout).name} "
                         f"(strides {list(out.stride())} for shape {list(out.shape)})")
    B = out.shape[0]
    _check_per_sample(op, "seeds", seeds, B, torch.int64, out.device)
    _check_per_sample(op, "t", t, B, torch.int64, out.device)
    if not 0 <= int(stream) < 2 ** 32:
        raise ValueError(f"{op}: stream must be in [0, 2^32), got {stream}")
