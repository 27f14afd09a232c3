"""The DDPM/DDIM drop-ins on the configurations stock diffusers runs but the fused table
cannot (fully) express, NumPy timesteps, and pipeline save/load.

Degenerate configurations must give diffusers' outputs with the non-finite values in the
same places: the drop-in steps those timesteps (or the whole configuration) with diffusers'
own step and says so (``fused_path``, a ``StockFallbackWarning``).
"""
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler  # noqa: E402

import fused_ddpm.diffusers as fdd  # noqa: E402
from fused_ddpm.diffusers import (FusedDDIMScheduler, FusedDDPMScheduler,  # noqa: E402
                                  StockFallbackWarning)

from helpers import tiny_unet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
RTOL = 1e-5


def assert_same_outputs(a, b, abar_t, what):
    """Non-finite values in the same places; finite ones within float32 rounding of the x̂0
    map, whose condition number is ~1/√ᾱ_t (huge just before ᾱ underflows)."""
    for name in ("prev_sample", "pred_original_sample"):
        u, v = getattr(a, name), getattr(b, name)
        fin = torch.isfinite(v)
        assert torch.equal(torch.isfinite(u), fin), (what, name, "non-finite places differ")
        assert torch.equal(torch.isnan(u), torch.isnan(v)), (what, name, "NaN places differ")
        assert torch.equal(u[~fin & ~torch.isnan(v)], v[~fin & ~torch.isnan(v)]), (what, name)
        if fin.any():
            cond = max(1.0, float(abar_t) ** -0.5) if abar_t > 0 else 1.0
            scale = v[fin].abs().max().clamp(min=1e-30)
            err = ((u[fin] - v[fin]).abs().max() / scale).item()
            assert err <= 2 * RTOL * cond, (what, name, err)


def steps_match(fused, stock, timesteps, seed=0, **kw):
    """Single steps from the same (x, m, generator) at every timestep."""
    for t in timesteps:
        g = torch.Generator().manual_seed(seed + int(t))
        x = torch.randn(2, 3, 4, 5, generator=g) * 1.5
        m = torch.randn(2, 3, 4, 5, generator=g)
        a = fused.step(m, t, x, generator=torch.Generator().manual_seed(int(t)), **kw)
        b = stock.step(m, t, x, generator=torch.Generator().manual_seed(int(t)), **kw)
        assert_same_outputs(a, b, stock.alphas_cumprod[int(t)], (int(t), kw))


def loops_match(fused, stock, **kw):
    """A whole loop on stock diffusers' trajectory with one generator each: every step of
    the drop-in starts from stock's sample (steps with ᾱ near 0 amplify any rounding
    difference ~1/√ᾱ, so free-running trajectories drift apart by design), and the
    generators advance alike."""
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    ga, gb = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for t in stock.timesteps:
        m = torch.sin(3 * x) * 0.7 + 0.1
        a = fused.step(m, t, x, generator=ga, **kw)
        b = stock.step(m, t, x, generator=gb, **kw)
        assert_same_outputs(a, b, stock.alphas_cumprod[int(t)], (int(t), kw))
        x = b.prev_sample
    assert torch.equal(ga.get_state(), gb.get_state())


def make(cls_fused, cls_stock, n, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StockFallbackWarning)
        fused, stock = cls_fused(**cfg), cls_stock(**cfg)
    if n:
        fused.set_timesteps(n)
        stock.set_timesteps(n)
    return fused, stock


# configuration -> the path of its 1000-step schedule; each raised a ValueError before
DDPM_DEGENERATE = {
    "threshold_max_below_1": (dict(thresholding=True, sample_max_value=0.5), "stock"),
    "zero_snr_epsilon": (dict(rescale_betas_zero_snr=True), "partial"),
    "zero_snr_epsilon_noclip": (dict(rescale_betas_zero_snr=True, clip_sample=False), "partial"),
    "abar_underflow": (dict(beta_end=0.2), "partial"),
    "abar_underflow_sample": (dict(beta_end=0.2, prediction_type="sample"), "partial"),
    "abar_underflow_v": (dict(beta_end=0.2, prediction_type="v_prediction",
                              clip_sample=False), "partial"),
    "betas_above_1": (dict(beta_end=2.0), "partial"),
    "fixed_large_log": (dict(variance_type="fixed_large_log"), "stock"),
}


