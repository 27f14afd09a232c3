"""fused-ddpm: the DDPM/DDIM sampler step as one fused kernel.

Public API (DESIGN.md §6): :class:`NoiseSchedule`, :func:`step_coefficients`,
:func:`ddpm_step`, :class:`DDPMStepFunction`, :mod:`reference`, :func:`backends`,
:func:`build_info`, :func:`sample`. The diffusers schedulers live in :mod:`fused_ddpm.diffusers`.
"""
from . import ops as _ops  # noqa: F401  (registers the torch.library ops)
from . import reference
from ._extension import build_info
from .backends import backends
from .coefficients import StepCoefficients, StepConfig, step_coefficients
from .schedule import NoiseSchedule, inference_timesteps
from .sampler import sample
from .step import DDPMStepFunction, ddpm_step

__version__ = "0.1.0"

__all__ = ["DDPMStepFunction", "NoiseSchedule", "StepCoefficients", "StepConfig", "backends",
           "build_info", "ddpm_step", "inference_timesteps", "reference", "sample",
           "step_coefficients"]
