"""Drop-in diffusers schedulers whose ``step`` is the fused op.

:class:`FusedDDPMScheduler` and :class:`FusedDDIMScheduler` subclass diffusers'
``DDPMScheduler`` / ``DDIMScheduler``: same config (every option), ``from_config``,
``from_pretrained``, ``save_pretrained``, ``set_timesteps`` and ``step`` signature and
output type, but ``step`` runs :func:`fused_ddpm.ddpm_step` (``return_x0=True``).

Parity with diffusers
    The coefficient table (one row per *training* timestep, columns as in
    :mod:`fused_ddpm.coefficients`) is built from diffusers' own float32 ``alphas_cumprod``
    with diffusers' float32 operations in diffusers' order (``1 - ᾱ_t``, ``ᾱ_t/ᾱ_t′``, ...);
    only the final linear combinations (folding the posterior-mean coefficients into the
    x / model-output coefficients when nothing is clipped) are done in float64 from those
    float32 values and rounded once. The previous timestep of each row follows diffusers:
    DDPM looks t up in its timestep list (the custom list too; t − 1 before
    ``set_timesteps``), DDIM uses ``t − T // num_inference_steps`` for every spacing —
    also for ``linspace`` / ``trailing``, where that value is usually *not* the next
    listed timestep (diffusers' behaviour, reproduced on purpose). The float64 schedule
    the PyTorch reference backend reads is made from the same float32 ᾱ, so that backend
    matches diffusers too.

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

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .backends import resolve
from .coefficients import StepCoefficients, previous_timesteps, step_coefficients
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

__all__ = ["FusedDDPMScheduler", "FusedDDIMScheduler", "NOISE_SOURCES", "diffusers_table",
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


def diffusers_table(alphas_cumprod: Tensor, prev: Tensor, *, method: str, prediction_type: str,
                    variance_type: str = "fixed_small", clips: bool = False, eta: float = 0.0,
                    use_clipped_model_output: bool = False,
                    final_alpha_cumprod: float = 1.0) -> Tensor:
    """The float32 ``[T, 8]`` coefficient table of diffusers' DDPM/DDIM step.

    ``alphas_cumprod``: diffusers' float32 ᾱ ``[T]``; ``prev``: int64 ``[T]``, the timestep
    row t steps to (−1: "before the first step", ᾱ = 1 for DDPM, ``final_alpha_cumprod``
    for DDIM). Every scalar diffusers computes in ``step`` is computed here with the same
    float32 operations in the same order (vectorised over t); the columns of
    :mod:`fused_ddpm.coefficients` are then formed from those float32 values in float64
    and rounded to float32 once.
    """
    a = alphas_cumprod.detach().to("cpu", torch.float32).flatten()
    T = a.numel()
    t = torch.arange(T)
    prev = prev.to("cpu", torch.int64)
    final = torch.tensor(final_alpha_cumprod, dtype=torch.float32)
    a_t = a
    a_p = torch.where(prev >= 0, a[prev.clamp(min=0)], final)
    b_t = 1 - a_t
    sa, sb = (a_t ** 0.5).double(), (b_t ** 0.5).double()
    zeros = torch.zeros(T, dtype=torch.float64)
    if prediction_type == "epsilon":                      # x̂0 = (x − √(1−ᾱ) m)/√ᾱ
        u, w = 1.0 / sa, -sb / sa
    elif prediction_type == "sample":                     # x̂0 = m
        u, w = zeros.clone(), torch.ones(T, dtype=torch.float64)
    elif prediction_type == "v_prediction":               # x̂0 = √ᾱ x − √(1−ᾱ) m
        u, w = sa, -sb
    else:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported")
    lb, lt = zeros.clone(), zeros.clone()
    if method == "ddpm":
        b_p = 1 - a_p
        ca = a_t / a_p                                     # current_alpha_t
        cb = 1 - ca                                        # current_beta_t
        pc = ((a_p ** 0.5 * cb) / b_t).double()            # pred_original_sample_coeff
        cc = (ca ** 0.5 * b_p / b_t).double()              # current_sample_coeff
        var = torch.clamp((1 - a_p) / (1 - a_t) * cb, min=1e-20)
        if variance_type == "fixed_small":
            s = var ** 0.5
        elif variance_type == "fixed_small_log":
            s = torch.exp(0.5 * torch.log(var))
        elif variance_type == "fixed_large":
            s = cb ** 0.5
        elif variance_type in ("learned", "learned_range"):
            s = torch.ones_like(var)
            if variance_type == "learned_range":
                lb, lt = torch.log(cb).double(), torch.log(var).double()
        else:
            raise ValueError(f"variance_type={variance_type!r} is not supported")
        s = torch.where(t > 0, s, torch.zeros_like(s)).double()   # diffusers: noise iff t > 0
        p, q, r = pc, cc, zeros.clone()
    elif method == "ddim":
        b_p = 1 - a_p
        var = (b_p / b_t) * (1 - a_t / a_p)                # _get_variance
        std = eta * var ** 0.5                             # std_dev_t
        d = ((1 - a_p - std ** 2) ** 0.5).double()         # coefficient of ε̂
        s = std.double()
        p = (a_p ** 0.5).double()
        if use_clipped_model_output:                       # ε̂ = (x − √ᾱ x̂0)/√(1−ᾱ)
            p, q, r = p - d * sa / sb, d / sb, zeros.clone()
        else:                                              # ε̂ linear in (x, m), unclipped
            if prediction_type == "epsilon":
                ex, em = zeros, torch.ones(T, dtype=torch.float64)
            elif prediction_type == "sample":
                ex, em = 1.0 / sb, -sa / sb
            else:
                ex, em = sb, sa
            q, r = d * ex, d * em
    else:
        raise ValueError(f"method={method!r} is not supported")
    if not clips:   # fold p into q, r: y = (q + p u) x + (r + p w) m
        q, r, p = q + p * u, r + p * w, zeros.clone()
    return torch.stack([u, w, p, q, r, s, lb, lt], dim=1).to(torch.float32).contiguous()


def _build_coefficients(abar32: Tensor, schedule: NoiseSchedule, *, method: str,
                        prev: Tensor, lookup: List[int], prediction_type: str,
                        variance_type: str, clip_sample: bool, clip_sample_range: float,
                        thresholding: bool, dynamic_thresholding_ratio: float,
                        sample_max_value: float, eta: float = 0.0,
                        use_clipped_model_output: bool = False,
                        set_alpha_to_one: bool = True) -> StepCoefficients:
    """StepCoefficients whose config/schedule drive the reference backend and whose table
    (diffusers' float32 values) drives the kernels."""
    base = step_coefficients(
        schedule, method=method, prediction_type=prediction_type,
        variance_type=variance_type if method == "ddpm" else "fixed_small",
        clip_sample_range=float(clip_sample_range) if clip_sample else None,
        timesteps=lookup, thresholding=thresholding,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        sample_max_value=sample_max_value, eta=eta,
        use_clipped_model_output=use_clipped_model_output, set_alpha_to_one=set_alpha_to_one)
    final = 1.0 if (method == "ddpm" or set_alpha_to_one) else float(abar32[0])
    table = diffusers_table(abar32, prev, method=method, prediction_type=prediction_type,
                            variance_type=variance_type, clips=base.config.clips, eta=eta,
                            use_clipped_model_output=use_clipped_model_output,
                            final_alpha_cumprod=final)
    rows = torch.tensor(sorted(set(lookup)), dtype=torch.int64)
    if not bool(torch.isfinite(table[rows]).all()):
        bad = rows[~torch.isfinite(table[rows]).all(dim=1)].tolist()
        raise ValueError(f"non-finite step coefficients at timesteps {bad[:8]}")
    return StepCoefficients(base.schedule, base.config, base.timesteps, prev.clone(),
                            table.double(), table)


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
        # key → (StepCoefficients or the error building it, {device: coeffs on device})
        self._fused_cache: Dict[object, Tuple[object, Dict[str, StepCoefficients]]] = {}
        self._fused_zero_seeds: Dict[Tuple[str, int], Tensor] = {}

    def _fused_coefficients(self, key) -> StepCoefficients:
        raise NotImplementedError

    def fused_coefficients(self, device: Union[str, torch.device] = "cpu", key=None
                           ) -> StepCoefficients:
        """The :class:`~fused_ddpm.StepCoefficients` ``step`` uses, with the table on
        ``device`` (built once per schedule and key, copied once per device)."""
        device = torch.device(device)
        if key not in self._fused_cache:
            try:
                if self._fused_schedule_error is not None:
                    raise self._fused_schedule_error
                built: object = self._fused_coefficients(key)
            except ValueError as e:   # deferred to step, as diffusers fails there too
                built = e
            self._fused_cache[key] = (built, {})
        built, per_device = self._fused_cache[key]
        if isinstance(built, BaseException):
            raise ValueError(f"{type(self).__name__} cannot step with this configuration: "
                             f"{built}") from built
        dkey = str(device)
        if dkey not in per_device:
            per_device[dkey] = built.to(device)
        return per_device[dkey]

    @staticmethod
    def _host_timestep(timestep, sample: Tensor):
        """(t for ddpm_step, the host-known values or None)."""
        if isinstance(timestep, Tensor):
            if timestep.device.type == "cpu":
                if timestep.numel() == 1:
                    v = int(timestep.reshape(()))
                    return v, [v]
                tv = timestep.to(torch.int64)
                return tv.to(sample.device, non_blocking=True), tv.tolist()
            return timestep, None
        v = int(timestep)
        return v, [v]

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

    def _no_noise(self, sample: Tensor):
        """(noise, seeds) for a step that adds no noise: consumes no random numbers."""
        if resolve(self.backend, sample.device, sample.dtype) == "reference":
            return torch.zeros_like(sample), None
        key = (str(sample.device), sample.shape[0])
        if key not in self._fused_zero_seeds:
            self._fused_zero_seeds[key] = torch.zeros(sample.shape[0], dtype=torch.int64,
                                                      device=sample.device)
        return None, self._fused_zero_seeds[key]

    def _draw_noise(self, generator, sample: Tensor, model_output: Tensor):
        if self.noise == "philox":
            return None, self._draw_seeds(generator, sample.shape[0], sample.device)
        z = randn_tensor(tuple(sample.shape), generator=generator, device=model_output.device,
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
    def _split_fused_kwargs(cls, kwargs):
        return kwargs.pop("noise", None), kwargs.pop("backend", None)

    @classmethod
    def _apply_fused_kwargs(cls, result, return_unused_kwargs, noise, backend):
        sched = result[0] if return_unused_kwargs else result
        if noise is not None:
            sched.noise = noise
        if backend is not None:
            sched.backend = backend
        return result


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

        @classmethod
        def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
            noise, backend = cls._split_fused_kwargs(kwargs)
            res = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
            return cls._apply_fused_kwargs(res, return_unused_kwargs, noise, backend)

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
                lookup = [int(v) for v in self.timesteps.cpu().tolist()]
                prev = previous_timesteps(torch.tensor(lookup, dtype=torch.int64), T)
            else:
                lookup = list(range(T - 1, -1, -1))
                prev = torch.arange(T, dtype=torch.int64) - 1
            return _build_coefficients(
                self._fused_abar, self._fused_schedule, method="ddpm", prev=prev,
                lookup=lookup, prediction_type=cfg.prediction_type,
                variance_type=cfg.variance_type, clip_sample=cfg.clip_sample,
                clip_sample_range=cfg.clip_sample_range, thresholding=cfg.thresholding,
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
            coeffs = self.fused_coefficients(sample.device)
            t, host = self._host_timestep(timestep, sample)
            if host is None or any(v > 0 for v in host):
                noise, seeds = self._draw_noise(generator, sample, model_output)
            else:
                noise, seeds = self._no_noise(sample)
            prev_sample, x0 = self._fused_step(model_output, t, sample, coeffs, noise, seeds)
            if not return_dict:
                return (prev_sample, x0)
            return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

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

        @classmethod
        def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
            noise, backend = cls._split_fused_kwargs(kwargs)
            res = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
            return cls._apply_fused_kwargs(res, return_unused_kwargs, noise, backend)

        def set_timesteps(self, num_inference_steps: int,
                          device: Union[str, torch.device, None] = None):
            super().set_timesteps(num_inference_steps, device=device)
            self._fused_reset()

        def _fused_coefficients(self, key) -> StepCoefficients:
            eta, ucmo = key
            cfg = self.config
            T = cfg.num_train_timesteps
            ratio = T // self.num_inference_steps
            prev = torch.arange(T, dtype=torch.int64) - ratio      # diffusers: t − T // n
            prev = torch.where(prev >= 0, prev, torch.full_like(prev, -1))
            listed = [int(v) for v in self.timesteps.cpu().tolist()]
            # The reference backend steps to the largest listed timestep below t: list the
            # t − T//n values too, so it lands where diffusers does.
            lookup = sorted(set(listed) | {v - ratio for v in listed if v - ratio >= 0},
                            reverse=True)
            return _build_coefficients(
                self._fused_abar, self._fused_schedule, method="ddim", prev=prev,
                lookup=lookup, prediction_type=cfg.prediction_type,
                variance_type="fixed_small", clip_sample=cfg.clip_sample,
                clip_sample_range=cfg.clip_sample_range, thresholding=cfg.thresholding,
                dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
                sample_max_value=cfg.sample_max_value, eta=eta,
                use_clipped_model_output=ucmo, set_alpha_to_one=cfg.set_alpha_to_one)

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
            coeffs = self.fused_coefficients(sample.device, (eta, bool(use_clipped_model_output)))
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
                noise, seeds = self._no_noise(sample)
            prev_sample, x0 = self._fused_step(model_output, t, sample, coeffs, noise, seeds)
            if not return_dict:
                return (prev_sample, x0)
            return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

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
