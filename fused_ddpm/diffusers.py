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

Configurations the table cannot express
    Every configuration stock diffusers steps without an error is accepted, with diffusers'
    outputs (non-finite values included). Where the fused table cannot express a visited
    timestep (ᾱ_t = 0 with ``prediction_type="epsilon"``: diffusers clips an infinite x̂0;
    float32 ᾱ underflowing to 0, e.g. ``beta_end=0.2``; ``beta_end > 1``) that step runs
    diffusers' own ``step`` (the ``"partial"`` path); where the configuration itself is
    outside what the table takes (``thresholding`` with ``sample_max_value < 1``,
    ``variance_type="fixed_large_log"``, which diffusers makes NaN for every t > 0, a
    negative DDIM ``eta``) every step does (the ``"stock"`` path). ``fused_path`` and
    ``fused_path_reason`` say which, and a :class:`StockFallbackWarning` is issued once per
    schedule. An unknown ``variance_type`` string is stepped as ``"fixed_small"``, as
    diffusers does, with a warning. Stepping from a timestep that is not in the schedule
    (diffusers raises an ``IndexError``) steps to the largest scheduled timestep below it.

Pipelines
    ``DDPMPipeline(unet, FusedDDPMScheduler()).save_pretrained(d)`` names
    ``fused_ddpm.diffusers`` in ``model_index.json``; ``DDPMPipeline.from_pretrained(d)``
    loads it back as the fused class in any process that imported ``fused_ddpm.diffusers``
    (diffusers loads components only from modules already imported). Loading with
    ``scheduler=DDPMScheduler.from_pretrained(d, subfolder="scheduler")`` needs no
    fused_ddpm. ``DDIMPipeline`` turns any scheduler into a stock ``DDIMScheduler`` in its
    constructor; assign ``pipe.scheduler = FusedDDIMScheduler.from_config(
    pipe.scheduler.config)`` after building or loading it.

``fused_ddpm.diffusers`` imports without diffusers installed; using the classes then raises
an ``ImportError`` that says ``pip install diffusers``.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .coefficients import StepCoefficients, StepConfig, previous_timesteps
from .methods import build_table
from .schedule import NoiseSchedule
from .step import SEED_HIGH, ddpm_step, drawing_step

try:  # diffusers is optional
    from diffusers import DDIMScheduler as _DDIMScheduler
    from diffusers import DDPMScheduler as _DDPMScheduler
    # a module-level SchedulerMixin is how diffusers' pipeline loader recognises the classes
    # of a module it loads components from (model_index.json names fused_ddpm.diffusers)
    from diffusers import SchedulerMixin  # noqa: F401
    from diffusers.configuration_utils import register_to_config
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
    _DIFFUSERS_ERROR: Optional[BaseException] = None
except ImportError as _e:  # pragma: no cover - exercised in a test with diffusers hidden
    _DIFFUSERS_ERROR = _e

__all__ = ["FusedDDPMScheduler", "FusedDDIMScheduler", "FusedDPMSolverMultistepScheduler",
           "FusedEulerAncestralDiscreteScheduler", "NOISE_SOURCES", "FUSED_PATHS",
           "StockFallbackWarning", "schedule_from_alphas_cumprod"]

NOISE_SOURCES = ("randn", "philox")
#: what ``fused_path`` reports: every step fused, some timesteps stock, every step stock
FUSED_PATHS = ("fused", "partial", "stock")
_PRECISION = "diffusers_float32"
#: diffusers' DDPMScheduler variance types -> the registry's name (None: stock step only);
#: diffusers treats any other string as "fixed_small"
_DDPM_VARIANCES: Dict[str, Optional[str]] = {
    "fixed_small": "fixed_small", "fixed_small_log": "fixed_small_log",
    "fixed_large": "fixed_large", "learned": "learned", "learned_range": "learned_range",
    # diffusers takes the square root of log β_t < 0 here: NaN for every t > 0
    "fixed_large_log": None,
}


