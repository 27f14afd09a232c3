"""The oracle: the sampler steps and ``add_noise`` in plain PyTorch, from the formulas.

It reads only the schedule (ᾱ, float64), the step config, the visited timesteps and (for
the sigma-based methods) the sigma sequence held by a
:class:`~fused_ddpm.coefficients.StepCoefficients` — never its coefficient table — and
computes x̂0, the posterior mean (DDPM), the DDIM update, the DPM-Solver++ multistep update
(Lu et al. 2022, in its log-sigma form) or the Euler-ancestral update (k-diffusion's
``sample_euler_ancestral``), the variance and the noise term the textbook way, always in
float64 whatever the input dtype (the result is cast back). Classifier-free guidance and
its rescale (Lin et al. 2023) are formed here from the two model outputs directly.
Its dynamic-thresholding quantile is its own (a sort and a linear interpolation). It is
differentiable (plain autograd). Production code never calls it.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .coefficients import StepCoefficients
from .contract import NoiseStream
from .philox import philox_normal
from .schedule import NoiseSchedule
from .validation import (check_step_inputs, check_tensor, guided_halves, normalize_seeds,
                         normalize_t)

__all__ = ["ddpm_step", "add_noise", "dynamic_threshold_scale", "prev_timestep",
           "rescale_guidance", "dpm_order"]

F64 = torch.float64


def _per_sample(values: Tensor, idx: Tensor, like: Tensor) -> Tensor:
    """values[idx] shaped [B, 1, 1, ...] to broadcast against ``like`` (float64)."""
    v = values.to(like.device, F64)[idx.to(like.device)]
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def prev_timestep(coeffs: StepCoefficients, t: Tensor) -> Tensor:
    """The timestep each t steps to (−1 at the end): t − step_gap when the coefficients
    use diffusers' DDIM rule, else the next scheduled timestep below t."""
    if coeffs.step_gap is not None:
        prev = t - coeffs.step_gap
        return torch.where(prev >= 0, prev, torch.full_like(prev, -1))
    ts = coeffs.timesteps.to(t.device)
    lower = torch.where(ts.unsqueeze(0) < t.reshape(-1, 1), ts.unsqueeze(0),
                        torch.full_like(ts, -1))
    return lower.max(dim=1).values


def dynamic_threshold_scale(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Imagen's per-sample scale s: the ``ratio`` quantile of |x̂0| over each sample (the
    sorted values, linearly interpolated at position ratio·(N − 1)), clamped to
    [1, max_value]; NaN in a sample gives NaN. ``x0``: [B, ...]; returns float64 ``[B]``."""
    flat = x0.detach().reshape(x0.shape[0], -1).to(F64).abs()
    n = flat.shape[1]
    ordered = torch.sort(flat, dim=1).values
    pos = ratio * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    q = ordered[:, lo] * (1 - frac) + ordered[:, hi] * frac
    q = torch.where(torch.isnan(flat).any(dim=1), torch.full_like(q, math.nan), q)
    return q.clamp(min=1.0, max=max_value)


def _x0_and_eps(prediction_type: str, x: Tensor, m: Tensor, ab: Tensor) -> Tuple[Tensor, Tensor]:
    """x̂0 and ε̂ from the model output m (forward process x_t = √ᾱ x0 + √(1−ᾱ) ε)."""
    if prediction_type == "epsilon":
        return (x - (1 - ab).sqrt() * m) / ab.sqrt(), m
    if prediction_type == "sample":
        return m, (x - ab.sqrt() * m) / (1 - ab).sqrt()
    if prediction_type == "v_prediction":        # v = √ᾱ ε − √(1−ᾱ) x0
        return ab.sqrt() * x - (1 - ab).sqrt() * m, ab.sqrt() * m + (1 - ab).sqrt() * x
    raise ValueError(f"prediction_type={prediction_type!r} is not supported")


def _ddpm_sigma(variance_type: str, v: Optional[Tensor], beta_t: Tensor,
                var_small: Tensor) -> Tensor:
    """σ of a DDPM step (before the t > 0 gate); v: the model's variance channels."""
    if variance_type == "fixed_small":
        return var_small.sqrt()
    if variance_type == "fixed_small_log":
        return torch.exp(0.5 * torch.log(var_small))
    if variance_type == "fixed_large":
        return beta_t.sqrt()
    if variance_type == "learned":               # v = σ² (diffusers)
        return v.sqrt()
    if variance_type == "learned_range":         # log σ² between log β̃ and log β
        frac = (v + 1) / 2
        return torch.exp(0.5 * (frac * torch.log(beta_t) + (1 - frac) * torch.log(var_small)))
    if variance_type == "learned_log":           # v = log σ² (improved-diffusion LEARNED)
        return torch.exp(0.5 * v)
    raise ValueError(f"variance_type={variance_type!r} is not supported")


