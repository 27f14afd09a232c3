"""Loads the compiled extensions (``fused_ddpm._C``, ``fused_ddpm._C_cuda``) if present.

The shared objects register ``torch.ops.fused_ddpm.*`` ops (schemas in ``csrc/ops.cpp``)
and are loaded with ``torch.ops.load_library``. ``_C`` is also a Python module
(``csrc/direct_launch.cpp``, :func:`direct`): the step's launches through the C++
dispatcher, without the Python side of ``torch.ops`` (about 8 µs a call). A missing or
broken build never breaks ``import fused_ddpm``: the reason is kept for
:func:`fused_ddpm.backends`. A shared object that the latest build (its record,
``_build_info.json``) says it did not make is left alone: it is stale.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Dict, Optional

import torch

_status: Dict[str, Optional[str]] = {}   # module name -> None if loaded, else why not


#: build-record keys: whether each extension was built, and why (not)
_RECORD_KEYS = {"_C": ("cpu_extension", "cpu_reason"),
                "_C_cuda": ("cuda_extension", "cuda_reason")}


def _load(name: str) -> Optional[str]:
    built, reason = _RECORD_KEYS[name]
    record = build_info()
    if record.get(built) is False:
        return record.get(reason) or f"fused_ddpm.{name} was not built"
    try:
        spec = importlib.util.find_spec(f"fused_ddpm.{name}")
    except (ImportError, ValueError) as e:  # pragma: no cover
        return f"cannot look up fused_ddpm.{name}: {e}"
    if spec is None or spec.origin is None:
        if record.get(built):
            return (f"fused_ddpm.{name} is missing, though the build record says it was "
                    "built (reinstall)")
        return f"fused_ddpm.{name} was not built (see build_info())"
    try:
        torch.ops.load_library(spec.origin)
    except Exception as e:  # a stale or ABI-mismatched build
        return f"fused_ddpm.{name} failed to load: {e}"
    return None


def load() -> Dict[str, Optional[str]]:
    """Load ``_C`` then ``_C_cuda`` once; returns {name: None or the reason it is missing}."""
    if not _status:
        _status["_C"] = _load("_C")
        if _status["_C"] is not None:
            _status["_C_cuda"] = "needs fused_ddpm._C, which is missing"
        else:
            _status["_C_cuda"] = _load("_C_cuda")
    return _status


def direct():
    """The ``fused_ddpm._C`` Python module (``step_forward``, ``step_backward``,
    ``PlainStep``), or None when ``_C`` is not loaded or predates it."""
    if load()["_C"] is not None:
        return None
    try:
        module = importlib.import_module("fused_ddpm._C")
    except ImportError:
        return None
    return module if hasattr(module, "PlainStep") else None


def has_op(name: str) -> bool:
    """Whether ``torch.ops.fused_ddpm.<name>`` exists (after loading the extensions)."""
    load()
    try:
        getattr(torch.ops.fused_ddpm, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def build_info() -> dict:
    """What ``setup.py`` recorded about the build, if anything: ``torch``, ``torch_cuda``,
    ``cpu_extension`` / ``cuda_extension`` (built or not) and ``cpu_reason`` / ``cuda_reason``
    (one line each: why), ``cuda_home``, ``nvcc`` (its CUDA release), ``arch_list``."""
    path = Path(__file__).with_name("_build_info.json")
    if path.exists():
        return json.loads(path.read_text())
    return {"note": "no build record (pure-Python install or source checkout)"}
