"""Bad input gets a clear error naming the argument, on every backend available here."""
import pytest
import torch

import fused_ddpm as fd

BACKENDS = [b for b, s in fd.backends().items() if s.startswith("available")]


@pytest.fixture(scope="module")
def coeffs():
    return fd.step_coefficients(fd.NoiseSchedule(num_train_timesteps=100))


@pytest.fixture(scope="module")
def learned():
    return fd.step_coefficients(fd.NoiseSchedule(num_train_timesteps=100),
                                variance_type="learned_range")


def _xm(shape=(2, 3, 4, 4), dtype=torch.float32):
    return torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t, exc, match", [
    (100, ValueError, r"t=100 is out of range \[0, 100\)"),
    (-1, ValueError, "out of range"),
    (torch.tensor([5, 100]), ValueError, "out of range"),
    (torch.tensor([5.0, 1.0]), TypeError, "t must be an integer tensor"),
    (torch.tensor([1, 2, 3]), ValueError, r"t must have shape \[\] or \[B\]"),
    (2.5, TypeError, "t must be an int"),
    (True, TypeError, "t must be an int"),
])
def test_bad_t(coeffs, backend, t, exc, match):
    x, m = _xm()
    with pytest.raises(exc, match=match):
        fd.ddpm_step(x, m, t, coeffs, seeds=0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_and_dtype_errors(coeffs, learned, backend):
    x, m = _xm()
    with pytest.raises(ValueError, match="model_output must have shape"):
        fd.ddpm_step(x, m[:, :2], 5, coeffs, backend=backend)
    with pytest.raises(ValueError, match="needs 2C channels"):
        fd.ddpm_step(x, m, 5, learned, backend=backend)
    with pytest.raises(TypeError, match="x_t must be float16, bfloat16, float32 or float64"):
        fd.ddpm_step(x.to(torch.int32), m.to(torch.int32), 5, coeffs, backend=backend)
    with pytest.raises(TypeError, match="model_output has dtype"):
        fd.ddpm_step(x, m.double(), 5, coeffs, backend=backend)
    with pytest.raises(ValueError, match=r"x_t must have shape \[B, C, ...\]"):
        fd.ddpm_step(x[0, 0, 0], m[0, 0, 0], 5, coeffs, backend=backend)
    with pytest.raises(ValueError, match="noise must have the shape"):
        fd.ddpm_step(x, m, 5, coeffs, noise=x[:1], backend=backend)
    with pytest.raises(ValueError, match="either noise or seeds"):
        fd.ddpm_step(x, m, 5, coeffs, noise=x, seeds=1, backend=backend)
    with pytest.raises(TypeError, match="seeds must be an int64 tensor"):
        fd.ddpm_step(x, m, 5, coeffs, seeds=torch.tensor([1, 2], dtype=torch.int32),
                     backend=backend)
    with pytest.raises(ValueError, match=r"seeds must have shape"):
        fd.ddpm_step(x, m, 5, coeffs, seeds=torch.tensor([1, 2, 3]), backend=backend)
    with pytest.raises(TypeError, match="coeffs must come from"):
        fd.ddpm_step(x, m, 5, {"table": None}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_errors(coeffs, backend):
    x, m = _xm()
    with pytest.raises(ValueError, match="out must match x_t"):
        fd.ddpm_step(x, m, 5, coeffs, seeds=1, out=torch.empty(2, 3, 4), backend=backend)
    with pytest.raises(ValueError, match="out must match x_t"):
        fd.ddpm_step(x, m, 5, coeffs, seeds=1, out=torch.empty_like(x, dtype=torch.float64),
                     backend=backend)
    with pytest.raises(ValueError, match="must not share memory"):
        fd.ddpm_step(x, m, 5, coeffs, seeds=1, out=x, backend=backend)
    with pytest.raises(ValueError, match="overlapping"):
        fd.ddpm_step(x, m, 5, coeffs, seeds=1, out=torch.empty(1, 3, 4, 4).expand(2, -1, -1, -1),
                     backend=backend)


def test_unknown_backend(coeffs):
    x, m = _xm()
    with pytest.raises(ValueError, match="backend='tpu' is not one of"):
        fd.ddpm_step(x, m, 5, coeffs, backend="tpu")


def test_backends_report_reasons():
    info = fd.backends()
    assert set(info) == {"cuda", "triton", "cpu", "reference"}
    assert info["reference"] == "available"
    for name, status in info.items():
        assert status.startswith("available") or status.startswith("unavailable: ")
    if not torch.cuda.is_available():
        assert info["cuda"].startswith("unavailable: ")
