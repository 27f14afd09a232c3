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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: extra threads only add wake-up
    latency (badly so on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_terminal_summary(terminalreporter):
    """Say how many hypothesis cases ran per backend (tests/test_properties.py)."""
    import sys
    mod = sys.modules.get("test_properties")
    if mod is not None and getattr(mod, "CASES", None):
        counts = ", ".join(f"{b}: {n}" for b, n in mod.CASES.items())
        terminalreporter.write_line(f"property-based cases run per backend: {counts}")
