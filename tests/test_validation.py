"""Bad input gets a clear error naming the argument, on every backend available here."""
import pytest
import torch

import fused_ddpm as fd


@pytest.fixture(scope="module")
def coeffs():
    return fd.step_coefficients(fd.NoiseSchedule(num_train_timesteps=100))


@pytest.fixture(scope="module")
def learned():
    return fd.step_coefficients(fd.NoiseSchedule(num_train_timesteps=100),
                                variance_type="learned_range")


def _xm(shape=(2, 3, 4, 4), dtype=torch.float32, device="cpu"):
    return torch.randn(shape).to(device, dtype), torch.randn(shape).to(device, dtype)


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
        fd.ddpm_step(x, m, t, coeffs, seeds=0, backend=backend.name)


def test_shape_and_dtype_errors(coeffs, learned, backend):
    x, m = _xm()
    with pytest.raises(ValueError, match="model_output must have shape"):
        fd.ddpm_step(x, m[:, :2], 5, coeffs, backend=backend.name)
    with pytest.raises(ValueError, match="needs 2C channels"):
        fd.ddpm_step(x, m, 5, learned, backend=backend.name)
    with pytest.raises(TypeError, match="x_t must be float16, bfloat16, float32 or float64"):
        fd.ddpm_step(x.to(torch.int32), m.to(torch.int32), 5, coeffs, backend=backend.name)
    with pytest.raises(TypeError, match="model_output has dtype"):
        fd.ddpm_step(x, m.double(), 5, coeffs, backend=backend.name)
    with pytest.raises(ValueError, match=r"x_t must have shape \[B, C, ...\]"):
        fd.ddpm_step(x[0, 0, 0], m[0, 0, 0], 5, coeffs, backend=backend.name)
    with pytest.raises(ValueError, match="noise must have the shape"):
        fd.ddpm_step(x, m, 5, coeffs, noise=x[:1], backend=backend.name)
    with pytest.raises(ValueError, match="either noise or seeds"):
        fd.ddpm_step(x, m, 5, coeffs, noise=x, seeds=1, backend=backend.name)
    with pytest.raises(TypeError, match="seeds must be an int64 tensor"):
        fd.ddpm_step(x, m, 5, coeffs, seeds=torch.tensor([1, 2], dtype=torch.int32),
                     backend=backend.name)
    with pytest.raises(ValueError, match=r"seeds must have shape"):
        fd.ddpm_step(x, m, 5, coeffs, seeds=torch.tensor([1, 2, 3]), backend=backend.name)
    with pytest.raises(TypeError, match="coeffs must come from"):
        fd.ddpm_step(x, m, 5, {"table": None}, backend=backend.name)


def test_out_errors(coeffs, backend):
    x, m = _xm(device=backend.device)
    with pytest.raises(ValueError, match="out must match x_t"):
        fd.ddpm_step(x, m, 5, coeffs, seeds=1, out=torch.empty(2, 3, 4, device=x.device),
                     backend=backend.name)
    with pytest.raises(ValueError, match="out must match x_t"):
        fd.ddpm_step(x, m, 5, coeffs, seeds=1, out=torch.empty_like(x, dtype=torch.float64),
                     backend=backend.name)
    with pytest.raises(ValueError, match="must not share memory"):
        fd.ddpm_step(x, m, 5, coeffs, seeds=1, out=x, backend=backend.name)
    with pytest.raises(ValueError, match="overlapping"):
        fd.ddpm_step(x, m, 5, coeffs, seeds=1,
                     out=torch.empty(1, 3, 4, 4, device=x.device).expand(2, -1, -1, -1),
                     backend=backend.name)


def test_unknown_backend(coeffs):
    x, m = _xm()
    with pytest.raises(ValueError, match="backend='tpu' is not one of"):
        fd.ddpm_step(x, m, 5, coeffs, backend="tpu")
    with pytest.raises(ValueError, match="fused_ddpm.reference.ddpm_step"):
        fd.ddpm_step(x, m, 5, coeffs, backend="reference")


def test_backends_report_reasons():
    info = fd.backends()
    assert set(info) == {"cuda", "triton", "cpu", "torch"}
    assert info["torch"] == "available"
    for name, status in info.items():
        assert status.startswith("available") or status.startswith("unavailable: ")
    if not torch.cuda.is_available():
        assert info["cuda"].startswith("unavailable: ")


def test_backend_unavailable_is_its_own_error():
    """A backend that cannot run a call: BackendUnavailableError (a RuntimeError), never a
    silent fallback; "auto" always finds one (torch is everywhere)."""
    x, m = _xm()
    c = fd.step_coefficients(fd.NoiseSchedule(num_train_timesteps=100))
    assert issubclass(fd.BackendUnavailableError, RuntimeError)
    if not torch.cuda.is_available():
        with pytest.raises(fd.BackendUnavailableError, match="backend='cuda'"):
            fd.ddpm_step(x, m, 5, c, seeds=1, backend="cuda")
    with pytest.raises(fd.BackendUnavailableError, match="backend='triton'"):
        fd.ddpm_step(x.double(), m.double(), 5, c, seeds=1, backend="triton")
    y = fd.ddpm_step(x.double(), m.double(), 5, c, seeds=1)
    assert y.dtype == torch.float64
    from fused_ddpm.backends import resolve
    assert resolve("auto", torch.device("meta"), torch.float32) == "torch"


