"""The backend records: which backends exist here, what they take, and their launchers.

One :class:`Backend` record per name says which devices and dtypes the backend takes, how
to find out whether it is available (the probe, run once), and its four launchers
(``docs/kernels.md``: ``step_forward``, ``step_backward``, ``philox_uint32``,
``philox_normal``). :func:`resolve`, the ops, the benchmark and the tests all read these
records; nothing else lists backends.

* ``"cuda"``: the CUDA kernels of the ``fused_ddpm._C_cuda`` extension (``torch.ops``).
* ``"triton"``: the Triton kernels (``fused_ddpm.triton_kernels``); on CPU tensors only
  under ``TRITON_INTERPRET=1`` (set before triton is first imported).
* ``"cpu"``: the C++ CPU kernels of the ``fused_ddpm._C`` extension (also float64).
* ``"torch"``: the contract in plain torch ops (:mod:`fused_ddpm.torch_backend`): any
  device, every dtype; always available. The fallback of ``"auto"``.

``backend="auto"`` picks, for CUDA tensors, cuda → triton → torch, for CPU tensors,
cpu → torch, and torch for other devices; the first that is available and takes the
device and dtype. ``FUSED_DDPM_BACKEND`` overrides "auto". A backend asked for by name
that cannot run the call raises :class:`BackendUnavailableError`.
"""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from . import _extension, checks

__all__ = ["Backend", "Launchers", "BackendUnavailableError", "BACKENDS", "backends",
           "get", "is_available", "resolve", "triton_interpreter"]


class BackendUnavailableError(RuntimeError):
    """The backend asked for is not built here, or does not take this device or dtype."""


@dataclass(frozen=True)
class Launchers:
    """The four launches of the contract, with the contract's argument order."""

    forward: Callable[..., None]
    backward: Callable[..., None]
    philox_uint32: Callable[..., torch.Tensor]
    philox_normal: Callable[..., None]


