"""``python -m fused_ddpm.demo``: a real sampling job end to end with the fused step.

1. An analytic model: data from a known isotropic Gaussian mixture, whose optimal noise
   predictor E[ε | x_t] is exact (see :class:`GaussianMixture`). It is sampled with
   :func:`fused_ddpm.sample` (DDPM and DDIM on a respaced schedule, every prediction type);
   the samples' mean, covariance and share per mixture component are compared with the
   mixture's exact values, and with the plain-PyTorch reference sampler on the same seeds.
2. A tiny randomly initialised diffusers ``UNet2DModel`` (built from a config, nothing
   downloaded) sampled through :class:`~fused_ddpm.diffusers.FusedDDPMScheduler` and the
   stock ``DDPMScheduler`` with the same generator: same images, and the mean time of one
   ``step`` call of each.

It saves two pictures in ``--out`` (default ``./fused_ddpm_demo``): ``mixture.png``, the
samples of every case over the mixture's true density, and ``unet_samples.png``, the UNet's
images from both schedulers. The last line is the verdict; the exit status is 1 when a check
failed. Runs on the GPU when there is one, else on the CPU (well under a minute there).
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .backends import backends, resolve
from .coefficients import StepCoefficients
from .schedule import NoiseSchedule

__all__ = ["GaussianMixture", "main", "sample_stats", "standard_errors"]

#: a statistic further than this many standard errors from its exact value fails the demo
#: (chance alone exceeds 5 with probability 6e-7 per statistic)
MAX_SE = 5.0
#: fused vs reference sampler on the same seeds: float32 rounding differences, grown over
#: 100 steps of a nonlinear model (about 1e-4..1e-3 seen); a wrong coefficient gives O(0.1)
MAX_REF_DIFF = 1e-2
#: fused vs stock diffusers scheduler, same generator
MAX_STOCK_DIFF = 1e-4


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

    def log_density(self, x: Tensor) -> Tensor:
        """log p(x) of the data distribution at points ``[N, D]`` (float64) -> ``[N]``."""
        xd = x.double()
        s2 = self.stds ** 2                                              # [K]
        d2 = ((xd[:, None, :] - self.means[None]) ** 2).sum(-1)          # [N, K]
        logp = (self.weights.log() - 0.5 * self.D * torch.log(2 * torch.pi * s2)
                - d2 / (2 * s2))
        return torch.logsumexp(logp, dim=1)

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
            elif pt == "v_prediction":
                a = abar.double().reshape(-1, 1)
                out = a.sqrt() * eps - (1 - a).sqrt() * x0
            else:
                raise ValueError(f"prediction_type={pt!r}: expected 'epsilon', 'sample' or "
                                 "'v_prediction'")
            return out.to(x.dtype).reshape(x.shape)

        return f


def sample_stats(x: Tensor, gm: GaussianMixture) -> Dict[str, Tensor]:
    """Mean ``[D]``, covariance ``[D, D]`` and the share of the samples nearest each
    component's mean ("weights", ``[K]``) of samples ``[n, D]``; float64 on the CPU."""
    x = x.double().cpu().reshape(x.shape[0], -1)
    k = gm.nearest_component(x)
    return {"mean": x.mean(0), "cov": torch.cov(x.T),
            "weights": torch.bincount(k, minlength=gm.K).double() / x.shape[0]}


def standard_errors(gm: GaussianMixture, n: int, draws: int = 400_000
                    ) -> Dict[str, Tensor]:
    """Exact values of :func:`sample_stats` and their standard errors for n independent
    draws from the mixture.

    mean_j: SE = √(Σ_jj / n). Covariance entry (i, j): the sample covariance is (up to
    O(1/n)) the mean of Y = (x_i − μ_i)(x_j − μ_j), so SE = √(Var[Y] / n), with Var[Y] (a
    fourth moment) evaluated on ``draws`` exact draws. Share nearest component k: its exact
    value p_k is measured on those draws (it is π_k up to the rare draws nearer another
    component's mean); binomial SE = √(p_k (1 − p_k) / n).
    """
    ref = gm.draw(draws, torch.Generator().manual_seed(0))
    c = ref - gm.mean
    y = c[:, :, None] * c[:, None, :]
    share = sample_stats(ref, gm)["weights"]
    return {"mean": gm.mean, "mean_se": (gm.cov.diagonal() / n).sqrt(),
            "cov": gm.cov, "cov_se": (y.var(0) / n).sqrt(),
            "weights": share, "weights_se": (share * (1 - share) / n).sqrt()}


