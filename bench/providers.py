"""The providers: what each one runs, per mode, and whether it can run here.

:func:`check` says whether a (provider, mode, device, dtype) can run at all (without
allocating anything); :func:`build` allocates the inputs and returns ``fn(i)`` - one timed
call on input set ``i % nbuf`` - plus the number of buffers it rotates among.

Every provider steps the same problem: a linear-β schedule (1000 steps, 1e-4..0.02),
ε-prediction, no clipping, and the step method of the case (:data:`bench.config.METHODS`):
DDPM (``fixed_small`` variance) at timestep t = 500 (noise is added); DPM-Solver++ 2M,
its SDE variant and Euler ancestral at the middle step of 20 (second order for the
multistep methods, whose step also reads the previous x̂0 and returns its own). So the fused
step, the reference, torch.compile, diffusers' stock scheduler and the drop-in compute the
same thing. The schedulers' state (step index, the multistep history) is set before each
timed call, as a sampling loop at that step would have it.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Tuple

import torch

from . import timing
from .config import DROPIN_MODES, FUSED, LOOP_MODES, LOOP_STEPS, METHODS, passes

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
        import diffusers
        return diffusers, None
    except Exception as e:
        return None, f"{e.__class__.__name__}: {e}"


_COEFFS = {}
_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                 beta_end=0.02)


def coeffs_on(device: torch.device, method: str = "ddpm"):
    """The fused step's coefficients of ``method`` on ``device`` (cached)."""
    key = (str(device), method)
    if key not in _COEFFS:
        fd = _fd()
        spec = METHODS[method]
        _COEFFS[key] = fd.step_coefficients(fd.NoiseSchedule(**_SCHEDULE),
                                            num_inference_steps=spec.steps, device=device,
                                            **spec.coeffs)
    return _COEFFS[key]


def step_position(method: str) -> int:
    """The timed step: DDPM's timestep t = 500; the middle step (its row) otherwise."""
    return T_STEP if method == "ddpm" else METHODS[method].steps // 2


def scheduler_class(provider: str, method: str):
    """diffusers' stock class of ``method`` ("diffusers") or the fused drop-in ("dropin",
    "dropin-philox"); :class:`Skip` when it is not there."""
    spec = METHODS[method]
    if provider == "diffusers":
        mod, name = _diffusers()[0], spec.stock
    else:
        import fused_ddpm.diffusers as mod
        name = spec.dropin
    cls = getattr(mod, name, None)
    if cls is None:
        raise Skip("unavailable", f"{mod.__name__} has no {name}")
    return cls


def scheduler(provider: str, method: str = "ddpm", device: torch.device = None):
    """A scheduler of ``provider`` for ``method`` with the shared schedule, its timesteps
    set (on ``device``) for the method's step count (DDPM: its 1000 training steps)."""
    spec = METHODS[method]
    kw = dict(_SCHEDULE, **spec.scheduler)
    if provider == "dropin-philox":
        kw["noise"] = "philox"
    sched = scheduler_class(provider, method)(**kw)
    if method != "ddpm":
        sched.set_timesteps(spec.steps, device=device)
    return sched


def diffusers_scheduler(method: str = "ddpm", device: torch.device = None):
    return scheduler("diffusers", method, device)


def dropin_scheduler(noise: str = "randn", method: str = "ddpm", device: torch.device = None):
    return scheduler("dropin-philox" if noise == "philox" else "dropin", method, device)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def working_set(mode: str, shape, dtype, method: str = "ddpm") -> int:
    """Bytes one call touches (for the buffer-rotation decision)."""
    n = passes(method, mode) if mode != "baseline" else 3
    return n * _numel(shape) * torch.tensor([], dtype=dtype).element_size()


# ------------------------------------------------------------------------------ check
def check(provider: str, mode: str, device: torch.device, dtype: torch.dtype,
          method: str = "ddpm") -> None:
    """Raise :class:`Skip` when this combination cannot run here."""
    if mode == "baseline":
        if provider not in ("randn", "copy"):
            raise Skip("unsupported", "baseline mode is for randn/copy")
        return
    if provider in ("randn", "copy"):
        raise Skip("unsupported", f"{provider} is mode-independent (recorded as 'baseline')")
    if provider == "add" and mode != "overhead":
        raise Skip("unsupported", "add is measured in mode 'overhead' only")
    if provider in ("dropin", "dropin-philox") and mode not in DROPIN_MODES:
        raise Skip("unsupported", f"{provider} is measured in modes {', '.join(DROPIN_MODES)}")
    spec = METHODS[method]
    if method != "ddpm":
        if provider == "dropin-philox":
            raise Skip("unsupported", "dropin-philox is the DDPM drop-in's noise option")
        if mode in LOOP_MODES:
            raise Skip("unsupported", "the loops are DDPM's 1000 steps")
    if mode == "fwd-noise" and not spec.noise:
        raise Skip("unsupported", f"{method} adds no noise: its fwd-seeds row is the step")
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
            raise Skip("unsupported", "the stock step draws its own noise (timed as "
                                      "schedulers are called); see its fwd-seeds row")
        scheduler_class(provider, method)
    if mode == "loop-graph" and provider in ("reference", "compile", "diffusers"):
        raise Skip("unsupported", "not graph-capturable as written (host-side tensors and "
                                  "host->device copies per step)")


