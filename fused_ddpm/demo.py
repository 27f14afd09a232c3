"""``python -m fused_ddpm.demo``: a real sampling job end to end with the fused step.

1. An analytic model: data from a known isotropic Gaussian mixture, whose optimal noise
   predictor E[ε | x_t] is exact (see :class:`GaussianMixture`). It is sampled with
   :func:`fused_ddpm.sample` (DDPM and DDIM on a respaced schedule, every prediction type)
   and the samples' mean / covariance / mode weights are compared with the mixture's.
2. A tiny randomly initialised diffusers ``UNet2DModel`` (built from a config, nothing
   downloaded) sampled through :class:`~fused_ddpm.diffusers.FusedDDPMScheduler` and the
   stock ``DDPMScheduler`` with the same generator: same images, and the mean time of one
   ``step`` call of each.

Runs on the GPU when there is one, else on the CPU (well under a minute there).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from .backends import backends, resolve
from .coefficients import StepCoefficients
from .schedule import NoiseSchedule

__all__ = ["GaussianMixture", "main"]


class GaussianMixture:
    r"""Data x0 ~ Σ_k π_k N(μ_k, s_k² I) in D dimensions, and its optimal denoisers.

    Derivation. With x_t = √ᾱ x0 + √(1−ᾱ) ε, ε ~ N(0, I) independent of x0 and of the
    component k, conditionally on k the pair (x_t, ε) is jointly Gaussian:

        x_t | k ~ N(√ᾱ μ_k, v_k I),   v_k = ᾱ s_k² + 1 − ᾱ,
        Cov(ε, x_t | k) = √(1−ᾱ) I,   Cov(x0, x_t | k) = √ᾱ s_k² I,

    so the Gaussian conditioning formula gives the per-component posterior means

        E[ε  | x_t, k] = √(1−ᾱ) (x_t − √ᾱ μ_k) / v_k,
        E[x0 | x_t, k] = μ_k + √ᾱ s_k² (x_t − √ᾱ μ_k) / v_k.

    The component posterior is γ_k(x_t) ∝ π_k N(x_t; √ᾱ μ_k, v_k I), i.e.
    log γ_k = log π_k − (D/2) log v_k − |x_t − √ᾱ μ_k|² / (2 v_k) + const, and by the tower
    rule the optimal (MSE) predictors are the γ-weighted averages:

        ε̂(x_t) = Σ_k γ_k E[ε | x_t, k],   x̂0(x_t) = Σ_k γ_k E[x0 | x_t, k],

    and v̂ = √ᾱ ε̂ − √(1−ᾱ) x̂0 (v is linear in (ε, x0)). They satisfy
    x_t = √ᾱ x̂0 + √(1−ᾱ) ε̂ exactly. Mixture moments: mean Σ π_k μ_k, covariance
    Σ π_k (s_k² I + μ_k μ_kᵀ) − mean meanᵀ.
    """

    def __init__(self, means: Sequence[Sequence[float]], stds: Sequence[float],
                 weights: Sequence[float]):
        self.means = torch.as_tensor(means, dtype=torch.float64)          # [K, D]
        self.stds = torch.as_tensor(stds, dtype=torch.float64)            # [K]
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.K, self.D = self.means.shape

    @classmethod
    def default(cls) -> "GaussianMixture":
        """Three well separated, unequal 2-D components."""
        return cls(means=[[-1.5, 0.5], [1.2, 1.0], [0.3, -1.4]], stds=[0.25, 0.35, 0.3],
                   weights=[0.5, 0.3, 0.2])

    @property
    def mean(self) -> Tensor:
        return self.weights @ self.means

    @property
    def cov(self) -> Tensor:
        eye = torch.eye(self.D, dtype=torch.float64)
        second = sum(self.weights[k] * (self.stds[k] ** 2 * eye + torch.outer(self.means[k],
                                                                             self.means[k]))
                     for k in range(self.K))
        return second - torch.outer(self.mean, self.mean)

    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """n exact samples ``[n, D]`` (float64)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.D, dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k, None] * z

    def nearest_component(self, x: Tensor) -> Tensor:
        return torch.cdist(x.double().cpu(), self.means).argmin(dim=1)

    def predict(self, x: Tensor, abar: Tensor):
        """(ε̂, x̂0) for x_t ``[B, D]`` and ᾱ_t ``[B]`` (float64 math)."""
        xd = x.double().reshape(x.shape[0], self.D)
        a = abar.double().reshape(-1, 1, 1)                              # [B, 1, 1]
        mu = self.means.to(x.device)[None]                               # [1, K, D]
        s2 = (self.stds.to(x.device) ** 2).reshape(1, -1, 1)             # [1, K, 1]
        v = a * s2 + (1 - a)                                             # [B, K, 1]
        diff = xd[:, None, :] - a.sqrt() * mu                            # [B, K, D]
        logg = (self.weights.to(x.device).log()[None] - 0.5 * self.D * v[..., 0].log()
                - (diff ** 2).sum(-1) / (2 * v[..., 0]))
        g = torch.softmax(logg, dim=1)[..., None]                        # [B, K, 1]
        eps = (g * (1 - a).sqrt() * diff / v).sum(1)
        x0 = (g * (mu + a.sqrt() * s2 * diff / v)).sum(1)
        return eps, x0

    def model(self, coeffs: StepCoefficients, prediction_type: Optional[str] = None
              ) -> Callable[[Tensor, Tensor], Tensor]:
        """``model(x, t)`` returning the optimal prediction of ``prediction_type``
        (default: the one ``coeffs`` was built for)."""
        pt = prediction_type or coeffs.config.prediction_type
        abar_all = coeffs.schedule.alphas_cumprod

        def f(x: Tensor, t: Tensor) -> Tensor:
            abar = abar_all.to(x.device)[t]
            eps, x0 = self.predict(x, abar)
            if pt == "epsilon":
                out = eps
            elif pt == "sample":
                out = x0
            else:
                a = abar.double().reshape(-1, 1)
                out = a.sqrt() * eps - (1 - a).sqrt() * x0
            return out.to(x.dtype).reshape(x.shape)

        return f


