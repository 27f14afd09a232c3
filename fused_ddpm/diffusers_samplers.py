"""Drop-in diffusers schedulers for DPM-Solver++ and Euler ancestral whose ``step`` is the
fused op; re-exported by :mod:`fused_ddpm.diffusers` (import them from there).

:class:`FusedDPMSolverMultistepScheduler` and :class:`FusedEulerAncestralDiscreteScheduler`
subclass diffusers' ``DPMSolverMultistepScheduler`` / ``EulerAncestralDiscreteScheduler``:
the same config (every option, saved and loaded alike, ``from_config`` both ways), the same
state (``model_outputs``, ``lower_order_nums``, ``step_index``, ``begin_index``), the same
``set_timesteps``, ``scale_model_input``, ``step`` signature and output type. ``step`` runs
:func:`fused_ddpm.ddpm_step` on a table with one row per step position, built from the
scheduler's own ``sigmas`` (whatever sigma schedule made them: Karras, exponential, beta, Lu
lambdas) in diffusers' float32 arithmetic (``precision="diffusers_float32"``).

Which path a configuration takes (``fused_path``: ``"fused"`` or ``"stock"``; the docs list
them in ``docs/diffusers.md``):

* DPM-Solver++: fused for ``algorithm_type`` ``"dpmsolver++"`` and ``"sde-dpmsolver++"``,
  ``solver_order`` 1 and 2, both ``solver_type``, every ``lower_order_final`` /
  ``euler_at_final`` / ``final_sigmas_type``, thresholding, prediction types ``epsilon``,
  ``sample``, ``v_prediction``. Stock: ``solver_order=3``, ``"dpmsolver"`` /
  ``"sde-dpmsolver"`` (noise-prediction algorithms), ``flow_prediction`` and
  ``use_flow_sigmas``, learned ``variance_type``, and sigmas with two equal neighbours
  (Karras/exponential/beta sigmas with ``final_sigmas_type="sigma_min"``). A single step
  whose order the table does not hold (a loop started mid-schedule with
  ``set_begin_index``: diffusers' first step there is first order) also runs diffusers'
  step; the next ones are fused again.
* Euler ancestral: fused for ``epsilon`` and ``v_prediction``; stock for ``sample`` (which
  diffusers does not implement: its error is kept).

Noise: with the default ``noise="randn"`` it is drawn exactly as diffusers draws it (shape,
dtype, device, generator, and only where diffusers draws it), so results equal diffusers'
up to float rounding; ``variance_noise`` (DPM) is used when given. ``noise="philox"`` uses
in-kernel noise seeded from the generator.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor

from .coefficients import step_coefficients
from .diffusers import (_DIFFUSERS_ERROR, _PRECISION, _finite_rows, _FusedStepMixin,
                        _output, _Plan, _stand_in, _stock_plan, schedule_from_alphas_cumprod)

__all__ = ["FusedDPMSolverMultistepScheduler", "FusedEulerAncestralDiscreteScheduler"]

if _DIFFUSERS_ERROR is None:
    # a module-level SchedulerMixin lets diffusers' pipeline loader load the classes below
    from diffusers import DPMSolverMultistepScheduler as _DPMScheduler
    from diffusers import EulerAncestralDiscreteScheduler as _EulerAScheduler
    from diffusers import SchedulerMixin  # noqa: F401
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as _euler_module
    from diffusers.schedulers.scheduling_euler_ancestral_discrete import \
        EulerAncestralDiscreteSchedulerOutput
    from diffusers.schedulers.scheduling_utils import SchedulerOutput


def _signature_with_options(parent: type) -> inspect.Signature:
    """``parent.__init__``'s signature plus the keyword-only ``noise`` and ``backend``: what
    diffusers' config machinery reads from the drop-in's ``__init__``."""
    init = getattr(parent.__init__, "__wrapped__", parent.__init__)
    sig = inspect.signature(init)
    extra = [inspect.Parameter("noise", inspect.Parameter.KEYWORD_ONLY, default="randn"),
             inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto")]
    return sig.replace(parameters=[*sig.parameters.values(), *extra])


class _SigmaStepMixin(_FusedStepMixin):
    """What the step-indexed drop-ins share: the config-level path decision, the table of the
    current ``sigmas`` and the step-index bookkeeping."""

    _method_name = ""

    def _config_stock_reason(self) -> Optional[str]:
        """Why this configuration runs diffusers' step throughout (None: it is fused)."""
        raise NotImplementedError

    def _method(self) -> str:
        return self._method_name

    def _method_options(self) -> dict:
        return {}

    def _has_schedule(self) -> bool:
        """Whether ``timesteps`` / ``sigmas`` are a schedule ``step`` can run."""
        return self.num_inference_steps is not None

    @property
    def fused_path(self) -> str:
        """``"fused"`` or ``"stock"``: which ``step`` this configuration runs (see the module
        docstring; before ``set_timesteps``: from the config alone). See
        :attr:`fused_path_reason`."""
        if self._config_stock_reason() is not None:
            return "stock"
        return self._plan_for(None).path if self._has_schedule() else "fused"

    @property
    def fused_path_reason(self) -> Optional[str]:
        """Why this configuration is stock (None on the fused path)."""
        reason = self._config_stock_reason()
        if reason is not None or not self._has_schedule():
            return reason
        return self._plan_for(None).reason

    def _fused_plan(self, key) -> _Plan:
        reason = self._config_stock_reason()
        if reason is not None:
            return _stock_plan(reason)
        cfg = self.config
        try:
            # the rows are made from the sigmas alone: ᾱ need not be reproduced exactly
            # (diffusers sets the last ᾱ of a zero-SNR schedule to 2^-24 by hand)
            schedule = self._fused_schedule or schedule_from_alphas_cumprod(self._fused_abar)
            coeffs = step_coefficients(
                schedule, method=self._method(),
                prediction_type=cfg.prediction_type,
                timesteps=self.timesteps.detach().cpu(),
                sigmas=self.sigmas.detach().cpu().double(), precision=_PRECISION,
                **self._method_options())
        except ValueError as e:
            return _stock_plan(str(e))
        if not bool(_finite_rows(coeffs.table64).all()):
            return _stock_plan("the sigmas give non-finite step coefficients")
        return _Plan(coeffs)

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._fused_reset()

    def _step_with_noise(self, plan: _Plan, model_output: Tensor, i: int, sample: Tensor,
                         generator, dtype: torch.dtype, variance_noise: Optional[Tensor] = None,
                         history: Optional[Tensor] = None):
        """(x_next, x̂0) of step i: no noise for a table without a noise term, else
        ``variance_noise`` (in ``dtype``) or noise drawn as diffusers draws it in ``dtype``."""
        coeffs = plan.coeffs
        if not coeffs.adds_noise:
            return self._fused_step(model_output, i, sample, coeffs, *self._no_noise(),
                                    history=history)
        if variance_noise is not None:
            return self._fused_step(model_output, i, sample, coeffs,
                                    variance_noise.to(device=sample.device, dtype=dtype), None,
                                    history=history)
        return self._noisy_step(model_output, i, sample, coeffs, generator, dtype, history)


