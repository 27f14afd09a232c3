"""fused-ddpm: the DDPM/DDIM sampler step as one fused kernel."""
from .coefficients import StepCoefficients, StepConfig, step_coefficients
from .schedule import NoiseSchedule, inference_timesteps
from . import reference

__all__ = ["NoiseSchedule", "StepCoefficients", "StepConfig", "inference_timesteps",
           "reference", "step_coefficients"]
