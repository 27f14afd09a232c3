"""Drop-in diffusers schedulers whose ``step`` is the fused op.

:class:`FusedDDPMScheduler` and :class:`FusedDDIMScheduler` subclass diffusers'
``DDPMScheduler`` / ``DDIMScheduler``: same config (every option), ``from_config``,
``from_pretrained``, ``save_pretrained``, ``set_timesteps`` and ``step`` signature and
output type, but ``step`` runs :func:`fused_ddpm.ddpm_step` (``return_x0=True``).

Parity with diffusers
    The coefficient table (one row per *training* timestep) comes from the same row builder
    as :func:`fused_ddpm.step_coefficients`, with the ``"diffusers_float32"`` precision
    policy (:mod:`fused_ddpm.methods`): diffusers' own float32 ``alphas_cumprod`` and
    diffusers' float32 operations in diffusers' order (``1 - ᾱ_t``, ``ᾱ_t/ᾱ_t′``, ...);
    only the final linear combinations (folding the posterior-mean coefficients into the
    x / model-output coefficients when nothing is clipped) are done in float64 from those
    float32 values and rounded once. The previous timestep of each row follows diffusers:
    DDPM looks t up in its timestep list (the custom list too; t − 1 before
    ``set_timesteps``), DDIM uses ``t − T // num_inference_steps`` for every spacing
    (``step_gap``) — also for ``linspace`` / ``trailing``, where that value is usually *not*
    the next listed timestep (diffusers' behaviour, reproduced on purpose). The float64
    schedule that :mod:`fused_ddpm.reference` reads is made from the same float32 ᾱ, so
    the reference matches diffusers too.

    With the default ``noise="randn"`` the noise is drawn exactly as diffusers draws it
    (``randn_tensor(model_output.shape, generator=..., device=..., dtype=...)``, a list of
    generators included) and only where diffusers draws it, so results equal diffusers'
    up to float rounding, over whole loops with noise. ``noise="philox"`` (constructor
    keyword or attribute; not saved in the config) uses in-kernel Philox noise with per-sample
    seeds drawn from the generator instead: no noise tensor is materialised.

Host syncs
    None inside ``step`` when the timestep is a device tensor: the table has a row per
    training timestep (so no ``nonzero`` lookup and no ``if t > 0``: noise rows have σ = 0 at
    t = 0) and is moved to the sample's device once and cached. DDPM draws noise only for
    t > 0; with a timestep that is a *device* tensor its value is unknown without a sync, so
    noise is drawn for every step and the σ = 0 row of t = 0 discards it: the result is the
    same as diffusers', only the generator has advanced one extra draw after the final step.
    A Python-int or CPU-tensor timestep (what diffusers' pipelines pass) follows diffusers
    exactly.

Unsupported
    ``variance_type="fixed_large_log"`` is broken in diffusers (it multiplies the noise by
    the square root of log β_t < 0, so every step with t > 0 is NaN). ``step`` raises a
    ``ValueError`` for it instead of returning NaN; the scheduler can still be built, saved
    and loaded. Stepping from a timestep that is not in the schedule (diffusers raises an
    ``IndexError``) steps to the largest scheduled timestep below it.

``fused_ddpm.diffusers`` imports without diffusers installed; using the classes then raises
an ``ImportError`` that says ``pip install diffusers``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .coefficients import StepCoefficients, step_coefficients
from .schedule import NoiseSchedule
from .step import SEED_HIGH, ddpm_step

try:  # diffusers is optional
    from diffusers import DDIMScheduler as _DDIMScheduler
    from diffusers import DDPMScheduler as _DDPMScheduler
    from diffusers.configuration_utils import register_to_config
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
    _DIFFUSERS_ERROR: Optional[BaseException] = None
except ImportError as _e:  # pragma: no cover - exercised in a test with diffusers hidden
    _DIFFUSERS_ERROR = _e

__all__ = ["FusedDDPMScheduler", "FusedDDIMScheduler", "NOISE_SOURCES",
           "schedule_from_alphas_cumprod"]

NOISE_SOURCES = ("randn", "philox")
_INSTALL_HINT = ("fused_ddpm.diffusers needs the diffusers package: pip install diffusers "
                 "(or pip install 'fused-ddpm[diffusers]')")


# ----------------------------------------------------------------------------- tables
def schedule_from_alphas_cumprod(alphas_cumprod: Tensor) -> NoiseSchedule:
    """A float64 :class:`NoiseSchedule` whose ᾱ equals ``alphas_cumprod`` (e.g. diffusers'
    float32 ᾱ) to float64 precision, so ``schedule.alphas_cumprod.float()`` gives it back
    exactly. β_t = 1 − ᾱ_t/ᾱ_{t−1} is passed as ``trained_betas``."""
    abar = alphas_cumprod.detach().to("cpu", torch.float64).flatten()
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = torch.where(prev > 0, 1.0 - abar / prev.clamp(min=1e-300), torch.ones_like(abar))
    return NoiseSchedule(num_train_timesteps=abar.numel(), trained_betas=betas.clamp(0.0, 1.0).tolist())


def _build_coefficients(schedule: NoiseSchedule, timesteps: List[int], *, method: str,
                        prediction_type: str, variance_type: str, clip_sample: bool,
                        clip_sample_range: float, thresholding: bool,
                        dynamic_thresholding_ratio: float, sample_max_value: float,
                        eta: float = 0.0, use_clipped_model_output: bool = False,
                        set_alpha_to_one: bool = True,
                        step_gap: Optional[int] = None) -> StepCoefficients:
    """The coefficients of a diffusers step: diffusers' float32 arithmetic
    (``precision="diffusers_float32"``) on ``schedule`` (diffusers' own ᾱ)."""
    return step_coefficients(
        schedule, method=method, prediction_type=prediction_type, variance_type=variance_type,
        clip_sample_range=float(clip_sample_range) if clip_sample else None,
        timesteps=timesteps, thresholding=thresholding,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        sample_max_value=sample_max_value, eta=eta,
        use_clipped_model_output=use_clipped_model_output, set_alpha_to_one=set_alpha_to_one,
        step_gap=step_gap, precision="diffusers_float32")


def _output(cls, **values):
    """``cls(**values)`` for a diffusers ``BaseOutput`` whose fields are all given (not
    None), without its generic ``__post_init__`` (µs per step): the same ordered items and
    attributes."""
    out = cls.__new__(cls)
    OrderedDict.__init__(out)
    for name, value in values.items():
        OrderedDict.__setitem__(out, name, value)
        object.__setattr__(out, name, value)
    return out


# ----------------------------------------------------------------------------- mixin
class _FusedStepMixin:
    """What both fused schedulers share: the noise source, the backend, the coefficient
    cache (per key and device) and timestep handling."""

    _fused_method = "ddpm"

    def _fused_init(self, noise: str, backend: str) -> None:
        self.noise = noise
        self.backend = backend
        self._fused_abar = self.alphas_cumprod.detach().to("cpu", torch.float32).clone()
        self._fused_schedule: Optional[NoiseSchedule] = None
        self._fused_schedule_error: Optional[BaseException] = None
        try:
            self._fused_schedule = schedule_from_alphas_cumprod(self._fused_abar)
        except ValueError as e:
            self._fused_schedule_error = e
        self._fused_reset()

    @property
    def noise(self) -> str:
        """``"randn"`` (diffusers' noise: identical outputs) or ``"philox"`` (in-kernel)."""
        return self._fused_noise

    @noise.setter
    def noise(self, value: str) -> None:
        if value not in NOISE_SOURCES:
            raise ValueError(f"noise={value!r} is not one of {list(NOISE_SOURCES)}")
        self._fused_noise = value

    def _fused_reset(self) -> None:
        # key → StepCoefficients, or the error building them
        self._fused_cache: Dict[object, object] = {}

    def _fused_coefficients(self, key) -> StepCoefficients:
        raise NotImplementedError

    def fused_coefficients(self, device: Union[str, torch.device, None] = None, key=None
                           ) -> StepCoefficients:
        """The :class:`~fused_ddpm.StepCoefficients` ``step`` uses (built once per schedule
        and key; their table is copied to each device once, on first use there, or now
        for ``device``)."""
        built = self._fused_cache.get(key)
        if built is None:
            try:
                if self._fused_schedule_error is not None:
                    raise self._fused_schedule_error
                built = self._fused_coefficients(key)
            except ValueError as e:   # deferred to step, as diffusers fails there too
                built = e
            self._fused_cache[key] = built
        if isinstance(built, BaseException):
            raise ValueError(f"{type(self).__name__} cannot step with this configuration: "
                             f"{built}") from built
        if device is not None:
            built.table_on(device)
        return built

    @staticmethod
    def _host_timestep(timestep, sample: Tensor):
        """(t for ddpm_step, whether noise is added: True/False when the host knows t,
        None for a device tensor)."""
        if isinstance(timestep, Tensor):
            if timestep.is_cpu:
                if timestep.numel() == 1:
                    v = int(timestep)
                    return v, v > 0
                tv = timestep.to(torch.int64)
                return tv.to(sample.device, non_blocking=True), bool((tv > 0).any())
            return timestep, None
        v = int(timestep)
        return v, v > 0

    def _draw_seeds(self, generator, batch: int, device: torch.device) -> Tensor:
        """Per-sample int64 seeds from the generator(s) (torch's default when None)."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
            return torch.cat([torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64,
                                            generator=g, device=g.device).to(device)
                              for g in generator])
        dev = generator.device if generator is not None else device
        return torch.randint(0, SEED_HIGH, (batch,), dtype=torch.int64, device=dev,
                             generator=generator).to(device)

    @staticmethod
    def _no_noise():
        """(noise, seeds) for a step that adds no noise (σ = 0 in its row): consumes no
        random numbers (a fixed seed feeds the in-kernel noise that σ = 0 discards)."""
        return None, 0

    def _draw_noise(self, generator, sample: Tensor, model_output: Tensor):
        if self.noise == "philox":
            return None, self._draw_seeds(generator, sample.shape[0], sample.device)
        device = model_output.device
        if generator is None or (type(generator) is torch.Generator and
                                 generator.device.type == device.type):
            # what randn_tensor does for one generator on the sample's device type
            z = torch.randn(sample.shape, generator=generator, device=device,
                            dtype=model_output.dtype)
        else:
            z = randn_tensor(tuple(sample.shape), generator=generator, device=device,
                             dtype=model_output.dtype)
        return z, None

    def _fused_step(self, model_output: Tensor, t, sample: Tensor, coeffs: StepCoefficients,
                    noise, seeds) -> Tuple[Tensor, Tensor]:
        if model_output.dtype != sample.dtype:
            model_output = model_output.to(sample.dtype)
        if noise is not None and noise.dtype != sample.dtype:
            noise = noise.to(sample.dtype)
        return ddpm_step(sample, model_output, t, coeffs, noise=noise, seeds=seeds,
                         return_x0=True, backend=self.backend)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``, also taking the ``noise`` and ``backend`` keywords
        (they are not part of the saved config)."""
        noise, backend = kwargs.pop("noise", None), kwargs.pop("backend", None)
        res = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        sched = res[0] if return_unused_kwargs else res
        if noise is not None:
            sched.noise = noise
        if backend is not None:
            sched.backend = backend
        return res


if _DIFFUSERS_ERROR is None:
    def _raw_init(cls):
        return getattr(cls.__init__, "__wrapped__", cls.__init__)

    class FusedDDPMScheduler(_FusedStepMixin, _DDPMScheduler):
        """diffusers' ``DDPMScheduler`` with the fused step (see the module docstring).

        Takes every ``DDPMScheduler`` option, plus two keyword-only ones that are *not*
        saved in the config: ``noise`` (``"randn"``: diffusers' noise, the default;
        ``"philox"``: in-kernel noise seeded from the generator) and ``backend`` (passed to
        :func:`fused_ddpm.ddpm_step`, default ``"auto"``). Both are also attributes.
        """

        ignore_for_config = ["noise", "backend"]

        @register_to_config
        def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                     beta_end: float = 0.02, beta_schedule: str = "linear",
                     trained_betas=None, variance_type: str = "fixed_small",
                     clip_sample: bool = True, prediction_type: str = "epsilon",
                     thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                     clip_sample_range: float = 1.0, sample_max_value: float = 1.0,
                     timestep_spacing: str = "leading", steps_offset: int = 0,
                     rescale_betas_zero_snr: bool = False, *, noise: str = "randn",
                     backend: str = "auto"):
            _raw_init(_DDPMScheduler)(
                self, num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                beta_end=beta_end, beta_schedule=beta_schedule, trained_betas=trained_betas,
                variance_type=variance_type, clip_sample=clip_sample,
                prediction_type=prediction_type, thresholding=thresholding,
                dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                clip_sample_range=clip_sample_range, sample_max_value=sample_max_value,
                timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                rescale_betas_zero_snr=rescale_betas_zero_snr)
            self._fused_init(noise, backend)

        def set_timesteps(self, num_inference_steps: Optional[int] = None,
                          device: Union[str, torch.device, None] = None,
                          timesteps: Optional[List[int]] = None):
            super().set_timesteps(num_inference_steps=num_inference_steps, device=device,
                                  timesteps=timesteps)
            self._fused_reset()

        def _fused_coefficients(self, key) -> StepCoefficients:
            cfg = self.config
            T = cfg.num_train_timesteps
            if self.custom_timesteps or self.num_inference_steps:
                timesteps = [int(v) for v in self.timesteps.cpu().tolist()]
            else:                       # before set_timesteps diffusers steps t → t − 1
                timesteps = list(range(T - 1, -1, -1))
            return _build_coefficients(
                self._fused_schedule, timesteps, method="ddpm",
                prediction_type=cfg.prediction_type, variance_type=cfg.variance_type,
                clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_sample_range,
                thresholding=cfg.thresholding,
                dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
                sample_max_value=cfg.sample_max_value)

        def step(self, model_output: Tensor, timestep, sample: Tensor,
                 generator=None, return_dict: bool = True):
            """diffusers' ``DDPMScheduler.step``, computed by the fused op.

            ``timestep`` may also be an int tensor ``[B]`` (one timestep per sample).
            Returns ``DDPMSchedulerOutput(prev_sample, pred_original_sample)`` (or the tuple).
            """
            if self.config.variance_type == "fixed_large_log":
                raise ValueError(
                    "variance_type='fixed_large_log' is not supported by FusedDDPMScheduler: "
                    "diffusers' DDPMScheduler takes the square root of log(beta_t) < 0 there "
                    "and returns NaN for every step with t > 0. Use 'fixed_large' (or "
                    "'learned_range' for GLIDE-style models).")
            coeffs = self._fused_cache.get(None)
            if type(coeffs) is not StepCoefficients:
                coeffs = self.fused_coefficients()
            t, noisy = self._host_timestep(timestep, sample)
            if noisy is False:
                noise, seeds = self._no_noise()
            else:
                noise, seeds = self._draw_noise(generator, sample, model_output)
            prev_sample, x0 = self._fused_step(model_output, t, sample, coeffs, noise, seeds)
            if not return_dict:
                return (prev_sample, x0)
            return _output(DDPMSchedulerOutput, prev_sample=prev_sample,
                           pred_original_sample=x0)

    class FusedDDIMScheduler(_FusedStepMixin, _DDIMScheduler):
        """diffusers' ``DDIMScheduler`` with the fused step (see the module docstring).

        ``eta`` and ``use_clipped_model_output`` are per-call ``step`` arguments, as in
        diffusers; one coefficient table is built and cached per pair. ``variance_noise``
        is used as the noise when given. Extra keyword-only options ``noise`` and
        ``backend`` as for :class:`FusedDDPMScheduler`.
        """

        ignore_for_config = ["noise", "backend"]
        _fused_method = "ddim"

        @register_to_config
        def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                     beta_end: float = 0.02, beta_schedule: str = "linear",
                     trained_betas=None, clip_sample: bool = True,
                     set_alpha_to_one: bool = True, steps_offset: int = 0,
                     prediction_type: str = "epsilon", thresholding: bool = False,
                     dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                     sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                     rescale_betas_zero_snr: bool = False, *, noise: str = "randn",
                     backend: str = "auto"):
            _raw_init(_DDIMScheduler)(
                self, num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                beta_end=beta_end, beta_schedule=beta_schedule, trained_betas=trained_betas,
                clip_sample=clip_sample, set_alpha_to_one=set_alpha_to_one,
                steps_offset=steps_offset, prediction_type=prediction_type,
                thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                clip_sample_range=clip_sample_range, sample_max_value=sample_max_value,
                timestep_spacing=timestep_spacing, rescale_betas_zero_snr=rescale_betas_zero_snr)
            self._fused_init(noise, backend)

        def set_timesteps(self, num_inference_steps: int,
                          device: Union[str, torch.device, None] = None):
            super().set_timesteps(num_inference_steps, device=device)
            self._fused_reset()

        def _fused_coefficients(self, key) -> StepCoefficients:
            eta, ucmo = key
            cfg = self.config
            return _build_coefficients(
                self._fused_schedule, [int(v) for v in self.timesteps.cpu().tolist()],
                method="ddim", prediction_type=cfg.prediction_type,
                variance_type="fixed_small", clip_sample=cfg.clip_sample,
                clip_sample_range=cfg.clip_sample_range, thresholding=cfg.thresholding,
                dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
                sample_max_value=cfg.sample_max_value, eta=eta,
                use_clipped_model_output=ucmo, set_alpha_to_one=cfg.set_alpha_to_one,
                step_gap=cfg.num_train_timesteps // self.num_inference_steps)  # t − T // n

        def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0,
                 use_clipped_model_output: bool = False, generator=None,
                 variance_noise: Optional[Tensor] = None, return_dict: bool = True):
            """diffusers' ``DDIMScheduler.step``, computed by the fused op.

            Returns ``DDIMSchedulerOutput(prev_sample, pred_original_sample)`` (or the tuple).
            """
            if self.num_inference_steps is None:
                raise ValueError("Number of inference steps is 'None', you need to run "
                                 "'set_timesteps' after creating the scheduler")
            eta = float(eta)
            coeffs = self.fused_coefficients(None, (eta, bool(use_clipped_model_output)))
            t, _ = self._host_timestep(timestep, sample)
            if eta > 0:
                if variance_noise is not None and generator is not None:
                    raise ValueError("Cannot pass both generator and variance_noise. Please make "
                                     "sure that either `generator` or `variance_noise` stays "
                                     "`None`.")
                if variance_noise is not None:
                    noise, seeds = variance_noise.to(sample.device), None
                else:
                    noise, seeds = self._draw_noise(generator, sample, model_output)
            else:
                noise, seeds = self._no_noise()
            prev_sample, x0 = self._fused_step(model_output, t, sample, coeffs, noise, seeds)
            if not return_dict:
                return (prev_sample, x0)
            return _output(DDIMSchedulerOutput, prev_sample=prev_sample,
                           pred_original_sample=x0)

else:
    class _MissingDiffusers(type):
        """Metaclass of the stand-ins: any use raises the install hint."""

        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            raise ImportError(f"{cls.__name__}: {_INSTALL_HINT}") from _DIFFUSERS_ERROR

    class FusedDDPMScheduler(metaclass=_MissingDiffusers):  # type: ignore[no-redef]
        """Stand-in: diffusers is not installed (``pip install diffusers``)."""

        def __init__(self, *args, **kwargs):
            raise ImportError(f"FusedDDPMScheduler: {_INSTALL_HINT}") from _DIFFUSERS_ERROR

    class FusedDDIMScheduler(metaclass=_MissingDiffusers):  # type: ignore[no-redef]
        """Stand-in: diffusers is not installed (``pip install diffusers``)."""

        def __init__(self, *args, **kwargs):
            raise ImportError(f"FusedDDIMScheduler: {_INSTALL_HINT}") from _DIFFUSERS_ERROR
