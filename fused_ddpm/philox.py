"""Pure-PyTorch Philox4x32-10 and the in-kernel noise spec : the oracle.

The kernels (Triton, CUDA, C++) generate noise in-kernel; this module computes the same
stream with plain int64 torch ops so tests can check them element by element.

Spec (``docs/kernels.md``, "Noise"), for sample b with int64 seed k, row index t (the
timestep, or the step position) and stream word w (:class:`fused_ddpm.contract.NoiseStream`),
element with *logical* (row-major, memory-format independent) index i within the sample:

* key     = (k mod 2³², ⌊k / 2³²⌋ mod 2³²)           (two's complement bits of k)
* counter = (⌊i/4⌋ mod 2³², ⌊i/4⌋ / 2³², t mod 2³², w)
* (o0, o1, o2, o3) = Philox4x32-10(counter, key)
* uniforms  uⱼ = ((oⱼ >> 8) + ½) · 2⁻²⁴   ∈ (0, 1), exact in float32
* normals   (Box–Muller, float32):  ρ₀ = √(−2 ln u₀), θ₀ = 2π·u₁ →
  z₀ = ρ₀ cos θ₀, z₁ = ρ₀ sin θ₀;  likewise (u₂, u₃) → z₂, z₃
* element i takes z_{i mod 4}.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
TWO_PI_F32 = 6.2831854820251465  # float32(2π), the constant every backend uses


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product a·b, b an int64 tensor of uint32 values.

    Split into 16-bit limbs so no intermediate leaves int64's exact range.
    """
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    ll = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi + (ll >> 16)     # < 2^34
    lo = ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)
    hi = a_hi * b_hi + (mid >> 16)
    return hi & MASK32, lo & MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds (Salmon et al. 2011). All args: int64 tensors of uint32 values
    (broadcastable). Returns four int64 tensors of uint32 values."""
    k0 = torch.as_tensor(k0, dtype=torch.int64)
    k1 = torch.as_tensor(k1, dtype=torch.int64)
    for rnd in range(10):
        if rnd:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uint32_to_uniform(o: torch.Tensor) -> torch.Tensor:
    """uint32 (held in int64) → float32 uniform in (0, 1): ((o >> 8) + ½)·2⁻²⁴, exact."""
    return ((o >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)


def box_muller(u0: torch.Tensor, u1: torch.Tensor):
    """Two float32 uniforms → two float32 standard normals, in the spec's operation order."""
    rho = torch.sqrt(-2.0 * torch.log(u0))
    theta = u1 * TWO_PI_F32
    return rho * torch.cos(theta), rho * torch.sin(theta)


def philox_uint32(seeds: torch.Tensor, timesteps: torch.Tensor, numel: int,
                  stream: int = 0) -> torch.Tensor:
    """The raw stream: int64 ``[B, numel]`` of uint32 values, element i taking output i mod 4.

    ``seeds``, ``timesteps``: int64 ``[B]``; ``stream``: the counter's fourth word (a
    :class:`~fused_ddpm.contract.NoiseStream`); computed on the seeds' device.
    """
    seeds = torch.as_tensor(seeds).to(torch.int64).reshape(-1, 1)
    timesteps = torch.as_tensor(timesteps).to(device=seeds.device, dtype=torch.int64).reshape(-1, 1)
    i = torch.arange(numel, dtype=torch.int64, device=seeds.device).reshape(1, -1)
    g = i // 4
    k0, k1 = seeds & MASK32, (seeds >> 32) & MASK32
    zero = torch.zeros_like(g)
    word = zero + (int(stream) & MASK32)
    outs = philox4x32_10(g & MASK32, (g >> 32) & MASK32, (timesteps & MASK32) + zero, word, k0, k1)
    stacked = torch.stack(torch.broadcast_tensors(*outs), dim=-1)          # [B, numel, 4]
    return torch.gather(stacked, -1, (i % 4).expand(stacked.shape[0], -1).unsqueeze(-1))[..., 0]


def philox_normal(seeds: torch.Tensor, timesteps: torch.Tensor, shape, *,
                  channels_last: bool = False, stream: int = 0) -> torch.Tensor:
    """In-kernel noise for a batch: float32 ``shape`` = [B, ...] on the seeds' device.

    ``seeds``/``timesteps``: int64 ``[B]`` (or scalars, expanded); ``stream``: the counter's
    fourth word. The logical index is the
    row-major index within a sample, whatever the memory format, so ``channels_last`` only
    sets the returned tensor's memory format.
    """
    shape = tuple(shape)
    B = shape[0]
    numel = 1
    for s in shape[1:]:
        numel *= s
    seeds = torch.as_tensor(seeds, dtype=torch.int64).expand(B)
    timesteps = torch.as_tensor(timesteps, dtype=torch.int64).to(seeds.device).expand(B)
    groups = (numel + 3) // 4
    o = philox_uint32(seeds, timesteps, 4 * groups, stream)
    o = o.reshape(B, groups, 4)
    u = uint32_to_uniform(o)
    z0, z1 = box_muller(u[..., 0], u[..., 1])
    z2, z3 = box_muller(u[..., 2], u[..., 3])
    z = torch.stack([z0, z1, z2, z3], dim=-1).reshape(B, 4 * groups)[:, :numel].reshape(shape)
    if channels_last and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        z = z.contiguous(memory_format=fmt)
    return z
