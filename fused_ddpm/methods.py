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

Methods indexed by **timestep** (DDPM, DDIM) have one row per training timestep, built from
:class:`Scalars`; methods indexed by **step** (DPM-Solver++, Euler ancestral: sigma-based
samplers whose timesteps may be fractional) have one row per step i of the inference
schedule, built from :class:`SigmaScalars` (the sigma sequence σ_0 > … > σ_n). The formulas of
each row are in ``docs/samplers.md``.

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
from functools import partial
from typing import TYPE_CHECKING, Callable, Dict, Mapping, Optional, Tuple, TypeVar, Union

import torch
from torch import Tensor

from .contract import Col, Var
from .schedule import dpmsolver_timesteps, euler_timesteps, inference_timesteps

if TYPE_CHECKING:  # pragma: no cover
    from .coefficients import StepConfig

__all__ = ["Scalars", "SigmaScalars", "Prediction", "Variance", "Method", "PREDICTIONS",
           "VARIANCES", "METHODS", "PRECISIONS", "SOLVER_TYPES", "FINAL_SIGMAS", "lookup",
           "build_table", "solver_orders"]

Columns = Dict[Col, Tensor]
Pair = Tuple[Tensor, Tensor]

#: precision policy -> the dtype of the per-row quantities (see the module docstring)
PRECISIONS: Dict[str, torch.dtype] = {"float64": torch.float64,
                                      "diffusers_float32": torch.float32}


# ----------------------------------------------------------------------------- scalars
class _Rows:
    """What every kind of per-row quantities offers the prediction maps: the row index
    ``t`` and √ᾱ, √(1 − ᾱ) of the state the model sees (``sa_t``, ``sb_t``)."""

    t: Tensor
    sa_t: Tensor
    sb_t: Tensor

    def const(self, value: float) -> Tensor:
        """A float64 column holding ``value`` in every row."""
        return torch.full(self.t.shape, float(value), dtype=torch.float64)

    @property
    def sa(self) -> Tensor:
        """√ᾱ of the current row, float64 (the final combinations are float64)."""
        return self.sa_t.double()

    @property
    def sb(self) -> Tensor:
        """√(1 − ᾱ) of the current row, float64."""
        return self.sb_t.double()


@dataclass(frozen=True)
class Scalars(_Rows):
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

    def gated(self, value: Tensor) -> Tensor:
        """``value`` where t > 0, else 0: noise is added only for t > 0 (as diffusers)."""
        return torch.where(self.t > 0, value, torch.zeros_like(value))

    @property
    def small_variance(self) -> Tensor:
        """β̃_t clamped to ≥ 1e-20 (diffusers' ``_get_variance``), in the policy's dtype."""
        return torch.clamp(self.beta_tilde, min=1e-20)


@dataclass(frozen=True)
class SigmaScalars(_Rows):
    """The per-row quantities of a sigma-based step i: σ_i → σ_{i+1}, tensors ``[n]`` in the
    precision policy's dtype (``n`` steps, row i = step i).

    σ is the "VE" noise level of the sequence (x = x0 + σ·ε in sigma space); the same state
    in the variance-preserving form x_vp = α·x has α = 1/√(σ² + 1), σ_vp = σ·α and log-SNR
    λ = log α − log σ_vp. Suffix ``_s``: step i (where the model is evaluated), ``_t``: step
    i + 1 (where the step lands), ``_r``: step i − 1 (the previous model evaluation; row 0
    repeats σ_0 there, and no builder uses it). ``t`` is the step position (int64); α and
    σ_vp of step i are ``sa_t`` and ``sb_t`` (the √ᾱ, √(1 − ᾱ) the predictions read).
    """

    t: Tensor
    sigma_s: Tensor
    sigma_t: Tensor
    sigma_r: Tensor
    sa_t: Tensor
    alpha_t: Tensor
    sb_t: Tensor
    svp_t: Tensor
    lam_s: Tensor
    lam_t: Tensor
    lam_r: Tensor

    @staticmethod
    def of(sigmas: Tensor, dtype: torch.dtype) -> "SigmaScalars":
        """From the sigma sequence (``[n + 1]``, the last entry the final sigma), in
        ``dtype``, in diffusers' order of operations."""
        sig = sigmas.to(dtype)
        alpha = 1 / (sig ** 2 + 1) ** 0.5
        svp = sig * alpha
        lam = torch.log(alpha) - torch.log(svp)
        n = sig.numel() - 1
        prev = torch.cat([sig[:1], sig[:n - 1]]) if n else sig[:0]
        lam_r = torch.cat([lam[:1], lam[:n - 1]]) if n else lam[:0]
        return SigmaScalars(t=torch.arange(n), sigma_s=sig[:n], sigma_t=sig[1:], sigma_r=prev,
                            sa_t=alpha[:n], alpha_t=alpha[1:], sb_t=svp[:n],
                            svp_t=svp[1:], lam_s=lam[:n], lam_t=lam[1:], lam_r=lam_r)

    @property
    def n(self) -> int:
        return int(self.t.numel())


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
    training timesteps ("timestep", built from :class:`Scalars`) or step positions ("step",
    built from :class:`SigmaScalars`). ``timesteps(T, n, spacing, steps_offset)``: the
    timesteps of its diffusers scheduler's ``set_timesteps`` (``default_spacing``: that
    scheduler's default ``timestep_spacing``). ``sigma_space``: its sample is x = x0 + σ·ε
    (the model is given x/√(σ² + 1), and x_T has standard deviation ≈ σ_0), not the
    variance-preserving √ᾱ·x0 + √(1 − ᾱ)·ε.
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
    timesteps: Callable[..., Tensor] = inference_timesteps
    default_spacing: str = "leading"
    sigma_space: bool = False


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