def worst_error(stats: Dict[str, Tensor], exact: Dict[str, Tensor]) -> float:
    """The largest |sample statistic − exact value| / standard error over the mean, the
    covariance entries and the shares."""
    return max(float(((stats[k] - exact[k]).abs() / exact[f"{k}_se"]).max())
               for k in ("mean", "cov", "weights"))


@dataclass
class MixtureCase:
    label: str
    samples: Tensor            # [n, D] float64, CPU
    stats: Dict[str, Tensor]
    worst_se: float            # worst_error(stats, exact)
    ref_diff: float            # max |fused − reference| over the samples
    seconds: float             # the fused sampling call, model included


@dataclass
class UnetResult:
    images: Dict[str, Tensor]  # "fused" / "stock" -> [B, 3, H, W] float32, CPU
    max_diff: float
    step_us: Dict[str, Dict[str, float]]   # name -> {"loop": µs, "alone": µs}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def _nums(v: Tensor, fmt: str = "+.3f") -> str:
    return " ".join(format(float(a), fmt) for a in v.flatten())


def _cov_cells(cov: Tensor) -> Tensor:
    """The distinct entries of a symmetric [D, D] matrix, row by row (xx, xy, yy for 2-D)."""
    i, j = torch.triu_indices(cov.shape[0], cov.shape[1])
    return cov[i, j]


MIXTURE_CASES = [("ddpm", "epsilon", "leading", {}), ("ddpm", "v_prediction", "trailing", {}),
                 ("ddim", "epsilon", "trailing", dict(eta=0.0)),
                 ("ddim", "sample", "leading", dict(eta=1.0))]


def run_mixture(device: torch.device, n: int, steps: int) -> List[MixtureCase]:
    from . import step_coefficients
    from .sampler import sample
    gm = GaussianMixture.default()
    sched = NoiseSchedule(1000, "linear")
    exact = standard_errors(gm, n)
    print(f"\n== 1. Gaussian mixture ({gm.D}-D, {gm.K} components): {n} samples per case, "
          f"{steps} respaced steps ==")
    print("Each case samples the mixture with the fused step, the model being the exact\n"
          "optimal denoiser, and compares the samples with the mixture's exact values:\n"
          "  mean          the samples' mean (x, y)\n"
          "  covariance    their covariance (xx, xy, yy)\n"
          "  shares        the fraction of samples nearest each component's centre\n"
          "  worst error   the largest gap between any of those and its exact value,\n"
          "                counted in standard errors (the scatter that this many random\n"
          f"                draws show by chance): below 3 is chance, above {MAX_SE:g} fails\n"
          "  vs reference  the largest difference between these samples and those of the\n"
          "                plain-PyTorch reference sampler given the same seeds\n"
          "  time          the fused sampling run, model calls included")
    widths = (30, 14, 21, 20, 12, 13, 9)
    print(_row(("case", "mean", "covariance", "shares", "worst error", "vs reference",
                "time"), widths))
    print(_row(("exact (the mixture)", _nums(exact["mean"]), _nums(_cov_cells(exact["cov"])),
                _nums(exact["weights"], ".3f"), "", "", ""), widths))
    warm = step_coefficients(sched, num_inference_steps=2, device=device)
    sample(gm.model(warm), (8, gm.D), warm, seeds=0, progress=False)    # warm-up
    seeds = torch.arange(n, device=device)
    out = []
    for method, pt, spacing, kw in MIXTURE_CASES:
        coeffs = step_coefficients(sched, method=method, prediction_type=pt,
                                   num_inference_steps=steps, timestep_spacing=spacing,
                                   device=device, **kw)
        model = gm.model(coeffs)
        t0 = time.perf_counter()
        x = sample(model, (n, gm.D), coeffs, seeds=seeds, progress=False)
        _sync(device)
        dt = time.perf_counter() - t0
        x_ref = sample(model, (n, gm.D), coeffs, seeds=seeds, progress=False,
                       backend="torch")
        st = sample_stats(x, gm)
        label = f"{method}, {pt}, {spacing}" + (f", eta={kw['eta']:g}" if "eta" in kw else "")
        case = MixtureCase(label, x.double().cpu(), st, worst_error(st, exact),
                           float((x.double() - x_ref.double()).abs().max()), dt)
        out.append(case)
        print(_row((label, _nums(st["mean"]), _nums(_cov_cells(st["cov"])),
                    _nums(st["weights"], ".3f"), f"{case.worst_se:.2f} SE",
                    f"{case.ref_diff:.1e}", f"{dt:.2f} s"), widths))
    return out


