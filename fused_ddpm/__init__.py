"""fused-ddpm: diffusion sampler steps as one fused kernel: DDPM, DDIM, DPM-Solver++ (2M, SDE)
and Euler ancestral, with classifier-free guidance inside the step (``docs/samplers.md``).

Public API: :class:`NoiseSchedule`, :func:`step_coefficients`, :func:`ddpm_step`,
:class:`DDPMStepFunction`, :func:`add_noise`, :func:`sample`, :mod:`reference` (the oracle),
:func:`backends`, :class:`BackendUnavailableError`, :func:`build_info`. The diffusers
schedulers live in :mod:`fused_ddpm.diffusers`; the kernel contract in
:mod:`fused_ddpm.contract` (``docs/kernels.md``).
"""
from . import ops as _ops  # noqa: F401  (registers the torch.library ops)
from . import reference
from ._extension import build_info
from .backends import BackendUnavailableError, backends
from .coefficients import StepCoefficients, StepConfig, add_noise_coefficients, step_coefficients
from .schedule import NoiseSchedule, inference_timesteps
from .sampler import sample
from .step import DDPMStepFunction, ddpm_step
from .training import add_noise

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "DDPMStepFunction", "NoiseSchedule", "StepCoefficients",
           "StepConfig", "add_noise", "add_noise_coefficients", "backends", "build_info",
           "ddpm_step", "inference_timesteps", "reference", "sample", "step_coefficients"]