# ----------------------------------------------------------------------------- sigma-based
#: DPM-Solver++ second-order variants: the coefficient c1 of D1 = (x̂0_i − x̂0_{i−1})/r from
#: (α_t, c0 = the coefficient of x̂0_i, h_eff = h (ODE) or 2h (SDE)); Lu et al. 2022, with
#: diffusers' "midpoint" and "heun" forms.
SOLVER_TYPES: Dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "midpoint": lambda alpha_t, c0, h_eff: 0.5 * c0,
    "heun": lambda alpha_t, c0, h_eff: alpha_t * (1 - (-torch.expm1(-h_eff)) / h_eff),
}

#: final_sigmas_type -> the last entry of the sigma sequence from ᾱ (float64 [T])
FINAL_SIGMAS: Dict[str, Callable[[Tensor], float]] = {
    "zero": lambda abar: 0.0,
    "sigma_min": lambda abar: float(((1 - abar[0]) / abar[0]) ** 0.5),
}


def solver_orders(n: int, cfg: "StepConfig") -> Tensor:
    """int64 ``[n]``: the DPM-Solver++ order of each of ``n`` steps, diffusers' rule: the
    first step is first order; the last is first order when ``euler_at_final``, or
    ``lower_order_final`` with n < 15, or the final sigma is zero (its λ is infinite); the
    others use ``solver_order`` (the "lower_order_second" rule only lowers a third order)."""
    orders = torch.full((n,), int(cfg.solver_order), dtype=torch.int64)
    if n:
        orders[0] = 1
        if cfg.euler_at_final or (cfg.lower_order_final and n < 15) or \
                cfg.final_sigmas_type == "zero":
            orders[n - 1] = 1
    return orders


def _dpmsolver(s: SigmaScalars, cfg: "StepConfig", pred: Prediction, sde: bool) -> Columns:
    # Lu et al. 2022 (DPM-Solver++), data prediction D0 = x̂0_i, D1 = (x̂0_i − x̂0_{i−1})/r,
    # h = λ_t − λ_s, r = (λ_s − λ_r)/h:
    #   ODE: y = σ_t/σ_s·x + α_t(1 − e^{−h})·D0 + c1·D1
    #   SDE: y = σ_t/σ_s·e^{−h}·x + α_t(1 − e^{−2h})·D0 + c1·D1 + σ_t√(1 − e^{−2h})·z
    # (σ here the VP σ_vp); first-order rows have no D1 term. D1 splits into P and H.
    u, w = pred.x0(s)
    h = s.lam_t - s.lam_s
    if sde:
        q = s.svp_t / s.sb_t * torch.exp(-h)
        c0 = s.alpha_t * (1 - torch.exp(-2.0 * h))
        sigma = s.svp_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        h_eff = 2.0 * h
    else:
        q = s.svp_t / s.sb_t
        c0 = -(s.alpha_t * (torch.exp(-h) - 1.0))
        sigma = None
        h_eff = h
    second = solver_orders(s.n, cfg) == 2
    c1 = lookup(SOLVER_TYPES, "solver_type", cfg.solver_type)(s.alpha_t, c0, h_eff).double()
    r = ((s.lam_s - s.lam_r) / h).double()
    d1 = torch.where(second, c1 / torch.where(second, r, torch.ones_like(r)),
                     torch.zeros_like(c1))
    cols = {Col.U: u, Col.W: w, Col.Q: q.double(), Col.P: c0.double() + d1, Col.H: -d1}
    if sigma is not None:
        cols[Col.S] = sigma.double()
    return cols


