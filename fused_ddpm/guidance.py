"""Classifier-free guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and
Sample Steps are Flawed", eq. 15-16; diffusers' ``rescale_noise_cfg``): the per-sample
factor k_b of the guided model output.

The fused step forms m = k_b·(m_u + g·(m_c − m_u)) in registers (``docs/kernels.md``); k_b
needs the standard deviation of the whole guided sample, so it is a separate small pass
before the step: :func:`rescale_factors`.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rescale_factors"]


def rescale_factors(m_uncond: Tensor, m_cond: Tensor, guidance_scale: float,
                    guidance_rescale: float) -> Tensor:
    """k_b = φ·std(m_c[b])/std(m_cfg[b]) + (1 − φ), m_cfg = (1 − g)·m_u + g·m_c: rescaling
    the guided prediction to the conditional one's standard deviation (per sample, over all
    of its elements, Bessel-corrected as ``torch.std``), mixed with the unrescaled one by φ.

    ``m_uncond``, ``m_cond``: the prediction channels ``[B, C, ...]`` (any layout);
    returns float32 ``[B]`` (computed in float64 for float64 inputs, else float32). A sample
    whose guided output is constant gets an infinite or NaN factor, as the formula does."""
    B = m_uncond.shape[0]
    cdt = torch.float64 if m_uncond.dtype == torch.float64 else torch.float32
    mu = m_uncond.detach().reshape(B, -1).to(cdt)
    mc = m_cond.detach().reshape(B, -1).to(cdt)
    g = float(guidance_scale)
    cfg = (1 - g) * mu + g * mc
    phi = float(guidance_rescale)
    k = phi * (mc.std(dim=1) / cfg.std(dim=1)) + (1 - phi)
    return k.to(torch.float32)
