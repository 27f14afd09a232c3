"""Per-timestep coefficient tables of the affine step (DESIGN.md §2).

Every supported step is, per element, with sample x and model output m::

    x̂0 = u·x + w·m                     then optionally clipped: clamp(x̂0, −c, c),
                                        or thresholded: clamp(x̂0, −s_b, s_b) / s_b
    y  = p·x̂0 + q·x + r·m + σ·z

:func:`step_coefficients` builds one row (u, w, p, q, r, σ-or-gate, log β, log β̃) per
*training* timestep, in float64 on the host, and keeps a float32 copy on the chosen device.
The kernels look rows up by the actual timestep t, so no host sync is needed per step.

Column meanings (kept in step with ``csrc/step_math.h`` and ``triton_kernels/step.py``):

=====  ==========================================================================
col    meaning
=====  ==========================================================================
0  u   x̂0 coefficient of x
1  w   x̂0 coefficient of m
2  p   coefficient of the (clipped) x̂0 in y; **zero when the step does not clip** —
       then p has been folded into q and r (the collapsed, better-conditioned form)
3  q   coefficient of x in y
4  r   coefficient of m in y
5  s   fixed variance: σ itself. Learned variances: a gate (1 where noise is added, else 0)
       that multiplies the per-element σ
6  lb  log β_t                 (``learned_range`` only)
7  lt  log max(β̃_t, 1e-20)    (``learned_range`` only)
=====  ==========================================================================

Per-element σ: ``learned``: σ = s·√v; ``learned_range``: σ = s·exp(½(f·lb + (1−f)·lt)),
f = (v + 1)/2, where v is the second half of a 2C-channel model output.

Rows of timesteps outside the inference schedule step to the largest scheduled timestep
below them (or to "before the first step"), so every row is a valid step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from .schedule import NoiseSchedule, inference_timesteps

METHODS = ("ddpm", "ddim")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")

COL_U, COL_W, COL_P, COL_Q, COL_R, COL_SIGMA, COL_LOG_BETA, COL_LOG_BETA_TILDE = range(8)
NUM_COLS = 8

# Kernel-level codes, shared by every backend.
VAR_FIXED, VAR_LEARNED, VAR_LEARNED_RANGE = 0, 1, 2
CLIP_NONE, CLIP_STATIC, CLIP_DYNAMIC = 0, 1, 2


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(choices)}")


@dataclass(frozen=True)
class StepConfig:
    """What a step does, independent of the schedule. See :func:`step_coefficients`."""

    method: str = "ddpm"
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample_range: Optional[float] = None
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    eta: float = 0.0
    use_clipped_model_output: bool = False
    set_alpha_to_one: bool = True

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _choice("variance_type", self.variance_type, VARIANCE_TYPES)
        if self.clip_sample_range is not None and not (float(self.clip_sample_range) > 0):
            raise ValueError(f"clip_sample_range must be a positive float or None, "
                             f"got {self.clip_sample_range!r}")
        if not 0.0 < self.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], "
                             f"got {self.dynamic_thresholding_ratio!r}")
        if not self.sample_max_value >= 1.0:
            raise ValueError(f"sample_max_value must be >= 1, got {self.sample_max_value!r}")
        if not self.eta >= 0.0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")

    @property
    def clips(self) -> bool:
        """True when x̂0 is clipped or thresholded before the posterior mean."""
        return self.thresholding or self.clip_sample_range is not None

    @property
    def learned_variance(self) -> bool:
        """True when the model output carries a second half of C variance channels."""
        return self.method == "ddpm" and self.variance_type in ("learned", "learned_range")

    @property
    def variance_mode(self) -> int:
        if self.method == "ddpm" and self.variance_type == "learned":
            return VAR_LEARNED
        if self.method == "ddpm" and self.variance_type == "learned_range":
            return VAR_LEARNED_RANGE
        return VAR_FIXED

    @property
    def clip_mode(self) -> int:
        if self.thresholding:
            return CLIP_DYNAMIC
        return CLIP_STATIC if self.clip_sample_range is not None else CLIP_NONE


def previous_timesteps(timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """For every training timestep t, the largest scheduled timestep below t, or −1.

    ``timesteps``: the descending schedule, int64 ``[n]``. Returns int64 CPU ``[T]``.
    """
    asc = torch.sort(timesteps.cpu()).values
    t = torch.arange(num_train_timesteps, dtype=torch.int64)
    pos = torch.searchsorted(asc, t, right=False) - 1  # last scheduled value < t
    return torch.where(pos >= 0, asc[pos.clamp(min=0)], torch.full_like(t, -1))


def _build_table(schedule: NoiseSchedule, cfg: StepConfig, prev: torch.Tensor) -> torch.Tensor:
    """The float64 ``[T, 8]`` table; each quantity from ᾱ_t and ᾱ_t′ (t′ = prev[t])."""
    abar = schedule.alphas_cumprod
    T = abar.numel()
    t = torch.arange(T)
    final = 1.0 if (cfg.method == "ddpm" or cfg.set_alpha_to_one) else float(abar[0])
    a_t = abar
    a_p = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.full_like(abar, final))
    alpha = a_t / a_p                                   # α_t = ᾱ_t / ᾱ_t′
    beta = 1.0 - alpha
    beta_tilde = beta * (1.0 - a_p) / (1.0 - a_t)       # β̃_t
    sa_t, sb_t = a_t.sqrt(), (1.0 - a_t).sqrt()

    # x̂0 = u x + w m
    if cfg.prediction_type == "epsilon":
        u, w = 1.0 / sa_t, -sb_t / sa_t
    elif cfg.prediction_type == "sample":
        u, w = torch.zeros_like(a_t), torch.ones_like(a_t)
    else:  # v_prediction
        u, w = sa_t, -sb_t

    log_beta = torch.zeros_like(a_t)
    log_beta_tilde = torch.zeros_like(a_t)
    if cfg.method == "ddpm":
        # Posterior mean μ̃ = p x̂0 + q x (Ho et al. 2020, eq. 7).
        p = a_p.sqrt() * beta / (1.0 - a_t)
        q = alpha.sqrt() * (1.0 - a_p) / (1.0 - a_t)
        r = torch.zeros_like(a_t)
        gate = (t > 0).to(torch.float64)                # diffusers adds noise only for t > 0
        bt = beta_tilde.clamp(min=1e-20)
        if cfg.variance_type in ("fixed_small", "fixed_small_log"):
            s = bt.sqrt() * gate
        elif cfg.variance_type == "fixed_large":
            s = beta.sqrt() * gate
        else:  # learned / learned_range: per-element σ, the column is the gate
            s = gate
            log_beta = beta.log()
            log_beta_tilde = bt.log()
        if not cfg.clips:
            # Collapsed form (the seed formula): y = (1/√α_t)(x − β_t/√(1−ᾱ_t)·ε) + σz
            # for ε-prediction; generally q += p·u, r += p·w.
            if cfg.prediction_type == "epsilon":
                q = 1.0 / alpha.sqrt()
                r = -beta / (alpha.sqrt() * sb_t)
            else:
                q, r = q + p * u, p * w
            p = torch.zeros_like(a_t)
    else:
        # DDIM (Song et al. 2021, eq. 12): y = √ᾱ_t′ x̂0 + √(1−ᾱ_t′−σ²) ε̂ + σz, σ = η√β̃.
        s = cfg.eta * beta_tilde.clamp(min=0).sqrt()
        d = (1.0 - a_p - s ** 2).clamp(min=0).sqrt()
        p = a_p.sqrt()
        if cfg.use_clipped_model_output and cfg.clips:
            # ε̂ re-derived from the clipped x̂0: ε̂ = (x − √ᾱ_t x̂0)/√(1−ᾱ_t)
            p = p - d * sa_t / sb_t
            q, r = d / sb_t, torch.zeros_like(a_t)
        else:
            # ε̂ from the unclipped prediction, linear in (x, m)
            if cfg.prediction_type == "epsilon":
                ex, em = torch.zeros_like(a_t), torch.ones_like(a_t)
            elif cfg.prediction_type == "sample":
                ex, em = 1.0 / sb_t, -sa_t / sb_t
            else:
                ex, em = sb_t, sa_t
            q, r = d * ex, d * em
        if not cfg.clips:
            q, r, p = q + p * u, r + p * w, torch.zeros_like(a_t)
    return torch.stack([u, w, p, q, r, s, log_beta, log_beta_tilde], dim=1).contiguous()


@dataclass(frozen=True, eq=False)
class StepCoefficients:
    """An immutable coefficient table plus the schedule and config it came from.

    Attributes:
        schedule: the :class:`NoiseSchedule`.
        config: the :class:`StepConfig`.
        timesteps: int64 CPU ``[n]``, the descending inference timesteps.
        prev_timesteps: int64 CPU ``[T]``, the timestep each row steps to (−1: the end).
        table64: float64 CPU ``[T, 8]``, the table (columns in the module docstring).
        table: float32 ``[T, 8]`` on ``device``, what the kernels read.
    """

    schedule: NoiseSchedule
    config: StepConfig
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    table64: torch.Tensor
    table: torch.Tensor
    _cache: Dict[Tuple[str, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    @property
    def device(self) -> torch.device:
        return self.table.device

    def table_on(self, device: Union[str, torch.device], dtype: torch.dtype = torch.float32
                 ) -> torch.Tensor:
        """The table on ``device`` in ``dtype`` (float32, or float64 for CPU fp64 kernels).

        Copies once per (device, dtype) and reuses the copy afterwards.
        """
        device = torch.device(device)
        if device == self.table.device and dtype == torch.float32:
            return self.table
        if device.type == "cpu" and dtype == torch.float64:
            return self.table64
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self.table64.to(device=device, dtype=dtype)
        return self._cache[key]

    def to(self, device: Union[str, torch.device]) -> "StepCoefficients":
        """The same coefficients with the float32 table on ``device``."""
        return StepCoefficients(self.schedule, self.config, self.timesteps, self.prev_timesteps,
                                self.table64, self.table_on(device))

    def __repr__(self) -> str:
        return (f"StepCoefficients({self.config}, {self.schedule!r}, "
                f"steps={self.timesteps.numel()}, device={self.device})")


def step_coefficients(schedule: NoiseSchedule,
                      method: str = "ddpm",
                      prediction_type: str = "epsilon",
                      variance_type: str = "fixed_small",
                      clip_sample_range: Optional[float] = None,
                      num_inference_steps: Optional[int] = None,
                      timestep_spacing: str = "leading",
                      device: Union[str, torch.device] = "cpu",
                      *,
                      steps_offset: int = 0,
                      timesteps: Optional[Sequence[int]] = None,
                      thresholding: bool = False,
                      dynamic_thresholding_ratio: float = 0.995,
                      sample_max_value: float = 1.0,
                      eta: float = 0.0,
                      use_clipped_model_output: bool = False,
                      set_alpha_to_one: bool = True) -> StepCoefficients:
    """Build the coefficient table of a DDPM or DDIM step.

    Args:
        schedule: the training :class:`NoiseSchedule`.
        method: ``"ddpm"`` or ``"ddim"`` (with ``eta``, ``use_clipped_model_output`` and
            ``set_alpha_to_one`` as in diffusers' ``DDIMScheduler``).
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        variance_type: DDPM only: ``"fixed_small"``, ``"fixed_small_log"``, ``"fixed_large"``,
            ``"learned"`` or ``"learned_range"`` (the last two expect 2C-channel model output).
        clip_sample_range: clip x̂0 to [−c, c]; ``None`` for no clipping.
        num_inference_steps, timestep_spacing, steps_offset, timesteps: the inference
            schedule (see :func:`fused_ddpm.schedule.inference_timesteps`). A step goes from
            t to the next scheduled timestep below it.
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen dynamic
            thresholding (wins over ``clip_sample_range``, as in diffusers).
        device: where the float32 table lives (the device of the tensors you will step).
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fused_ddpm.NoiseSchedule, got {type(schedule).__name__}")
    if clip_sample_range is not None:
        clip_sample_range = float(clip_sample_range)
    cfg = StepConfig(method, prediction_type, variance_type, clip_sample_range, bool(thresholding),
                     float(dynamic_thresholding_ratio), float(sample_max_value), float(eta),
                     bool(use_clipped_model_output), bool(set_alpha_to_one))
    T = schedule.num_train_timesteps
    ts = inference_timesteps(T, num_inference_steps, timestep_spacing, steps_offset, timesteps)
    prev = previous_timesteps(ts, T)
    table64 = _build_table(schedule, cfg, prev)
    if not bool(torch.isfinite(table64[ts]).all()):
        bad = ts[~torch.isfinite(table64[ts]).all(dim=1)].tolist()
        raise ValueError(f"the schedule gives non-finite step coefficients at timesteps {bad} "
                         f"(ᾱ_t = 0 there: a zero-terminal-SNR schedule needs "
                         f"prediction_type='v_prediction' or 'sample')")
    return StepCoefficients(schedule, cfg, ts, prev, table64,
                            table64.to(device=torch.device(device), dtype=torch.float32))
