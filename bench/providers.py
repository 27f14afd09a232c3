"""The providers: what each one runs, per mode, and whether it can run here.

:func:`check` says whether a (provider, mode, device, dtype) can run at all (without
allocating anything); :func:`build` allocates the inputs and returns ``fn(i)`` - one timed
call on input set ``i % nbuf`` - plus the number of buffers it rotates among.

Every provider steps the same problem: a linear-β DDPM schedule (1000 steps, 1e-4..0.02),
ε-prediction, ``fixed_small`` variance, no clipping, timestep t = 500 (noise is added), so
the fused step, the reference, torch.compile and diffusers compute the same thing.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Tuple

import torch

from . import timing
from .config import FUSED, LOOP_MODES, LOOP_STEPS

T_STEP = 500


class Skip(Exception):
    """A case that is not measured: ``status`` is "unavailable" (the provider is missing
    here) or "unsupported" (it exists but cannot run this mode/dtype/device)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


# ------------------------------------------------------------------------------ helpers
@functools.lru_cache(maxsize=None)
def _fd():
    import fused_ddpm
    return fused_ddpm


@functools.lru_cache(maxsize=None)
def backend_status() -> dict:
    try:
        return dict(_fd().backends())
    except Exception as e:  # pragma: no cover - a broken package
        return {b: f"unavailable: fused_ddpm failed to import ({e})" for b in FUSED}


@functools.lru_cache(maxsize=None)
def _diffusers():
    try:
        import diffusers  # noqa: F401
        from diffusers import DDPMScheduler
        return DDPMScheduler, None
    except Exception as e:
        return None, f"{e.__class__.__name__}: {e}"


_COEFFS = {}


def coeffs_on(device: torch.device):
    key = str(device)
    if key not in _COEFFS:
        fd = _fd()
        sched = fd.NoiseSchedule(num_train_timesteps=1000, beta_schedule="linear",
                                 beta_start=1e-4, beta_end=0.02)
        _COEFFS[key] = fd.step_coefficients(sched, method="ddpm", prediction_type="epsilon",
                                            variance_type="fixed_small", device=device)
    return _COEFFS[key]


_DIFFUSERS_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, variance_type="fixed_small", clip_sample=False,
                         prediction_type="epsilon")


def diffusers_scheduler():
    DDPMScheduler, _ = _diffusers()
    return DDPMScheduler(**_DIFFUSERS_CONFIG)


def dropin_scheduler(noise: str = "randn"):
    from fused_ddpm.diffusers import FusedDDPMScheduler
    return FusedDDPMScheduler(**_DIFFUSERS_CONFIG, noise=noise)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def working_set(mode: str, shape, dtype) -> int:
    """Bytes one call touches (for the buffer-rotation decision)."""
    from .config import PASSES
    return PASSES.get(mode, 3) * _numel(shape) * torch.tensor([], dtype=dtype).element_size()


