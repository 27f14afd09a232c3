"""User-level argument checks shared by every backend and by the reference, so every path
fails with the same message naming the argument: ``TypeError`` for a wrong type or dtype,
``ValueError`` for a wrong value or shape."""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .coefficients import StepCoefficients

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["FLOAT_DTYPES", "debug_checks_enabled", "check_tensor", "normalize_t",
           "normalize_seeds", "check_step_inputs", "check_out", "check_guidance",
           "guided_halves"]


def debug_checks_enabled() -> bool:
    """``FUSED_DDPM_DEBUG=1`` turns on checks that need a host sync (t range on the device)."""
    return os.environ.get("FUSED_DDPM_DEBUG", "0") not in ("", "0")


def check_tensor(name: str, value) -> None:
    """``value`` is a floating tensor of a dtype the step takes."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got "
                        f"{value.dtype}")


def _integer(value) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def normalize_t(t, batch: int, device: torch.device, num_rows: int,
                coeffs: Optional[StepCoefficients] = None) -> Tensor:
    """t as an int64 tensor ``[B]`` on ``device`` (a scalar is expanded, stride 0).

    ``t`` is an int (Python or NumPy), or an integer tensor ``[]`` / ``[1]`` / ``[B]``, or a
    NumPy integer array, in ``[0, num_rows)``. Range-checked on the host when it is an int or
    a CPU tensor; on the device only with ``FUSED_DDPM_DEBUG=1`` (the check would sync). An
    int becomes a view of ``coeffs``' cached index tensor when given (no kernel, no copy).
    """
    R = num_rows
    if isinstance(t, bool):
        raise TypeError("t must be an int or an integer tensor, got bool")
    if _integer(t):
        t = int(t)
        if not 0 <= t < R:  # a Python int is a compile-time constant, so this check is free
            raise ValueError(f"t={t} is out of range [0, {R})")
        if coeffs is None or torch.compiler.is_compiling():
            return torch.full((), t, dtype=torch.int64, device=device).expand(batch)
        return coeffs.row_index(t, device).expand(batch)
    if type(t).__module__ == "numpy":
        t = torch.as_tensor(t)
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be an int or an integer tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"t must be an integer tensor, got dtype {t.dtype}")
    if t.dim() == 1 and t.shape[0] == 1 and batch != 1:
        t = t.reshape(())
    if not (t.dim() == 0 or (t.dim() == 1 and t.shape[0] == batch)):
        raise ValueError(f"t must have shape [] or [B]=[{batch}], got {list(t.shape)}")
    # Value checks read t on the host: skipped while torch.compile traces (the kernels clamp
    # the row index, so an out-of-range t can never read outside the table).
    if (t.device.type == "cpu" or debug_checks_enabled()) and not torch.compiler.is_compiling():
        if t.numel():
            lo, hi = (int(v) for v in t.aminmax())
            if lo < 0 or hi >= R:
                raise ValueError(f"t is out of range [0, {R}): min {lo}, max {hi}")
    return t.to(device=device, dtype=torch.int64).expand(batch)


def normalize_seeds(seeds, batch: int, device: torch.device) -> Tensor:
    """Seeds as an int64 tensor ``[B]`` on ``device``; a scalar expands to every sample.

    An int seed (Python or NumPy, any 64-bit value, signed or not) is made into a tensor on
    every call: a tiny fill, safe on every stream."""
    if isinstance(seeds, bool):
        raise TypeError("seeds must be an int or an int64 tensor, got bool")
    if _integer(seeds):
        seeds = int(seeds)
        if not -(2 ** 63) <= seeds < 2 ** 64:
            raise ValueError(f"seeds={seeds} does not fit in 64 bits")
        if seeds >= 2 ** 63:
            seeds -= 2 ** 64
        return torch.full((), seeds, dtype=torch.int64, device=device).expand(batch)
    if not isinstance(seeds, Tensor):
        raise TypeError(f"seeds must be an int or an int64 tensor, got {type(seeds).__name__}")
    if seeds.dtype != torch.int64:
        raise TypeError(f"seeds must be an int64 tensor, got dtype {seeds.dtype}")
    if not (seeds.dim() == 0 or (seeds.dim() == 1 and seeds.shape[0] == batch)):
        raise ValueError(f"seeds must have shape [] or [B]=[{batch}], got {list(seeds.shape)}")
    return seeds.to(device).expand(batch)


def guided_halves(model_output, batch: int) -> Tuple[Tensor, Tensor]:
    """(unconditional, conditional) model outputs ``[B, ...]`` of a guided step: the two
    halves of a ``[2B, ...]`` tensor (unconditional first, diffusers' ``chunk(2)`` order,
    as views), or the given pair."""
    if isinstance(model_output, (tuple, list)):
        return model_output[0], model_output[1]
    return model_output[:batch], model_output[batch:]


def check_guidance(guidance_scale, guidance_rescale) -> None:
    """``guidance_scale``: None or a finite real; ``guidance_rescale``: a real in [0, 1],
    nonzero only with a guidance scale."""
    if guidance_scale is not None:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
            raise TypeError(f"guidance_scale must be a float or None, got "
                            f"{type(guidance_scale).__name__}")
        if not math.isfinite(float(guidance_scale)):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
    if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, numbers.Real):
        raise TypeError(f"guidance_rescale must be a float, got "
                        f"{type(guidance_rescale).__name__}")
    if not 0.0 <= float(guidance_rescale) <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
    if guidance_rescale != 0 and guidance_scale is None:
        raise ValueError("guidance_rescale needs guidance_scale (a guided step)")


def _check_model_output(name: str, mo, x: Tensor, x_name: str, coeffs: StepCoefficients,
                        batch: int) -> None:
    check_tensor(name, mo)
    if mo.device != x.device:
        raise ValueError(f"{name} is on {mo.device} but {x_name} is on {x.device}")
    if mo.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {mo.dtype} but {x_name} has {x.dtype}")
    expected = [batch] + list(x.shape[1:])
    channels = coeffs.config.model_channels
    expected[1] *= channels
    if list(mo.shape) != expected:
        extra = (f" (variance_type={coeffs.config.variance_type!r} needs 2C channels: "
                 f"the prediction, then the variance)" if channels == 2 else "")
        guided = " (guided: the unconditional batch, then the conditional one)" \
            if name == "model_output" and batch != x.shape[0] else ""
        raise ValueError(f"{name} must have shape {expected}{extra}{guided}, got "
                         f"{list(mo.shape)}")


def check_step_inputs(x: Tensor, model_output, t, coeffs: StepCoefficients,
                      noise: Optional[Tensor] = None, seeds=None, *, x_name: str = "x_t",
                      history: Optional[Tensor] = None, guidance_scale=None,
                      guidance_rescale=0.0) -> Tuple[Tensor, Optional[Tensor]]:
    """Validate one step's arguments; returns (t ``[B]`` int64, seeds ``[B]`` int64 or None).

    ``model_output`` is None for the training-side step (``add_noise``), whose sample is
    named ``x_name``; for a guided step (``guidance_scale`` given) a ``[2B, ...]`` tensor or
    an (unconditional, conditional) pair. ``history``: the previous step's x̂0 (x's shape,
    dtype and device)."""
    if not isinstance(coeffs, StepCoefficients):
        raise TypeError(f"coeffs must come from fused_ddpm.step_coefficients, got "
                        f"{type(coeffs).__name__}")
    check_tensor(x_name, x)
    if x.dim() < 2:
        raise ValueError(f"{x_name} must have shape [B, C, ...], got {list(x.shape)}")
    check_guidance(guidance_scale, guidance_rescale)
    B = x.shape[0]
    if model_output is not None:
        if guidance_scale is None:
            if isinstance(model_output, (tuple, list)):
                raise TypeError("model_output must be a torch.Tensor; an (unconditional, "
                                "conditional) pair needs guidance_scale")
            _check_model_output("model_output", model_output, x, x_name, coeffs, B)
        elif isinstance(model_output, (tuple, list)):
            if len(model_output) != 2:
                raise ValueError(f"model_output must be a tensor [2B, ...] or a pair "
                                 f"(unconditional, conditional), got {len(model_output)} "
                                 f"tensors")
            for name, half in zip(("model_output[0]", "model_output[1]"), model_output):
                _check_model_output(name, half, x, x_name, coeffs, B)
        else:
            _check_model_output("model_output", model_output, x, x_name, coeffs, 2 * B)
    if history is not None:
        check_tensor("history", history)
        if list(history.shape) != list(x.shape) or history.dtype != x.dtype or \
                history.device != x.device:
            raise ValueError(f"history must match {x_name} (shape {list(x.shape)}, {x.dtype}, "
                             f"{x.device}), got shape {list(history.shape)}, {history.dtype}, "
                             f"{history.device}")
    if noise is not None:
        if seeds is not None:
            raise ValueError("pass either noise or seeds, not both")
        check_tensor("noise", noise)
        if list(noise.shape) != list(x.shape):
            raise ValueError(f"noise must have the shape of {x_name} {list(x.shape)}, got "
                             f"{list(noise.shape)}")
        if noise.device != x.device:
            raise ValueError(f"noise is on {noise.device} but {x_name} is on {x.device}")
    t = normalize_t(t, B, x.device, coeffs.num_rows, coeffs)
    if seeds is not None:
        seeds = normalize_seeds(seeds, B, x.device)
    return t, seeds


def check_out(out: Tensor, x: Tensor, x_name: str = "x_t") -> None:
    """``out=`` must match x; whether it overlaps an input is checked per call
    (:func:`out_overlaps`)."""
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must match {x_name} (shape {list(x.shape)}, {x.dtype}, "
                         f"{x.device}), got shape {list(out.shape)}, {out.dtype}, {out.device}")
    if any(st == 0 and n > 1 for st, n in zip(out.stride(), out.shape)):
        raise ValueError("out must not have overlapping memory (it is an expanded tensor)")


def out_overlaps(out: Tensor, *inputs: Optional[Tensor]) -> bool:
    """Whether ``out`` shares storage with one of the inputs."""
    if not out.numel():
        return False
    ptr = out.untyped_storage().data_ptr()
    return any(a is not None and a.numel() and a.untyped_storage().data_ptr() == ptr
               for a in inputs)
