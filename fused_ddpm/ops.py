"""The fused step as ``torch.library`` custom ops, with fake (meta) and autograd rules.

The ops take a launch exactly as ``docs/kernels.md`` describes it — the input streams
(indexed by :class:`~fused_ddpm.contract.In`, already sample-dense in the layout of
``flags[LAYOUT]``), t, seeds, the table, thresh, gscale, flags and scalars — plus the
backend's name, allocate the outputs in that layout and call the backend's launcher from
its record (:mod:`fused_ddpm.backends`).

* ``fused_ddpm::step`` → (y, x0); differentiable in every stream. Its backward is itself
  a registered op, ``fused_ddpm::step_backward`` (one backward implementation: the
  :class:`~fused_ddpm.step.DDPMStepFunction` uses it too). In eager mode, on plain tensors,
  :func:`step_differentiable` runs the same body, context and backward as a plain autograd
  Function, and the backward calls the body of ``step_backward`` directly: torch.library's
  per-call wrappers cost tens of µs.
* ``fused_ddpm::step_out`` writes y (and x0) into given tensors (no autograd).
* ``fused_ddpm::philox_normal`` writes in-kernel normals (x_T of the sampling loop).

Because the streams are a list, the ops carry them as ``Tensor[]`` of the *present*
streams plus a bit mask ``present`` (bit i: ``ins[In(i)]`` is given); :func:`pack` and
:func:`unpack` convert. Opaque custom ops keep ``torch.compile(fullgraph=True)`` whole, and
since they read t and seeds from device tensors and never sync, they can be captured in a
CUDA graph.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _extension, backends
from .contract import Flag, In, Layout
from .layout import empty_in_layout, is_sample_dense, layout_of, to_layout

__all__ = ["pack", "unpack", "step", "step_differentiable", "step_out", "step_backward",
           "philox_normal", "launch_forward", "launch_backward"]


# ----------------------------------------------------------------------------- streams
def pack(ins: Sequence[Optional[Tensor]]) -> Tuple[List[Tensor], int]:
    """(the present streams in In order, the bit mask of which are present)."""
    present = 0
    streams = []
    for s, a in zip(In, ins):
        if a is not None:
            present |= 1 << int(s)
            streams.append(a)
    return streams, present


def unpack(streams: Sequence[Tensor], present: int) -> List[Optional[Tensor]]:
    """The ``ins`` list (``NUM_IN`` entries, None where absent) of :func:`pack`'s output."""
    it = iter(streams)
    return [next(it) if present >> int(s) & 1 else None for s in In]


def launch_forward(backend: str, ins, t, seeds, table, thresh, gscale, outs, flags,
                   scalars) -> None:
    """``step_forward_kernel`` on ``backend`` (nothing to do for an empty tensor)."""
    if ins[In.X].numel():
        backends.get(backend).launchers.forward(ins, t, seeds, table, thresh, gscale, outs,
                                                flags, scalars)


def launch_backward(backend: str, ins, grad_y, grad_x0, t, seeds, table, thresh, gscale,
                    grads, flags, scalars) -> None:
    """``step_backward_kernel`` on ``backend``."""
    if ins[In.X].numel():
        backends.get(backend).launchers.backward(ins, grad_y, grad_x0, t, seeds, table, thresh,
                                                 gscale, grads, flags, scalars)


# ----------------------------------------------------------------------------- C++ fakes
def _register_extension_fakes() -> None:
    """Fake (meta) impls of the compiled kernels' ops, so they trace under torch.compile
    and pass opcheck: the step and noise kernels only write their out-arguments."""
    if not (backends.is_available("cpu") or backends.is_available("cuda")):
        return
    for name in ("step_forward_kernel", "step_backward_kernel", "philox_normal_kernel"):
        torch.library.register_fake(f"fused_ddpm::{name}")(lambda *args: None)

    @torch.library.register_fake("fused_ddpm::philox_uint32")
    def _(seeds, t, numel, stream):
        return seeds.new_empty((seeds.shape[0], numel), dtype=torch.int64)


_extension.load()
_register_extension_fakes()


# ----------------------------------------------------------------------------- forward
def _layout(flags: Sequence[int]) -> Layout:
    return Layout(flags[Flag.LAYOUT])


