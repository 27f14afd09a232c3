"""Shared test helpers: random step inputs."""
from __future__ import annotations

import torch

from fused_ddpm.coefficients import StepCoefficients


def variance_values(variance_type: str, shape, generator=None) -> torch.Tensor:
    """float64 values of a model's variance channels that the variance type accepts:
    σ² ∈ (0.05, 1.05) (``learned``), v ∈ (−1, 1) (``learned_range``), log σ² ∈ (−6, 0)
    (``learned_log``)."""
    u = torch.rand(shape, dtype=torch.float64, generator=generator)
    if variance_type == "learned":
        return u + 0.05
    if variance_type == "learned_range":
        return 2 * u - 1
    if variance_type == "learned_log":
        return 6 * u - 6
    raise ValueError(f"{variance_type!r} has no variance channels")


def random_inputs(coeffs: StepCoefficients, shape, dtype=torch.float64, generator=None,
                  channels_last=False):
    """(x, model_output, noise) for a step; a 2C-channel model output for learned variance
    types, its second half drawn by :func:`variance_values`."""
    g = generator
    x = torch.randn(shape, dtype=torch.float64, generator=g) * 1.5
    mshape = list(shape)
    cfg = coeffs.config
    if cfg.learned_variance:
        mshape[1] *= 2
    m = torch.randn(mshape, dtype=torch.float64, generator=g)
    if cfg.learned_variance:
        C = shape[1]
        m[:, C:] = variance_values(cfg.variance_type, m[:, C:].shape, g)
    z = torch.randn(shape, dtype=torch.float64, generator=g)
    out = [x.to(dtype), m.to(dtype), z.to(dtype)]
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        out = [o.contiguous(memory_format=fmt) for o in out]
    return out


def tiny_unet(channels: int = 3, **options):
    """The pipeline tests' model: a diffusers ``UNet2DModel`` on 8×8 samples with
    ``channels`` in and out channels (``options``: more constructor arguments), built right
    after ``torch.manual_seed(0)``, in eval mode."""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels,
                       layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), **options).eval()