def _tiny_unet():
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def run_unet(device: torch.device, batch: int, steps: int, repeats: int
             ) -> Optional[UnetResult]:
    try:
        from diffusers import DDPMScheduler
        from .diffusers import FusedDDPMScheduler
    except ImportError:
        print("\n(diffusers is not installed: skipping the UNet2DModel part; "
              "pip install diffusers)")
        return None
    unet = _tiny_unet().to(device)
    nparams = sum(p.numel() for p in unet.parameters())
    shape = (batch, 3, 16, 16)
    print(f"\n== 2. diffusers UNet2DModel (random weights, {nparams / 1e3:.0f}k parameters): "
          f"{batch} images of 3x16x16, {steps} DDPM steps ==")
    print("The same sampling loop twice with the same random generator: once with stock\n"
          "diffusers' DDPMScheduler, once with FusedDDPMScheduler. The images must be the\n"
          "same (random weights make noise-like pictures; the point is that they agree).")
    images, times = {}, {}
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
        images[name] = x.float().cpu()
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
        times[name] = {"loop": step_time / steps * 1e6,
                       "alone": (time.perf_counter() - t0) / (repeats * steps) * 1e6}
    res = UnetResult(images, float((images["fused"] - images["stock"]).abs().max()), times)
    print(f"  largest pixel difference, fused vs stock: {res.max_diff:.1e} "
          f"(pixel values span about {float(images['stock'].std()) * 4:.1f})")
    f, s = times["fused"], times["stock"]
    print(f"  scheduler.step, µs per call: fused {f['alone']:.1f}, stock {s['alone']:.1f} "
          f"when called back to back ({s['alone'] / f['alone']:.2f}x faster); "
          f"fused {f['loop']:.1f}, stock {s['loop']:.1f} inside the loop, between UNet calls")
    return res


