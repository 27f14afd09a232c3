"""The user-facing fused step: :func:`ddpm_step` and :class:`DDPMStepFunction`.

A call is validated once per *kind* of call: the first call with given coefficients,
shapes, strides, dtypes, devices, noise source, timestep kind and backend builds a
:class:`Prepared` launch (every check a bad input can fail runs here), and later calls of
the same kind go straight to the launch. Only what a value can get wrong is checked per
call (an int timestep's range, an int seed's size, a CPU timestep tensor's range, ``out``
overlapping an input).

The commonest kind — an int t, no ``out=``, no guidance or dynamic thresholding, dense
inputs, nothing that needs a gradient, on the C++ backends — is also handed to a C++
``PlainStep`` (``csrc/direct_launch.cpp``) kept on the coefficients per backend: it
compares the next call's arguments with the validated ones, checks t's range and
launches, a few µs in all; a call of any other kind falls through to the path below.

Lists here are indexed with ``int(Flag.X)`` rather than ``Flag.X``: torch.compile (2.13)
traces this module and fails on a list indexed by an IntEnum.
"""
from __future__ import annotations

import numbers
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _extension, ops
from .backends import get as get_backend
from .backends import resolve
from .coefficients import StepCoefficients
from .contract import (NUM_FLAGS, NUM_IN, NUM_SCALARS, SEED_HIGH, Clip, Col, Flag, In, Layout,
                       Noise, Scalar, Var)
from .guidance import rescale_factors
from .layout import empty_in_layout, is_sample_dense, layout_of, to_layout
from .thresholding import step_threshold
from .validation import (check_guidance, check_out, check_step_inputs, guided_halves,
                         normalize_seeds, normalize_t, out_overlaps)

__all__ = ["ddpm_step", "DDPMStepFunction", "draw_seeds", "Prepared", "drawing_step",
           "SEED_HIGH"]

_X, _M, _MC, _Z, _H = int(In.X), int(In.M), int(In.MC), int(In.Z), int(In.H)
# FUSED_DDPM_BACKEND as set now, read from os.environ's own dict: os.environ.get costs
# ~0.8 µs, as much as the rest of a PlainStep call's Python.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("FUSED_DDPM_BACKEND") if _ENV_DATA is not None else None


def _env_backend():
    if _ENV_DATA is None:
        return os.environ.get("FUSED_DDPM_BACKEND")
    return _ENV_DATA.get(_ENV_KEY)
#: prepared launches kept per StepCoefficients (oldest dropped first)
MAX_PREPARED = 64


