"""Training-side fused op: :func:`add_noise`, the forward process and the target in one pass.

It runs through the same step kernels as sampling, with the rows of the ``add_noise``
method (:mod:`fused_ddpm.methods`): the X stream is x0, there is no model output, and the
kernel writes Y = √ᾱ_t·x0 + √(1−ᾱ_t)·z (x_t) and X0 = the training target (ε, x0 or v).
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .coefficients import StepCoefficients, add_noise_coefficients
from .schedule import NoiseSchedule
from .step import prepared

__all__ = ["add_noise"]

_COEFFS: "weakref.WeakKeyDictionary[NoiseSchedule, Dict[str, StepCoefficients]]" = \
    weakref.WeakKeyDictionary()


def _coefficients(schedule: NoiseSchedule, prediction_type: str) -> StepCoefficients:
    """The add_noise table of ``schedule`` (built once per schedule and prediction type)."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fused_ddpm.NoiseSchedule, got "
                        f"{type(schedule).__name__}")
    per = _COEFFS.setdefault(schedule, {})
    if prediction_type not in per:
        per[prediction_type] = add_noise_coefficients(schedule, prediction_type)
    return per[prediction_type]


def add_noise(x0: Tensor,
              t: Union[int, Tensor],
              schedule: NoiseSchedule,
              seeds: Union[None, int, Tensor] = None,
              noise: Optional[Tensor] = None,
              prediction_type: str = "epsilon",
              backend: str = "auto",
              generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Noise clean samples to timestep t and form the training target, fused.

    x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε; target = ε (``"epsilon"``), x0 (``"sample"``) or
    v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (``"v_prediction"``).

    Args:
        x0: clean samples ``[B, C, ...]``, float16/bfloat16/float32/float64.
        t: training timesteps: an int, or an integer tensor ``[B]`` / ``[]``.
        schedule: the :class:`~fused_ddpm.NoiseSchedule`.
        seeds: per-sample seeds (int, or int64 ``[B]``) for in-kernel Philox ε: sample b's ε
            is the Philox noise of (seeds[b], t[b]) — the noise a sampler step at t with
            that seed adds. Or ``noise``: an external ε (x0's shape). With neither, seeds
            are drawn from ``generator`` (torch's default when None).
        prediction_type: the target's kind.
        backend: as for :func:`fused_ddpm.ddpm_step`.

    Returns:
        (x_t, target), each with x0's shape, dtype and memory format; differentiable in x0
        and in an external ``noise``.
    """
    coeffs = _coefficients(schedule, prediction_type)
    compiling = torch.compiler.is_compiling()
    plan = prepared(coeffs, x0, None, t, noise, seeds, None, backend, x_name="x0",
                    compiling=compiling)
    return plan.run(x0, None, t, noise, seeds, True, None, generator, compiling)
