"""One small call of every launch path of the fused step, for compute-sanitizer.

``bench/gpu_check.sh`` runs ``python -m bench.small_run --device cuda --backends cuda,triton``
under ``compute-sanitizer --tool memcheck`` (with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``, so an
overrun of a few bytes lands outside its allocation and is reported). Every path a kernel can
take is launched once on a small tensor: each variance kind (fixed, learned, learned_range),
clipping and dynamic thresholding, every dtype the backend takes, contiguous and
channels_last, an odd shape (vector tail), an input at an element offset of 1 (no 16-byte
alignment), in-kernel and external noise, forward with x̂0 and the backward, the training-side
step (:func:`fused_ddpm.add_noise`), and the raw Philox stream.

Values are checked too, loosely (the contract tests are the real value checks): external-noise
steps against the float64 reference, in-kernel-noise steps for finiteness and for repeating
bit for bit, the Philox stream bit for bit against the oracle. Inputs come from fixed seeds.

On the CPU the same paths run with ``--device cpu --backends cpu,torch`` (the test of this
module does that). Exit status 1 when a check fails; one line per check on stdout.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

import fused_ddpm as fd
from fused_ddpm import philox
from fused_ddpm.backends import get as get_backend

#: (name, step_coefficients keyword arguments): one of each variance kind and clip mode
CONFIGS: Sequence[Tuple[str, dict]] = (
    ("ddpm-eps-fixed", dict(method="ddpm", prediction_type="epsilon",
                            variance_type="fixed_small")),
    ("ddpm-eps-learned_range-clip", dict(method="ddpm", prediction_type="epsilon",
                                         variance_type="learned_range",
                                         clip_sample_range=1.0)),
    ("ddpm-sample-learned", dict(method="ddpm", prediction_type="sample",
                                 variance_type="learned")),
    ("ddim-v-eta-threshold", dict(method="ddim", prediction_type="v_prediction", eta=0.5,
                                  thresholding=True, dynamic_thresholding_ratio=0.9,
                                  sample_max_value=2.5)),
)
#: (name, shape, layout): aligned, odd (a vector tail in every sample), 5-D
SHAPES: Sequence[Tuple[str, Tuple[int, ...], str]] = (
    ("aligned", (2, 4, 8, 8), "contiguous"),
    ("odd", (3, 3, 17, 9), "contiguous"),
    ("odd-cl", (3, 3, 17, 9), "channels_last"),
    ("offset1", (2, 3, 5, 7), "offset1"),
    ("video", (1, 4, 3, 8, 5), "contiguous"),
)
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


class Checker:
    """Prints one line per check and remembers the failures."""

    def __init__(self) -> None:
        self.failed: List[str] = []
        self.count = 0

    def __call__(self, name: str, ok: bool, detail: str = "") -> None:
        self.count += 1
        print(("ok   " if ok else "FAIL ") + name + (f"  {detail}" if detail else ""),
              flush=True)
        if not ok:
            self.failed.append(name)


def place(a: torch.Tensor, layout: str) -> torch.Tensor:
    """``a`` (on its device) in ``layout``: contiguous, channels_last (4-D) or at an element
    offset of 1 inside a larger buffer (same values, no 16-byte alignment)."""
    if layout == "contiguous":
        return a.contiguous()
    if layout == "channels_last":
        return a.contiguous(memory_format=torch.channels_last)
    if layout == "offset1":
        buf = torch.empty(a.numel() + 1, dtype=a.dtype, device=a.device)
        view = buf[1:].view(a.shape)
        view.copy_(a)
        return view
    raise ValueError(f"layout {layout!r} is not one of contiguous, channels_last, offset1")


def model_output(coeffs, shape, dtype, device, gen: torch.Generator) -> torch.Tensor:
    """A model output for ``coeffs`` (``[B, 2C, ...]`` for learned variances, the variance
    half in the range its variance kind takes)."""
    B, C = shape[0], shape[1]
    cfg = coeffs.config
    m = torch.randn((B, cfg.model_channels * C) + tuple(shape[2:]), generator=gen,
                    dtype=torch.float64)
    if cfg.model_channels == 2:
        v = m[:, C:]
        if cfg.variance_type == "learned":
            v.copy_(v.abs() * 0.01 + 1e-3)       # a standard deviation
        else:
            v.clamp_(-1.0, 1.0)                  # an interpolation fraction
    return m.to(device=device, dtype=dtype)


def cases(backend: str, device: torch.device) -> Iterator[Tuple[str, dict, str, tuple, str,
                                                                torch.dtype]]:
    """Every (dtype, shape/layout) the backend takes, each with one of the configs in turn
    (so every config meets every dtype and most layouts, in few launches: each launch
    variant is a kernel compilation for Triton)."""
    record = get_backend(backend)
    dtypes = [d for d in (torch.float32, torch.float16, torch.bfloat16)
              if record.takes(device, d) is None]
    for k, (dtype, (sname, shape, layout)) in enumerate(itertools.product(dtypes, SHAPES)):
        cname, cfg = CONFIGS[(k + k // len(CONFIGS)) % len(CONFIGS)]
        yield cname, cfg, sname, shape, layout, dtype


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = max(float(want.abs().max()), 1.0) if want.numel() else 1.0
    return float((got.double().cpu() - want.cpu()).abs().max()) / scale if want.numel() else 0.0


def run_steps(backend: str, device: torch.device, check: Checker) -> None:
    sched = fd.NoiseSchedule()
    coeffs_cache = {}
    for k, (cname, cfg, sname, shape, layout, dtype) in enumerate(cases(backend, device)):
        if cname not in coeffs_cache:
            coeffs_cache[cname] = fd.step_coefficients(sched, num_inference_steps=20,
                                                       device=device, **cfg)
        co = coeffs_cache[cname]
        gen = torch.Generator().manual_seed(1000 + k)
        B = shape[0]
        x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5
        z64 = torch.randn(shape, generator=gen, dtype=torch.float64)
        m = model_output(co, shape, dtype, device, gen)
        x = place(x64.to(device=device, dtype=dtype), layout)
        m = place(m, layout)
        z = place(z64.to(device=device, dtype=dtype), layout)
        t = co.timesteps[torch.randint(len(co.timesteps), (B,), generator=gen)].to(device)
        seeds = torch.randint(0, 2 ** 62, (B,), generator=gen).to(device)
        tag = f"{backend} {cname} {sname} {str(dtype)[6:]}"

        y, x0 = fd.ddpm_step(x, m, t, co, noise=z, return_x0=True, backend=backend)
        want, want_x0 = fd.reference.ddpm_step(x.double().cpu(), m.double().cpu(), t.cpu(),
                                               co.to("cpu"), noise=z.double().cpu(),
                                               return_x0=True)
        err = max(max_rel_err(y, want), max_rel_err(x0, want_x0))
        check(f"fwd external noise {tag}", err <= TOL[dtype], f"max err/scale {err:.1e}")

        ya = fd.ddpm_step(x, m, t, co, seeds=seeds, backend=backend)
        yb = fd.ddpm_step(x, m, t, co, seeds=seeds, backend=backend)
        check(f"fwd in-kernel noise {tag}", bool(torch.isfinite(ya).all()) and
              torch.equal(ya, yb))

        xg = x.detach().clone().requires_grad_(True)
        mg = m.detach().clone().requires_grad_(True)
        gy = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        for noise_kw in (dict(seeds=seeds), dict(noise=z)):
            yg = fd.ddpm_step(xg, mg, t, co, backend=backend, **noise_kw)
            gx, gm = torch.autograd.grad(yg, (xg, mg), gy)
            ok = bool(torch.isfinite(gx).all() and torch.isfinite(gm).all())
            check(f"bwd {'seeds' if 'seeds' in noise_kw else 'noise'} {tag}", ok)


def run_add_noise(backend: str, device: torch.device, check: Checker) -> None:
    sched = fd.NoiseSchedule()
    for k, (pred, dtype) in enumerate(itertools.product(("epsilon", "v_prediction"),
                                                        (torch.float32, torch.float16))):
        if get_backend(backend).takes(device, dtype) is not None:
            continue
        gen = torch.Generator().manual_seed(2000 + k)
        x0 = torch.randn(3, 3, 17, 9, generator=gen).to(device=device, dtype=dtype)
        t = torch.randint(1000, (3,), generator=gen).to(device)
        seeds = torch.randint(0, 2 ** 62, (3,), generator=gen).to(device)
        xt, target = fd.add_noise(x0, t, sched, seeds=seeds, prediction_type=pred,
                                  backend=backend)
        ok = bool(torch.isfinite(xt).all() and torch.isfinite(target).all())
        check(f"add_noise {backend} {pred} {str(dtype)[6:]}", ok)


def run_philox(backend: str, device: torch.device, check: Checker) -> None:
    u32 = get_backend(backend).launchers.philox_uint32
    seeds = torch.tensor([0, 1, -1, 2 ** 40 + 7, -(2 ** 63), 2 ** 63 - 1])
    ts = torch.tensor([0, 999, 17, 2 ** 33 + 5, 1, 500])
    for n in (1, 37, 4099):
        got = u32(seeds.to(device), ts.to(device), n, 0).cpu()
        check(f"philox_uint32 {backend} numel={n}",
              torch.equal(got, philox.philox_uint32(seeds, ts, n)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.small_run", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--backends", default="cuda,triton",
                   help="comma list of fused_ddpm backends (default cuda,triton); those not "
                        "available here are reported and skipped")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but no CUDA device is visible", file=sys.stderr)
        return 2
    status = fd.backends()
    check = Checker()
    ran = []
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        get_backend(name)                       # an unknown name raises
        if not status[name].startswith("available"):
            print(f"skip {name}: {status[name]}", flush=True)
            continue
        if get_backend(name).takes(device, torch.float32) is not None:
            print(f"skip {name}: {get_backend(name).takes(device, torch.float32)}", flush=True)
            continue
        ran.append(name)
        run_philox(name, device, check)
        run_steps(name, device, check)
        run_add_noise(name, device, check)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"small_run: {check.count} checks on {', '.join(ran) or 'no backend'}, "
          f"{len(check.failed)} failed", flush=True)
    if not ran:
        return 1
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
