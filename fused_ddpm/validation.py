"""User-level argument checks shared by every backend and by the reference, so every path
fails with the same message naming the argument: ``TypeError`` for a wrong type or dtype,
``ValueError`` for a wrong value or shape."""
from __future__ import annotations

import numbers
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .coefficients import StepCoefficients

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["FLOAT_DTYPES", "debug_checks_enabled", "check_tensor", "normalize_t",
           "normalize_seeds", "check_step_inputs", "check_out"]


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


def check_step_inputs(x: Tensor, model_output: Optional[Tensor], t, coeffs: StepCoefficients,
                      noise: Optional[Tensor] = None, seeds=None, *, x_name: str = "x_t"
                      ) -> Tuple[Tensor, Optional[Tensor]]:
    """Validate one step's arguments; returns (t ``[B]`` int64, seeds ``[B]`` int64 or None).

    ``model_output`` is None for the training-side step (``add_noise``), whose sample is
    named ``x_name``."""
    if not isinstance(coeffs, StepCoefficients):
        raise TypeError(f"coeffs must come from fused_ddpm.step_coefficients, got "
                        f"{type(coeffs).__name__}")
    check_tensor(x_name, x)
    if x.dim() < 2:
        raise ValueError(f"{x_name} must have shape [B, C, ...], got {list(x.shape)}")
    if model_output is not None:
        check_tensor("model_output", model_output)
        if model_output.device != x.device:
            raise ValueError(f"model_output is on {model_output.device} but {x_name} is on "
                             f"{x.device}")
        if model_output.dtype != x.dtype:
            raise TypeError(f"model_output has dtype {model_output.dtype} but {x_name} has "
                            f"{x.dtype}")
        expected = list(x.shape)
        channels = coeffs.config.model_channels
        expected[1] *= channels
        if list(model_output.shape) != expected:
            extra = (f" (variance_type={coeffs.config.variance_type!r} needs 2C channels: "
                     f"the prediction, then the variance)" if channels == 2 else "")
            raise ValueError(f"model_output must have shape {expected}{extra}, got "
                             f"{list(model_output.shape)}")
    if noise is not None:
        if seeds is not None:
            raise ValueError("pass either noise or seeds, not both")
        check_tensor("noise", noise)
        if list(noise.shape) != list(x.shape):
            raise ValueError(f"noise must have the shape of {x_name} {list(x.shape)}, got "
                             f"{list(noise.shape)}")
        if noise.device != x.device:
            raise ValueError(f"noise is on {noise.device} but {x_name} is on {x.device}")
    B = x.shape[0]
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
