"""The fused step as ``torch.library`` custom ops, with fake (meta) and autograd rules.

``fused_ddpm::step`` (functional), ``fused_ddpm::step_out`` (writes into given tensors) and
``fused_ddpm::step_backward`` take already-validated arguments (see :mod:`fused_ddpm.step`
for the user-facing function) and a ``backend`` name, bring every tensor into one layout
the kernels accept (``docs/kernels.md``) and call that backend's launcher. Because they are
opaque custom ops, ``torch.compile(fullgraph=True)`` keeps them whole, and because they read
t and seeds from device tensors and never sync, they can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _extension

CONTIGUOUS, CHANNELS_LAST = 0, 1


# ---------------------------------------------------------------------------- layouts
def _cl_format(dim: int):
    return torch.channels_last if dim == 4 else torch.channels_last_3d


def _dense_strides(shape, layout: int) -> List[int]:
    """Strides of a dense sample of ``shape`` ([C, *spatial]) in ``layout``."""
    # innermost first: contiguous walks the last dim first; channels_last walks C first,
    # then the spatial dims from last to first.
    order = range(len(shape) - 1, -1, -1)
    if layout == CHANNELS_LAST:
        order = [0] + list(range(len(shape) - 1, 0, -1))
    strides = [0] * len(shape)
    acc = 1
    for d in order:
        strides[d] = acc
        acc *= shape[d]
    return strides


def is_sample_dense(t: Tensor, layout: int) -> bool:
    """Whether every sample t[b] is dense in ``layout`` (only sizes > 1 constrain strides)."""
    if layout == CONTIGUOUS and t.is_contiguous():
        return True                                   # the common case, decided in C++
    shape = t.shape[1:]
    want = _dense_strides(shape, layout)
    return all(s == w for n, s, w in zip(shape, t.stride()[1:], want) if n > 1)


def layout_of(x: Tensor) -> int:
    """The layout the kernels will use for a step on ``x``."""
    if x.is_contiguous() or is_sample_dense(x, CONTIGUOUS):
        return CONTIGUOUS
    if x.dim() in (4, 5) and is_sample_dense(x, CHANNELS_LAST):
        return CHANNELS_LAST
    return CONTIGUOUS


def to_layout(t: Optional[Tensor], layout: int) -> Optional[Tensor]:
    """``t`` itself when sample-dense in ``layout``, else a copy that is."""
    if t is None or is_sample_dense(t, layout):
        return t
    if layout == CHANNELS_LAST:
        return t.contiguous(memory_format=_cl_format(t.dim()))
    return t.contiguous()


def empty_in_layout(x: Tensor, layout: int, shape=None) -> Tensor:
    shape = list(x.shape if shape is None else shape)
    if layout == CHANNELS_LAST:
        return torch.empty(shape, dtype=x.dtype, device=x.device,
                           memory_format=_cl_format(len(shape)))
    return torch.empty(shape, dtype=x.dtype, device=x.device)


def split_model_output(model_output: Tensor, channels: int, var_mode: int, layout: int
                       ) -> Tuple[Tensor, Optional[Tensor]]:
    """(m, v) views (or layout copies) of the model output: v is the second half for learned
    variances, else None."""
    if var_mode == 0:
        return to_layout(model_output, layout), None
    return (to_layout(model_output[:, :channels], layout),
            to_layout(model_output[:, channels:], layout))


# ---------------------------------------------------------------------------- C++ op metadata
def _register_extension_fakes() -> None:
    """Fake (meta) impls for the compiled kernels' ops, so they trace under torch.compile
    and pass opcheck: the two step kernels only write their out-arguments."""
    if not _extension.has_op("step_forward_kernel"):
        return
    torch.library.register_fake("fused_ddpm::step_forward_kernel")(lambda *args: None)
    torch.library.register_fake("fused_ddpm::step_backward_kernel")(lambda *args: None)

    @torch.library.register_fake("fused_ddpm::philox_uint32")
    def _(seeds, t, numel):
        return seeds.new_empty((seeds.shape[0], numel), dtype=torch.int64)


_register_extension_fakes()


# ---------------------------------------------------------------------------- launchers
def _launch_forward(backend, *args) -> None:
    if backend == "triton":
        from .triton_kernels import step_forward
        step_forward(*args)
    else:
        torch.ops.fused_ddpm.step_forward_kernel(*args)


def _launch_backward(backend, *args) -> None:
    if backend == "triton":
        from .triton_kernels import step_backward
        step_backward(*args)
    else:
        torch.ops.fused_ddpm.step_backward_kernel(*args)


def forward_into(x, model_output, t, table, noise, seeds, thresh, clip, clip_mode, var_mode,
                 backend, y: Tensor, x0: Optional[Tensor]) -> None:
    """Run the forward kernel writing y (and x0); y/x0 may be in any layout."""
    layout = layout_of(x)
    xk = to_layout(x, layout)
    m, v = split_model_output(model_output, x.shape[1], var_mode, layout)
    noise = to_layout(noise, layout)
    yk = y if is_sample_dense(y, layout) else empty_in_layout(x, layout)
    x0k = x0 if (x0 is None or is_sample_dense(x0, layout)) else empty_in_layout(x, layout)
    if x.numel():
        _launch_forward(backend, xk, m, v, noise, seeds, t, table, thresh, yk, x0k,
                        float(clip), int(clip_mode), int(var_mode))
    if yk is not y:
        y.copy_(yk)
    if x0k is not x0:
        x0.copy_(x0k)


# ---------------------------------------------------------------------------- ops
def forward(x: Tensor, model_output: Tensor, t: Tensor, table: Tensor, noise: Optional[Tensor],
            seeds: Optional[Tensor], thresh: Optional[Tensor], clip: float, clip_mode: int,
            var_mode: int, return_x0: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """The body of ``fused_ddpm::step`` as a plain function: eager callers that need neither
    autograd nor tracing call it directly and skip the custom-op dispatch (tens of µs)."""
    layout = layout_of(x)
    y = empty_in_layout(x, layout)
    x0 = empty_in_layout(x, layout) if return_x0 else None
    forward_into(x, model_output, t, table, noise, seeds, thresh, clip, clip_mode, var_mode,
                 backend, y, x0)
    return y, (x0 if x0 is not None else x.new_empty(0))


@torch.library.custom_op("fused_ddpm::step", mutates_args=())
def step(x: Tensor, model_output: Tensor, t: Tensor, table: Tensor, noise: Optional[Tensor],
         seeds: Optional[Tensor], thresh: Optional[Tensor], clip: float, clip_mode: int,
         var_mode: int, return_x0: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """Functional fused step: returns (y, x0); x0 is an empty [0] tensor unless return_x0."""
    return forward(x, model_output, t, table, noise, seeds, thresh, clip, clip_mode, var_mode,
                   return_x0, backend)


@step.register_fake
def _(x, model_output, t, table, noise, seeds, thresh, clip, clip_mode, var_mode, return_x0,
      backend):
    layout = layout_of(x)
    y = empty_in_layout(x, layout)
    return y, (empty_in_layout(x, layout) if return_x0 else x.new_empty(0))


@torch.library.custom_op("fused_ddpm::step_out", mutates_args=("out", "x0_out"))
def step_out(x: Tensor, model_output: Tensor, t: Tensor, table: Tensor, noise: Optional[Tensor],
             seeds: Optional[Tensor], thresh: Optional[Tensor], clip: float, clip_mode: int,
             var_mode: int, backend: str, out: Tensor, x0_out: Optional[Tensor]) -> None:
    """The fused step writing into ``out`` (and ``x0_out``); no autograd."""
    forward_into(x, model_output, t, table, noise, seeds, thresh, clip, clip_mode, var_mode,
                 backend, out, x0_out)


@step_out.register_fake
def _(x, model_output, t, table, noise, seeds, thresh, clip, clip_mode, var_mode, backend, out,
      x0_out):
    return None


@torch.library.custom_op("fused_ddpm::step_backward", mutates_args=())
def step_backward(grad_y: Tensor, grad_x0: Optional[Tensor], x: Tensor, model_output: Tensor,
                  t: Tensor, table: Tensor, noise: Optional[Tensor], seeds: Optional[Tensor],
                  thresh: Optional[Tensor], clip: float, clip_mode: int, var_mode: int,
                  backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (x, model_output, noise) of the fused step; grad_noise is [0] without noise."""
    layout = layout_of(x)
    C = x.shape[1]
    xk = to_layout(x, layout)
    m, v = split_model_output(model_output, C, var_mode, layout)
    noise_k = to_layout(noise, layout)
    gy = to_layout(grad_y, layout)
    gx0 = to_layout(grad_x0, layout)
    grad_x = empty_in_layout(x, layout)
    grad_mo = empty_in_layout(x, layout, model_output.shape)
    if var_mode == 0:
        grad_m, grad_v = grad_mo, None
    else:
        grad_m, grad_v = grad_mo[:, :C], grad_mo[:, C:]
        if not (is_sample_dense(grad_m, layout) and is_sample_dense(grad_v, layout)):
            grad_m, grad_v = empty_in_layout(x, layout), empty_in_layout(x, layout)
    grad_noise = empty_in_layout(x, layout) if noise is not None else None
    if x.numel():
        _launch_backward(backend, gy, gx0, xk, m, v, noise_k, seeds, t, table, thresh,
                         grad_x, grad_m, grad_v, grad_noise, float(clip), int(clip_mode),
                         int(var_mode))
    if var_mode != 0 and grad_m.data_ptr() != grad_mo.data_ptr():
        grad_mo = torch.cat([grad_m, grad_v], dim=1)
    return grad_x, grad_mo, (grad_noise if grad_noise is not None else x.new_empty(0))