def test_errors_are_raised_on_every_call_not_just_the_first(coeffs):
    """A prepared (cached) step still checks what a value can get wrong."""
    x, m = _xm()
    fd.ddpm_step(x, m, 5, coeffs, seeds=1)
    fd.ddpm_step(x, m, 5, coeffs, seeds=1)
    with pytest.raises(ValueError, match="out of range"):
        fd.ddpm_step(x, m, 100, coeffs, seeds=1)
    with pytest.raises(ValueError, match="out of range"):
        fd.ddpm_step(x, m, torch.tensor([5, 100]), coeffs, seeds=1)
    fd.ddpm_step(x, m, torch.tensor([5, 6]), coeffs, seeds=1)
    with pytest.raises(ValueError, match="out of range"):
        fd.ddpm_step(x, m, torch.tensor([-1, 6]), coeffs, seeds=1)
    with pytest.raises(ValueError, match="64 bits"):
        fd.ddpm_step(x, m, 5, coeffs, seeds=2 ** 64)
    out = torch.empty_like(x)
    fd.ddpm_step(x, m, 5, coeffs, seeds=1, out=out)
    with pytest.raises(ValueError, match="must not share memory"):
        fd.ddpm_step(out, m, 5, coeffs, seeds=1, out=out)
    with pytest.raises(ValueError, match="model_output must have shape"):
        fd.ddpm_step(x, m[:, :2], 5, coeffs, seeds=1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="ddpm", eta=0.5), "eta=0.5 does not apply to method='ddpm'"),
    (dict(method="ddpm", use_clipped_model_output=True), "use_clipped_model_output"),
    (dict(method="ddpm", set_alpha_to_one=False), "set_alpha_to_one"),
    (dict(method="ddim", variance_type="fixed_large"), "does not apply to method='ddim'"),
    (dict(method="ddim", variance_type="fixed_small_log"), "does not apply to method='ddim'"),
    (dict(method="add_noise"), "not a sampler step"),
    (dict(variance_type="LEARNED"), "variance_type='LEARNED' is not supported"),
    (dict(precision="float16"), "precision='float16' is not supported"),
    (dict(step_gap=0), "step_gap"),
])
def test_options_a_method_ignores_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fd.step_coefficients(fd.NoiseSchedule(num_train_timesteps=100), **kwargs)


def test_ddim_with_learned_variance_takes_2c_channels_and_ignores_the_variance():
    """Documented: DDIM's σ is η√β̃; with a learned variance type it takes the 2C-channel
    output and ignores its variance half."""
    sched = fd.NoiseSchedule(num_train_timesteps=100)
    plain = fd.step_coefficients(sched, method="ddim", eta=0.5)
    for vt in ("learned", "learned_range", "learned_log"):
        c = fd.step_coefficients(sched, method="ddim", eta=0.5, variance_type=vt)
        x, m = _xm()
        z = torch.randn_like(x)
        with pytest.raises(ValueError, match="needs 2C channels"):
            fd.ddpm_step(x, m, 50, c, noise=z)
        m2 = torch.cat([m, torch.randn_like(m)], dim=1)
        assert torch.equal(fd.ddpm_step(x, m2, 50, c, noise=z), fd.ddpm_step(x, m, 50, plain,
                                                                          noise=z))


def test_unknown_names_raise_everywhere():
    """No silent fallthrough: an unknown name is a ValueError in the config, the registry
    and the reference."""
    from fused_ddpm import reference
    from fused_ddpm.coefficients import StepConfig
    from fused_ddpm.methods import METHODS, PREDICTIONS, VARIANCES, lookup
    for registry, what in ((METHODS, "method"), (PREDICTIONS, "prediction_type"),
                           (VARIANCES, "variance_type")):
        with pytest.raises(ValueError, match=what):
            lookup(registry, what, "nope")
        with pytest.raises(ValueError, match=what):
            StepConfig(**{what: "nope"})
    x = torch.zeros(1, 1, 2)
    with pytest.raises(ValueError, match="prediction_type"):
        reference._x0_and_eps("nope", x, x, x)
    with pytest.raises(ValueError, match="variance_type"):
        reference._ddpm_sigma("nope", x, x, x)
    with pytest.raises(ValueError, match="prediction_type"):
        reference.add_noise(x, 3, fd.NoiseSchedule(num_train_timesteps=100), noise=x,
                            prediction_type="nope")
    with pytest.raises(ValueError, match="prediction_type"):
        fd.add_noise(x, 3, fd.NoiseSchedule(num_train_timesteps=100), noise=x,
                     prediction_type="nope")
