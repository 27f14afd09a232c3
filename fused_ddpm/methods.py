"""The registry of step methods, prediction types and variance types: the row builders.

Every step the kernels run is one affine update per element (``docs/kernels.md``); what
differs between samplers is only the coefficient table. A **method** is a row builder that
maps the schedule's per-row quantities (:class:`Scalars`) and a
:class:`~fused_ddpm.coefficients.StepConfig` to float64 columns of the contract
(:class:`fused_ddpm.contract.Col`). **Prediction types** say how x̂0, ε̂ and the training
target are linear in their inputs; **variance types** say where σ comes from. Each is one
entry of a dict below; :func:`lookup` is the only way to read them, and an unknown name is
a ``ValueError`` everywhere.

Adding a prediction type, a variance type that one of the kernels' σ forms
(:class:`fused_ddpm.contract.Var`) can express, or a step method of this affine form means
adding an entry here and its formula to :mod:`fused_ddpm.reference`; nothing else.

Precision policies (one algebra, two arithmetics):

* ``"float64"``: every per-row quantity in float64.
* ``"diffusers_float32"``: the quantities that diffusers' ``DDPMScheduler.step`` /
  ``DDIMScheduler.step`` compute as float32 scalars (1 − ᾱ_t, α_t, β_t, β̃_t, σ, the
  posterior coefficients, √ᾱ ...) are computed in float32, in diffusers' order of
  operations, from diffusers' own float32 ᾱ; only the final linear combinations of the
  columns (the x̂0 map, folding the posterior into the x and model-output coefficients) are
  done in float64 from those float32 values. The table is then what diffusers computes,
  up to one float32 rounding per column.

The algebra below is written once, in diffusers' order of operations; the policy only
picks the dtype of :class:`Scalars`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Mapping, Tuple, TypeVar

import torch
from torch import Tensor

from .contract import Col, Var

if TYPE_CHECKING:  # pragma: no cover
    from .coefficients import StepConfig

__all__ = ["Scalars", "Prediction", "Variance", "Method", "PREDICTIONS", "VARIANCES",
           "METHODS", "PRECISIONS", "lookup", "build_table"]

Columns = Dict[Col, Tensor]
Pair = Tuple[Tensor, Tensor]

#: precision policy -> the dtype of the per-row quantities (see the module docstring)
PRECISIONS: Dict[str, torch.dtype] = {"float64": torch.float64,
                                      "diffusers_float32": torch.float32}


# ----------------------------------------------------------------------------- scalars
@dataclass(frozen=True)
class Scalars:
    """The per-row quantities of a step from ᾱ_t (row t) to ᾱ_t′ (the row it steps to),
    tensors ``[R]`` in the precision policy's dtype.

    ``t``: int64 ``[R]``, the row's training timestep. ``a_t`` = ᾱ_t, ``a_p`` = ᾱ_t′
    (ᾱ of "before the first step" for the last step), ``b_t`` = 1 − ᾱ_t, ``b_p`` = 1 − ᾱ_t′,
    ``alpha`` = α_t = ᾱ_t/ᾱ_t′, ``beta`` = β_t = 1 − α_t, ``beta_tilde`` =
    β̃_t = (1 − ᾱ_t′)/(1 − ᾱ_t)·β_t, ``sa_t`` = √ᾱ_t, ``sb_t`` = √(1 − ᾱ_t), ``sa_p`` = √ᾱ_t′.
    """

    t: Tensor
    a_t: Tensor
    a_p: Tensor
    b_t: Tensor
    b_p: Tensor
    alpha: Tensor
    beta: Tensor
    beta_tilde: Tensor
    sa_t: Tensor
    sb_t: Tensor
    sa_p: Tensor

    @staticmethod
    def of(abar: Tensor, prev: Tensor, final_alpha: Tensor, dtype: torch.dtype) -> "Scalars":
        """From ᾱ ``[T]``, the row each row steps to (``prev`` int64 ``[T]``, −1: the end, where
        ᾱ_t′ = ``final_alpha``), computed in ``dtype``."""
        a_t = abar.to(dtype)
        a_p = torch.where(prev >= 0, a_t[prev.clamp(min=0)], final_alpha.to(dtype))
        b_t = 1 - a_t
        b_p = 1 - a_p
        alpha = a_t / a_p
        beta = 1 - alpha
        return Scalars(t=torch.arange(abar.numel()), a_t=a_t, a_p=a_p, b_t=b_t, b_p=b_p,
                       alpha=alpha, beta=beta, beta_tilde=b_p / b_t * beta,
                       sa_t=a_t ** 0.5, sb_t=b_t ** 0.5, sa_p=a_p ** 0.5)

    def const(self, value: float) -> Tensor:
        """A float64 column holding ``value`` in every row."""
        return torch.full(self.t.shape, float(value), dtype=torch.float64)

    def gated(self, value: Tensor) -> Tensor:
        """``value`` where t > 0, else 0: noise is added only for t > 0 (as diffusers)."""
        return torch.where(self.t > 0, value, torch.zeros_like(value))

    @property
    def sa(self) -> Tensor:
        """√ᾱ_t, float64 (the final combinations are float64)."""
        return self.sa_t.double()

    @property
    def sb(self) -> Tensor:
        """√(1 − ᾱ_t), float64."""
        return self.sb_t.double()

    @property
    def small_variance(self) -> Tensor:
        """β̃_t clamped to ≥ 1e-20 (diffusers' ``_get_variance``), in the policy's dtype."""
        return torch.clamp(self.beta_tilde, min=1e-20)


# ----------------------------------------------------------------------------- predictions
@dataclass(frozen=True)
class Prediction:
    """What the model output m means, as three linear maps (float64 ``[R]`` pairs):

    * ``x0``: (u, w) with x̂0 = u·x + w·m;
    * ``eps``: (e_x, e_m) with ε̂ = e_x·x + e_m·m (the unclipped noise estimate);
    * ``target``: (c_0, c_ε) with the training target c_0·x0 + c_ε·ε for
      x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε.
    """

    name: str
    x0: Callable[[Scalars], Pair]
    eps: Callable[[Scalars], Pair]
    target: Callable[[Scalars], Pair]


PREDICTIONS: Dict[str, Prediction] = {p.name: p for p in (
    # m = ε:                     x̂0 = (x − √(1−ᾱ) m)/√ᾱ
    Prediction("epsilon",
               x0=lambda s: (1.0 / s.sa, -s.sb / s.sa),
               eps=lambda s: (s.const(0), s.const(1)),
               target=lambda s: (s.const(0), s.const(1))),
    # m = x0:                    ε̂ = (x − √ᾱ m)/√(1−ᾱ)
    Prediction("sample",
               x0=lambda s: (s.const(0), s.const(1)),
               eps=lambda s: (1.0 / s.sb, -s.sa / s.sb),
               target=lambda s: (s.const(1), s.const(0))),
    # m = v = √ᾱ ε − √(1−ᾱ) x0:  x̂0 = √ᾱ x − √(1−ᾱ) m,  ε̂ = √(1−ᾱ) x + √ᾱ m
    Prediction("v_prediction",
               x0=lambda s: (s.sa, -s.sb),
               eps=lambda s: (s.sb, s.sa),
               target=lambda s: (-s.sb, s.sa)),
)}


# ----------------------------------------------------------------------------- variances
@dataclass(frozen=True)
class Variance:
    """Where σ of a DDPM step comes from.

    ``mode``: the kernels' σ form (``Var``); ``channels``: 2 when the model output carries
    C extra channels v (its second half); ``columns``: the S, VA, VB columns (float64).
    With ``Var.SQRT`` σ = S·√v, with ``Var.EXP`` σ = S·exp(VA + VB·v); S is then the gate.
    """

    name: str
    mode: Var
    channels: int
    columns: Callable[[Scalars], Columns]


def _log_range(s: Scalars) -> Columns:
    # σ = exp(½(f log β + (1−f) log β̃)), f = (v+1)/2  ⇔  VA = ¼(lb + lt), VB = ¼(lb − lt)
    lb = torch.log(s.beta).double()
    lt = torch.log(s.small_variance).double()
    return {Col.S: s.gated(s.const(1)), Col.VA: 0.25 * (lb + lt), Col.VB: 0.25 * (lb - lt)}


VARIANCES: Dict[str, Variance] = {v.name: v for v in (
    Variance("fixed_small", Var.FIXED, 1,
             lambda s: {Col.S: s.gated(s.small_variance ** 0.5).double()}),
    Variance("fixed_small_log", Var.FIXED, 1,
             lambda s: {Col.S: s.gated(torch.exp(0.5 * torch.log(s.small_variance))).double()}),
    Variance("fixed_large", Var.FIXED, 1,
             lambda s: {Col.S: s.gated(s.beta ** 0.5).double()}),
    # diffusers "learned": the variance channels hold σ² itself.
    Variance("learned", Var.SQRT, 2, lambda s: {Col.S: s.gated(s.const(1))}),
    # improved-diffusion / diffusers "learned_range": v ∈ [−1, 1] interpolates log σ²
    # between log β̃_t (v = −1) and log β_t (v = 1).
    Variance("learned_range", Var.EXP, 2, _log_range),
    # improved-diffusion / guided-diffusion "LEARNED": the variance channels hold log σ²
    # (so σ = exp(½ v)); diffusers' "learned" above holds σ² instead.
    Variance("learned_log", Var.EXP, 2,
             lambda s: {Col.S: s.gated(s.const(1)), Col.VA: s.const(0), Col.VB: s.const(0.5)}),
)}


# ----------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One step method: a row builder and what it accepts.

    ``build(scalars, config, prediction)`` returns the float64 columns of every row (absent
    columns are zero). ``final_alpha(config, abar)``: ᾱ_t′ of the last step ("before the
    first step"). ``variance_types``: the variance types it accepts; ``own_sigma``: σ comes
    from the method (DDIM's η), not from the variance type, which then only says how many
    channels the model output has. ``options``: the config options it reads besides the
    prediction type, the variance type and clipping. ``samples``: a sampler step that takes
    a model output (``add_noise`` is training-side: no model output). ``index_by``: rows are
    training timesteps ("timestep") or step positions ("step").
    """

    name: str
    build: Callable[[Scalars, "StepConfig", Prediction], Columns]
    final_alpha: Callable[["StepConfig", Tensor], Tensor]
    variance_types: Tuple[str, ...]
    own_sigma: bool
    options: Tuple[str, ...]
    samples: bool = True
    clips: bool = True
    index_by: str = "timestep"


def _ddpm(s: Scalars, cfg: "StepConfig", pred: Prediction) -> Columns:
    # Posterior mean of q(x_t′ | x_t, x0) (Ho et al. 2020, eq. 7): p·x̂0 + q·x_t.
    u, w = pred.x0(s)
    cols = {Col.U: u, Col.W: w,
            Col.P: ((s.sa_p * s.beta) / s.b_t).double(),
            Col.Q: (s.alpha ** 0.5 * s.b_p / s.b_t).double()}
    cols.update(lookup(VARIANCES, "variance_type", cfg.variance_type).columns(s))
    return cols


def _ddim(s: Scalars, cfg: "StepConfig", pred: Prediction) -> Columns:
    # Song et al. 2021, eq. 12: y = √ᾱ_t′ x̂0 + √(1 − ᾱ_t′ − σ²) ε̂ + σ z, σ = η √β̃_t.
    u, w = pred.x0(s)
    std = cfg.eta * torch.clamp(s.beta_tilde, min=0) ** 0.5
    d = (torch.clamp(1 - s.a_p - std ** 2, min=0) ** 0.5).double()
    p = s.sa_p.double()
    if cfg.use_clipped_model_output:      # ε̂ re-derived from the clipped x̂0
        p, q, r = p - d * s.sa / s.sb, d / s.sb, s.const(0)
    else:                                 # ε̂ from the unclipped prediction, linear in x, m
        ex, em = pred.eps(s)
        q, r = d * ex, d * em
    return {Col.U: u, Col.W: w, Col.P: p, Col.Q: q, Col.R: r, Col.S: std.double()}


def _add_noise(s: Scalars, cfg: "StepConfig", pred: Prediction) -> Columns:
    # Y = x_t = √ᾱ_t x0 + √(1−ᾱ_t) z;  X0 = the target, c_0·x0 + c_ε·z.
    c0, ce = pred.target(s)
    return {Col.Q: s.sa, Col.S: s.sb, Col.U: c0, Col.E: ce}


_ONE = torch.ones((), dtype=torch.float64)

METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("ddpm", _ddpm, final_alpha=lambda cfg, abar: _ONE,
           variance_types=tuple(VARIANCES), own_sigma=False, options=()),
    Method("ddim", _ddim,
           final_alpha=lambda cfg, abar: _ONE if cfg.set_alpha_to_one else abar[0],
           variance_types=("fixed_small", "learned", "learned_range", "learned_log"),
           own_sigma=True, options=("eta", "use_clipped_model_output", "set_alpha_to_one")),
    Method("add_noise", _add_noise, final_alpha=lambda cfg, abar: _ONE,
           variance_types=("fixed_small",), own_sigma=True, options=(), samples=False,
           clips=False),
)}

