"""Test setup: the Triton interpreter on GPU-less machines, and the one backend fixture.

TRITON_INTERPRET must be set before triton is first imported, so it happens here, at
collection time, before any test module imports fused_ddpm.

``backend`` runs a test once per (backend, device) that is available here, from the
backend records of :mod:`fused_ddpm.backends`: cuda and triton on a CUDA device (marked
``gpu``), triton on the CPU under the interpreter, cpu, and torch on the CPU (and on a CUDA
device, marked ``gpu``). ``FUSED_DDPM_TEST_BACKENDS=cuda,triton`` restricts the set (e.g. a
GPU check: ``FUSED_DDPM_TEST_BACKENDS=cuda,triton pytest -m gpu tests/test_kernels.py``).
Backends that are not available are listed, with the reason, in the terminal summary.
"""
import os
from dataclasses import dataclass
from typing import Tuple


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fused_ddpm as fd  # noqa: E402
from fused_ddpm.backends import BACKENDS  # noqa: E402


@dataclass(frozen=True)
class BackendCase:
    """One backend on one device: ``name`` (for ``backend=``), ``device``, the dtypes it
    takes there, and whether its noise is GPU fast math (normals within 1e-5, else 1e-6)."""

    name: str
    device: str
    dtypes: Tuple[torch.dtype, ...]

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def noise_tol(self) -> float:
        return 1e-5 if self.gpu else 1e-6

    def __str__(self) -> str:
        return f"{self.name}-{self.device}"


def _cases():
    wanted = os.environ.get("FUSED_DDPM_TEST_BACKENDS")
    wanted = {w.strip() for w in wanted.split(",")} if wanted else None
    out = []
    for name, record in BACKENDS.items():
        if (wanted is not None and name not in wanted) or \
                not fd.backends()[name].startswith("available"):
            continue
        for device in ("cuda", "cpu"):
            if device == "cuda" and not torch.cuda.is_available():
                continue
            if record.takes(torch.device(device), torch.float32) is not None:
                continue
            dtypes = tuple(d for d in (torch.float32, torch.float16, torch.bfloat16,
                                       torch.float64)
                           if record.takes(torch.device(device), d) is None)
            out.append(BackendCase(name, device, dtypes))
            if name == "triton" and device == "cuda":
                break          # Triton on CPU tensors is only the interpreter fallback
    return out


BACKEND_CASES = _cases()
BACKEND_NAMES = list(dict.fromkeys(c.name for c in BACKEND_CASES))


@pytest.fixture(params=[pytest.param(c, id=str(c), marks=[pytest.mark.gpu] if c.gpu else [])
                        for c in BACKEND_CASES])
def backend(request) -> BackendCase:
    """Every available (backend, device) in turn (see the module docstring)."""
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: extra threads only add wake-up
    latency (badly so on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_terminal_summary(terminalreporter):
    """Which backends the contract tests ran on (and why the others did not), and how many
    hypothesis cases ran per backend (tests/test_properties.py)."""
    ran = ", ".join(str(c) for c in BACKEND_CASES)
    terminalreporter.write_line(f"backends tested: {ran}")
    for name, status in fd.backends().items():
        if not status.startswith("available"):
            terminalreporter.write_line(f"  not tested: {name} ({status})")
    import sys
    mod = sys.modules.get("test_properties")
    if mod is not None and getattr(mod, "CASES", None):
        counts = ", ".join(f"{b}: {n}" for b, n in mod.CASES.items())
        terminalreporter.write_line(f"property-based cases run per backend: {counts}")
