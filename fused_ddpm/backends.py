"""Which backends exist here, and which one a call uses.

Backends: ``"cuda"`` (the CUDA extension), ``"triton"`` (Triton kernels; on CPU tensors only
under ``TRITON_INTERPRET=1``), ``"cpu"`` (the C++ extension) and ``"reference"`` (plain
PyTorch, always there). ``backend="auto"`` picks, for CUDA tensors, cuda → triton →
reference, and for CPU tensors, cpu → reference. ``FUSED_DDPM_BACKEND`` overrides "auto".
float64 tensors on a GPU go to the reference (the GPU kernels compute in float32).
"""
from __future__ import annotations

import os
from typing import Dict

import torch

from . import _extension

BACKENDS = ("cuda", "triton", "cpu", "reference")


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> str:
    try:
        import triton  # noqa: F401
        from . import triton_kernels  # noqa: F401
    except Exception as e:  # ImportError, or a broken triton install
        return f"unavailable: cannot import triton ({e.__class__.__name__}: {e})"
    if triton_interpreter():
        return "available (interpreter, TRITON_INTERPRET=1: runs on CPU tensors, slowly)"
    if not torch.cuda.is_available():
        return "unavailable: no CUDA device (set TRITON_INTERPRET=1 to run it on the CPU)"
    return f"available (triton {triton.__version__})"


_STATUS: Dict[str, str] = {}


def backends() -> Dict[str, str]:
    """{backend: "available ..." or "unavailable: <why>"} for every backend (found once)."""
    if not _STATUS:
        _STATUS.update(_probe())
    return dict(_STATUS)


def _probe() -> Dict[str, str]:
    status = _extension.load()
    stale = "unavailable: the extension has no step kernels (a stale build? reinstall)"
    kernels = _extension.has_op("step_forward_kernel")
    out = {}
    if status.get("_C_cuda") is not None:
        out["cuda"] = f"unavailable: {status['_C_cuda']}"
    elif not torch.cuda.is_available():
        out["cuda"] = "unavailable: built, but no CUDA device is visible"
    else:
        out["cuda"] = "available" if kernels else stale
    out["triton"] = _triton_status()
    if status.get("_C") is not None:
        out["cpu"] = f"unavailable: {status['_C']}"
    else:
        out["cpu"] = "available" if kernels else stale
    out["reference"] = "available"
    return out


def is_available(name: str) -> bool:
    return backends()[name].startswith("available")


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend a call with tensors on ``device`` of ``dtype`` runs on."""
    if backend == "auto":
        backend = os.environ.get("FUSED_DDPM_BACKEND", "auto") or "auto"
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS) + ['auto']}")
    if backend == "auto":
        if device.type == "cuda":
            if dtype == torch.float64:
                return "reference"
            order = ("cuda", "triton")
        elif device.type == "cpu":
            order = ("cpu",)
        else:
            order = ()
        for name in order:
            if is_available(name):
                return name
        return "reference"
    if backend == "reference":
        return backend
    status = backends()[backend]
    if not status.startswith("available"):
        raise RuntimeError(f"backend={backend!r} is {status}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not (
            device.type == "cpu" and triton_interpreter()):
        raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with "
                         f"TRITON_INTERPRET=1), got tensors on {device}")
    if backend in ("cuda", "triton") and dtype == torch.float64:
        raise TypeError(f"backend={backend!r} computes in float32 and does not take float64 "
                        f"tensors; use backend='reference' (or 'auto', which does)")
    return backend
