"""The whole sampling loop on the device: :func:`sample`.

``sample(model, shape, coeffs, seeds=...)`` starts from x_T ~ N(0, I) and applies the fused
step at every timestep of ``coeffs.timesteps`` (descending), calling
``model(x, t) -> model_output`` with ``t`` an int64 tensor ``[B]`` on the device.

Noise rule (reproducible, batch independent). Sample b with int64 seed k_b:

* x_T is the in-kernel Philox noise of seed k_b at row **t = T**
  (``num_train_timesteps``, a row no step uses), stream TIMESTEP, i.e. exactly
  ``fused_ddpm.philox.philox_normal(seeds, T, shape)``, written by the backend's
  ``philox_normal`` kernel;
* the step at timestep t adds the in-kernel noise of seed k_b at row t.

So a sample's whole trajectory is a function of its own seed only: the same seeds give the
same samples on every backend, run and batch split. In a CUDA graph, fresh seeds written
into the seeds buffer give a fresh x_T and fresh step noise on replay.

``cuda_graph=True`` captures x_T generation plus every model call and step of the loop in
one CUDA graph (after a warm-up of the model and the step on a side stream), caches it per
(model, shape, dtype, device, coeffs, backend) — at most :data:`MAX_GRAPHS`, the oldest
dropped first — and replays it; the seeds live in a static device buffer that is
overwritten before each replay. The graph reads the model's parameter *storage*: in-place
weight updates are seen, replaced parameter tensors are not (call :func:`clear_graph_cache`).
"""
from __future__ import annotations

import sys
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops
from .backends import resolve
from .coefficients import StepCoefficients
from .contract import NoiseStream
from .step import ddpm_step, draw_seeds
from .validation import normalize_seeds

__all__ = ["sample", "initial_noise", "clear_graph_cache", "MAX_GRAPHS"]

Model = Callable[[Tensor, Tensor], Tensor]

#: captured sampling graphs kept (each holds its own memory pool)
MAX_GRAPHS = 8


# ----------------------------------------------------------------------------- x_T
def initial_noise(seeds: Union[int, Tensor], shape, T: int, *, device=None,
                  dtype: torch.dtype = torch.float32, backend: str = "auto",
                  out: Optional[Tensor] = None) -> Tensor:
    """x_T for per-sample ``seeds``: ``philox_normal(seeds, T, shape)``, written on the
    device by the backend's ``philox_normal`` kernel (no host sync)."""
    device = torch.device(device) if device is not None else (
        seeds.device if isinstance(seeds, Tensor) else torch.device("cpu"))
    shape = tuple(shape)
    seeds = normalize_seeds(seeds, shape[0], device)
    name = resolve(backend, device, dtype)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    t = torch.full((shape[0],), T, dtype=torch.int64, device=device)
    ops.philox_normal(seeds, t, int(NoiseStream.TIMESTEP), name, out)
    return out


# ----------------------------------------------------------------------------- loop
def _timestep_rows(coeffs: StepCoefficients, device: torch.device, batch: int) -> Tensor:
    """int64 ``[n, B]`` on the device, row i = the row of the i-th step for every sample
    (the timestep itself for tables indexed by timestep, which is also what the model is
    given). The host→device copy happens once per (coeffs, device)."""
    if coeffs.index_by != "timestep":
        raise ValueError(f"fused_ddpm.sample runs tables indexed by timestep, not "
                         f"{coeffs.index_by!r}")
    return coeffs.visited_rows_on(device)[:, None].expand(-1, batch).contiguous()


def _progress(iterable, enabled: bool, total: int):
    if not (enabled and sys.stderr.isatty()):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc="fused_ddpm.sample", leave=False)


def _run_loop(model: Model, coeffs: StepCoefficients, t_rows: Tensor, seeds: Tensor,
              bufs: Tuple[Tensor, Tensor], T: int, backend: str, traj: Optional[Tensor],
              x_T: Optional[Tensor], progress: bool) -> Tensor:
    """x_T into bufs[0], then every step ping-ponging between the two buffers."""
    shape = tuple(bufs[0].shape)
    if x_T is not None:
        bufs[0].copy_(x_T)
    else:
        initial_noise(seeds, shape, T, device=bufs[0].device, dtype=bufs[0].dtype,
                      backend=backend, out=bufs[0])
    if traj is not None:
        traj[0].copy_(bufs[0])
    n = t_rows.shape[0]
    x = bufs[0]
    for i in _progress(range(n), progress, n):
        t = t_rows[i]
        m = model(x, t)
        if m.dtype != x.dtype:
            m = m.to(x.dtype)
        y = bufs[(i + 1) % 2]
        ddpm_step(x, m, t, coeffs, seeds=seeds, out=y, backend=backend)
        if traj is not None:
            traj[i + 1].copy_(y)
        x = y
    return x


