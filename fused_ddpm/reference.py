"""The oracle: the DDPM / DDIM step in plain PyTorch, straight from the formulas.

It reads only the schedule (ᾱ, float64) and the step config held by a
:class:`~fused_ddpm.coefficients.StepCoefficients` — never its coefficient table — and
computes x̂0, the posterior mean (DDPM) or the DDIM update, the variance and the noise term
the textbook way. It is differentiable (plain autograd) and runs in float64 when given
float64 inputs (float32 for lower-precision inputs; the result is cast back).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .coefficients import StepCoefficients
from .philox import philox_normal
from .validation import check_step_inputs


def _per_sample(values: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[idx] shaped [B, 1, 1, ...] to broadcast against ``like``, in like's dtype/device."""
    v = values.to(like.device)[idx.to(like.device)]
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def prev_timestep(coeffs: StepCoefficients, t: torch.Tensor) -> torch.Tensor:
    """The scheduled timestep below each t (−1 at the end), found in the timestep list."""
    ts = coeffs.timesteps.to(t.device)
    lower = torch.where(ts.unsqueeze(0) < t.reshape(-1, 1), ts.unsqueeze(0), torch.full_like(ts, -1))
    return lower.max(dim=1).values


def dynamic_threshold_scale(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's per-sample scale s: the ``ratio`` quantile of |x̂0| over each sample,
    clamped to [1, max_value]. ``x0``: [B, ...]; returns float32/64 ``[B]``."""
    flat = x0.detach().reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1)
    return s.clamp(min=1.0, max=max_value)


def ddpm_step(x_t: torch.Tensor,
              model_output: torch.Tensor,
              t: Union[int, torch.Tensor],
              coeffs: StepCoefficients,
              noise: Optional[torch.Tensor] = None,
              seeds: Union[None, int, torch.Tensor] = None,
              return_x0: bool = False,
              generator: Optional[torch.Generator] = None,
              ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """One reverse step x_t → x_{t′} computed from the formulas.

    Args:
        x_t: sample, floating ``[B, C, ...]``.
        model_output: ``[B, C, ...]``, or ``[B, 2C, ...]`` for learned variances (second half v).
        t: the current timestep (int, or int tensor ``[B]`` / ``[]``); steps to the next
            scheduled timestep below t.
        coeffs: supplies the schedule and the step config.
        noise: z, shape of ``x_t``. Else ``seeds`` (int or int64 ``[B]``) for the in-kernel
            Philox stream, else z ~ N(0, 1) from ``generator`` (torch's default if None).
        return_x0: also return x̂0 (after clipping/thresholding, as diffusers does).

    Returns:
        x_{t′} in x_t's dtype (and x̂0 if ``return_x0``).
    """
    cfg = coeffs.config
    t, seeds = check_step_inputs(x_t, model_output, t, coeffs, noise=noise, seeds=seeds)
    out_dtype = x_t.dtype
    cdt = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    x = x_t.to(cdt)
    m = model_output.to(cdt)
    C = x.shape[1]
    v = None
    if cfg.learned_variance:
        m, v = m[:, :C], m[:, C:]

    abar = coeffs.schedule.alphas_cumprod                   # float64, CPU
    tp = prev_timestep(coeffs, t)
    final = 1.0 if (cfg.method == "ddpm" or cfg.set_alpha_to_one) else float(abar[0])
    abar_ext = torch.cat([abar, torch.tensor([final], dtype=torch.float64)])  # index −1 → final
    ab_t = _per_sample(abar, t, x)                          # ᾱ_t
    ab_p = _per_sample(abar_ext, tp, x)                     # ᾱ_t′
    alpha_t = ab_t / ab_p
    beta_t = 1 - alpha_t

    # x̂0 from the prediction type (forward process x_t = √ᾱ x0 + √(1−ᾱ) ε).
    if cfg.prediction_type == "epsilon":
        x0 = (x - (1 - ab_t).sqrt() * m) / ab_t.sqrt()
        eps = m
    elif cfg.prediction_type == "sample":
        x0 = m
        eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
    else:  # v = √ᾱ ε − √(1−ᾱ) x0
        x0 = ab_t.sqrt() * x - (1 - ab_t).sqrt() * m
        eps = ab_t.sqrt() * m + (1 - ab_t).sqrt() * x

    if cfg.thresholding:
        s = dynamic_threshold_scale(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        s = s.to(cdt).reshape(-1, *([1] * (x.dim() - 1)))
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s
    elif cfg.clip_sample_range is not None:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)

    if cfg.method == "ddpm":
        # Posterior mean μ̃(x_t, x̂0) of q(x_{t′} | x_t, x0).
        mean = (ab_p.sqrt() * beta_t / (1 - ab_t)) * x0 + (alpha_t.sqrt() * (1 - ab_p) / (1 - ab_t)) * x
        var_small = (beta_t * (1 - ab_p) / (1 - ab_t)).clamp(min=1e-20)
        vt = cfg.variance_type
        if vt == "fixed_small":
            sigma = var_small.sqrt()
        elif vt == "fixed_small_log":
            sigma = torch.exp(0.5 * torch.log(var_small))
        elif vt == "fixed_large":
            sigma = beta_t.sqrt()
        elif vt == "learned":
            sigma = v.sqrt()
        else:  # learned_range: interpolate log-variance between β̃ and β
            frac = (v + 1) / 2
            sigma = torch.exp(0.5 * (frac * torch.log(beta_t) + (1 - frac) * torch.log(var_small)))
        sigma = sigma * (t.to(x.device) > 0).to(cdt).reshape(-1, *([1] * (x.dim() - 1)))
    else:
        var = (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
        sigma = cfg.eta * var.clamp(min=0).sqrt()
        if cfg.use_clipped_model_output:
            eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
        mean = ab_p.sqrt() * x0 + (1 - ab_p - sigma ** 2).clamp(min=0).sqrt() * eps

    if noise is not None:
        z = noise.to(cdt)
    elif seeds is not None:
        z = philox_normal(seeds, t, x.shape).to(device=x.device, dtype=cdt)
    else:
        z = torch.randn(x.shape, generator=generator, dtype=torch.float32,
                        device=generator.device if generator is not None else x.device)
        z = z.to(device=x.device, dtype=cdt)
    y = (mean + sigma * z).to(out_dtype)
    if return_x0:
        return y, x0.to(out_dtype)
    return y
