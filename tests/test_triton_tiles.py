"""Triton-only paths that the contract suite's sizes do not reach under the interpreter:
several programs per sample with a partial last block, and the int64 in-sample offsets
that samples of >= 2**31 elements take (forced here by lowering the limit)."""
import pytest
import torch

import fused_ddpm as fd
from fused_ddpm import philox
from fused_ddpm.contract import Layout

from kernel_cases import Case, assert_close_scaled

if not fd.backends()["triton"].startswith("available"):
    pytest.skip(f"triton backend: {fd.backends()['triton']}", allow_module_level=True)

from fused_ddpm.triton_kernels import tiles  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CFG = dict(method="ddpm", prediction_type="epsilon", variance_type="fixed_large",
           clip_sample_range=1.0)


@pytest.mark.parametrize("layout", list(Layout), ids=lambda v: v.name)
@pytest.mark.parametrize("noise", ["philox", "external"])
def test_multi_block_samples(monkeypatch, layout, noise):
    monkeypatch.setattr(tiles, "INTERPRET_BLOCK", 64)
    case = Case(CFG, (2, 3, 7, 11), torch.float32, layout, noise, "triton", DEV, seed=1)
    y, x0 = case.launch.forward("triton")
    y_ref, x0_ref, _ = case.reference()
    b0, by = case.scales()
    assert_close_scaled(y, y_ref, by, case.tol(), f"y {case}")
    assert_close_scaled(x0, x0_ref, b0, case.tol(), f"x0 {case}")


@pytest.mark.parametrize("layout", list(Layout), ids=lambda v: v.name)
def test_int64_offsets(monkeypatch, layout):
    monkeypatch.setattr(tiles, "IDX32_LIMIT", 0)
    case = Case(CFG, (2, 3, 5, 8), torch.float32, layout, "philox", "triton", DEV, seed=2)
    y, x0 = case.launch.forward("triton")
    y_ref, x0_ref, _ = case.reference()
    b0, by = case.scales()
    assert_close_scaled(y, y_ref, by, case.tol(), f"y {case}")
    seeds, t = torch.tensor([4, 5]), torch.tensor([6, 7])
    out = torch.empty(2, 3, 5, 8, device=DEV)
    if layout == Layout.CHANNELS_LAST:
        out = out.contiguous(memory_format=torch.channels_last)
    from fused_ddpm.backends import get
    get("triton").launchers.philox_normal(seeds.to(DEV), t.to(DEV), 0, int(layout), out)
    torch.testing.assert_close(out.cpu(), philox.philox_normal(seeds, t, out.shape),
                               atol=1e-5, rtol=0)
