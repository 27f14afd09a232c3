"""Test setup: run Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it happens here, at
collection time, before any test module imports fused_ddpm.
"""
import os


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

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def seed_everything(request):
    """A fresh seed per test, printed on failure via the test id (reproducible by node id)."""
    import zlib
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return seed


def pytest_terminal_summary(terminalreporter):
    """Say how many hypothesis cases ran per backend (tests/test_properties.py)."""
    import sys
    mod = sys.modules.get("test_properties")
    if mod is not None and getattr(mod, "CASES", None):
        counts = ", ".join(f"{b}: {n}" for b, n in mod.CASES.items())
        terminalreporter.write_line(f"property-based cases run per backend: {counts}")