def draw_seeds(batch: int, device: torch.device,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """int64 seeds ``[B]`` drawn on ``device`` from ``generator`` (torch's default if None),
    so ``torch.manual_seed`` makes in-kernel noise reproducible without a host sync."""
    dev = generator.device if generator is not None else device
    return torch.randint(0, SEED_HIGH, (batch,), dtype=torch.int64, device=dev,
                         generator=generator).to(device)


def _sig(a: Optional[Tensor]):
    return None if a is None else (a.shape, a.stride(), a.dtype, a.device)


def _value_sig(a) -> Any:
    """What validation checked about t or seeds: the kind of value, or a tensor's metadata."""
    if isinstance(a, Tensor):
        return (a.shape, a.dtype, a.device)
    return type(a)


ModelOutput = Union[Tensor, Tuple[Tensor, Tensor]]


def _tensors(model_output) -> Tuple[Tensor, ...]:
    """The tensors of a model output (one, or the pair of a guided step)."""
    if model_output is None:
        return ()
    return tuple(model_output) if isinstance(model_output, (tuple, list)) else (model_output,)


class Prepared:
    """A validated launch recipe for one kind of call (see the module docstring).

    ``model_output`` is None for the training-side step (:func:`fused_ddpm.add_noise`),
    whose sample is named ``x_name`` in messages. The kind of call includes whether it is
    guided (and how the two halves are given), rescaled, and given a ``history``.
    """

    def __init__(self, coeffs: StepCoefficients, x: Tensor, model_output: Optional[ModelOutput],
                 t, noise: Optional[Tensor], seeds, out: Optional[Tensor], backend: str,
                 x_name: str = "x_t", history: Optional[Tensor] = None,
                 guidance_scale: Optional[float] = None, guidance_rescale: float = 0.0):
        check_step_inputs(x, model_output, t, coeffs, noise=noise, seeds=seeds, x_name=x_name,
                          history=history, guidance_scale=guidance_scale,
                          guidance_rescale=guidance_rescale)
        if out is not None:
            check_out(out, x, x_name)
        cfg = coeffs.config
        self.coeffs = coeffs
        self.x_name = x_name
        self.backend = resolve(backend, x.device, x.dtype)
        self.record = get_backend(self.backend)
        self.device = x.device
        self.dtype = x.dtype
        self.batch = x.shape[0]
        self.channels = x.shape[1]
        self.rows = coeffs.num_rows
        self.layout = layout_of(x)
        if not coeffs.adds_noise:
            self.noise_mode = Noise.NONE
        else:
            self.noise_mode = Noise.EXTERNAL if noise is not None else Noise.PHILOX
        self.var_mode = cfg.variance_mode
        self.dynamic = cfg.clip_mode == Clip.DYNAMIC
        self.guided = guidance_scale is not None
        self.rescale = self.guided and guidance_rescale != 0
        # a history the table does not read is not passed on
        self.has_history = history is not None and coeffs.multistep
        terms = coeffs.terms
        # Without a history the H term is left out; the rows a call uses must not need it.
        self.h_free: Optional[Tensor] = None
        if coeffs.multistep and not self.has_history:
            terms &= ~(1 << int(Col.H))
            self.h_free = ~torch.tensor(coeffs.reads_history)
            if isinstance(t, Tensor) and t.device.type != "cpu":
                raise ValueError(f"history is needed by method={cfg.method!r} (the previous "
                                 f"step's x̂0); with a device tensor t pass one on every step, "
                                 f"e.g. zeros on the first (its coefficient is 0 there)")
        self.flags: List[int] = [0] * NUM_FLAGS
        self.flags[int(Flag.CLIP)] = int(cfg.clip_mode)
        self.flags[int(Flag.VAR)] = int(self.var_mode)
        self.flags[int(Flag.NOISE)] = int(self.noise_mode)
        self.flags[int(Flag.LAYOUT)] = int(self.layout)
        self.flags[int(Flag.TERMS)] = terms
        self.flags[int(Flag.NOISE_STREAM)] = int(coeffs.noise_stream)
        self.scalars: List[float] = [0.0] * NUM_SCALARS
        self.scalars[int(Scalar.CLIP)] = float(cfg.clip_sample_range or 0.0)
        self.table = coeffs.table_on(x.device, torch.float64 if x.dtype == torch.float64
                                     else torch.float32)
        self.has_model = model_output is not None
        self.split = self.has_model and cfg.model_channels == 2
        self.copies = [a is not None and not is_sample_dense(a, self.layout)
                       for a in self._streams_raw(x, model_output, noise, history)]
        # the common case: x, model_output (and noise, history) go in as given
        self.plain = not (self.split or self.guided or any(self.copies) or (
            self.noise_mode == Noise.EXTERNAL and noise.dtype != self.dtype))
        self.external = self.noise_mode == Noise.EXTERNAL
        self.seeds_ready = (isinstance(seeds, Tensor) and seeds.dim() == 1 and
                            seeds.device == self.device)
        self.t_views: Dict[int, Tensor] = {}       # int t -> its [B] index view
        self.dense_out = out is None or is_sample_dense(out, self.layout)
        dense = x.is_contiguous() if self.layout == Layout.CONTIGUOUS else \
            x.dim() in (4, 5) and x.is_contiguous(memory_format=torch.channels_last if
                                                  x.dim() == 4 else torch.channels_last_3d)
        self.empty = torch.empty_like if dense else (lambda a: empty_in_layout(a, self.layout))
        self.forward = None           # the unchecked launcher, once a launch was checked
        self.backend_arg = backend
        self.plain_step = None        # the C++ PlainStep of this kind of call (made once)
        self.fast = (self.plain and self.has_model and dense and out is None and
                     not self.dynamic and
                     self.record.torch_ops and type(t) is int and x.numel() > 0 and
                     all(a is None or type(a) is Tensor
                         for a in (x, model_output, noise, history)) and
                     (self.noise_mode != Noise.PHILOX or self.seeds_ready))

    def _streams_raw(self, x: Tensor, model_output: Optional[ModelOutput],
                     noise: Optional[Tensor], history: Optional[Tensor]
                     ) -> List[Optional[Tensor]]:
        """The ins list before layout copies."""
        ins: List[Optional[Tensor]] = [None] * NUM_IN
        ins[int(In.X)] = x
        if self.has_model:
            C = self.channels
            if self.guided:
                mu, mc = guided_halves(model_output, self.batch)
            else:
                mu, mc = model_output, None
            ins[int(In.M)] = mu[:, :C] if self.split else mu
            if mc is not None:
                ins[int(In.MC)] = mc[:, :C] if self.split else mc
            if self.var_mode != Var.FIXED:     # the variance of the conditional output
                ins[int(In.V)] = (mu if mc is None else mc)[:, C:]
        if self.noise_mode == Noise.EXTERNAL:
            ins[int(In.Z)] = noise if noise.dtype == self.dtype else noise.to(self.dtype)
        if self.has_history:
            ins[int(In.H)] = history
        return ins

    def streams(self, x: Tensor, model_output: Optional[ModelOutput], noise: Optional[Tensor],
                history: Optional[Tensor] = None) -> List[Optional[Tensor]]:
        """The ins list of a launch, sample-dense in the layout."""
        if self.plain:
            ins = [None] * NUM_IN
            ins[_X] = x
            ins[_M] = model_output
            if self.external:
                ins[_Z] = noise
            if self.has_history:
                ins[_H] = history
            return ins
        ins = self._streams_raw(x, model_output, noise, history)
        for i, copy in enumerate(self.copies):
            if copy:
                ins[i] = to_layout(ins[i], self.layout)
        return ins

    def timesteps(self, t, batch: int, compiling: bool = False) -> Tensor:
        """t as int64 ``[B]`` on the device (an int: a view of a cached index tensor)."""
        if type(t) is int and not compiling:
            view = self.t_views.get(t)
            if view is None:
                if not 0 <= t < self.rows:
                    raise ValueError(f"t={t} is out of range [0, {self.rows})")
                self._check_history_rows(t)
                view = self.coeffs.row_index(t, self.device).expand(batch)
                if not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                    self.t_views[t] = view
            return view
        tt = normalize_t(t, batch, self.device, self.rows, self.coeffs)
        if self.h_free is not None and not compiling:
            self._check_history_rows(torch.as_tensor(t))       # t is on the host here
        return tt

    def _check_history_rows(self, t) -> None:
        """Without a history, the rows of t must have no H term (t: an int or a CPU tensor)."""
        if self.h_free is None:
            return
        if isinstance(t, Tensor):
            ok = bool(self.h_free[t.reshape(-1).long().clamp(0, self.rows - 1)].all())
        else:
            ok = bool(self.h_free[int(t)])
        if not ok:
            shown = t.tolist() if isinstance(t, Tensor) else t
            raise ValueError(f"history is needed at t={shown} "
                             f"(method={self.coeffs.config.method!r} reads the previous "
                             f"step's x̂0 there): pass history=the x̂0 of the previous step "
                             f"(return_x0=True)")

    def seeds(self, seeds, batch: int, generator) -> Optional[Tensor]:
        if self.noise_mode != Noise.PHILOX:
            return None
        if seeds is None:
            return draw_seeds(batch, self.device, generator)
        if self.seeds_ready:
            return seeds
        if isinstance(seeds, Tensor):
            return seeds.to(self.device).expand(batch)
        return normalize_seeds(seeds, batch, self.device)

    def gscale(self, ins, guidance_scale, guidance_rescale) -> Optional[Tensor]:
        """k ``[B]`` of a rescaled guided step (:func:`fused_ddpm.guidance.rescale_factors`)."""
        if not self.rescale:
            return None
        return rescale_factors(ins[_M], ins[_MC], guidance_scale, guidance_rescale)

    def thresh(self, ins, t: Tensor, gscale: Optional[Tensor] = None,
               scalars: Optional[List[float]] = None) -> Optional[Tensor]:
        if not self.dynamic:
            return None
        cfg = self.coeffs.config
        return step_threshold(ins, t, self.table, gscale, self.flags,
                              self.scalars if scalars is None else scalars,
                              cfg.dynamic_thresholding_ratio, cfg.sample_max_value)

    def launch(self, ins, t, seeds, thresh, outs, gscale=None, scalars=None) -> None:
        """The forward launch: the backend's checks run on the first one only."""
        scalars = self.scalars if scalars is None else scalars
        if self.forward is not None:
            if ins[_X].numel():
                self.forward(ins, t, seeds, self.table, thresh, gscale, outs, self.flags,
                             scalars)
        elif ins[_X].numel():
            self.record.launchers.forward(ins, t, seeds, self.table, thresh, gscale, outs,
                                          self.flags, scalars)
            self.forward = self.record.unchecked_launchers.forward

    def run(self, x: Tensor, model_output: Optional[ModelOutput], t, noise: Optional[Tensor],
            seeds, return_x0: bool, out: Optional[Tensor], generator,
            compiling: bool = False, history: Optional[Tensor] = None,
            guidance_scale: Optional[float] = None, guidance_rescale: float = 0.0):
        """One step with this recipe: y (and x0 when ``return_x0``)."""
        B = self.batch
        scalars = self.scalars
        if self.guided:
            check_guidance(guidance_scale, guidance_rescale)
            scalars = list(self.scalars)
            scalars[int(Scalar.GUIDANCE)] = float(guidance_scale)
        tt = self.timesteps(t, B, compiling)
        sd = self.seeds(seeds, B, generator)
        ins = self.streams(x, model_output, noise, history)
        gscale = self.gscale(ins, guidance_scale, guidance_rescale) if self.rescale else None
        thresh = self.thresh(ins, tt, gscale, scalars) if self.dynamic else None
        inputs = (x,) + _tensors(model_output) + (noise, history)
        if out is not None:
            if torch.is_grad_enabled() and out.requires_grad:
                raise RuntimeError("out= does not support automatic differentiation (out "
                                   "requires grad)")
            if out_overlaps(out, *inputs):
                raise ValueError(f"out must not share memory with an input ({self.x_name}, "
                                 f"model_output, noise, history)")
            x0 = self.empty(x) if return_x0 else None
            if compiling:
                ops.step_out(*ops.pack(ins), tt, sd, self.table, thresh, gscale, self.flags,
                             scalars, self.backend, out, x0)
            elif self.dense_out:
                self.launch(ins, tt, sd, thresh, [out, x0], gscale, scalars)
            else:
                y = self.empty(x)
                self.launch(ins, tt, sd, thresh, [y, x0], gscale, scalars)
                out.copy_(y)
            return (out, x0) if return_x0 else out
        if compiling or (torch.is_grad_enabled() and any(
                a is not None and a.requires_grad for a in inputs)):
            y, x0 = ops.step_differentiable(*ops.pack(ins), tt, sd, self.table, thresh, gscale,
                                            self.flags, scalars, return_x0, self.backend)
        else:
            y = self.empty(x)
            x0 = self.empty(x) if return_x0 else None
            self.launch(ins, tt, sd, thresh, [y, x0], gscale, scalars)
            if self.fast:
                self._hand_over(x, model_output, noise, seeds, history)
        return (y, x0) if return_x0 else y

    def _hand_over(self, x, model_output, noise, seeds, history) -> None:
        """Make this kind of call the one the C++ ``PlainStep`` of its backend takes."""
        if self.plain_step is None:
            direct = _extension.direct()
            if direct is None or (self.device.type == "cuda" and
                                  torch.cuda.is_current_stream_capturing()):
                return
            h_free = [] if self.h_free is None else self.h_free.tolist()
            self.plain_step = direct.PlainStep(
                self.table, self.coeffs.row_numbers(self.device), self.flags, self.scalars,
                h_free, x, model_output, noise, seeds, history, self.external,
                self.noise_mode == Noise.PHILOX, self.has_history)
        self.coeffs._fast[_fast_key(self.backend_arg)] = self.plain_step


def drawing_step(noise: str, coeffs: StepCoefficients, backend: str, x_t: Tensor,
                 model_output: Tensor, t: int, generator: Optional[torch.Generator],
                 history: Optional[Tensor] = None) -> Optional[Tuple[Tensor, Tensor]]:
    """``ddpm_step(..., return_x0=True)`` with its noise drawn from ``generator`` (None:
    torch's default generator of x_t's device) in the same C++ call, as the diffusers
    drop-ins draw it, when the last call of this kind left a ``PlainStep``; else None, with
    nothing drawn (the caller draws and calls :func:`ddpm_step`).

    ``noise``: ``"randn"``: ``noise=torch.randn(x_t.shape, generator=generator,
    dtype=x_t.dtype, device=x_t.device)``; ``"philox"``: ``seeds=`` :func:`draw_seeds`
    ``(B, x_t.device, generator)``."""
    if noise == "randn":
        method = "randn"
    elif noise == "philox":
        method = "seeded"
    else:
        raise ValueError(f"noise={noise!r} is not one of ['randn', 'philox']")
    if torch.compiler.is_compiling() or type(coeffs) is not StepCoefficients:
        return None
    fast = coeffs._fast.get(_fast_key(backend))
    if fast is None:
        return None
    return getattr(fast, method)(x_t, model_output, t, generator, history, True)


def _fast_key(backend: str):
    """Which ``PlainStep`` a call with ``backend`` may use (``"auto"`` with the environment's
    override, which changes what "auto" picks)."""
    return backend if backend != "auto" else ("auto", _env_backend())


def prepared(coeffs: StepCoefficients, x: Tensor, model_output: Optional[ModelOutput], t,
             noise: Optional[Tensor], seeds, out: Optional[Tensor], backend: str,
             x_name: str = "x_t", compiling: bool = False, history: Optional[Tensor] = None,
             guidance_scale: Optional[float] = None, guidance_rescale: float = 0.0
             ) -> Prepared:
    """The :class:`Prepared` launch for this kind of call: cached on ``coeffs`` (at most
    :data:`MAX_PREPARED`), or built (and validated) now. Under torch.compile: built fresh.

    The cache key is everything validation looked at: shapes, strides, dtypes and devices
    of the tensors, the kinds of t and seeds, the backend asked for (and the environment
    override of "auto"), whether the step is guided (and how) and rescaled."""
    extra = dict(history=history, guidance_scale=guidance_scale,
                 guidance_rescale=guidance_rescale)
    if compiling or type(coeffs) is not StepCoefficients or type(x) is not Tensor:
        return Prepared(coeffs, x, model_output, t, noise, seeds, out, backend, x_name, **extra)
    mo = model_output
    if guidance_scale is not None:
        if not (isinstance(guidance_scale, numbers.Real) and
                isinstance(guidance_rescale, numbers.Real)):
            return Prepared(coeffs, x, model_output, t, noise, seeds, out, backend, x_name,
                            **extra)         # raises the TypeError
        guide = ("pair" if isinstance(mo, (tuple, list)) else "tensor", guidance_rescale != 0)
    else:
        guide = None
    key = (x.shape, x.stride(), x.dtype, x.device,
           tuple(_sig(a) if isinstance(a, Tensor) else type(a) for a in _tensors(mo)),
           None if noise is None else (noise.shape, noise.stride(), noise.dtype, noise.device),
           int if type(t) is int else _value_sig(t),
           _value_sig(seeds), None if out is None else _sig(out), backend,
           _env_backend() if backend == "auto" else None, x_name,
           guide, _sig(history) if isinstance(history, Tensor) else type(history),
           guidance_rescale if guidance_scale is None else None)
    plans = coeffs._plans
    plan = plans.get(key)
    if plan is None:
        plan = Prepared(coeffs, x, model_output, t, noise, seeds, out, backend, x_name, **extra)
        if len(plans) >= MAX_PREPARED:
            plans.pop(next(iter(plans)))
        plans[key] = plan
    return plan


def ddpm_step(x_t: Tensor,
              model_output: ModelOutput,
              t: Union[int, Tensor],
              coeffs: StepCoefficients,
              noise: Optional[Tensor] = None,
              seeds: Union[None, int, Tensor] = None,
              return_x0: bool = False,
              out: Optional[Tensor] = None,
              backend: str = "auto",
              generator: Optional[torch.Generator] = None,
              *,
              history: Optional[Tensor] = None,
              guidance_scale: Optional[float] = None,
              guidance_rescale: float = 0.0,
              ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """One fused sampler step: DDPM, DDIM, DPM-Solver++ (2M, SDE) or Euler ancestral, as
    ``coeffs`` says (formulas: ``docs/samplers.md``).

    Args:
        x_t: sample ``[B, C, ...]``, float16/bfloat16/float32/float64 (sigma space x0 + σ·ε
            for Euler ancestral, as diffusers).
        model_output: ``[B, C, ...]`` (``[B, 2C, ...]`` for learned variances), x_t's dtype.
            Guided (``guidance_scale`` given): ``[2B, ...]`` with the unconditional half first
            (diffusers' ``chunk(2)`` order), or a pair ``(unconditional, conditional)``.
        t: which row of the table: the actual timestep for methods indexed by timestep
            (DDPM, DDIM), the step position i = 0 … n − 1 for methods indexed by step
            (``coeffs.index_by == "step"``). An int (Python or NumPy), or an integer tensor
            ``[B]`` / ``[]`` (on the device: no host sync, graph-capturable).
        coeffs: from :func:`fused_ddpm.step_coefficients`.
        noise: external z (x_t's shape). Or ``seeds`` (int, or int64 ``[B]`` on the device) for
            in-kernel Philox noise. With neither, seeds are drawn from ``generator`` (torch's
            default generator when None). A step without a noise term (DDIM with η = 0,
            DPM-Solver++) uses neither.
        return_x0: also return x̂0 (clipped/thresholded, as diffusers' ``pred_original_sample``
            and DPM-Solver's ``model_outputs[-1]``): the ``history`` of the next step.
        out: write x_{t′} here (x_t's shape/dtype/device; not differentiable).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"torch"``
            (:mod:`fused_ddpm.backends`).
        history: the previous step's x̂0 (x_t's shape, dtype, device), read by multistep
            methods (``coeffs.multistep``). May be None on a step whose row has no history
            term (the first step) when t is an int or a CPU tensor; with a device-tensor t
            pass a finite tensor (zeros) there.
        guidance_scale: g of classifier-free guidance: m = m_u + g·(m_c − m_u), formed in
            the kernel (g = 1: exactly the conditional step). Learned variances take the
            variance channels of the conditional half.
        guidance_rescale: φ ∈ [0, 1] (Lin et al. 2023): the guided prediction is scaled per
            sample by φ·std(m_c)/std(m_cfg) + 1 − φ (a small pre-pass; treated as a constant
            for gradients).

    Returns:
        x_{t′} with x_t's shape, dtype and memory format; and x̂0 if ``return_x0``.
        Differentiable w.r.t. x_t, model_output (both halves), history and noise.

    Raises:
        TypeError (a wrong type or dtype), ValueError (a wrong value or shape, an unknown
        backend name, a missing history), :class:`fused_ddpm.BackendUnavailableError` (the
        backend asked for cannot run this call here).
    """
    compiling = torch.compiler.is_compiling()
    if (not compiling and out is None and guidance_scale is None and generator is None and
            type(coeffs) is StepCoefficients and type(guidance_rescale) is float and
            guidance_rescale == 0.0):
        fast = coeffs._fast.get(_fast_key(backend))
        if fast is not None:
            res = fast(x_t, model_output, t, noise, seeds, history, return_x0)
            if res is not None:
                return res
    plan = prepared(coeffs, x_t, model_output, t, noise, seeds, out, backend,
                    compiling=compiling, history=history, guidance_scale=guidance_scale,
                    guidance_rescale=guidance_rescale)
    return plan.run(x_t, model_output, t, noise, seeds, return_x0, out, generator, compiling,
                    history, guidance_scale, guidance_rescale)


class DDPMStepFunction(torch.autograd.Function):
    """``torch.autograd.Function`` form of the fused step (same maths as :func:`ddpm_step`).

    ``DDPMStepFunction.apply(x_t, model_output, t, coeffs, noise=None, seeds=None,
    backend="auto", history=None, guidance_scale=None, guidance_rescale=0.0)`` returns
    x_{t′} (a guided ``model_output`` is the ``[2B, ...]`` tensor here). Forward and
    backward are those of :func:`ddpm_step` (the backward is the registered
    ``fused_ddpm::step_backward`` op); in-kernel noise is recomputed from the seeds in
    backward, never stored.
    """

    @staticmethod
    def forward(ctx, x_t, model_output, t, coeffs, noise=None, seeds=None, backend="auto",
                history=None, guidance_scale=None, guidance_rescale=0.0):
        leaves = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a
                  for a in (x_t, model_output, noise, history)]
        with torch.enable_grad():
            y = ddpm_step(leaves[0], leaves[1], t, coeffs, noise=leaves[2], seeds=seeds,
                          backend=backend, history=leaves[3], guidance_scale=guidance_scale,
                          guidance_rescale=guidance_rescale)
        ctx.graph = (y, leaves)
        return y.detach()

    @staticmethod
    def backward(ctx, grad_y):
        y, leaves = ctx.graph
        wanted = [a for a in leaves if isinstance(a, Tensor) and a.requires_grad]
        got = iter(torch.autograd.grad(y, wanted, grad_y, allow_unused=True)
                   if wanted and y.requires_grad else ())
        gx, gm, gz, gh = [next(got) if isinstance(a, Tensor) and a.requires_grad else None
                          for a in leaves]
        return gx, gm, None, None, gz, None, None, gh, None, None
