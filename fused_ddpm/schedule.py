"""Noise schedules (β_t, ᾱ_t) and inference timestep lists, all in float64.

A :class:`NoiseSchedule` holds the training schedule: ``betas`` and ``alphas_cumprod``,
float64 tensors of shape ``[T]`` on the CPU, built with diffusers' option names and formulas
(but in float64). :func:`inference_timesteps` gives the descending list of timesteps a
sampler visits, with diffusers' ``leading`` / ``trailing`` / ``linspace`` spacings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _alpha_bar_betas(num_steps: int, alpha_bar, max_beta: float = 0.999) -> torch.Tensor:
    """β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta) for a continuous ᾱ(s), s ∈ [0, 1]."""
    betas = [min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
             for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def _cosine_alpha_bar(s: float) -> float:
    # Nichol & Dhariwal (2021), eq. 17 with offset 0.008.
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(s: float) -> float:
    # log-SNR λ(s) = −½·sign(½−s)·log(1 − 2|½−s| + 1e-6);  ᾱ = √(SNR/(1+SNR)), as diffusers.
    lmb = -0.5 * math.copysign(1.0, 0.5 - s) * math.log(1.0 - 2.0 * abs(0.5 - s) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1.0 + snr))


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale β so that ᾱ_{T−1} = 0 (Lin et al. 2023, Algorithm 1), in float64.

    √ᾱ is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    abar_sqrt = torch.cumprod(1.0 - betas.double(), 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(choices)}")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A DDPM training noise schedule, computed in float64.

    Args mirror diffusers' ``DDPMScheduler`` config: ``num_train_timesteps`` (T),
    ``beta_schedule`` (one of :data:`BETA_SCHEDULES`), ``beta_start``/``beta_end`` (for
    ``linear``, ``scaled_linear``, ``sigmoid``), ``trained_betas`` (explicit β, length T,
    overrides ``beta_schedule``) and ``rescale_betas_zero_snr``.

    Attributes:
        betas: float64 CPU tensor ``[T]``, β_t.
        alphas_cumprod: float64 CPU tensor ``[T]``, ᾱ_t = ∏_{s≤t} (1 − β_s).
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    trained_betas: Optional[Sequence[float]] = None
    rescale_betas_zero_snr: bool = False
    betas: torch.Tensor = field(init=False, repr=False)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        T = self.num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {T!r}")
        if self.trained_betas is not None:
            betas = torch.as_tensor(self.trained_betas, dtype=torch.float64).flatten().clone()
            if betas.numel() != T:
                raise ValueError(f"trained_betas has {betas.numel()} values; expected "
                                 f"num_train_timesteps={T}")
            object.__setattr__(self, "trained_betas", tuple(betas.tolist()))
        else:
            _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
            if self.beta_schedule == "linear":
                betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)
            elif self.beta_schedule == "scaled_linear":
                betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T,
                                       dtype=torch.float64) ** 2
            elif self.beta_schedule == "squaredcos_cap_v2":
                betas = _alpha_bar_betas(T, _cosine_alpha_bar)
            elif self.beta_schedule == "laplace":
                betas = _alpha_bar_betas(T, _laplace_alpha_bar)
            elif self.beta_schedule == "sigmoid":  # GeoDiff
                s = torch.sigmoid(torch.linspace(-6.0, 6.0, T, dtype=torch.float64))
                betas = s * (self.beta_end - self.beta_start) + self.beta_start
            else:  # pragma: no cover - _check_choice guards this
                raise AssertionError(self.beta_schedule)
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        if not bool(torch.all((betas >= 0) & (betas <= 1))):
            raise ValueError("betas must lie in [0, 1]")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, 0))

    def __repr__(self) -> str:
        kind = "trained_betas" if self.trained_betas is not None else self.beta_schedule
        return (f"NoiseSchedule(T={self.num_train_timesteps}, {kind}, beta_start={self.beta_start}, "
                f"beta_end={self.beta_end}, zero_snr={self.rescale_betas_zero_snr})")


def inference_timesteps(num_train_timesteps: int,
                        num_inference_steps: Optional[int] = None,
                        timestep_spacing: str = "leading",
                        steps_offset: int = 0,
                        timesteps: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The descending timesteps a sampler visits, as an int64 CPU tensor ``[n]``.

    ``timesteps`` (a custom strictly descending list) wins; else ``num_inference_steps`` with
    ``timestep_spacing`` (as diffusers' ``set_timesteps``); else all T timesteps T−1, …, 0.
    """
    T = num_train_timesteps
    if timesteps is not None:
        if num_inference_steps is not None:
            raise ValueError("pass either num_inference_steps or timesteps, not both")
        ts = [int(v) for v in (timesteps.tolist() if isinstance(timesteps, torch.Tensor)
                               else timesteps)]
        if len(ts) == 0:
            raise ValueError("timesteps must not be empty")
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"timesteps must be strictly descending, got {ts}")
        if ts[0] >= T or ts[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, num_train_timesteps={T}), got {ts}")
        return torch.tensor(ts, dtype=torch.int64)
    _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    if num_inference_steps is None:
        return torch.arange(T - 1, -1, -1, dtype=torch.int64)
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be an int in [1, num_train_timesteps={T}], "
                         f"got {n!r}")
    if timestep_spacing == "linspace":
        ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round().flip(0)
    elif timestep_spacing == "leading":
        ts = (torch.arange(n, dtype=torch.float64) * (T // n)).round().flip(0) + steps_offset
    elif timestep_spacing == "trailing":
        ratio = T / n
        ts = torch.tensor([round(T - i * ratio) for i in range(n)], dtype=torch.float64) - 1
    else:  # pragma: no cover - _check_choice guards this
        raise AssertionError(timestep_spacing)
    ts = ts.to(torch.int64)
    if int(ts.max()) >= T or int(ts.min()) < 0:
        raise ValueError(f"steps_offset={steps_offset} moves timesteps outside [0, {T})")
    return ts


def _check_steps(T: int, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be an int in [1, num_train_timesteps={T}], "
                         f"got {n!r}")
    return n


def dpmsolver_timesteps(num_train_timesteps: int, num_inference_steps: int,
                        timestep_spacing: str = "linspace", steps_offset: int = 0
                        ) -> torch.Tensor:
    """The timesteps of diffusers' ``DPMSolverMultistepScheduler.set_timesteps`` (an
    n + 1 point grid whose lowest point is dropped), int64 CPU ``[n]``, descending."""
    T = num_train_timesteps
    n = _check_steps(T, num_inference_steps)
    _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    if timestep_spacing == "linspace":
        ts = torch.linspace(0, T - 1, n + 1, dtype=torch.float64).round().flip(0)[:-1]
    elif timestep_spacing == "leading":
        ratio = T // (n + 1)
        ts = (torch.arange(n + 1, dtype=torch.float64) * ratio).round().flip(0)[:-1] + steps_offset
    elif timestep_spacing == "trailing":
        ts = _trailing(T, n)
    else:  # pragma: no cover - _check_choice guards this
        raise AssertionError(timestep_spacing)
    return _in_range(ts.to(torch.int64), T, steps_offset)


def euler_timesteps(num_train_timesteps: int, num_inference_steps: int,
                    timestep_spacing: str = "linspace", steps_offset: int = 0) -> torch.Tensor:
    """The timesteps of diffusers' ``EulerAncestralDiscreteScheduler.set_timesteps``,
    descending: float64 CPU ``[n]`` for ``linspace`` (fractional, rounded to float32 as
    diffusers), int64 for ``leading`` / ``trailing``."""
    T = num_train_timesteps
    n = _check_steps(T, num_inference_steps)
    _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    if timestep_spacing == "linspace":
        ts = torch.linspace(0, T - 1, n, dtype=torch.float64).float().double().flip(0)
        return ts
    if timestep_spacing == "leading":
        ts = (torch.arange(n, dtype=torch.float64) * (T // n)).round().flip(0) + steps_offset
    elif timestep_spacing == "trailing":
        ts = _trailing(T, n)
    else:  # pragma: no cover - _check_choice guards this
        raise AssertionError(timestep_spacing)
    return _in_range(ts.to(torch.int64), T, steps_offset)


def _trailing(T: int, n: int) -> torch.Tensor:
    ratio = T / n
    return torch.tensor([round(T - i * ratio) for i in range(n)], dtype=torch.float64) - 1


def _in_range(ts: torch.Tensor, T: int, steps_offset: int) -> torch.Tensor:
    if int(ts.max()) >= T or int(ts.min()) < 0:
        raise ValueError(f"steps_offset={steps_offset} moves timesteps outside [0, {T})")
    return ts


def sigmas_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """σ(t) = √((1 − ᾱ_t)/ᾱ_t) at (possibly fractional) timesteps, interpolated linearly
    between integer t (as diffusers' ``np.interp``), float64 ``[n]``. A zero ᾱ (the last
    step of a zero-terminal-SNR schedule) is replaced by 2⁻²⁴ first, as diffusers' sigma
    schedulers do, so σ stays finite."""
    abar = alphas_cumprod.double()
    abar = torch.where(abar > 0, abar, torch.full_like(abar, 2.0 ** -24))
    sig = ((1 - abar) / abar) ** 0.5
    t = timesteps.double()
    lo = t.floor().long().clamp(0, abar.numel() - 1)
    hi = (lo + 1).clamp(max=abar.numel() - 1)
    frac = t - lo.double()
    return sig[lo] + frac * (sig[hi] - sig[lo])