def _noise(noise, seeds, t, shape, like: Tensor, generator,
           stream: NoiseStream = NoiseStream.TIMESTEP) -> Tensor:
    if noise is not None:
        return noise.to(F64)
    if seeds is not None:
        z = philox_normal(seeds, t, shape, stream=stream)
        return z.to(device=like.device, dtype=F64)
    z = torch.randn(shape, generator=generator, dtype=torch.float32,
                    device=generator.device if generator is not None else like.device)
    return z.to(device=like.device, dtype=F64)


def rescale_guidance(m_cfg: Tensor, m_cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023 (eq. 15-16), as diffusers' ``rescale_noise_cfg``: the guided output
    rescaled to the conditional output's standard deviation per sample (over all other
    dimensions, Bessel-corrected), mixed with the unrescaled one by φ. float64 in, out."""
    dims = list(range(1, m_cfg.dim()))
    rescaled = m_cfg * (m_cond.std(dim=dims, keepdim=True) / m_cfg.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * m_cfg


def dpm_order(i: int, n: int, cfg) -> int:
    """The order of DPM-Solver++ step i of n: 1 while no earlier model output exists (the
    first step), and at the last step when ``euler_at_final``, ``lower_order_final`` with
    fewer than 15 steps, or a zero final sigma; else ``solver_order``."""
    if i == 0 or cfg.solver_order == 1:
        return 1
    if i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                       or cfg.final_sigmas_type == "zero"):
        return 1
    return 2


def _clip(x0: Tensor, cfg) -> Tensor:
    """x̂0 after dynamic thresholding (Imagen) or static clipping, as the config says."""
    if cfg.thresholding:
        s = dynamic_threshold_scale(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        s = s.reshape(-1, *([1] * (x0.dim() - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s
    if cfg.clip_sample_range is not None:
        return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    return x0


def _timestep_step(cfg, coeffs, x, m, v, t):
    """DDPM / DDIM from t to the previous scheduled timestep: (mean, σ, x̂0)."""
    abar = coeffs.schedule.alphas_cumprod                   # float64, CPU
    tp = prev_timestep(coeffs, t)
    if cfg.method == "ddpm":
        final = 1.0
    elif cfg.method == "ddim":
        final = 1.0 if cfg.set_alpha_to_one else float(abar[0])
    else:
        raise ValueError(f"method={cfg.method!r} is not supported by the reference step")
    abar_ext = torch.cat([abar, torch.tensor([final], dtype=F64)])  # index −1 → final
    ab_t = _per_sample(abar, t, x)                          # ᾱ_t
    ab_p = _per_sample(abar_ext, tp, x)                     # ᾱ_t′
    alpha_t = ab_t / ab_p
    beta_t = 1 - alpha_t

    x0, eps = _x0_and_eps(cfg.prediction_type, x, m, ab_t)
    x0 = _clip(x0, cfg)
    if cfg.method == "ddpm":
        # Posterior mean μ̃(x_t, x̂0) of q(x_{t′} | x_t, x0).
        mean = ((ab_p.sqrt() * beta_t / (1 - ab_t)) * x0
                + (alpha_t.sqrt() * (1 - ab_p) / (1 - ab_t)) * x)
        var_small = (beta_t * (1 - ab_p) / (1 - ab_t)).clamp(min=1e-20)
        sigma = _ddpm_sigma(cfg.variance_type, v, beta_t, var_small)
        sigma = sigma * (t.to(x.device) > 0).to(F64).reshape(-1, *([1] * (x.dim() - 1)))
    else:  # ddim (checked above); a learned variance half is not used
        var = (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
        sigma = cfg.eta * var.clamp(min=0).sqrt()
        if cfg.use_clipped_model_output:
            eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
        mean = ab_p.sqrt() * x0 + (1 - ab_p - sigma ** 2).clamp(min=0).sqrt() * eps
    return mean, sigma, x0


def _dpm_solver(cfg, coeffs, x, m, t, history):
    """DPM-Solver++ (Lu et al. 2022) multistep data-prediction update from σ_i to σ_{i+1},
    in the VP form x = α·x0 + σ_vp·ε with α = 1/√(1 + σ²), λ = −log σ, h = λ_{i+1} − λ_i,
    so e^{−h} = ρ = σ_{i+1}/σ_i. Order 1 (DDIM-like), or order 2 with the previous x̂0:
    r = h_{i−1}/h_i, "midpoint" D = x̂0 + (x̂0 − x̂0′)/(2r), "heun" the φ₂ form. The SDE variant
    (sde-dpmsolver++) uses e^{−2h} for the data term and adds σ_vp,{i+1}·√(1 − e^{−2h})·z.
    Returns (mean, σ, x̂0)."""
    sig = coeffs.sigmas
    n = sig.numel() - 1
    s_s = _per_sample(sig, t, x)
    s_t = _per_sample(sig, t + 1, x)
    s_r = _per_sample(sig, (t - 1).clamp(min=0), x)
    a_s = 1 / (1 + s_s ** 2).sqrt()
    a_t = 1 / (1 + s_t ** 2).sqrt()
    x0, _ = _x0_and_eps(cfg.prediction_type, x, m, a_s ** 2)
    x0 = _clip(x0, cfg)
    rho = s_t / s_s
    h = torch.log(s_s / s_t)
    order = torch.tensor([dpm_order(int(i), n, cfg) for i in t.tolist()], dtype=torch.int64)
    second = (order == 2).reshape(s_s.shape).to(x.device)
    if bool(second.any()) and history is None:
        raise ValueError("the reference's second-order DPM-Solver++ step needs history")
    prev = history.to(F64) if history is not None else torch.zeros_like(x0)
    r = torch.log(s_r / s_s) / h
    diff = torch.where(second, (x0 - prev) / torch.where(second, r, torch.ones_like(r)),
                       torch.zeros_like(x0))
    sde = cfg.method == "sde-dpmsolver++"
    decay = rho ** 2 if sde else rho            # e^{−2h} or e^{−h}
    h_eff = 2 * h if sde else h
    if cfg.solver_type == "midpoint":
        data = a_t * (1 - decay) * (x0 + 0.5 * diff)
    elif cfg.solver_type == "heun":
        data = a_t * (1 - decay) * x0 + a_t * (1 - (1 - decay) / h_eff) * diff
    else:
        raise ValueError(f"solver_type={cfg.solver_type!r} is not supported")
    mean = (a_t / a_s) * decay * x + data
    sigma = s_t * a_t * (1 - rho ** 2).sqrt() if sde else torch.zeros_like(s_t)
    return mean, sigma, x0


def _euler_ancestral(cfg, coeffs, x, m, t):
    """k-diffusion's ``sample_euler_ancestral`` (η = 1) in sigma space x = x0 + σ·ε: the
    model sees x/√(1 + σ²); d = (x − x̂0)/σ_i; an Euler step to σ_down plus σ_up·z, where
    σ_up = min(σ_{i+1}, √(σ_{i+1}²(σ_i² − σ_{i+1}²)/σ_i²)), σ_down = √(σ_{i+1}² − σ_up²).
    Returns (mean, σ_up, x̂0)."""
    sig = coeffs.sigmas
    s = _per_sample(sig, t, x)
    s_next = _per_sample(sig, t + 1, x)
    x0, _ = _x0_and_eps(cfg.prediction_type, x / (1 + s ** 2).sqrt(), m, 1 / (1 + s ** 2))
    x0 = _clip(x0, cfg)
    up = torch.minimum(s_next, (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2).sqrt())
    down = (s_next ** 2 - up ** 2).sqrt()
    d = (x - x0) / s
    return x + d * (down - s), up, x0


def ddpm_step(x_t: Tensor,
              model_output,
              t: Union[int, Tensor],
              coeffs: StepCoefficients,
              noise: Optional[Tensor] = None,
              seeds: Union[None, int, Tensor] = None,
              return_x0: bool = False,
              generator: Optional[torch.Generator] = None,
              *,
              history: Optional[Tensor] = None,
              guidance_scale: Optional[float] = None,
              guidance_rescale: float = 0.0,
              ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """One sampler step computed from the formulas, in float64.

    Args:
        x_t: sample, floating ``[B, C, ...]``.
        model_output: ``[B, C, ...]``, or ``[B, 2C, ...]`` for learned variances (second half
            v). Guided: ``[2B, ...]`` (unconditional first) or a pair (uncond, cond).
        t: the row: the current timestep (DDPM/DDIM: steps to the next scheduled timestep
            below t) or the step position (methods indexed by step); an int, or an int
            tensor ``[B]`` / ``[]``.
        coeffs: supplies the schedule, the step config, the visited timesteps and sigmas.
        noise: z, shape of ``x_t``. Else ``seeds`` (int or int64 ``[B]``) for the in-kernel
            Philox stream, else z ~ N(0, 1) from ``generator`` (torch's default if None).
        return_x0: also return x̂0 (after clipping/thresholding, as diffusers does).
        history: the previous step's x̂0 (second-order DPM-Solver++ steps).
        guidance_scale, guidance_rescale: classifier-free guidance m = m_u + g·(m_c − m_u),
            then :func:`rescale_guidance` with φ; learned variances from the conditional half.

    Returns:
        x_{t′} in x_t's dtype (and x̂0 if ``return_x0``).
    """
    cfg = coeffs.config
    t, seeds = check_step_inputs(x_t, model_output, t, coeffs, noise=noise, seeds=seeds,
                                 history=history, guidance_scale=guidance_scale,
                                 guidance_rescale=guidance_rescale)
    x = x_t.to(F64)
    C = x.shape[1]
    if guidance_scale is None:
        mc = model_output.to(F64)
        m = mc[:, :C]
    else:
        mu, mc = (a.to(F64) for a in guided_halves(model_output, x.shape[0]))
        m = mu[:, :C] + guidance_scale * (mc[:, :C] - mu[:, :C])
        if guidance_rescale:
            m = rescale_guidance(m, mc[:, :C], guidance_rescale)
    v = mc[:, C:] if cfg.learned_variance else None

    if cfg.method in ("ddpm", "ddim"):
        mean, sigma, x0 = _timestep_step(cfg, coeffs, x, m, v, t)
    elif cfg.method in ("dpmsolver++", "sde-dpmsolver++"):
        mean, sigma, x0 = _dpm_solver(cfg, coeffs, x, m, t, history)
    elif cfg.method == "euler_ancestral":
        mean, sigma, x0 = _euler_ancestral(cfg, coeffs, x, m, t)
    else:
        raise ValueError(f"method={cfg.method!r} is not supported by the reference step")

    z = _noise(noise, seeds, t, x.shape, x, generator, coeffs.noise_stream)
    y = (mean + sigma * z).to(x_t.dtype)
    if return_x0:
        return y, x0.to(x_t.dtype)
    return y


def add_noise(x0: Tensor,
              t: Union[int, Tensor],
              schedule: NoiseSchedule,
              noise: Optional[Tensor] = None,
              seeds: Union[None, int, Tensor] = None,
              prediction_type: str = "epsilon",
              generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """The forward process and the training target, from the formulas, in float64:
    x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, target ε (``"epsilon"``), x0 (``"sample"``) or
    v = √ᾱ_t ε − √(1−ᾱ_t) x0 (``"v_prediction"``). ε is ``noise``, else the Philox noise of
    ``seeds`` at row t (stream TIMESTEP), else drawn from ``generator``. Returns
    (x_t, target) in x0's dtype."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fused_ddpm.NoiseSchedule, got "
                        f"{type(schedule).__name__}")
    check_tensor("x0", x0)
    if x0.dim() < 2:
        raise ValueError(f"x0 must have shape [B, C, ...], got {list(x0.shape)}")
    if noise is not None:
        if seeds is not None:
            raise ValueError("pass either noise or seeds, not both")
        check_tensor("noise", noise)
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {list(x0.shape)}, got "
                             f"{list(noise.shape)}")
    B = x0.shape[0]
    t = normalize_t(t, B, x0.device, schedule.num_train_timesteps)
    if seeds is not None:
        seeds = normalize_seeds(seeds, B, x0.device)
    x = x0.to(F64)
    ab = _per_sample(schedule.alphas_cumprod, t, x)
    eps = _noise(noise, seeds, t, x.shape, x, generator)
    x_t = ab.sqrt() * x + (1 - ab).sqrt() * eps
    if prediction_type == "epsilon":
        target = eps
    elif prediction_type == "sample":
        target = x
    elif prediction_type == "v_prediction":
        target = ab.sqrt() * eps - (1 - ab).sqrt() * x
    else:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported")
    return x_t.to(x0.dtype), target.to(x0.dtype)