T = TypeVar("T")


def lookup(registry: Mapping[str, T], what: str, name: str) -> T:
    """``registry[name]``, or a ValueError naming ``what`` and the choices."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"{what}={name!r} is not supported; expected one of "
                         f"{list(registry)}") from None


def build_table(abar: Tensor, prev: Tensor, cfg: "StepConfig", precision: str) -> Tensor:
    """The float64 ``[T, NUM_COLS]`` table of ``cfg`` for ᾱ ``abar`` (float64 ``[T]``), each
    row t stepping to ``prev[t]`` (int64 ``[T]``; −1: the end).

    When the step does not clip, P is folded into Q and R (y = (Q + P·U)·x + (R + P·W)·m):
    the better-conditioned collapsed form, with no x̂0 pass.
    """
    method = lookup(METHODS, "method", cfg.method)
    pred = lookup(PREDICTIONS, "prediction_type", cfg.prediction_type)
    dtype = lookup(PRECISIONS, "precision", precision)
    s = Scalars.of(abar, prev, method.final_alpha(cfg, abar), dtype)
    cols = method.build(s, cfg, pred)
    if not cfg.clips and Col.P in cols:
        p = cols.pop(Col.P)
        cols[Col.Q] = cols.get(Col.Q, 0) + p * cols[Col.U]
        cols[Col.R] = cols.get(Col.R, 0) + p * cols[Col.W]
    table = torch.zeros(abar.numel(), len(Col), dtype=torch.float64)
    for col, values in cols.items():
        table[:, col] = values
    return table
