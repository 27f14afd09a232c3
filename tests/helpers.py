"""Shared test helpers: random step inputs and the affine form applied in plain torch."""
from __future__ import annotations

import torch

from fused_ddpm.coefficients import (COL_LOG_BETA, COL_LOG_BETA_TILDE, COL_P, COL_Q, COL_R,
                                     COL_SIGMA, COL_U, COL_W, StepCoefficients)
from fused_ddpm.reference import dynamic_threshold_scale


def random_inputs(coeffs: StepCoefficients, shape, dtype=torch.float64, generator=None,
                  channels_last=False):
    """(x, model_output, noise) for a step; learned variances get v ∈ (0.05, 1.05) for
    ``learned`` (it is a variance) and v ∈ (−1, 1) for ``learned_range``."""
    g = generator
    x = torch.randn(shape, dtype=torch.float64, generator=g) * 1.5
    mshape = list(shape)
    if coeffs.config.learned_variance:
        mshape[1] *= 2
    m = torch.randn(mshape, dtype=torch.float64, generator=g)
    if coeffs.config.learned_variance:
        C = shape[1]
        v = torch.rand(m[:, C:].shape, dtype=torch.float64, generator=g)
        m[:, C:] = v + 0.05 if coeffs.config.variance_type == "learned" else 2 * v - 1
    z = torch.randn(shape, dtype=torch.float64, generator=g)
    out = [x.to(dtype), m.to(dtype), z.to(dtype)]
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        out = [o.contiguous(memory_format=fmt) for o in out]
    return out


def affine_step(x, m, z, t, coeffs: StepCoefficients, table=None):
    """The step as the kernels compute it, in plain torch from the table (float64 default)."""
    table = coeffs.table64 if table is None else table
    cfg = coeffs.config
    rows = table[t.cpu()].to(x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)
    col = lambda c: rows[:, c].reshape(shape).to(x.dtype)  # noqa: E731
    C = x.shape[1]
    v = m[:, C:] if cfg.learned_variance else None
    m = m[:, :C]
    xh = col(COL_U) * x + col(COL_W) * m
    if cfg.thresholding:
        s = dynamic_threshold_scale(xh, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        s = s.to(x.dtype).reshape(shape)
        xh = torch.minimum(torch.maximum(xh, -s), s) / s
    elif cfg.clip_sample_range is not None:
        xh = xh.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    if cfg.variance_mode == 1:
        sigma = col(COL_SIGMA) * v.sqrt()
    elif cfg.variance_mode == 2:
        f = (v + 1) / 2
        sigma = col(COL_SIGMA) * torch.exp(0.5 * (f * col(COL_LOG_BETA) +
                                                  (1 - f) * col(COL_LOG_BETA_TILDE)))
    else:
        sigma = col(COL_SIGMA)
    y = col(COL_P) * xh + col(COL_Q) * x + col(COL_R) * m + sigma * z
    return y, xh