def forward(ins, t, seeds, table, thresh, gscale, flags, scalars, return_x0: bool,
            backend: str) -> Tuple[Tensor, Optional[Tensor]]:
    """The body of ``fused_ddpm::step``: allocate y (and x0) in the layout and launch."""
    x = ins[In.X]
    y = empty_in_layout(x, _layout(flags))
    x0 = empty_in_layout(x, _layout(flags)) if return_x0 else None
    launch_forward(backend, ins, t, seeds, table, thresh, gscale, [y, x0], flags, scalars)
    return y, x0


def forward_into(ins, t, seeds, table, thresh, gscale, flags, scalars, backend: str,
                 y: Tensor, x0: Optional[Tensor]) -> None:
    """Launch writing into y (and x0), which may be in any layout (a copy when not dense)."""
    layout = _layout(flags)
    outs = [a if a is None or is_sample_dense(a, layout) else empty_in_layout(a, layout)
            for a in (y, x0)]
    launch_forward(backend, ins, t, seeds, table, thresh, gscale, outs, flags, scalars)
    for want, got in zip((y, x0), outs):
        if got is not want:
            want.copy_(got)


def step_impl(streams: List[Tensor], present: int, t: Tensor, seeds: Optional[Tensor],
              table: Tensor, thresh: Optional[Tensor], gscale: Optional[Tensor],
              flags: List[int], scalars: List[float], return_x0: bool, backend: str
              ) -> Tuple[Tensor, Tensor]:
    """Functional fused step: (y, x0); x0 is an empty ``[0]`` tensor unless return_x0."""
    y, x0 = forward(unpack(streams, present), t, seeds, table, thresh, gscale, flags, scalars,
                    return_x0, backend)
    return y, (x0 if x0 is not None else y.new_empty(0))


step = torch.library.custom_op("fused_ddpm::step", mutates_args=())(step_impl)


@step.register_fake
def _(streams, present, t, seeds, table, thresh, gscale, flags, scalars, return_x0, backend):
    x = unpack(streams, present)[In.X]
    y = empty_in_layout(x, _layout(flags))
    return y, (empty_in_layout(x, _layout(flags)) if return_x0 else x.new_empty(0))


@torch.library.custom_op("fused_ddpm::step_out", mutates_args=("y", "x0"))
def step_out(streams: List[Tensor], present: int, t: Tensor, seeds: Optional[Tensor],
             table: Tensor, thresh: Optional[Tensor], gscale: Optional[Tensor],
             flags: List[int], scalars: List[float], backend: str, y: Tensor,
             x0: Optional[Tensor]) -> None:
    """The fused step writing into ``y`` (and ``x0``); no autograd."""
    forward_into(unpack(streams, present), t, seeds, table, thresh, gscale, flags, scalars,
                 backend, y, x0)


@step_out.register_fake
def _(streams, present, t, seeds, table, thresh, gscale, flags, scalars, backend, y, x0):
    return None


# ----------------------------------------------------------------------------- backward
def _step_backward(streams: List[Tensor], present: int, wanted: int, grad_y: Tensor,
                   grad_x0: Optional[Tensor], t: Tensor, seeds: Optional[Tensor],
                   table: Tensor, thresh: Optional[Tensor], gscale: Optional[Tensor],
                   flags: List[int], scalars: List[float], backend: str) -> List[Tensor]:
    """Gradients of the present streams (in ``streams`` order); a stream whose bit in
    ``wanted`` is clear gets an empty ``[0]`` tensor."""
    ins = unpack(streams, present)
    layout = _layout(flags)
    x = ins[In.X]
    grads = [empty_in_layout(x, layout) if a is not None and wanted >> int(s) & 1 else None
             for s, a in zip(In, ins)]
    launch_backward(backend, ins, to_layout(grad_y, layout), to_layout(grad_x0, layout), t,
                    seeds, table, thresh, gscale, grads, flags, scalars)
    return [g if g is not None else x.new_empty(0) for g, a in zip(grads, ins)
            if a is not None]


step_backward = torch.library.custom_op("fused_ddpm::step_backward",
                                        mutates_args=())(_step_backward)