@torch.no_grad()
def sample(model: Model,
           shape,
           coeffs: StepCoefficients,
           seeds: Union[None, int, Tensor] = None,
           cuda_graph: bool = False,
           progress: bool = True,
           *,
           device: Union[str, torch.device, None] = None,
           dtype: torch.dtype = torch.float32,
           return_trajectory: bool = False,
           backend: str = "auto",
           generator: Optional[torch.Generator] = None,
           x_T: Optional[Tensor] = None,
           ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Run the reverse process x_T → x_0 with the fused step, entirely on the device.

    Args:
        model: ``model(x, t) -> model_output``; ``x`` ``[B, C, ...]`` in ``dtype``, ``t`` int64
            ``[B]`` on the device (the actual timestep). The output is ``[B, C, ...]``
            (``[B, 2C, ...]`` for learned variances) and is cast to ``dtype`` if needed.
        shape: ``(B, C, ...)``.
        coeffs: from :func:`fused_ddpm.step_coefficients` (the loop visits ``coeffs.timesteps``).
        seeds: per-sample seeds, int (every sample the same) or int64 ``[B]``; they seed
            x_T (Philox at counter word T) and every step's in-kernel noise (counter word t).
            ``None``: drawn from ``generator`` (torch's default generator when None).
        cuda_graph: capture the whole loop (x_T, model calls, steps) in one CUDA graph and
            replay it; the graph is cached, so later calls with new seeds only replay.
            CUDA only (``ValueError`` on other devices).
        progress: a tqdm bar when stderr is a terminal (eager mode only).
        device: where to sample; default: ``coeffs.device``.
        dtype: the sample's dtype.
        return_trajectory: also return every x, ``[n + 1, *shape]`` (x_T first).
        backend: passed to :func:`fused_ddpm.ddpm_step`.
        x_T: start from this tensor instead of the seeded x_T.

    Returns:
        x_0 ``shape`` (and the trajectory if ``return_trajectory``). Runs under
        ``torch.no_grad()``.
    """
    if not isinstance(coeffs, StepCoefficients):
        raise TypeError(f"coeffs must come from fused_ddpm.step_coefficients, got "
                        f"{type(coeffs).__name__}")
    device = torch.device(device) if device is not None else coeffs.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be (B, C, ...), got {shape}")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, but sampling runs on {device}")
    B = shape[0]
    seeds_t = (draw_seeds(B, device, generator) if seeds is None
               else normalize_seeds(seeds, B, device).contiguous())
    if x_T is not None and tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
    T = coeffs.num_train_timesteps
    if cuda_graph:
        return _sample_graphed(model, shape, coeffs, seeds_t, device, dtype,
                               return_trajectory, backend, x_T)
    t_rows = _timestep_rows(coeffs, device, B)
    bufs = (torch.empty(shape, dtype=dtype, device=device),
            torch.empty(shape, dtype=dtype, device=device))
    traj = (torch.empty((t_rows.shape[0] + 1,) + shape, dtype=dtype, device=device)
            if return_trajectory else None)
    x = _run_loop(model, coeffs, t_rows, seeds_t, bufs, T, backend, traj, x_T, progress)
    return (x, traj) if return_trajectory else x


# ----------------------------------------------------------------------------- CUDA graphs
@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    seeds: Tensor
    x_T: Optional[Tensor]
    out: Tensor
    traj: Optional[Tensor]
    model_ref: object
    coeffs: StepCoefficients     # kept alive: its id() is part of the cache key


_GRAPHS: "OrderedDict[tuple, _Graph]" = OrderedDict()


def clear_graph_cache() -> None:
    """Forget every captured sampling graph (frees their memory pools)."""
    _GRAPHS.clear()


def _model_key(model):
    try:
        return weakref.ref(model)
    except TypeError:
        return model


def _sample_graphed(model, shape, coeffs, seeds, device, dtype, return_trajectory, backend,
                    x_T):
    key = (id(model), shape, dtype, str(device), id(coeffs), backend, return_trajectory,
           x_T is not None)
    coeffs_in = coeffs
    entry = _GRAPHS.get(key)
    if entry is not None:
        ref = entry.model_ref
        alive = ref() if isinstance(ref, weakref.ref) else ref
        if alive is not model:
            entry = None
    if entry is None:
        entry = _capture(model, shape, coeffs, device, dtype, return_trajectory, backend,
                         x_T is not None)
        entry.coeffs = coeffs_in
        while len(_GRAPHS) >= MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
        _GRAPHS[key] = entry
    entry.seeds.copy_(seeds)
    if x_T is not None:
        entry.x_T.copy_(x_T)
    entry.graph.replay()
    out = entry.out.clone()
    if return_trajectory:
        return out, entry.traj.clone()
    return out


def _capture(model, shape, coeffs, device, dtype, return_trajectory, backend, with_x_T):
    B = shape[0]
    T = coeffs.num_train_timesteps
    t_rows = _timestep_rows(coeffs, device, B)
    coeffs.table_on(device, torch.float64 if dtype == torch.float64 else torch.float32)
    seeds = torch.zeros(B, dtype=torch.int64, device=device)
    x_T = torch.zeros(shape, dtype=dtype, device=device) if with_x_T else None
    bufs = (torch.empty(shape, dtype=dtype, device=device),
            torch.empty(shape, dtype=dtype, device=device))
    traj = (torch.empty((t_rows.shape[0] + 1,) + shape, dtype=dtype, device=device)
            if return_trajectory else None)
    # Warm-up on a side stream: compiles/loads every kernel, fills the table cache, lets the
    # model allocate its workspaces — nothing may touch the host during capture.
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            initial_noise(seeds, shape, T, device=device, dtype=dtype, backend=backend,
                          out=bufs[0])
            m = model(bufs[0], t_rows[0])
            ddpm_step(bufs[0], m.to(dtype), t_rows[0], coeffs, seeds=seeds, out=bufs[1],
                      backend=backend)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _run_loop(model, coeffs, t_rows, seeds, bufs, T, backend, traj, x_T, False)
    return _Graph(graph, seeds, x_T, out, traj, _model_key(model), coeffs)