if _DIFFUSERS_ERROR is None:
    class FusedDPMSolverMultistepScheduler(_SigmaStepMixin, _DPMScheduler):
        """diffusers' ``DPMSolverMultistepScheduler`` with the fused step (see the module
        docstring). Takes every ``DPMSolverMultistepScheduler`` option, plus the keyword-only
        ``noise`` and ``backend`` of :class:`fused_ddpm.diffusers.FusedDDPMScheduler`."""

        ignore_for_config = ["noise", "backend"]
        _method_name = "dpmsolver++"

        def __init__(self, *args, noise: str = "randn", backend: str = "auto", **kwargs):
            super().__init__(*args, **kwargs)
            self._fused_init(noise, backend)

        __init__.__signature__ = _signature_with_options(_DPMScheduler)

        def _config_stock_reason(self) -> Optional[str]:
            cfg = self.config
            if cfg.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
                return f"algorithm_type={cfg.algorithm_type!r} (only the ++ algorithms are fused)"
            if cfg.solver_order not in (1, 2):
                return f"solver_order={cfg.solver_order} (orders 1 and 2 are fused)"
            if cfg.prediction_type not in ("epsilon", "sample", "v_prediction"):
                return f"prediction_type={cfg.prediction_type!r}"
            if cfg.use_flow_sigmas:
                return "use_flow_sigmas=True"
            if cfg.variance_type is not None:
                return f"variance_type={cfg.variance_type!r}"
            return None

        def _method(self) -> str:
            return self.config.algorithm_type

        def _method_options(self) -> dict:
            cfg = self.config
            return dict(solver_order=cfg.solver_order, solver_type=cfg.solver_type,
                        lower_order_final=cfg.lower_order_final,
                        euler_at_final=cfg.euler_at_final,
                        final_sigmas_type=cfg.final_sigmas_type,
                        thresholding=cfg.thresholding,
                        dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
                        sample_max_value=cfg.sample_max_value)

        def _second_order_now(self) -> bool:
            """Whether diffusers' step at the current step index is second order (its rule,
            with its ``lower_order_nums`` state)."""
            cfg = self.config
            n = len(self.timesteps)
            final = self.step_index == n - 1 and (
                cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                or cfg.final_sigmas_type == "zero")
            return cfg.solver_order == 2 and self.lower_order_nums >= 1 and not final

        def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None,
                 variance_noise: Optional[Tensor] = None, return_dict: bool = True):
            """diffusers' ``DPMSolverMultistepScheduler.step``, computed by the fused op where
            :attr:`fused_path` says so. Returns ``SchedulerOutput(prev_sample)`` (or the
            tuple); ``model_outputs[-1]`` then holds this step's x̂0, as in diffusers."""
            if self.num_inference_steps is None:
                raise ValueError("Number of inference steps is 'None', you need to run "
                                 "'set_timesteps' after creating the scheduler")
            plan = self._fused_cache.get(None)
            if plan is None:
                plan = self._plan_for(None)
            if plan.coeffs is None:
                return super().step(model_output, timestep, sample, generator=generator,
                                    variance_noise=variance_noise, return_dict=return_dict)
            if self.step_index is None:
                self._init_step_index(timestep)
            i = self.step_index
            second = plan.coeffs.reads_history[i]
            if second != self._second_order_now():
                return super().step(model_output, timestep, sample, generator=generator,
                                    variance_noise=variance_noise, return_dict=return_dict)
            history = self.model_outputs[-1] if second else None
            prev_sample, x0 = self._step_with_noise(plan, model_output, i, sample, generator,
                                                    torch.float32, variance_noise, history)
            order = self.config.solver_order
            for k in range(order - 1):
                self.model_outputs[k] = self.model_outputs[k + 1]
            self.model_outputs[-1] = x0
            if self.lower_order_nums < order:
                self.lower_order_nums += 1
            self._step_index += 1
            if not return_dict:
                return (prev_sample,)
            return _output(SchedulerOutput, prev_sample=prev_sample)

    class FusedEulerAncestralDiscreteScheduler(_SigmaStepMixin, _EulerAScheduler):
        """diffusers' ``EulerAncestralDiscreteScheduler`` with the fused step (see the module
        docstring). Takes every ``EulerAncestralDiscreteScheduler`` option, plus the
        keyword-only ``noise`` and ``backend`` of
        :class:`fused_ddpm.diffusers.FusedDDPMScheduler`."""

        ignore_for_config = ["noise", "backend"]
        _method_name = "euler_ancestral"

        def __init__(self, *args, noise: str = "randn", backend: str = "auto", **kwargs):
            super().__init__(*args, **kwargs)
            self._fused_init(noise, backend)

        __init__.__signature__ = _signature_with_options(_EulerAScheduler)

        def _has_schedule(self) -> bool:
            return True                 # diffusers' constructor sets a 1000-step schedule

        def _config_stock_reason(self) -> Optional[str]:
            if self.config.prediction_type not in ("epsilon", "v_prediction"):
                return (f"prediction_type={self.config.prediction_type!r} (diffusers' Euler "
                        f"ancestral step takes epsilon and v_prediction)")
            return None

        def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None,
                 return_dict: bool = True):
            """diffusers' ``EulerAncestralDiscreteScheduler.step``, computed by the fused op
            where :attr:`fused_path` says so. Returns
            ``EulerAncestralDiscreteSchedulerOutput(prev_sample, pred_original_sample)`` (or
            the tuple)."""
            plan = self._fused_cache.get(None)
            if plan is None:
                plan = self._plan_for(None)
            if plan.coeffs is None or isinstance(timestep, (int, torch.IntTensor,
                                                            torch.LongTensor)):
                return super().step(model_output, timestep, sample, generator=generator,
                                    return_dict=return_dict)       # (raises for the latter)
            if not self.is_scale_input_called:
                _euler_module.logger.warning(
                    "The `scale_model_input` function should be called before `step` to ensure "
                    "correct denoising. See `StableDiffusionPipeline` for a usage example.")
            if self.step_index is None:
                self._init_step_index(timestep)
            prev_sample, x0 = self._step_with_noise(plan, model_output, self.step_index,
                                                    sample, generator, model_output.dtype)
            self._step_index += 1
            if not return_dict:
                return (prev_sample, x0)
            return _output(EulerAncestralDiscreteSchedulerOutput, prev_sample=prev_sample,
                           pred_original_sample=x0)

else:
    FusedDPMSolverMultistepScheduler = _stand_in(  # type: ignore[misc]
        "FusedDPMSolverMultistepScheduler")
    FusedEulerAncestralDiscreteScheduler = _stand_in(  # type: ignore[misc]
        "FusedEulerAncestralDiscreteScheduler")