# ------------------------------------------------------------------------------ check
def check(provider: str, mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise :class:`Skip` when this combination cannot run here."""
    if mode == "baseline":
        if provider not in ("randn", "copy"):
            raise Skip("unsupported", "baseline mode is for randn/copy")
        return
    if provider in ("randn", "copy"):
        raise Skip("unsupported", f"{provider} is mode-independent (recorded as 'baseline')")
    if provider in ("add", "dropin", "dropin-philox") and mode != "overhead":
        raise Skip("unsupported", f"{provider} is measured in mode 'overhead' only")
    if mode == "overhead" and provider not in FUSED + ("add", "dropin", "dropin-philox",
                                                       "diffusers"):
        raise Skip("unsupported", "mode 'overhead' measures the fused step, the drop-in, "
                                  "diffusers and torch.add")
    if mode == "loop-graph" and device.type != "cuda":
        raise Skip("unsupported", "CUDA graphs need a CUDA device")
    if provider in FUSED:
        from fused_ddpm.backends import get as get_backend
        status = backend_status().get(provider, "unavailable: unknown backend")
        if provider == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise Skip("unavailable", "TRITON_INTERPRET=1 is set (interpreter, not "
                                      "kernels): unset it to benchmark Triton")
        if not status.startswith("available"):
            raise Skip("unavailable", status.replace("unavailable: ", "", 1))
        why = get_backend(provider).takes(device, dtype)
        if why is not None:
            raise Skip("unsupported", f"the {provider} backend cannot run this: {why}")
        return
    if provider == "sample" and mode not in LOOP_MODES:
        raise Skip("unsupported", "fused_ddpm.sample is a whole loop (loop modes only)")
    if provider in ("diffusers", "dropin", "dropin-philox"):
        if _diffusers()[0] is None:
            raise Skip("unavailable", f"diffusers is not installed ({_diffusers()[1]})")
        if mode == "fwd-noise":
            raise Skip("unsupported", "DDPMScheduler.step draws its own noise (no "
                                      "variance_noise argument); see its fwd-seeds row")
    if mode == "loop-graph" and provider in ("reference", "compile", "diffusers"):
        raise Skip("unsupported", "not graph-capturable as written (host-side tensors and "
                                  "host->device copies per step)")


# ------------------------------------------------------------------------------ build
def _inputs(shape, dtype, device, nbuf, noise=False, grad=False):
    gen = torch.Generator(device=device).manual_seed(0)
    bufs = []
    for _ in range(nbuf):
        x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        m = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        b = {"x": x, "m": m}
        if noise:
            b["z"] = torch.randn(shape, generator=gen, device=device,
                                 dtype=torch.float32).to(dtype)
        if grad:
            x.requires_grad_(True)
            m.requires_grad_(True)
        bufs.append(b)
    return bufs


def _step_fn(provider: str, mode: str, device: torch.device, shape):
    """f(x, m, z) -> y for one step of this provider (z is None for own/in-kernel noise)."""
    fd = _fd()
    coeffs = coeffs_on(device)
    B = shape[0]
    if provider in FUSED:
        # mode overhead: an int t, as a Python sampling loop passes it
        t = T_STEP if mode == "overhead" else torch.full((B,), T_STEP, dtype=torch.int64,
                                                         device=device)
        seeds = torch.arange(B, dtype=torch.int64, device=device) + 12345

        def f(x, m, z):
            if z is None:
                return fd.ddpm_step(x, m, t, coeffs, seeds=seeds, backend=provider)
            return fd.ddpm_step(x, m, t, coeffs, noise=z, backend=provider)
        return f
    if provider in ("reference", "compile"):
        ref = fd.reference.ddpm_step

        def f(x, m, z):
            return ref(x, m, T_STEP, coeffs, noise=z)
        if provider == "compile":
            return compiled(f)
        return f
    if provider in ("diffusers", "dropin", "dropin-philox"):
        sched = (diffusers_scheduler() if provider == "diffusers" else
                 dropin_scheduler("philox" if provider == "dropin-philox" else "randn"))
        t = sched.timesteps[len(sched.timesteps) - 1 - T_STEP]    # a CPU tensor, as pipelines
        g = torch.Generator(device=device).manual_seed(0)

        def f(x, m, z):
            return sched.step(m, t, x, generator=g, return_dict=False)[0]
        return f
    if provider == "add":
        return lambda x, m, z: torch.add(x, m)
    raise Skip("unsupported", f"{provider} has no step")


def compiled(f):
    """torch.compile(f) with a fresh dynamo state (static shapes; randn with symbolic
    shapes fails to trace in the reference, so no dynamic shapes)."""
    import torch._dynamo as dynamo
    dynamo.reset()
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    return torch.compile(f, dynamic=False)


def build(provider: str, mode: str, shape, dtype, device: torch.device, rotate: bool
          ) -> Tuple[Callable[[int], object], int]:
    """(fn(i), nbuf). Raises :class:`Skip` for cases that cannot run."""
    check(provider, mode, device, dtype)
    nbuf = timing.num_buffers(working_set(mode, shape, dtype), device, rotate)
    if mode == "baseline":
        if provider == "copy":
            xs = [torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
                  for _ in range(nbuf)]
            ys = [torch.empty_like(x) for x in xs]
            return (lambda i: ys[i % nbuf].copy_(xs[i % nbuf])), nbuf
        # randn: the functional call, as a step that draws its own noise would make it
        return (lambda i: torch.randn(shape, dtype=dtype, device=device)), 1
    if mode in LOOP_MODES:
        return _build_loop(provider, mode, shape, dtype, device), 1
    f = _step_fn(provider, mode, device, shape)
    if mode == "overhead":
        b = _inputs(shape, dtype, device, 1)[0]
        return (lambda i: f(b["x"], b["m"], None)), 1
    if mode in ("fwd-seeds", "fwd-noise"):
        bufs = _inputs(shape, dtype, device, nbuf, noise=(mode == "fwd-noise"))

        def fn(i):
            b = bufs[i % nbuf]
            return f(b["x"], b["m"], b.get("z"))
        return fn, nbuf
    if mode == "bwd":
        bufs = _inputs(shape, dtype, device, nbuf, grad=True)
        for b in bufs:
            b["y"] = f(b["x"], b["m"], None)
            if not b["y"].requires_grad:
                raise Skip("unsupported", f"{provider}: output does not require grad")
            b["gy"] = torch.ones_like(b["y"])

        def fn(i):
            b = bufs[i % nbuf]
            return torch.autograd.grad(b["y"], (b["x"], b["m"]), b["gy"], retain_graph=True)
        return fn, nbuf
    raise Skip("unsupported", f"unknown mode {mode}")


class _ConstModel(torch.nn.Module):
    """A stand-in for the UNet: returns a fixed model output whatever it is given."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, t, *args, **kwargs):
        return self.m


def _build_loop(provider, mode, shape, dtype, device):
    fd = _fd()
    coeffs = coeffs_on(device)
    B = shape[0]
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    m = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    seeds = torch.arange(B, dtype=torch.int64, device=device) + 12345
    steps = list(range(LOOP_STEPS - 1, -1, -1))
    graph = mode == "loop-graph"

    if provider == "sample":
        model = _ConstModel(m)

        def run(i):
            return fd.sample(model, tuple(shape), coeffs, seeds=seeds, cuda_graph=graph,
                             progress=False, device=device, dtype=dtype, x_T=x0)
        return run

    if provider in FUSED:
        ts = torch.tensor(steps, dtype=torch.int64, device=device)
        tv = list(ts.unbind(0))           # 0-dim device views: no host->device copy per step

        def loop():
            x = x0
            for t in tv:
                x = fd.ddpm_step(x, m, t, coeffs, seeds=seeds, backend=provider)
            return x
        if not graph:
            return lambda i: loop()
        # warm up on a side stream, then capture the whole loop in one graph
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            x = x0
            for t in tv[:3]:
                x = fd.ddpm_step(x, m, t, coeffs, seeds=seeds, backend=provider)
        torch.cuda.current_stream(device).wait_stream(s)
        torch.cuda.synchronize(device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            loop()
        return lambda i: g.replay()

    if provider in ("reference", "compile"):
        ref = fd.reference.ddpm_step

        def one(x, t):
            return ref(x, m, t, coeffs)
        if provider == "compile":
            one = compiled(one)
            tt = [torch.tensor(t) for t in steps]   # a tensor t: one graph for all steps

            def run(i):
                x = x0
                for t in tt:
                    x = one(x, t)
                return x
            return run

        def run(i):
            x = x0
            for t in steps:
                x = one(x, t)
            return x
        return run

    if provider == "diffusers":
        sched = diffusers_scheduler()

        def run(i):
            x = x0
            for t in steps:
                x = sched.step(m, t, x, return_dict=False)[0]
            return x
        return run
    raise Skip("unsupported", f"{provider} has no loop")