# ------------------------------------------------------------------------------ build
def _inputs(shape, dtype, device, nbuf, noise=False, grad=False, history=False):
    """``nbuf`` input sets {x, m[, z][, h]} from a fixed seed (h: a previous x̂0)."""
    gen = torch.Generator(device=device).manual_seed(0)
    bufs = []
    for _ in range(nbuf):
        def draw():
            return torch.randn(shape, generator=gen, device=device,
                               dtype=torch.float32).to(dtype)
        b = {"x": draw(), "m": draw()}
        if noise:
            b["z"] = draw()
        if history:
            b["h"] = draw()
        if grad:
            b["x"].requires_grad_(True)
            b["m"].requires_grad_(True)
        bufs.append(b)
    return bufs


def _at_step(sched, method: str, k: int):
    """``prepare(h)``: puts ``sched`` in the state a sampling loop has at step ``k``: the
    step index, and for the multistep methods the previous x̂0 ``h`` as the last history
    entry with enough earlier steps for the second order (the stock step shifts its
    history, so each call starts from the same state)."""
    if method == "ddpm":
        return lambda h: None
    spec = METHODS[method]

    def prepare(h):
        sched._step_index = k
        sched.is_scale_input_called = True
        if spec.multistep:
            sched.model_outputs[-1] = h
            sched.lower_order_nums = sched.config.solver_order
    return prepare


def _step_fn(provider: str, mode: str, device: torch.device, shape, method: str = "ddpm"):
    """f(x, m, z, h) -> y (and x̂0 for a multistep method, forward) for one step of this
    provider (z is None for own/in-kernel noise; h the previous x̂0 or None)."""
    fd = _fd()
    spec = METHODS[method]
    coeffs = coeffs_on(device, method)
    k = step_position(method)
    x0_too = spec.multistep and mode != "bwd"
    B = shape[0]
    if provider in FUSED:
        # mode overhead: an int t, as a Python sampling loop passes it
        t = k if mode == "overhead" else torch.full((B,), k, dtype=torch.int64, device=device)
        seeds = torch.arange(B, dtype=torch.int64, device=device) + 12345
        kw = dict(history=None, return_x0=True) if x0_too else {}

        def f(x, m, z, h=None):
            if spec.multistep:
                kw["history"] = h
            if not spec.noise:
                return fd.ddpm_step(x, m, t, coeffs, backend=provider, **kw)
            if z is None:
                return fd.ddpm_step(x, m, t, coeffs, seeds=seeds, backend=provider, **kw)
            return fd.ddpm_step(x, m, t, coeffs, noise=z, backend=provider, **kw)
        return f
    if provider in ("reference", "compile"):
        ref = fd.reference.ddpm_step

        def f(x, m, z, h=None):
            if spec.multistep:
                return ref(x, m, k, coeffs, noise=z, history=h, return_x0=x0_too)
            return ref(x, m, k, coeffs, noise=z)
        if provider == "compile":
            return compiled(f)
        return f
    if provider in ("diffusers", "dropin", "dropin-philox"):
        sched = scheduler(provider, method, device)
        if method == "ddpm":
            t = sched.timesteps[len(sched.timesteps) - 1 - k]    # a CPU tensor, as pipelines
        else:
            t = sched.timesteps[k]
        prepare = _at_step(sched, method, k)
        g = torch.Generator(device=device).manual_seed(0)

        def f(x, m, z, h=None):
            prepare(h)
            return sched.step(m, t, x, generator=g, return_dict=False)[0]
        return f
    if provider == "add":
        return lambda x, m, z, h=None: torch.add(x, m)
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


def build(provider: str, mode: str, shape, dtype, device: torch.device, rotate: bool,
          method: str = "ddpm") -> Tuple[Callable[[int], object], int]:
    """(fn(i), nbuf). Raises :class:`Skip` for cases that cannot run."""
    check(provider, mode, device, dtype, method)
    nbuf = timing.num_buffers(working_set(mode, shape, dtype, method), device, rotate)
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
    f = _step_fn(provider, mode, device, shape, method)
    history = METHODS[method].multistep
    if mode == "overhead":
        b = _inputs(shape, dtype, device, 1, history=history)[0]
        return (lambda i: f(b["x"], b["m"], None, b.get("h"))), 1
    if mode in ("fwd-seeds", "fwd-noise"):
        bufs = _inputs(shape, dtype, device, nbuf, noise=(mode == "fwd-noise"), history=history)

        def fn(i):
            b = bufs[i % nbuf]
            return f(b["x"], b["m"], b.get("z"), b.get("h"))
        return fn, nbuf
    if mode == "bwd":
        bufs = _inputs(shape, dtype, device, nbuf, grad=True, history=history)
        for b in bufs:
            b["y"] = f(b["x"], b["m"], None, b.get("h"))
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
