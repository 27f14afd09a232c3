"""Edge cases on every kernel backend: NaN/inf, odd offsets, broadcast and strided inputs,
autocast, inference mode, mixed requires_grad, t out of range on the device."""
import pytest
import torch

import fused_ddpm as fd

from helpers import random_inputs

@pytest.fixture(scope="module")
def coeffs():
    return fd.step_coefficients(fd.NoiseSchedule(), clip_sample_range=1.0, num_inference_steps=20)


def _ref(x, m, t, c, z, **kw):
    return fd.reference.ddpm_step(x.double().cpu(), m.double().cpu(),
                                  t.cpu() if isinstance(t, torch.Tensor) else t, c,
                                  noise=z.double().cpu(), **kw)


def test_nan_and_inf_propagate_like_reference(backend, coeffs):
    dev = backend.device
    x, m, z = (a.float().to(dev) for a in random_inputs(coeffs, (2, 3, 4, 5)))
    x[0, 0, 0, 0] = float("nan")
    m[0, 1, 0, 0] = float("inf")
    m[1, 2, 3, 4] = float("-inf")
    z[1, 0, 1, 1] = float("nan")
    y = fd.ddpm_step(x, m, 500, coeffs, noise=z, backend=backend.name).cpu().double()
    want = _ref(x, m, 500, coeffs, z)
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert torch.equal(torch.isinf(y), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(y[finite], want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip", [dict(clip_sample_range=1.0),
                                  dict(thresholding=True, dynamic_thresholding_ratio=0.9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_survives_clipping(backend, clip, dtype):
    """clamp(NaN) is NaN (torch.clamp semantics): a NaN model output must not be clipped
    into a finite x̂0 (a clipped DDPM step has r = 0, so only x̂0 carries m into y). With
    dynamic thresholding the NaN also makes the sample's quantile NaN: all of it is NaN."""
    c = fd.step_coefficients(fd.NoiseSchedule(), **clip)
    dev = backend.device
    x, m, z = (a.to(dev, dtype) for a in random_inputs(c, (2, 3, 4, 5)))
    m[0, 1, 2, 3] = float("nan")
    m[1, 0, 0, 0] = float("nan")
    y, x0 = fd.ddpm_step(x, m, 500, c, noise=z, return_x0=True, backend=backend.name)
    want_y, want_x0 = _ref(x, m, 500, c, z, return_x0=True)
    for got, want in ((y, want_y), (x0, want_x0)):
        nan = torch.isnan(want)
        assert int(nan.sum()) == (2 if "clip_sample_range" in clip else want.numel())
        assert torch.equal(torch.isnan(got.cpu()), nan)
        if nan.all():
            continue
        torch.testing.assert_close(got.cpu().double()[~nan], want[~nan], rtol=4e-3, atol=4e-3)


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_unaligned_views(backend, coeffs, offset):
    """Views starting at an odd element offset must not be read with vector loads that
    assume alignment."""
    dev = backend.device
    shape = (2, 3, 5, 7)
    n = 2 * 3 * 5 * 7
    bufs = [torch.randn(n + offset, device=dev) for _ in range(3)]
    x, m, z = (b[offset:].view(shape) for b in bufs)
    out_buf = torch.full((n + offset,), float("nan"), device=dev)
    out = out_buf[offset:].view(shape)
    fd.ddpm_step(x, m, 400, coeffs, noise=z, out=out, backend=backend.name)
    torch.testing.assert_close(out.cpu().double(), _ref(x, m, 400, coeffs, z), rtol=1e-5,
                               atol=1e-5)
    assert torch.isnan(out_buf[:offset]).all()            # nothing written before the view


def test_broadcast_and_transposed_inputs(backend, coeffs):
    dev = backend.device
    x = torch.randn(1, 3, 6, 4, device=dev).expand(3, -1, -1, -1)     # batch stride 0
    m = torch.randn(3, 3, 4, 6, device=dev).transpose(2, 3)          # transposed view
    z = torch.randn(3, 1, 6, 4, device=dev).expand(-1, 3, -1, -1)     # channel stride 0
    t = torch.tensor([950, 500, 0], device=dev)
    y = fd.ddpm_step(x, m, t, coeffs, noise=z, backend=backend.name)
    torch.testing.assert_close(y.cpu().double(), _ref(x, m, t, coeffs, z), rtol=1e-5, atol=1e-5)


def test_inference_mode_and_autocast(backend, coeffs):
    dev = backend.device
    x, m, z = (a.float().to(dev) for a in random_inputs(coeffs, (2, 3, 4, 4)))
    want = fd.ddpm_step(x, m, 300, coeffs, noise=z, backend=backend.name)
    with torch.inference_mode():
        torch.testing.assert_close(fd.ddpm_step(x, m, 300, coeffs, noise=z, backend=backend.name),
                                   want, rtol=0, atol=0)
    with torch.autocast(device_type=dev, dtype=torch.bfloat16):
        y = fd.ddpm_step(x, m, 300, coeffs, noise=z, backend=backend.name)
    assert y.dtype == torch.float32                       # the op keeps its input dtype
    torch.testing.assert_close(y, want, rtol=0, atol=0)


def test_mixed_requires_grad(backend, coeffs):
    dev = backend.device
    x, m, z = (a.float().to(dev) for a in random_inputs(coeffs, (2, 3, 4, 4)))
    m.requires_grad_()
    y = fd.ddpm_step(x, m, 300, coeffs, noise=z, backend=backend.name)
    (gm,) = torch.autograd.grad(y.sum(), (m,))
    m2 = m.detach().double().cpu().requires_grad_()
    (want,) = torch.autograd.grad(_ref(x, m2, 300, coeffs, z).sum(), (m2,))
    torch.testing.assert_close(gm.cpu().double(), want, rtol=1e-5, atol=1e-6)


def test_device_t_out_of_range_never_reads_outside_table(backend, coeffs, monkeypatch):
    """On the device t is not range-checked (that would sync) unless FUSED_DDPM_DEBUG=1;
    the kernels clamp the row, so the result is a finite step, never garbage memory."""
    if not backend.gpu:
        pytest.skip("t on a CPU tensor is always range-checked")
    dev = "cuda"
    x, m, z = (a.float().to(dev) for a in random_inputs(coeffs, (2, 3, 4, 4)))
    t = torch.tensor([5000, -7], device=dev)
    y = fd.ddpm_step(x, m, t, coeffs, noise=z, backend=backend.name)
    assert torch.isfinite(y).all()
    monkeypatch.setenv("FUSED_DDPM_DEBUG", "1")
    with pytest.raises(ValueError, match="out of range"):
        fd.ddpm_step(x, m, t, coeffs, noise=z, backend=backend.name)
