"""Argument checks shared by every backend, so every backend fails with the same message."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .coefficients import StepCoefficients

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def debug_checks_enabled() -> bool:
    """``FUSED_DDPM_DEBUG=1`` turns on checks that need a host sync (t range on the device)."""
    return os.environ.get("FUSED_DDPM_DEBUG", "0") not in ("", "0")


def _check_tensor(name: str, value, *, floating: bool = True) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")


_SCALARS: dict = {}


def _device_scalar(value: int, device: torch.device) -> torch.Tensor:
    """An int64 0-d tensor holding ``value`` on ``device``, made once and reused (kernels
    only read it), so a Python-int t or seed costs no fill kernel per step."""
    key = (value, device)
    cached = _SCALARS.get(key)
    if cached is None:
        cached = torch.full((), value, dtype=torch.int64, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return cached   # filled only when the graph replays: never reuse it eagerly
        if len(_SCALARS) > 4096:
            _SCALARS.clear()
        _SCALARS[key] = cached
    return cached


def normalize_t(t, batch: int, device: torch.device, num_train_timesteps: int) -> torch.Tensor:
    """t as an int64 tensor ``[B]`` on ``device`` (a scalar is expanded, stride 0).

    Range-checked on the host when t is a Python int or a CPU tensor; on the device only
    with ``FUSED_DDPM_DEBUG=1`` (the check would sync).
    """
    T = num_train_timesteps
    if isinstance(t, bool):
        raise TypeError("t must be an int or an integer tensor, got bool")
    if isinstance(t, int):
        if not 0 <= t < T:  # a Python int is a compile-time constant, so this check is free
            raise ValueError(f"t={t} is out of range [0, {T})")
        if torch.compiler.is_compiling():
            return torch.full((), t, dtype=torch.int64, device=device).expand(batch)
        return _device_scalar(t, device).expand(batch)
    if not isinstance(t, torch.Tensor):
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
            if lo < 0 or hi >= T:
                raise ValueError(f"t is out of range [0, {T}): min {lo}, max {hi}")
    t = t.to(device=device, dtype=torch.int64)
    return t.expand(batch)


def normalize_seeds(seeds, batch: int, device: torch.device) -> torch.Tensor:
    """Seeds as an int64 tensor ``[B]`` on ``device``; a scalar expands to every sample."""
    if isinstance(seeds, bool):
        raise TypeError("seeds must be an int or an int64 tensor, got bool")
    if isinstance(seeds, int):
        if not -(2 ** 63) <= seeds < 2 ** 64:
            raise ValueError(f"seeds={seeds} does not fit in 64 bits")
        if seeds >= 2 ** 63:
            seeds -= 2 ** 64
        if torch.compiler.is_compiling():
            return torch.full((), seeds, dtype=torch.int64, device=device).expand(batch)
        return _device_scalar(seeds, device).expand(batch)
    if not isinstance(seeds, torch.Tensor):
        raise TypeError(f"seeds must be an int or an int64 tensor, got {type(seeds).__name__}")
    if seeds.dtype != torch.int64:
        raise TypeError(f"seeds must be an int64 tensor, got dtype {seeds.dtype}")
    if not (seeds.dim() == 0 or (seeds.dim() == 1 and seeds.shape[0] == batch)):
        raise ValueError(f"seeds must have shape [] or [B]=[{batch}], got {list(seeds.shape)}")
    return seeds.to(device).expand(batch)


def check_step_inputs(x: torch.Tensor, model_output: torch.Tensor, t, coeffs: StepCoefficients,
                      noise: Optional[torch.Tensor] = None, seeds=None
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validate one step's arguments; returns (t ``[B]`` int64, seeds ``[B]`` int64 or None)."""
    if not isinstance(coeffs, StepCoefficients):
        raise TypeError(f"coeffs must come from fused_ddpm.step_coefficients, got "
                        f"{type(coeffs).__name__}")
    _check_tensor("x_t", x)
    _check_tensor("model_output", model_output)
    if x.dim() < 2:
        raise ValueError(f"x_t must have shape [B, C, ...], got {list(x.shape)}")
    if model_output.device != x.device:
        raise ValueError(f"model_output is on {model_output.device} but x_t is on {x.device}")
    if model_output.dtype != x.dtype:
        raise TypeError(f"model_output has dtype {model_output.dtype} but x_t has {x.dtype}")
    expected = list(x.shape)
    if coeffs.config.learned_variance:
        expected[1] *= 2
    if list(model_output.shape) != expected:
        extra = (" (variance_type=%r needs 2C channels: ε then v)" % coeffs.config.variance_type
                 if coeffs.config.learned_variance else "")
        raise ValueError(f"model_output must have shape {expected}{extra}, got "
                         f"{list(model_output.shape)}")
    if noise is not None:
        if seeds is not None:
            raise ValueError("pass either noise or seeds, not both")
        _check_tensor("noise", noise)
        if list(noise.shape) != list(x.shape):
            raise ValueError(f"noise must have the shape of x_t {list(x.shape)}, got "
                             f"{list(noise.shape)}")
        if noise.device != x.device:
            raise ValueError(f"noise is on {noise.device} but x_t is on {x.device}")
    B = x.shape[0]
    t = normalize_t(t, B, x.device, coeffs.num_train_timesteps)
    if seeds is not None:
        seeds = normalize_seeds(seeds, B, x.device)
    return t, seeds
