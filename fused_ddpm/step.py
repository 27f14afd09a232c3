"""The user-facing fused step: :func:`ddpm_step` and :class:`DDPMStepFunction`."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops, reference
from .backends import resolve
from .coefficients import CLIP_DYNAMIC, COL_U, COL_W, StepCoefficients
from .validation import check_step_inputs

SEED_HIGH = 2 ** 63 - 1


def draw_seeds(batch: int, device: torch.device,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """int64 seeds ``[B]`` drawn on ``device`` from ``generator`` (torch's default if None),
    so ``torch.manual_seed`` makes in-kernel noise reproducible without a host sync."""
    dev = generator.device if generator is not None else device
    return torch.randint(0, SEED_HIGH, (batch,), dtype=torch.int64, device=dev,
                         generator=generator).to(device)


def threshold_scale(x: Tensor, model_output: Tensor, t: Tensor, table: Tensor,
                    coeffs: StepCoefficients) -> Tensor:
    """Per-sample dynamic-thresholding scale s ``[B]`` (float32) from x̂0 = u·x + w·m.

    A separate small pass before the fused step (it needs a quantile over each sample)."""
    rows = table[t.clamp(0, table.shape[0] - 1)].float()
    shape = (-1,) + (1,) * (x.dim() - 1)
    m = model_output[:, :x.shape[1]]
    x0 = rows[:, COL_U].reshape(shape) * x.float() + rows[:, COL_W].reshape(shape) * m.float()
    cfg = coeffs.config
    return reference.dynamic_threshold_scale(x0, cfg.dynamic_thresholding_ratio,
                                             cfg.sample_max_value).float()


def _prepare(x_t, model_output, t, coeffs, noise, seeds, backend, generator):
    t, seeds = check_step_inputs(x_t, model_output, t, coeffs, noise=noise, seeds=seeds)
    name = resolve(backend, x_t.device, x_t.dtype)
    if noise is None and seeds is None:
        seeds = draw_seeds(x_t.shape[0], x_t.device, generator)
    if noise is not None and noise.dtype != x_t.dtype:
        noise = noise.to(x_t.dtype)
    return t, seeds, noise, name


def _kernel_args(x_t: Tensor, model_output: Tensor, t: Tensor, coeffs: StepCoefficients):
    """(table, thresh, clip, clip_mode, var_mode) for the ops, per docs/kernels.md."""
    cfg = coeffs.config
    table = coeffs.table_on(x_t.device, torch.float64 if x_t.dtype == torch.float64
                            else torch.float32)
    thresh = (threshold_scale(x_t, model_output, t, table, coeffs)
              if cfg.clip_mode == CLIP_DYNAMIC else None)
    return table, thresh, float(cfg.clip_sample_range or 0.0), cfg.clip_mode, cfg.variance_mode


def ddpm_step(x_t: Tensor,
              model_output: Tensor,
              t: Union[int, Tensor],
              coeffs: StepCoefficients,
              noise: Optional[Tensor] = None,
              seeds: Union[None, int, Tensor] = None,
              return_x0: bool = False,
              out: Optional[Tensor] = None,
              backend: str = "auto",
              generator: Optional[torch.Generator] = None,
              ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """One fused DDPM/DDIM step x_t → x_{t′} (t′: the next scheduled timestep below t).

    Args:
        x_t: sample ``[B, C, ...]``, float16/bfloat16/float32 (float64: CPU kernel or reference).
        model_output: ``[B, C, ...]`` (``[B, 2C, ...]`` for learned variances), x_t's dtype.
        t: the actual timestep: an int, or an integer tensor ``[B]`` / ``[]`` (on the device:
            no host sync, graph-capturable).
        coeffs: from :func:`fused_ddpm.step_coefficients`.
        noise: external z (x_t's shape). Or ``seeds`` (int, or int64 ``[B]`` on the device) for
            in-kernel Philox noise. With neither, seeds are drawn from ``generator`` (torch's
            default generator when None).
        return_x0: also return x̂0 (clipped/thresholded, as diffusers' ``pred_original_sample``).
        out: write x_{t′} here (x_t's shape/dtype/device; not differentiable).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        x_{t′} with x_t's shape, dtype and memory format; and x̂0 if ``return_x0``.
        Differentiable w.r.t. x_t, model_output and noise.
    """
    t, seeds, noise, name = _prepare(x_t, model_output, t, coeffs, noise, seeds, backend,
                                     generator)
    if name == "reference":
        res = reference.ddpm_step(x_t, model_output, t, coeffs, noise=noise, seeds=seeds,
                                  return_x0=return_x0)
        if out is None:
            return res
        y = res[0] if return_x0 else res
        _check_out(out, x_t, model_output, noise)
        out.copy_(y)
        return (out, res[1]) if return_x0 else out
    table, thresh, clip, clip_mode, var_mode = _kernel_args(x_t, model_output, t, coeffs)
    # Eager calls that need neither autograd nor tracing skip the custom-op dispatcher
    # (tens of µs of Python per call); torch.compile and autograd go through the ops.
    tracing = torch.compiler.is_compiling()
    if out is not None:
        _check_out(out, x_t, model_output, noise)
        x0 = torch.empty_like(x_t) if return_x0 else None
        run_out = ops.step_out if tracing else ops.forward_into
        run_out(x_t, model_output, t, table, noise, seeds, thresh, clip, clip_mode, var_mode,
                name, out, x0)
        return (out, x0) if return_x0 else out
    run = ops.step if tracing or _needs_grad(x_t, model_output, noise) else ops.forward
    y, x0 = run(x_t, model_output, t, table, noise, seeds, thresh, clip, clip_mode, var_mode,
                return_x0, name)
    return (y, x0) if return_x0 else y


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


def _check_out(out: Tensor, x_t: Tensor, *others: Optional[Tensor]) -> None:
    """out= must match x_t and must not overlap itself or any input."""
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != x_t.shape or out.dtype != x_t.dtype or out.device != x_t.device:
        raise ValueError(f"out must match x_t (shape {list(x_t.shape)}, {x_t.dtype}, "
                         f"{x_t.device}), got shape {list(out.shape)}, {out.dtype}, {out.device}")
    if torch.is_grad_enabled() and out.requires_grad:
        raise RuntimeError("out= does not support automatic differentiation (out requires grad)")
    if any(st == 0 and n > 1 for st, n in zip(out.stride(), out.shape)):
        raise ValueError("out must not have overlapping memory (it is an expanded tensor)")
    for other in (x_t,) + others:
        if other is not None and out.numel() and other.numel() and \
                out.untyped_storage().data_ptr() == other.untyped_storage().data_ptr():
            raise ValueError("out must not share memory with an input (x_t, model_output, noise)")


class DDPMStepFunction(torch.autograd.Function):
    """``torch.autograd.Function`` form of the fused step (same maths as :func:`ddpm_step`).

    ``DDPMStepFunction.apply(x_t, model_output, t, coeffs, noise=None, seeds=None,
    backend="auto")`` returns x_{t′}. The backward is the fused backward kernel; in-kernel
    noise is recomputed from the seeds there, never stored.
    """

    @staticmethod
    def forward(ctx, x_t, model_output, t, coeffs, noise=None, seeds=None, backend="auto"):
        t, seeds, noise, name = _prepare(x_t, model_output, t, coeffs, noise, seeds, backend,
                                         None)
        if name == "reference":
            raise RuntimeError("DDPMStepFunction runs a fused kernel, and no kernel backend "
                               f"(cuda, triton, cpu) takes {x_t.dtype} tensors on {x_t.device} "
                               "here; use fused_ddpm.reference.ddpm_step")
        table, thresh, clip, clip_mode, var_mode = _kernel_args(x_t, model_output, t, coeffs)
        y, _ = ops.forward(x_t, model_output, t, table, noise, seeds, thresh, clip, clip_mode,
                           var_mode, False, name)
        ctx.save_for_backward(x_t, model_output, t, table, noise, seeds, thresh)
        ctx.args = (clip, clip_mode, var_mode, name)
        ctx.has_noise = noise is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_t, model_output, t, table, noise, seeds, thresh = ctx.saved_tensors
        clip, clip_mode, var_mode, name = ctx.args
        gx, gm, gn = ops.step_backward(grad_y, None, x_t, model_output, t, table, noise, seeds,
                                       thresh, clip, clip_mode, var_mode, name)
        return gx, gm, None, None, (gn if ctx.has_noise else None), None, None