def _eager(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether these are plain tensors with no compiler, tracer or dispatch mode watching:
    then an op's body may run as a Python call, without the dispatcher and torch.library's
    wrappers around it (tens of µs, as much as the kernel at SD-latent sizes)."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and all(a is None or type(a) is Tensor for a in tensors))


@step_backward.register_fake
def _(streams, present, wanted, grad_y, grad_x0, t, seeds, table, thresh, gscale, flags,
      scalars, backend):
    ins = unpack(streams, present)
    x = ins[In.X]
    return [empty_in_layout(x, _layout(flags)) if wanted >> int(s) & 1 else x.new_empty(0)
            for s, a in zip(In, ins) if a is not None]


def _setup_context(ctx, inputs, output):
    (streams, present, t, seeds, table, thresh, gscale, flags, scalars, return_x0,
     backend) = inputs
    ctx.save_for_backward(*streams, t, seeds, table, thresh, gscale)
    ctx.n = len(streams)
    ctx.args = (present, flags, scalars, return_x0, backend)
    present_streams = [s for s in In if present >> int(s) & 1]
    # needs_input_grad starts with one entry per element of the streams list
    ctx.wanted = sum(1 << int(s) for s, need in zip(present_streams, ctx.needs_input_grad)
                     if need)


def _backward(ctx, grad_y, grad_x0):
    saved = ctx.saved_tensors
    streams, (t, seeds, table, thresh, gscale) = list(saved[:ctx.n]), saved[ctx.n:]
    present, flags, scalars, return_x0, backend = ctx.args
    if grad_y is None:
        grad_y = torch.zeros_like(streams[0])
    gx0 = grad_x0 if (return_x0 and grad_x0 is not None and grad_x0.numel()) else None
    run = _step_backward if _eager([grad_y, gx0, t, seeds, *streams]) else step_backward
    grads = run(streams, present, ctx.wanted, grad_y, gx0, t, seeds, table, thresh, gscale,
                flags, scalars, backend)
    present_streams = [s for s in In if present >> int(s) & 1]
    out = [g if ctx.wanted >> int(s) & 1 else None for s, g in zip(present_streams, grads)]
    return out, None, None, None, None, None, None, None, None, None, None


step.register_autograd(_backward, setup_context=_setup_context)

_NUM_STEP_ARGS = 10     # the arguments of fused_ddpm::step after the streams list


class _EagerStep(torch.autograd.Function):
    """``fused_ddpm::step`` with its autograd rule in eager mode: the op's body, context and
    backward (:func:`_setup_context`, :func:`_backward`) as a plain autograd Function,
    without torch.library's per-call autograd wrapper (its pytree work costs as much as the
    kernel at SD-latent sizes). Arguments: the streams, then the op's other arguments."""

    @staticmethod
    def forward(*args):
        streams, rest = args[:-_NUM_STEP_ARGS], args[-_NUM_STEP_ARGS:]
        return step_impl(list(streams), *rest)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # needs_input_grad starts with one entry per stream, as _setup_context expects
        _setup_context(ctx, (list(inputs[:-_NUM_STEP_ARGS]), *inputs[-_NUM_STEP_ARGS:]),
                       output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_x0):
        grads = _backward(ctx, grad_y, grad_x0)[0]
        return (*grads, *[None] * _NUM_STEP_ARGS)


def step_differentiable(streams: List[Tensor], present: int, t: Tensor,
                        seeds: Optional[Tensor], table: Tensor, thresh: Optional[Tensor],
                        gscale: Optional[Tensor], flags: List[int], scalars: List[float],
                        return_x0: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """``fused_ddpm::step`` (what torch.compile, tracers and dispatch modes see), or, for
    plain tensors in eager mode, the same step through :class:`_EagerStep`."""
    args = (present, t, seeds, table, thresh, gscale, flags, scalars, return_x0, backend)
    if _eager([t, seeds, table, thresh, gscale, *streams]):
        return _EagerStep.apply(*streams, *args)
    return step(streams, *args)


# ----------------------------------------------------------------------------- noise
@torch.library.custom_op("fused_ddpm::philox_normal", mutates_args=("out",))
def philox_normal(seeds: Tensor, t: Tensor, stream: int, backend: str, out: Tensor) -> None:
    """Writes the in-kernel normals of every element of ``out`` (``[B, C, ...]``, any
    layout: written through a dense copy when needed) for per-sample ``seeds`` and rows
    ``t`` (int64 ``[B]``), on ``backend``."""
    layout = layout_of(out)
    dense = out if is_sample_dense(out, layout) else empty_in_layout(out, layout)
    if out.numel():
        backends.get(backend).launchers.philox_normal(seeds, t, stream, int(layout), dense)
    if dense is not out:
        out.copy_(dense)


@philox_normal.register_fake
def _(seeds, t, stream, backend, out):
    return None