class StockFallbackWarning(UserWarning):
    """A fused drop-in runs diffusers' own ``step`` for some or all steps (the message says
    which and why); its outputs are still diffusers' outputs."""


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
    return NoiseSchedule(num_train_timesteps=abar.numel(),
                         trained_betas=betas.clamp(0.0, 1.0).tolist())


@dataclass(frozen=True)
class _Plan:
    """How a drop-in steps with one configuration (and inference schedule).

    ``coeffs``: the table of the fused steps (None: every step is stock); ``stock``: visited
    timesteps whose rows the table cannot express (diffusers' step gives inf/NaN there, or
    clips an infinite x̂0), stepped by diffusers' own ``step``; ``reason``: why anything is
    stock (None when nothing is)."""

    coeffs: Optional[StepCoefficients]
    stock: FrozenSet[int] = frozenset()
    reason: Optional[str] = None

    @property
    def path(self) -> str:
        """One of :data:`FUSED_PATHS`."""
        if self.coeffs is None:
            return "stock"
        return "partial" if self.stock else "fused"


def _stock_plan(reason: str) -> _Plan:
    return _Plan(None, frozenset(), reason)


def _finite_rows(table64: Tensor) -> Tensor:
    """bool ``[R]``: rows finite in float64 and in the kernels' float32."""
    return torch.isfinite(table64).all(dim=1) & torch.isfinite(table64.float()).all(dim=1)


def _plan(schedule: Optional[NoiseSchedule], make_config: Callable[[], StepConfig],
          timesteps: List[int], step_gap: Optional[int] = None) -> _Plan:
    """The fused table for ``timesteps`` (diffusers' float32 arithmetic on ``schedule``,
    diffusers' own ᾱ), with the visited rows it cannot express left to the stock step.

    ``schedule`` None or a ``make_config()`` that raises ValueError (an option value our
    validation refuses, e.g. ``sample_max_value < 1``): every step is stock."""
    if schedule is None:
        return _stock_plan("diffusers' float32 alphas_cumprod is not a product of betas in "
                           "[0, 1] (betas > 1?)")
    try:
        cfg = make_config()
    except ValueError as e:
        return _stock_plan(str(e))
    T = schedule.num_train_timesteps
    ts = torch.tensor(timesteps, dtype=torch.int64)
    try:
        coeffs = StepCoefficients(schedule, cfg, ts, step_gap=step_gap, precision=_PRECISION)
        if bool(_finite_rows(coeffs.table64[ts]).all()):
            return _Plan(coeffs)
        error = "non-finite float32 coefficients"
    except ValueError as e:        # non-finite rows at visited timesteps: found below
        error = str(e)
    if step_gap is None:
        prev = previous_timesteps(ts, T)
    else:
        prev = torch.arange(T, dtype=torch.int64) - step_gap
        prev = torch.where(prev >= 0, prev, torch.full_like(prev, -1))
    ok = _finite_rows(build_table(schedule.alphas_cumprod, prev, cfg, _PRECISION))
    keep = [t for t in timesteps if ok[t]]
    bad = frozenset(t for t in timesteps if not ok[t])
    reason = (f"diffusers' step gives non-finite values (or clips an infinite x̂0) at "
              f"timesteps {sorted(bad, reverse=True)[:8]}{' ...' if len(bad) > 8 else ''}")
    if not bad:
        return _stock_plan(error)
    if not keep:
        return _stock_plan(reason)
    coeffs = StepCoefficients(schedule, cfg, torch.tensor(keep), step_gap=step_gap,
                              precision=_PRECISION)
    keep_t = torch.tensor(keep)
    if not torch.equal(coeffs.prev_timesteps[keep_t], prev[keep_t]):
        return _stock_plan(reason)   # dropping rows changed where a fused row steps to
    return _Plan(coeffs, bad, reason)


def _clip_range(cfg) -> Optional[float]:
    return float(cfg.clip_sample_range) if cfg.clip_sample else None


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