@pytest.mark.parametrize("name", list(DDPM_DEGENERATE))
def test_ddpm_degenerate_configs_match_stock(name):
    cfg, path = DDPM_DEGENERATE[name]
    fused, stock = make(FusedDDPMScheduler, DDPMScheduler, None, **cfg)   # all 1000 steps
    with pytest.warns(StockFallbackWarning):
        assert fused.fused_path == path
    assert fused.fused_path_reason
    steps_match(fused, stock, stock.timesteps)
    fused, stock = make(FusedDDPMScheduler, DDPMScheduler, 25, **cfg)
    loops_match(fused, stock)


DDIM_DEGENERATE = {
    "threshold_max_below_1": (dict(thresholding=True, sample_max_value=0.5), "stock"),
    "zero_snr_epsilon": (dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
                         "partial"),
    "abar_underflow": (dict(beta_end=0.2, timestep_spacing="trailing"), "partial"),
    "abar_underflow_noclip": (dict(beta_end=0.2, timestep_spacing="trailing",
                                   clip_sample=False), "partial"),
    "betas_above_1": (dict(beta_end=2.0, timestep_spacing="linspace"), "partial"),
}


@pytest.mark.parametrize("name", list(DDIM_DEGENERATE))
def test_ddim_degenerate_configs_match_stock(name):
    cfg, path = DDIM_DEGENERATE[name]
    fused, stock = make(FusedDDIMScheduler, DDIMScheduler, 20, **cfg)
    with pytest.warns(StockFallbackWarning):
        assert fused.fused_path == path
    for eta in (0.0, 1.0):
        steps_match(fused, stock, stock.timesteps, eta=eta)
        loops_match(fused, stock, eta=eta)


def test_ddim_negative_eta_runs_as_stock():
    """diffusers takes any eta (a negative one adds no noise); the fused table refuses it."""
    fused, stock = make(FusedDDIMScheduler, DDIMScheduler, 10)
    assert fused.fused_path == "fused"
    with pytest.warns(StockFallbackWarning, match="eta"):
        steps_match(fused, stock, stock.timesteps[:3], eta=-0.5)


def test_partial_path_runs_stock_only_where_needed(monkeypatch):
    """The fused op steps every timestep the table expresses; diffusers' step only the rest."""
    fused, stock = make(FusedDDPMScheduler, DDPMScheduler, 20, rescale_betas_zero_snr=True,
                        timestep_spacing="trailing")
    with pytest.warns(StockFallbackWarning, match="999"):
        assert fused.fused_path == "partial"
    stock_calls, fused_calls = [], []
    real_stock, real_fused = DDPMScheduler.step, fdd.ddpm_step
    monkeypatch.setattr(DDPMScheduler, "step",
                        lambda self, m, t, *a, **k: stock_calls.append(int(t)) or
                        real_stock(self, m, t, *a, **k))
    monkeypatch.setattr(fdd, "ddpm_step", lambda x, m, t, *a, **k: fused_calls.append(t) or
                        real_fused(x, m, t, *a, **k))
    real_drawing = fdd.drawing_step

    def drawing_step(noise, coeffs, backend, x, m, t, *a):   # the fused step drawing its noise
        res = real_drawing(noise, coeffs, backend, x, m, t, *a)
        if res is not None:
            fused_calls.append(t)
        return res
    monkeypatch.setattr(fdd, "drawing_step", drawing_step)
    x = torch.randn(1, 2, 3, 3)
    for t in fused.timesteps:
        fused.step(torch.randn_like(x), t, x)
    assert stock_calls == [999] and len(fused_calls) == 19
    # per-sample timesteps (an extension) cannot take diffusers' step
    with pytest.raises(ValueError, match="timestep"):
        fused.step(torch.randn(2, 2, 3, 3), torch.tensor([999, 949]), torch.randn(2, 2, 3, 3))