@dataclass(frozen=True)
class Backend:
    """What a backend takes and how to launch it.

    ``device_types``: device types it runs on (None: any). ``dtypes``: input dtypes.
    ``probe()``: "available ..." or "unavailable: <why>" (called once). ``load(checked)``:
    its :class:`Launchers`, checking their arguments (the contract's checks, in C++ or
    :mod:`fused_ddpm.checks`) or, for arguments a prepared step has checked before, not
    (where the backend has such a path). ``torch_ops``: the launchers are ``torch.ops``
    (the compiled extensions), else Python functions.
    """

    name: str
    device_types: Optional[Callable[[], Tuple[str, ...]]]
    dtypes: Tuple[torch.dtype, ...]
    probe: Callable[[], str]
    load: Callable[[bool], Launchers]
    torch_ops: bool

    def takes(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None when it runs tensors of ``dtype`` on ``device``, else why not."""
        types = self.device_types() if self.device_types is not None else None
        if types is not None and device.type not in types:
            return (f"it runs on {' or '.join(types)} tensors, not {device.type}"
                    if types else "it runs on no device here")
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"it takes {names} tensors, not {str(dtype).replace('torch.', '')}"
        return None

    @property
    def launchers(self) -> Launchers:
        """The launchers, checking their arguments first."""
        return _launchers(self.name, True)

    @property
    def unchecked_launchers(self) -> Launchers:
        """The launchers without the Python-side checks: for arguments already checked once
        (a prepared step). The C++ ops always check."""
        return _launchers(self.name, False)


FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- probes
_CONTRACT_OPS = ("step_forward_kernel", "step_backward_kernel", "philox_uint32",
                 "philox_normal_kernel")


def _extension_status(module: str) -> Optional[str]:
    """None when ``module`` loaded and implements this contract, else why not."""
    why = _extension.load().get(module)
    if why is not None:
        return why
    for op in _CONTRACT_OPS:
        if not _extension.has_op(op):
            return f"the extension has no {op} op (a stale build? reinstall)"
    schema = torch.ops.fused_ddpm.step_forward_kernel.default._schema
    if not schema.arguments or schema.arguments[0].name != "ins":
        return "the extension implements an older kernel contract (a stale build? reinstall)"
    return None


def _probe_cpu() -> str:
    why = _extension_status("_C")
    return f"unavailable: {why}" if why else "available"


def _probe_cuda() -> str:
    why = _extension_status("_C_cuda")
    if why:
        return f"unavailable: {why}"
    if not torch.cuda.is_available():
        return "unavailable: built, but no CUDA device is visible"
    return "available"


def _probe_triton() -> str:
    try:
        import triton
        from . import triton_kernels
    except Exception as e:  # ImportError, or a broken triton install
        return f"unavailable: cannot import triton ({e.__class__.__name__}: {e})"
    names = ("step_forward", "step_backward", "philox_uint32", "philox_normal")
    missing = [n for n in names if not callable(getattr(triton_kernels, n, None))]
    if missing:
        return f"unavailable: fused_ddpm.triton_kernels has no {', '.join(missing)}"
    params = list(inspect.signature(triton_kernels.step_forward).parameters)
    if not params or params[0] != "ins":
        return "unavailable: fused_ddpm.triton_kernels implements an older kernel contract"
    if triton_interpreter():
        return "available (interpreter, TRITON_INTERPRET=1: runs on CPU tensors, slowly)"
    if not torch.cuda.is_available():
        return "unavailable: no CUDA device (set TRITON_INTERPRET=1 to run it on the CPU)"
    return f"available (triton {triton.__version__})"


# ----------------------------------------------------------------------------- launchers
def _load_extension(checked: bool) -> Launchers:
    """The torch ops, which always check, so ``checked`` changes nothing here. The step's
    forward and backward are called through the C++ dispatcher by ``fused_ddpm._C``'s
    Python functions (:func:`fused_ddpm._extension.direct`) when the build has them: the
    same ops without the Python side of ``torch.ops``."""
    ops = torch.ops.fused_ddpm
    direct = _extension.direct()
    forward, backward = ((direct.step_forward, direct.step_backward) if direct is not None
                         else (ops.step_forward_kernel, ops.step_backward_kernel))
    return Launchers(forward, backward, ops.philox_uint32, ops.philox_normal_kernel)


def _load_triton(checked: bool) -> Launchers:
    from . import triton_kernels as tk
    names = ("step_forward", "step_backward", "philox_uint32", "philox_normal")
    suffix = "" if checked else "_unchecked"
    return Launchers(*(getattr(tk, n + suffix, None) or getattr(tk, n) for n in names))


def _load_torch(checked: bool) -> Launchers:
    from . import torch_backend as tb
    raw = Launchers(tb.step_forward, tb.step_backward, tb.philox_uint32, tb.philox_normal)
    return _with_checks(raw, BACKENDS["torch"].dtypes) if checked else raw


def _with_checks(raw: Launchers, dtypes) -> Launchers:
    """Python launchers with :mod:`fused_ddpm.checks` run first."""
    def forward(*args):
        checks.check_forward(*args, dtypes=dtypes)
        raw.forward(*args)

    def backward(*args):
        checks.check_backward(*args, dtypes=dtypes)
        raw.backward(*args)

    def philox_uint32(*args):
        checks.check_philox_uint32(*args)
        return raw.philox_uint32(*args)

    def philox_normal(*args):
        checks.check_philox_normal(*args, dtypes=dtypes)
        raw.philox_normal(*args)
    return Launchers(forward, backward, philox_uint32, philox_normal)


BACKENDS: Dict[str, Backend] = {b.name: b for b in (
    Backend("cuda", lambda: ("cuda",), FLOATS, _probe_cuda, _load_extension, torch_ops=True),
    Backend("triton", lambda: ("cuda", "cpu") if triton_interpreter() else ("cuda",), FLOATS,
            _probe_triton, _load_triton, torch_ops=False),
    Backend("cpu", lambda: ("cpu",), FLOATS + (torch.float64,), _probe_cpu, _load_extension,
            torch_ops=True),
    Backend("torch", None, FLOATS + (torch.float64,), lambda: "available", _load_torch,
            torch_ops=False),
)}

#: "auto": the order in which backends are tried, per device type (others: torch)
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


@functools.lru_cache(maxsize=None)
def _launchers(name: str, checked: bool) -> Launchers:
    return BACKENDS[name].load(checked)


_STATUS: Dict[str, str] = {}


def backends() -> Dict[str, str]:
    """{backend: "available ..." or "unavailable: <why>"} for every backend (probed once)."""
    if not _STATUS:
        _STATUS.update({name: b.probe() for name, b in BACKENDS.items()})
    return dict(_STATUS)


def is_available(name: str) -> bool:
    return backends()[name].startswith("available")


def get(name: str) -> Backend:
    """The record of backend ``name`` (ValueError for an unknown name)."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        hint = (" (the oracle is not a backend: call fused_ddpm.reference.ddpm_step)"
                if name == "reference" else "")
        raise ValueError(f"backend={name!r} is not one of {list(BACKENDS) + ['auto']}"
                         f"{hint}") from None


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend a call with tensors on ``device`` of ``dtype`` runs on.

    ``"auto"`` (or ``FUSED_DDPM_BACKEND`` when set) picks the first available backend of
    the device's order that takes the call. A backend named explicitly must be able to run
    it: else :class:`BackendUnavailableError`; an unknown name is a ValueError.
    """
    device = torch.device(device)
    if backend == "auto":
        backend = os.environ.get("FUSED_DDPM_BACKEND", "auto") or "auto"
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if is_available(name) and BACKENDS[name].takes(device, dtype) is None:
                return name
        raise BackendUnavailableError(f"no backend takes {dtype} tensors on {device}")
    record = get(backend)
    if not is_available(backend):
        raise BackendUnavailableError(f"backend={backend!r} is {backends()[backend]}")
    why = record.takes(device, dtype)
    if why is not None:
        raise BackendUnavailableError(f"backend={backend!r} cannot run this call: {why} "
                                      f"(backend='auto' picks one that can)")
    return backend