@step_backward.register_fake
def _(grad_y, grad_x0, x, model_output, t, table, noise, seeds, thresh, clip, clip_mode,
      var_mode, backend):
    layout = layout_of(x)
    gn = empty_in_layout(x, layout) if noise is not None else x.new_empty(0)
    return (empty_in_layout(x, layout), empty_in_layout(x, layout, model_output.shape), gn)


def _setup_context(ctx, inputs, output):
    (x, model_output, t, table, noise, seeds, thresh, clip, clip_mode, var_mode, return_x0,
     backend) = inputs
    ctx.save_for_backward(x, model_output, t, table, noise, seeds, thresh)
    ctx.args = (clip, clip_mode, var_mode, return_x0, backend)


def _backward(ctx, grad_y, grad_x0):
    x, model_output, t, table, noise, seeds, thresh = ctx.saved_tensors
    clip, clip_mode, var_mode, return_x0, backend = ctx.args
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    gx0 = grad_x0 if (return_x0 and grad_x0 is not None) else None
    gx, gm, gn = step_backward(grad_y, gx0, x, model_output, t, table, noise, seeds, thresh,
                               clip, clip_mode, var_mode, backend)
    return (gx, gm, None, None, gn if noise is not None else None, None, None, None, None,
            None, None, None)


step.register_autograd(_backward, setup_context=_setup_context)