class _MissingDiffusers(type):
    """Metaclass of the stand-ins used without diffusers: any use raises the install hint."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"{cls.__name__}: {_INSTALL_HINT}") from _DIFFUSERS_ERROR


def _stand_in(name: str) -> type:
    """A class named ``name`` whose construction or use raises the install hint."""
    def __init__(self, *args, **kwargs):
        raise ImportError(f"{name}: {_INSTALL_HINT}") from _DIFFUSERS_ERROR
    return _MissingDiffusers(name, (), {"__init__": __init__, "__doc__":
                                        "Stand-in: diffusers is not installed "
                                        "(``pip install diffusers``)."})


# ----------------------------------------------------------------------------- mixin
class _FusedStepMixin:
    """What both fused schedulers share: the noise source, the backend, the coefficient
    cache (per key and device) and timestep handling."""


    def _fused_init(self, noise: str, backend: str) -> None:
        self.noise = noise
        self.backend = backend
        self._fused_abar = self.alphas_cumprod.detach().to("cpu", torch.float32).clone()
        self._fused_schedule: Optional[NoiseSchedule] = None
        try:
            schedule = schedule_from_alphas_cumprod(self._fused_abar)
            if torch.equal(schedule.alphas_cumprod.float(), self._fused_abar):
                self._fused_schedule = schedule
        except ValueError:
            pass
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
        self._fused_cache: Dict[object, _Plan] = {}     # step-argument key -> plan

    def _fused_plan(self, key) -> _Plan:
        raise NotImplementedError

    def _plan_for(self, key) -> _Plan:
        """The cached plan of ``key``; a new one warns once when it uses the stock step."""
        plan = self._fused_cache.get(key)
        if plan is None:
            plan = self._fused_plan(key)
            self._fused_cache[key] = plan
            if plan.reason is not None:
                warnings.warn(f"{type(self).__name__}: {plan.path} path, diffusers' own step "
                              f"runs {'every step' if plan.coeffs is None else 'those steps'}:"
                              f" {plan.reason}", StockFallbackWarning, stacklevel=3)
        return plan

    @property
    def fused_path(self) -> str:
        """Which ``step`` runs for this configuration and inference schedule (with the default
        ``step`` arguments): ``"fused"`` (the fused op, every step), ``"partial"`` (diffusers'
        own step at the timesteps the table cannot express, the fused op elsewhere) or
        ``"stock"`` (diffusers' own step throughout). See :attr:`fused_path_reason`."""
        return self._plan_for(self._default_key).path

    @property
    def fused_path_reason(self) -> Optional[str]:
        """Why some steps are stock (None on the ``"fused"`` path)."""
        return self._plan_for(self._default_key).reason

    _default_key: object = None

    def fused_coefficients(self, device: Union[str, torch.device, None] = None, key=None
                           ) -> StepCoefficients:
        """The :class:`~fused_ddpm.StepCoefficients` ``step`` uses (built once per schedule
        and key; their table is copied to each device once, on first use there, or now
        for ``device``). A ValueError on the ``"stock"`` path (:attr:`fused_path`)."""
        plan = self._plan_for(key)
        if plan.coeffs is None:
            raise ValueError(f"{type(self).__name__} runs diffusers' own step with this "
                             f"configuration (no fused table): {plan.reason}")
        if device is not None:
            plan.coeffs.table_on(device)
        return plan.coeffs

    @staticmethod
    def _stock_step(plan: _Plan, timestep) -> bool:
        """Whether this step runs diffusers' own step. Reads a device timestep's value (a host
        sync) only on the ``"partial"`` path."""
        if plan.coeffs is None:
            return True
        if not plan.stock:
            return False
        if isinstance(timestep, Tensor) and timestep.numel() != 1:
            hit = sorted(set(timestep.flatten().tolist()) & plan.stock)
            if hit:
                raise ValueError(f"timestep: per-sample timesteps {hit} need diffusers' own "
                                 f"step, which takes one timestep per call")
            return False
        return int(timestep) in plan.stock

    @staticmethod
    def _host_timestep(timestep, sample: Tensor):
        """(t for ddpm_step, whether noise is added: True/False when the host knows t,
        None for a device tensor)."""
        if not isinstance(timestep, (int, Tensor)) and getattr(timestep, "ndim", 0) > 0:
            timestep = torch.as_tensor(timestep)      # a NumPy array of per-sample timesteps
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

    def _draw_noise(self, generator, sample: Tensor, model_output: Tensor,
                    dtype: Optional[torch.dtype] = None):
        """(noise, seeds): z ``[sample.shape]`` drawn as diffusers draws it (in ``dtype``,
        default the model output's), or Philox seeds."""
        if self.noise == "philox":
            return None, self._draw_seeds(generator, sample.shape[0], sample.device)
        device = model_output.device
        dtype = model_output.dtype if dtype is None else dtype
        if generator is None or (type(generator) is torch.Generator and
                                 generator.device.type == device.type):
            # what randn_tensor does for one generator on the sample's device type
            z = torch.randn(sample.shape, generator=generator, device=device, dtype=dtype)
        else:
            z = randn_tensor(tuple(sample.shape), generator=generator, device=device,
                             dtype=dtype)
        return z, None

    def _noisy_step(self, model_output: Tensor, t, sample: Tensor, coeffs: StepCoefficients,
                    generator, dtype: Optional[torch.dtype] = None,
                    history: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The fused step with noise from :meth:`_draw_noise` (z in ``dtype``, default the
        model output's), drawn inside the fused call when it can be
        (:func:`fused_ddpm.step.drawing_step`)."""
        if self._fused_noise == "philox" or (model_output.dtype == sample.dtype and
                                            (dtype is None or dtype == sample.dtype)):
            res = drawing_step(self._fused_noise, coeffs, self.backend, sample, model_output, t,
                               generator, history)
            if res is not None:
                return res
        noise, seeds = self._draw_noise(generator, sample, model_output, dtype)
        return self._fused_step(model_output, t, sample, coeffs, noise, seeds, history)

    def _fused_step(self, model_output: Tensor, t, sample: Tensor, coeffs: StepCoefficients,
                    noise, seeds, history: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if model_output.dtype != sample.dtype:
            model_output = model_output.to(sample.dtype)
        if noise is not None and noise.dtype != sample.dtype:
            noise = noise.to(sample.dtype)
        if history is None:
            return ddpm_step(sample, model_output, t, coeffs, noise=noise, seeds=seeds,
                             return_x0=True, backend=self.backend)
        if history.dtype != sample.dtype:
            history = history.to(sample.dtype)
        return ddpm_step(sample, model_output, t, coeffs, noise=noise, seeds=seeds,
                         return_x0=True, backend=self.backend, history=history)

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

        def _fused_plan(self, key) -> _Plan:
            cfg = self.config
            T = cfg.num_train_timesteps
            if self.custom_timesteps or self.num_inference_steps:
                timesteps = [int(v) for v in self.timesteps.cpu().tolist()]
            else:                       # before set_timesteps diffusers steps t → t − 1
                timesteps = list(range(T - 1, -1, -1))
            if cfg.variance_type in _DDPM_VARIANCES:
                variance_type = _DDPM_VARIANCES[cfg.variance_type]
                if variance_type is None:
                    return _stock_plan(f"variance_type={cfg.variance_type!r} (diffusers returns "
                                       f"NaN for every step with t > 0)")
            else:
                variance_type = "fixed_small"
                warnings.warn(f"{type(self).__name__}: variance_type={cfg.variance_type!r} is "
                              f"not one of diffusers' {list(_DDPM_VARIANCES)}; stepping with "
                              f"'fixed_small', as diffusers' DDPMScheduler does",
                              StockFallbackWarning, stacklevel=4)

            def config() -> StepConfig:
                return StepConfig(
                    "ddpm", cfg.prediction_type, variance_type, _clip_range(cfg),
                    bool(cfg.thresholding), float(cfg.dynamic_thresholding_ratio),
                    float(cfg.sample_max_value))
            return _plan(self._fused_schedule, config, timesteps)

        def step(self, model_output: Tensor, timestep, sample: Tensor,
                 generator=None, return_dict: bool = True):
            """diffusers' ``DDPMScheduler.step``, computed by the fused op (by diffusers' own
            step where :attr:`fused_path` says so).

            ``timestep``: an int (Python or NumPy), or an int tensor ``[]`` or ``[B]`` (one
            timestep per sample, an extension). Returns
            ``DDPMSchedulerOutput(prev_sample, pred_original_sample)`` (or the tuple).
            """
            plan = self._fused_cache.get(None)
            if plan is None:
                plan = self._plan_for(None)
            if plan.stock and self._stock_step(plan, timestep) or plan.coeffs is None:
                return super().step(model_output, timestep, sample, generator=generator,
                                    return_dict=return_dict)
            t, noisy = self._host_timestep(timestep, sample)
            if noisy is False:
                prev_sample, x0 = self._fused_step(model_output, t, sample, plan.coeffs,
                                                   *self._no_noise())
            else:
                prev_sample, x0 = self._noisy_step(model_output, t, sample, plan.coeffs,
                                                   generator)
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
        _default_key = (0.0, False)

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

        def _fused_plan(self, key) -> _Plan:
            if self.num_inference_steps is None:
                raise ValueError("Number of inference steps is 'None', you need to run "
                                 "'set_timesteps' after creating the scheduler")
            eta, ucmo = key
            cfg = self.config

            def config() -> StepConfig:
                return StepConfig(
                    "ddim", cfg.prediction_type, "fixed_small", _clip_range(cfg),
                    bool(cfg.thresholding), float(cfg.dynamic_thresholding_ratio),
                    float(cfg.sample_max_value), eta, ucmo, bool(cfg.set_alpha_to_one))
            return _plan(self._fused_schedule, config,
                         [int(v) for v in self.timesteps.cpu().tolist()],
                         step_gap=cfg.num_train_timesteps // self.num_inference_steps)  # t − T//n

        def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0,
                 use_clipped_model_output: bool = False, generator=None,
                 variance_noise: Optional[Tensor] = None, return_dict: bool = True):
            """diffusers' ``DDIMScheduler.step``, computed by the fused op (by diffusers' own
            step where the plan of this configuration and ``eta`` says so, see
            :attr:`fused_path`). ``timestep`` as for :meth:`FusedDDPMScheduler.step`.

            Returns ``DDIMSchedulerOutput(prev_sample, pred_original_sample)`` (or the tuple).
            """
            if self.num_inference_steps is None:
                raise ValueError("Number of inference steps is 'None', you need to run "
                                 "'set_timesteps' after creating the scheduler")
            eta = float(eta)
            plan = self._plan_for((eta, bool(use_clipped_model_output)))
            if plan.stock and self._stock_step(plan, timestep) or plan.coeffs is None:
                return super().step(model_output, timestep, sample, eta=eta,
                                    use_clipped_model_output=use_clipped_model_output,
                                    generator=generator, variance_noise=variance_noise,
                                    return_dict=return_dict)
            coeffs = plan.coeffs
            t, _ = self._host_timestep(timestep, sample)
            if eta > 0:
                if variance_noise is not None and generator is not None:
                    raise ValueError("Cannot pass both generator and variance_noise. Please make "
                                     "sure that either `generator` or `variance_noise` stays "
                                     "`None`.")
                if variance_noise is None:
                    prev_sample, x0 = self._noisy_step(model_output, t, sample, coeffs,
                                                       generator)
                else:
                    prev_sample, x0 = self._fused_step(model_output, t, sample, coeffs,
                                                       variance_noise.to(sample.device), None)
            else:
                prev_sample, x0 = self._fused_step(model_output, t, sample, coeffs,
                                                   *self._no_noise())
            if not return_dict:
                return (prev_sample, x0)
            return _output(DDIMSchedulerOutput, prev_sample=prev_sample,
                           pred_original_sample=x0)

else:
    FusedDDPMScheduler = _stand_in("FusedDDPMScheduler")            # type: ignore[misc]
    FusedDDIMScheduler = _stand_in("FusedDDIMScheduler")            # type: ignore[misc]

# the DPM-Solver++ and Euler-ancestral drop-ins (they build on the mixin above)
from .diffusers_samplers import (FusedDPMSolverMultistepScheduler,  # noqa: E402
                                 FusedEulerAncestralDiscreteScheduler)
