"""Schedules and inference timesteps vs diffusers' own tables."""
import numpy as np
import pytest
import torch

import fused_ddpm as fd
from fused_ddpm.schedule import BETA_SCHEDULES, inference_timesteps

diffusers = pytest.importorskip("diffusers")


def _stock(**kw):
    return diffusers.DDPMScheduler(**kw)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("T", [1000, 77])
def test_schedule_matches_diffusers_float32(beta_schedule, zero_snr, T):
    kw = dict(num_train_timesteps=T, beta_schedule=beta_schedule, beta_start=1e-4,
              beta_end=0.02, rescale_betas_zero_snr=zero_snr)
    ours = fd.NoiseSchedule(**kw)
    ref = _stock(**kw)
    assert ours.betas.dtype == torch.float64 and ours.alphas_cumprod.dtype == torch.float64
    # diffusers' float32 tables carry ~1e-7 relative error per op; 1e-6 relative bounds it
    # (ᾱ relative to max(ᾱ, 1e-3): the zero-SNR tail is float32 rounding noise around 0).
    pairs = [(ours.alphas_cumprod, ref.alphas_cumprod)]
    if zero_snr:
        # zero-SNR β = 1 − ᾱ_t/ᾱ_{t−1} cancels catastrophically in float32 (~1e-4 relative),
        # so check β against diffusers' own rescaling run in float64 instead.
        raw = _stock(**{**kw, "rescale_betas_zero_snr": False}).betas.double()
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
        b64 = rescale_zero_terminal_snr(raw)
        torch.testing.assert_close(ours.betas, b64, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(ours.alphas_cumprod, torch.cumprod(1 - b64, 0), rtol=1e-6,
                                   atol=1e-12)
        # and against the float32 table: its shift-and-scale of √ᾱ loses ~1e-5 absolute
        torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0,
                                   atol=2e-5)
        return
    pairs.append((ours.betas, ref.betas))
    for a, b in pairs:
        b = b.double()
        err = (a - b).abs() / b.abs().clamp(min=1e-3)
        assert float(err.max()) <= 1e-6, (beta_schedule, zero_snr)


def test_trained_betas():
    betas = np.linspace(1e-3, 0.03, 50)
    ours = fd.NoiseSchedule(num_train_timesteps=50, trained_betas=betas)
    torch.testing.assert_close(ours.betas, torch.tensor(betas, dtype=torch.float64))
    torch.testing.assert_close(ours.alphas_cumprod, torch.cumprod(1 - torch.tensor(betas), 0))
    with pytest.raises(ValueError, match="trained_betas"):
        fd.NoiseSchedule(num_train_timesteps=49, trained_betas=betas)


def test_zero_snr_terminal():
    s = fd.NoiseSchedule(rescale_betas_zero_snr=True, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
    plain = fd.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert float(s.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-12)


@pytest.mark.parametrize("spacing, offset", [("leading", 0), ("leading", 1), ("trailing", 0),
                                             ("linspace", 0)])
@pytest.mark.parametrize("n", [1, 7, 10, 50, 333, 1000])
def test_timesteps_match_diffusers(spacing, n, offset):
    ref = _stock(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(n)
    if int(ref.timesteps.max()) >= 1000:   # diffusers accepts it and fails later, in step
        with pytest.raises(ValueError, match="steps_offset"):
            inference_timesteps(1000, n, spacing, offset)
        return
    ours = inference_timesteps(1000, n, spacing, offset)
    assert ours.tolist() == ref.timesteps.tolist()


def test_custom_timesteps_and_defaults():
    assert inference_timesteps(10).tolist() == list(range(9, -1, -1))
    assert inference_timesteps(1000, timesteps=[999, 500, 3]).tolist() == [999, 500, 3]


@pytest.mark.parametrize("kwargs, match", [
    (dict(timesteps=[5, 5, 1]), "descending"),
    (dict(timesteps=[1, 5]), "descending"),
    (dict(timesteps=[1000, 5]), r"\[0, num_train_timesteps"),
    (dict(timesteps=[]), "empty"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=1001), "num_inference_steps"),
    (dict(num_inference_steps=10, timestep_spacing="uniform"), "timestep_spacing"),
    (dict(num_inference_steps=10, timesteps=[3, 2]), "either"),
])
def test_timestep_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        inference_timesteps(1000, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta_schedule="cosine"), "beta_schedule"),
    (dict(num_train_timesteps=0), "num_train_timesteps"),
    (dict(num_train_timesteps=10.0), "num_train_timesteps"),
    (dict(beta_start=0.5, beta_end=1.5), "betas must lie"),
])
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fd.NoiseSchedule(**kwargs)