def _euler_ancestral(s: SigmaScalars, cfg: "StepConfig", pred: Prediction) -> Columns:
    # k-diffusion sample_euler_ancestral (η = 1) in sigma space x = x0 + σ·ε:
    #   σ_up = √(σ_t²(σ_s² − σ_t²)/σ_s²), σ_down = √(σ_t² − σ_up²),
    #   y = x + (x − x̂0)/σ_s·(σ_down − σ_s) + σ_up·z.
    # x̂0 from the prediction of the VP state α_s·x: U = α_s·u, W = w.
    u, w = pred.x0(s)
    up = (s.sigma_t ** 2 * (s.sigma_s ** 2 - s.sigma_t ** 2) / s.sigma_s ** 2) ** 0.5
    down = torch.clamp(s.sigma_t ** 2 - up ** 2, min=0) ** 0.5
    ratio = ((down - s.sigma_s) / s.sigma_s).double()          # dt/σ
    return {Col.U: u * s.sa, Col.W: w, Col.Q: 1 + ratio, Col.P: -ratio, Col.S: up.double()}


_ONE = torch.ones((), dtype=torch.float64)
_DPM_OPTIONS = ("solver_order", "solver_type", "lower_order_final", "euler_at_final",
                "final_sigmas_type")
#: variance types of methods with their own σ: fixed_small (the C-channel output) or a
#: learned type, whose 2C-channel output's variance half they ignore
_OWN_SIGMA_VARIANCES = ("fixed_small", "learned", "learned_range", "learned_log")

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
    Method("dpmsolver++", partial(_dpmsolver, sde=False), final_alpha=lambda cfg, abar: _ONE,
           variance_types=_OWN_SIGMA_VARIANCES, own_sigma=True, options=_DPM_OPTIONS,
           index_by="step", timesteps=dpmsolver_timesteps, default_spacing="linspace"),
    Method("sde-dpmsolver++", partial(_dpmsolver, sde=True), final_alpha=lambda cfg, abar: _ONE,
           variance_types=_OWN_SIGMA_VARIANCES, own_sigma=True, options=_DPM_OPTIONS,
           index_by="step", timesteps=dpmsolver_timesteps, default_spacing="linspace"),
    Method("euler_ancestral", _euler_ancestral, final_alpha=lambda cfg, abar: _ONE,
           variance_types=_OWN_SIGMA_VARIANCES, own_sigma=True,
           options=(), index_by="step", timesteps=euler_timesteps,
           default_spacing="linspace", sigma_space=True),
)}

T = TypeVar("T")


def lookup(registry: Mapping[str, T], what: str, name: str) -> T:
    """``registry[name]``, or a ValueError naming ``what`` and the choices."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"{what}={name!r} is not supported; expected one of "
                         f"{list(registry)}") from None


def build_table(abar: Tensor, prev: Optional[Tensor], cfg: "StepConfig", precision: str,
                sigmas: Optional[Tensor] = None) -> Tensor:
    """The float64 ``[R, NUM_COLS]`` table of ``cfg``. Methods indexed by timestep: R = T
    rows from ᾱ ``abar`` (float64 ``[T]``), each row t stepping to ``prev[t]`` (int64
    ``[T]``; −1: the end). Methods indexed by step: R = n rows from ``sigmas`` (float64
    ``[n + 1]``), row i stepping from σ_i to σ_{i+1}.

    When the step does not clip, P is folded into Q and R (y = (Q + P·U)·x + (R + P·W)·m):
    the better-conditioned collapsed form, with no x̂0 pass.
    """
    method = lookup(METHODS, "method", cfg.method)
    pred = lookup(PREDICTIONS, "prediction_type", cfg.prediction_type)
    dtype = lookup(PRECISIONS, "precision", precision)
    s: Union[Scalars, SigmaScalars]
    if method.index_by == "timestep":
        s = Scalars.of(abar, prev, method.final_alpha(cfg, abar), dtype)
    elif method.index_by == "step":
        s = SigmaScalars.of(sigmas, dtype)
    else:
        raise ValueError(f"index_by={method.index_by!r} is not supported; expected one of "
                         f"['timestep', 'step']")
    cols = method.build(s, cfg, pred)
    if not cfg.clips and Col.P in cols:
        p = cols.pop(Col.P)
        cols[Col.Q] = cols.get(Col.Q, 0) + p * cols[Col.U]
        cols[Col.R] = cols.get(Col.R, 0) + p * cols[Col.W]
    table = torch.zeros(s.t.numel(), len(Col), dtype=torch.float64)
    for col, values in cols.items():
        table[:, col] = values
    return table