def sample_stats(x: Tensor, gm: GaussianMixture) -> Dict[str, Tensor]:
    x = x.double().cpu().reshape(x.shape[0], -1)
    k = gm.nearest_component(x)
    return {"mean": x.mean(0), "cov": torch.cov(x.T),
            "weights": torch.bincount(k, minlength=gm.K).double() / x.shape[0]}


def _fmt(v: Tensor) -> str:
    return "[" + ", ".join(f"{float(a):+.3f}" for a in v.flatten()) + "]"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mixture(device: torch.device, n: int, steps: int) -> None:
    from . import step_coefficients
    from .sampler import sample
    gm = GaussianMixture.default()
    sched = NoiseSchedule(1000, "linear")
    print(f"\n== Gaussian mixture, D={gm.D}, K={gm.K}: {n} samples, {steps} respaced steps ==")
    print(f"  mixture      mean {_fmt(gm.mean)}  cov {_fmt(gm.cov)}  weights {_fmt(gm.weights)}")
    cases = [("ddpm", "epsilon", "leading", {}), ("ddpm", "v_prediction", "trailing", {}),
             ("ddim", "epsilon", "trailing", dict(eta=0.0)),
             ("ddim", "sample", "leading", dict(eta=1.0))]
    warm = step_coefficients(sched, num_inference_steps=2, device=device)
    sample(gm.model(warm), (8, gm.D), warm, seeds=0, progress=False)    # warm-up
    for method, pt, spacing, kw in cases:
        coeffs = step_coefficients(sched, method=method, prediction_type=pt,
                                   num_inference_steps=steps, timestep_spacing=spacing,
                                   device=device, **kw)
        t0 = time.perf_counter()
        x = sample(gm.model(coeffs), (n, gm.D), coeffs, seeds=torch.arange(n, device=device),
                   progress=False)
        _sync(device)
        dt = time.perf_counter() - t0
        st = sample_stats(x, gm)
        se = (gm.cov.diagonal() / n).sqrt()
        z = ((st["mean"] - gm.mean) / se).abs().max()
        label = f"{method}/{pt}/{spacing}" + (f"/eta={kw['eta']}" if "eta" in kw else "")
        print(f"  {label:<28} mean {_fmt(st['mean'])}  cov {_fmt(st['cov'])}  weights "
              f"{_fmt(st['weights'])}  |mean err|/SE max {float(z):.2f}  "
              f"{dt * 1e3:.0f} ms ({dt / steps * 1e6:.0f} us/step incl. model)")