def test_healthy_configs_stay_fused_and_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error", StockFallbackWarning)
        for fused in (FusedDDPMScheduler(), FusedDDPMScheduler(prediction_type="v_prediction",
                                                               rescale_betas_zero_snr=True)):
            assert fused.fused_path == "fused" and fused.fused_path_reason is None
        ddim = FusedDDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                  timestep_spacing="trailing")
        ddim.set_timesteps(10)
        assert ddim.fused_path == "fused"
    with pytest.raises(ValueError, match="set_timesteps"):
        FusedDDIMScheduler().fused_path


def test_unknown_variance_type_is_fixed_small_like_diffusers():
    """diffusers steps an unknown variance_type as "fixed_small" (raised before)."""
    fused, stock = make(FusedDDPMScheduler, DDPMScheduler, 15, variance_type="fixed_smal")
    with pytest.warns(StockFallbackWarning, match="fixed_small"):
        assert fused.fused_path == "fused"
    steps_match(fused, stock, stock.timesteps)
    loops_match(fused, stock)


# ----------------------------------------------------------------------------- timesteps
def test_numpy_timesteps():
    fused, stock = make(FusedDDPMScheduler, DDPMScheduler, None)
    steps_match(fused, stock, [np.int64(500), np.int32(3), np.array(777), np.int16(0)])
    ddim, ddim_stock = make(FusedDDIMScheduler, DDIMScheduler, 10)
    steps_match(ddim, ddim_stock, [np.int64(901), np.array(1)], eta=1.0)
    # per-sample timesteps as a NumPy array (an extension; raised a TypeError before)
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a = fused.step(m, np.array([700, 0]), x, generator=torch.Generator().manual_seed(0))
    b = fused.step(m, torch.tensor([700, 0]), x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.prev_sample, b.prev_sample)
    c = stock.step(m[1:], 0, x[1:])
    assert (a.prev_sample[1:] - c.prev_sample).abs().max() <= RTOL * c.prev_sample.abs().max()


# ----------------------------------------------------------------------------- pipelines
@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def images(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(0),
                    num_inference_steps=4, output_type="np", **kw).images


def test_ddpm_pipeline_save_load_round_trip(unet, tmp_path):
    """Failed before: model_index.json names fused_ddpm.diffusers, whose classes diffusers'
    loader did not recognise as schedulers."""
    cfg = dict(prediction_type="sample", clip_sample_range=2.0, beta_schedule="scaled_linear")
    pipe = DDPMPipeline(unet=unet, scheduler=FusedDDPMScheduler(**cfg))
    pipe.save_pretrained(tmp_path)
    want = images(pipe)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is FusedDDPMScheduler
    assert {k: loaded.scheduler.config[k] for k in cfg} == cfg
    assert np.abs(images(loaded) - want).max() <= 1e-6
    for sched in (FusedDDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler"),
                  DDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler")):
        again = DDPMPipeline.from_pretrained(tmp_path, scheduler=sched)
        assert again.scheduler is sched and sched.config.prediction_type == "sample"
        assert np.abs(images(again) - want).max() <= 1e-5
    # a fresh interpreter that imported fused_ddpm.diffusers loads it too
    code = ("import fused_ddpm.diffusers\nfrom diffusers import DDPMPipeline\n"
            f"print(type(DDPMPipeline.from_pretrained({str(tmp_path)!r}).scheduler).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.strip() == "FusedDDPMScheduler", out.stderr[-2000:]


def test_ddim_pipeline_save_load_round_trip(unet, tmp_path):
    """DDIMPipeline's constructor turns any scheduler into a stock DDIMScheduler (diffusers'
    behaviour); the fused one is assigned afterwards and survives save/load as a config."""
    cfg = dict(prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing")
    pipe = DDIMPipeline(unet=unet, scheduler=FusedDDIMScheduler(**cfg))
    want = images(pipe, eta=1.0)
    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)
    assert np.abs(images(pipe, eta=1.0) - want).max() <= 1e-5
    pipe.save_pretrained(tmp_path)
    for kw in ({}, dict(scheduler=FusedDDIMScheduler.from_pretrained(tmp_path,
                                                                     subfolder="scheduler"))):
        loaded = DDIMPipeline.from_pretrained(tmp_path, **kw)
        assert {k: loaded.scheduler.config[k] for k in cfg} == cfg
        assert np.abs(images(loaded, eta=1.0) - want).max() <= 1e-5