# ------------------------------------------------------------------------------ pictures
def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_mixture(gm: GaussianMixture, cases: Sequence[MixtureCase], path: str) -> None:
    """One panel per case: the true density (shaded) and the samples (dots)."""
    plt = _pyplot()
    lo = (gm.means - 4 * gm.stds[:, None]).min(0).values
    hi = (gm.means + 4 * gm.stds[:, None]).max(0).values
    gx, gy = torch.meshgrid(torch.linspace(float(lo[0]), float(hi[0]), 200),
                            torch.linspace(float(lo[1]), float(hi[1]), 200), indexing="xy")
    dens = gm.log_density(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().reshape(gx.shape)
    ncols = min(2, len(cases))
    nrows = (len(cases) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.4 * nrows), squeeze=False)
    for ax in axes.flat[len(cases):]:
        ax.set_visible(False)
    for ax, c in zip(axes.flat, cases):
        ax.contourf(gx.numpy(), gy.numpy(), dens.numpy(), levels=12, cmap="Blues")
        pts = c.samples[:2000]
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=2, c="tab:red", alpha=0.5,
                   linewidths=0)
        ax.set_title(f"{c.label}\nworst error {c.worst_se:.2f} SE", fontsize=9)
        ax.set_xlim(float(lo[0]), float(hi[0]))
        ax.set_ylim(float(lo[1]), float(hi[1]))
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    fig.suptitle(f"fused step samples (red, {min(2000, len(cases[0].samples))} shown) over "
                 "the true mixture density (blue)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_unet(res: UnetResult, path: str) -> None:
    """Row 1: the fused scheduler's images; row 2: stock diffusers'; row 3: |difference|
    magnified 1000x. Pixels: [-1, 1] -> [0, 1]."""
    plt = _pyplot()
    fused, stock = res.images["fused"], res.images["stock"]
    rows = [("FusedDDPMScheduler", fused), ("stock DDPMScheduler", stock),
            ("|difference| x 1000", (fused - stock).abs() * 1000 * 2 - 1)]
    b = fused.shape[0]
    fig, axes = plt.subplots(3, b, figsize=(1.6 * b + 1.2, 5.2), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for i in range(b):
            ax = axes[r, i]
            ax.imshow(((imgs[i].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(),
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(f"random-weight UNet2DModel samples, same generator "
                 f"(max |difference| {res.max_diff:.1e})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_pictures(out_dir: str, cases: Sequence[MixtureCase], unet: Optional[UnetResult]
                  ) -> None:
    print("\n== pictures ==")
    if _pyplot() is None:
        print("  skipped: matplotlib is not installed (pip install matplotlib)")
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "mixture.png")
    plot_mixture(GaussianMixture.default(), cases, path)
    print(f"  {path}: the samples of every case (red) over the true density (blue)")
    if unet is not None:
        path = os.path.join(out_dir, "unet_samples.png")
        plot_unet(unet, path)
        print(f"  {path}: the UNet's images, fused (top row) and stock diffusers (middle), "
              "and their difference x1000 (bottom)")


# ------------------------------------------------------------------------------ verdict
def verdict(cases: Sequence[MixtureCase], unet: Optional[UnetResult]) -> List[str]:
    """The failed checks, in words (empty: everything passed)."""
    problems = []
    for c in cases:
        if not c.worst_se <= MAX_SE:
            problems.append(f"{c.label}: samples {c.worst_se:.1f} standard errors from the "
                            f"mixture (limit {MAX_SE:g})")
        if not c.ref_diff <= MAX_REF_DIFF:
            problems.append(f"{c.label}: fused and reference samples differ by "
                            f"{c.ref_diff:.1e} (limit {MAX_REF_DIFF:g})")
    if unet is not None and not unet.max_diff <= MAX_STOCK_DIFF:
        problems.append(f"UNet images: fused and stock differ by {unet.max_diff:.1e} "
                        f"(limit {MAX_STOCK_DIFF:g})")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fused_ddpm.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--samples", type=int, default=4000, help="mixture samples (default 4000)")
    ap.add_argument("--steps", type=int, default=100, help="respaced steps (default 100)")
    ap.add_argument("--unet-batch", type=int, default=4, help="UNet images (default 4)")
    ap.add_argument("--unet-steps", type=int, default=50, help="UNet DDPM steps (default 50)")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats of the step loop")
    ap.add_argument("--out", default="fused_ddpm_demo", metavar="DIR",
                    help="where the pictures go (default: ./fused_ddpm_demo)")
    ap.add_argument("--no-pictures", action="store_true", help="do not write the PNGs")
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
    cases = run_mixture(device, args.samples, args.steps)
    unet = run_unet(device, args.unet_batch, args.unet_steps, args.repeats)
    if not args.no_pictures:
        save_pictures(args.out, cases, unet)
    problems = verdict(cases, unet)
    print(f"\ndone in {time.perf_counter() - t_start:.1f} s")
    if problems:
        print("verdict: FAILED - " + "; ".join(problems))
        return 1
    worst = max(c.worst_se for c in cases)
    ref = max(c.ref_diff for c in cases)
    print(f"verdict: OK - all {len(cases)} mixture cases match the true distribution (worst "
          f"{worst:.2f} standard errors, limit {MAX_SE:g}) and the reference sampler (max "
          f"difference {ref:.1e})"
          + ("" if unet is None else f"; the fused diffusers scheduler gives stock diffusers' "
             f"images (max difference {unet.max_diff:.1e})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