def _tiny_unet():
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def run_unet(device: torch.device, batch: int, steps: int, repeats: int) -> None:
    try:
        from diffusers import DDPMScheduler
        from .diffusers import FusedDDPMScheduler
    except ImportError:
        print("\n(diffusers is not installed: skipping the UNet2DModel part; "
              "pip install diffusers)")
        return
    unet = _tiny_unet().to(device)
    nparams = sum(p.numel() for p in unet.parameters())
    shape = (batch, 3, 16, 16)
    print(f"\n== diffusers UNet2DModel (random init, {nparams / 1e3:.0f}k params), "
          f"sample {list(shape)}, {steps} DDPM steps ==")
    results = {}
    for name, sched in (("fused", FusedDDPMScheduler()), ("stock", DDPMScheduler())):
        sched.set_timesteps(steps, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, generator=gen, device=device)
        step_time = 0.0
        with torch.no_grad():
            for t in sched.timesteps:
                m = unet(x, t).sample
                _sync(device)
                t0 = time.perf_counter()
                x = sched.step(m, t, x, generator=gen).prev_sample
                _sync(device)
                step_time += time.perf_counter() - t0
        results[name] = (x, step_time / steps)
        # step-only timing: the same call repeated over the schedule, no model in between
        m = torch.randn(shape, device=device)
        x0 = torch.randn(shape, device=device)
        for t in sched.timesteps[:3]:
            sched.step(m, t, x0, generator=gen)        # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            for t in sched.timesteps:
                sched.step(m, t, x0, generator=gen)
        _sync(device)
        results[name] += ((time.perf_counter() - t0) / (repeats * steps),)
    diff = (results["fused"][0] - results["stock"][0]).abs().max().item()
    print(f"  images: fused vs stock max |diff| = {diff:.2e}  (same generator)")
    print(f"  final x: mean {results['fused'][0].mean().item():+.4f}, "
          f"std {results['fused'][0].std().item():.4f}")
    for name in ("fused", "stock"):
        _, in_loop, alone = results[name]
        print(f"  {name:<5} scheduler.step: {in_loop * 1e6:8.1f} us/call in the loop, "
              f"{alone * 1e6:8.1f} us/call alone")
    print(f"  step speed-up (alone): {results['stock'][2] / results['fused'][2]:.2f}x")


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fused_ddpm.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--samples", type=int, default=4000, help="mixture samples (default 4000)")
    ap.add_argument("--steps", type=int, default=100, help="respaced steps (default 100)")
    ap.add_argument("--unet-batch", type=int, default=4)
    ap.add_argument("--unet-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats of the step loop")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        # tiny tensors: intra-op threads cost more in wake-ups than they save
        torch.set_num_threads(1)
    t_start = time.perf_counter()
    from . import __version__
    print(f"fused_ddpm {__version__} demo on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    for name, status in backends().items():
        print(f"  backend {name:<9} {status}")
    print(f"  step backend used (float32 on {device}): {resolve('auto', device, torch.float32)}"
          + (f"; torch CPU threads: {torch.get_num_threads()}" if device.type == "cpu" else ""))
    run_mixture(device, args.samples, args.steps)
    run_unet(device, args.unet_batch, args.unet_steps, args.repeats)
    print(f"\ndone in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
