"""FusedDDPMScheduler / FusedDDIMScheduler against stock diffusers.

Every step is run several ways (the ``backend`` fixture below):
  * ``reference`` - the drop-in's ``ddpm_step`` replaced by fused_ddpm.reference.ddpm_step,
                    which computes from the schedule and config, not from the table;
  * every backend available on the CPU (the ``torch`` backend is the kernel contract in
    plain PyTorch reading the scheduler's table, so it checks the table itself; the C++
    CPU kernel when built). Triton under the interpreter is left out here: too slow for
    whole loops (the kernel suite covers it).
Per step, the relative error max|fused − diffusers| / max|diffusers| must be <= 1e-5.
"""
import importlib
import json
import sys

import pytest
import torch

import fused_ddpm as fd
from fused_ddpm.backends import resolve
from fused_ddpm.contract import Col
from fused_ddpm.step import SEED_HIGH

from conftest import BACKEND_CASES
from helpers import tiny_unet

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

import fused_ddpm.diffusers as fdd  # noqa: E402
from fused_ddpm.diffusers import FusedDDIMScheduler, FusedDDPMScheduler  # noqa: E402

RTOL = 1e-5
BACKENDS = ["reference"] + [c.name for c in BACKEND_CASES
                            if c.device == "cpu" and c.name != "triton"]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]


# ----------------------------------------------------------------------------- helpers
pytestmark = pytest.mark.usefixtures("one_thread")


def reference_step(x_t, model_output, t, coeffs, noise=None, seeds=None, return_x0=False,
                   out=None, backend="auto", generator=None):
    """fd.ddpm_step's signature, computed by the reference."""
    return fd.reference.ddpm_step(x_t, model_output, t, coeffs, noise=noise, seeds=seeds,
                                  return_x0=return_x0, generator=generator)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setattr(fdd, "ddpm_step", reference_step)
        monkeypatch.setattr(fdd, "drawing_step", lambda *args: None)  # always ddpm_step
    return request.param


def float64_tables(stock):
    """Stock diffusers with its ᾱ (the same float32 values) held in float64, so that its
    per-step scalar arithmetic runs in float64 as the reference's does (in float32,
    β_t = 1 − ᾱ_t/ᾱ_{t−1} loses ~5e-4 relative near t = 0)."""
    for name in ("betas", "alphas", "alphas_cumprod", "one", "final_alpha_cumprod"):
        if hasattr(stock, name):
            setattr(stock, name, torch.as_tensor(getattr(stock, name)).double())
    return stock


def rel_err(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def model_output_for(sched, x, t, seed):
    """A random model output of the right shape (2C channels for learned variances)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(x.shape, generator=g)
    vt = getattr(sched.config, "variance_type", "fixed_small")
    if vt == "learned":
        return torch.cat([m, torch.rand(x.shape, generator=g) * 0.02 + 1e-4], dim=1)
    if vt == "learned_range":
        return torch.cat([m, torch.rand(x.shape, generator=g) * 2 - 1], dim=1)
    return m


def compare_steps(fused, stock, timesteps, shape=(2, 3, 4, 4), seed=0, step_kwargs=None):
    """Single steps from the same (x, m, generator) at each timestep."""
    for i, t in enumerate(timesteps):
        g = torch.Generator().manual_seed(seed + i)
        x = torch.randn(shape, generator=g) * 1.5
        m = model_output_for(stock, x, t, seed + 100 + i)
        kw = dict(step_kwargs or {})
        a = fused.step(m, t, x, generator=torch.Generator().manual_seed(7 + i), **kw)
        b = stock.step(m, t, x, generator=torch.Generator().manual_seed(7 + i), **kw)
        assert rel_err(a.prev_sample, b.prev_sample) <= RTOL, (int(t), "prev_sample")
        assert rel_err(a.pred_original_sample, b.pred_original_sample) <= RTOL, (int(t), "x0")


def linear_model(x, t, T=1000):
    """A cheap deterministic 'model': a fixed linear function of x and t."""
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.dim() - 1)))
    return x * (0.4 + 0.5 * tt / T) + 0.05 * (tt / T)


def compare_loops(fused, stock, shape=(2, 3, 4, 4), step_kwargs=None, seed=0):
    """Full loops with the same generator; per-step relative error on each trajectory."""
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    xa, xb = x0.clone(), x0.clone()
    ga, gb = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    for t in stock.timesteps:
        kw = dict(step_kwargs or {})
        ma, mb = linear_model(xa, t), linear_model(xb, t)
        xa = fused.step(ma, t, xa, generator=ga, **kw).prev_sample
        xb = stock.step(mb, t, xb, generator=gb, **kw).prev_sample
        assert rel_err(xa, xb) <= RTOL, int(t)
    return xa, xb


def pair(cls_fused, cls_stock, backend, **cfg):
    """(fused, stock): the drop-in on ``backend`` (the reference: the stock scheduler in
    float64 arithmetic on the same ᾱ)."""
    fused, stock = cls_fused(**cfg), cls_stock(**cfg)
    if backend == "reference":
        float64_tables(stock)
    else:
        fused.backend = backend
    return fused, stock


# ----------------------------------------------------------------------------- DDPM
CLIP_MODES = {
    "none": dict(clip_sample=False),
    "clip": dict(clip_sample=True, clip_sample_range=1.5),
    "threshold": dict(thresholding=True, sample_max_value=3.0, dynamic_thresholding_ratio=0.9),
}
VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddpm_single_steps_all_options(backend, prediction_type):
    for vt in VARIANCES:
        for clip_name, clip in CLIP_MODES.items():
            for n in (None, 10):
                fused, stock = pair(FusedDDPMScheduler, DDPMScheduler, backend,
                                    prediction_type=prediction_type, variance_type=vt, **clip)
                if n:
                    fused.set_timesteps(n)
                    stock.set_timesteps(n)
                ts = stock.timesteps
                compare_steps(fused, stock, [ts[0], ts[len(ts) // 2], ts[-2], ts[-1]])


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2",
                                           "sigmoid", "laplace"])
def test_ddpm_loops_schedules_and_spacings(backend, beta_schedule):
    spacings = [dict(timestep_spacing="leading"), dict(timestep_spacing="trailing"),
                dict(timestep_spacing="linspace"),
                dict(timestep_spacing="leading", steps_offset=1)]
    for sp in spacings:
        fused, stock = pair(FusedDDPMScheduler, DDPMScheduler, backend,
                            beta_schedule=beta_schedule, beta_end=0.012 if beta_schedule !=
                            "linear" else 0.02, **sp)
        fused.set_timesteps(12)
        stock.set_timesteps(12)
        assert torch.equal(fused.timesteps, stock.timesteps)
        compare_loops(fused, stock)
    # custom timesteps
    fused, stock = pair(FusedDDPMScheduler, DDPMScheduler, backend, beta_schedule=beta_schedule)
    custom = [999, 800, 650, 400, 399, 120, 5, 1, 0]
    fused.set_timesteps(timesteps=custom)
    stock.set_timesteps(timesteps=custom)
    compare_loops(fused, stock)


def test_ddpm_zero_snr_v_prediction(backend):
    for spacing in ("trailing", "leading"):
        fused, stock = pair(FusedDDPMScheduler, DDPMScheduler, backend,
                            prediction_type="v_prediction", rescale_betas_zero_snr=True,
                            timestep_spacing=spacing, clip_sample=False)
        fused.set_timesteps(10)
        stock.set_timesteps(10)
        compare_loops(fused, stock)
        compare_steps(fused, stock, [stock.timesteps[0]])


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddpm_full_1000_step_loop(backend, prediction_type):
    """diffusers-style full-loop check: sum and mean of |x| after 1000 noisy steps."""
    fused, stock = pair(FusedDDPMScheduler, DDPMScheduler, backend,
                        prediction_type=prediction_type)
    n = 4 * 3 * 8 * 8
    x_init = (torch.arange(n, dtype=torch.float32).reshape(4, 3, 8, 8) / n - 0.5) * 2
    out = []
    for sched in (fused, stock):
        g = torch.Generator().manual_seed(0)
        x = x_init.clone()
        for t in sched.timesteps:
            x = sched.step(linear_model(x, t), t, x, generator=g).prev_sample
        out.append(x)
    a, b = out
    assert abs(a.abs().sum().item() - b.abs().sum().item()) <= 1e-2
    assert abs(a.abs().mean().item() - b.abs().mean().item()) <= 1e-3


def test_ddpm_generator_list_and_per_sample_timesteps(backend):
    fused, stock = pair(FusedDDPMScheduler, DDPMScheduler, backend)
    x = torch.randn(3, 2, 4, 4)
    m = torch.randn(3, 2, 4, 4)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    a = fused.step(m, 500, x, generator=gens()).prev_sample
    b = stock.step(m, 500, x, generator=gens()).prev_sample
    assert rel_err(a, b) <= RTOL
    # one timestep per sample (an extension: diffusers takes one timestep)
    ts = torch.tensor([999, 0, 37])
    a = fused.step(m, ts, x, generator=gens()).prev_sample
    for i, t in enumerate(ts.tolist()):
        gi = torch.Generator().manual_seed(i + 1)
        b = stock.step(m[i:i + 1], t, x[i:i + 1], generator=gi).prev_sample
        assert rel_err(a[i:i + 1], b) <= RTOL


def test_ddpm_noise_drawn_only_where_diffusers_draws_it():
    fused, stock = FusedDDPMScheduler(), DDPMScheduler()
    x, m = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for t in (torch.tensor(1), 0, torch.tensor(0)):
        fused.step(m, t, x, generator=ga)
        stock.step(m, t, x, generator=gb)
        assert torch.equal(ga.get_state(), gb.get_state())
    state = torch.get_rng_state()
    fused.step(m, 0, x)           # t = 0: no noise, torch's default generator untouched
    assert torch.equal(state, torch.get_rng_state())


# ----------------------------------------------------------------------------- philox noise
def test_philox_noise_mode(tmp_path):
    sched = FusedDDPMScheduler(noise="philox", backend="torch")
    assert sched.noise == "philox"
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a = sched.step(m, 321, x, generator=torch.Generator().manual_seed(5)).prev_sample
    b = sched.step(m, 321, x, generator=torch.Generator().manual_seed(5)).prev_sample
    assert torch.equal(a, b)
    seeds = torch.randint(0, SEED_HIGH, (2,), dtype=torch.int64,
                          generator=torch.Generator().manual_seed(5))
    ref = fd.reference.ddpm_step(x, m, 321, sched.fused_coefficients(), seeds=seeds)
    assert rel_err(a, ref) <= RTOL
    # a list of generators: one seed per sample from its own generator
    c = sched.step(m, 321, x, generator=[torch.Generator().manual_seed(s) for s in (8, 9)])
    s8 = torch.randint(0, SEED_HIGH, (1,), generator=torch.Generator().manual_seed(8))
    s9 = torch.randint(0, SEED_HIGH, (1,), generator=torch.Generator().manual_seed(9))
    ref = fd.reference.ddpm_step(x, m, 321, sched.fused_coefficients(), seeds=torch.cat([s8, s9]))
    assert rel_err(c.prev_sample, ref) <= RTOL
    # not part of the config; settable as attribute or from_pretrained kwarg
    sched.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert "noise" not in saved and "backend" not in saved
    assert FusedDDPMScheduler.from_pretrained(tmp_path).noise == "randn"
    assert FusedDDPMScheduler.from_pretrained(tmp_path, noise="philox").noise == "philox"
    with pytest.raises(ValueError, match="noise"):
        sched.noise = "gaussian"
    ddim = FusedDDIMScheduler(noise="philox")
    ddim.set_timesteps(10)
    y1 = ddim.step(m, 901, x, eta=1.0, generator=torch.Generator().manual_seed(1)).prev_sample
    y0 = ddim.step(m, 901, x, eta=0.0).prev_sample
    assert not torch.allclose(y1, y0)


# ----------------------------------------------------------------------------- DDIM
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_single_steps_all_options(backend, prediction_type):
    for clip_name, clip in CLIP_MODES.items():
        for set_alpha_to_one in (True, False):
            fused, stock = pair(FusedDDIMScheduler, DDIMScheduler, backend,
                                prediction_type=prediction_type,
                                set_alpha_to_one=set_alpha_to_one, **clip)
            fused.set_timesteps(10)
            stock.set_timesteps(10)
            ts = stock.timesteps
            for eta in (0.0, 0.5, 1.0):
                for ucmo in (False, True):
                    compare_steps(fused, stock, [ts[0], ts[5], ts[-1]],
                                  step_kwargs=dict(eta=eta, use_clipped_model_output=ucmo))


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddim_loops_schedules_and_spacings(backend, beta_schedule):
    for sp in (dict(timestep_spacing="leading"), dict(timestep_spacing="trailing"),
               dict(timestep_spacing="linspace"), dict(timestep_spacing="leading", steps_offset=1)):
        fused, stock = pair(FusedDDIMScheduler, DDIMScheduler, backend,
                            beta_schedule=beta_schedule, **sp)
        fused.set_timesteps(12)
        stock.set_timesteps(12)
        compare_loops(fused, stock, step_kwargs=dict(eta=0.7))
        compare_loops(fused, stock, step_kwargs=dict(eta=0.0, use_clipped_model_output=True))
    fused, stock = pair(FusedDDIMScheduler, DDIMScheduler, backend, prediction_type="v_prediction",
                        rescale_betas_zero_snr=True, timestep_spacing="trailing",
                        clip_sample=False)
    fused.set_timesteps(10)
    stock.set_timesteps(10)
    compare_loops(fused, stock, step_kwargs=dict(eta=1.0))


def test_ddim_variance_noise_and_errors(backend):
    fused, stock = pair(FusedDDIMScheduler, DDIMScheduler, backend)
    with pytest.raises(ValueError, match="set_timesteps"):
        fused.step(torch.randn(1, 1, 2, 2), 10, torch.randn(1, 1, 2, 2))
    fused.set_timesteps(20)
    stock.set_timesteps(20)
    x, m, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a = fused.step(m, 500, x, eta=0.8, variance_noise=z).prev_sample
    b = stock.step(m, 500, x, eta=0.8, variance_noise=z).prev_sample
    assert rel_err(a, b) <= RTOL
    with pytest.raises(ValueError, match="generator"):
        fused.step(m, 500, x, eta=0.8, variance_noise=z, generator=torch.Generator())
    # eta = 0 draws no random numbers
    state = torch.get_rng_state()
    fused.step(m, 500, x)
    assert torch.equal(state, torch.get_rng_state())


def test_ddim_one_table_per_eta_and_clipped_output():
    fused = FusedDDIMScheduler()
    fused.set_timesteps(10)
    x, m = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    for eta in (0.0, 0.3, 0.0):
        for ucmo in (False, True):
            fused.step(m, 901, x, eta=eta, use_clipped_model_output=ucmo)
    assert set(fused._fused_cache) == {(0.0, False), (0.0, True), (0.3, False), (0.3, True)}
    c1 = fused.fused_coefficients("cpu", (0.3, False))
    assert fused.fused_coefficients("cpu", (0.3, False)) is c1      # cached
    fused.set_timesteps(20)
    assert fused._fused_cache == {}


def test_ddim_full_loop_sum_mean(backend):
    for prediction_type in PREDICTIONS:
        fused, stock = pair(FusedDDIMScheduler, DDIMScheduler, backend,
                            prediction_type=prediction_type)
        out = []
        for sched in (fused, stock):
            sched.set_timesteps(50)
            g = torch.Generator().manual_seed(0)
            x = torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)
            for t in sched.timesteps:
                x = sched.step(linear_model(x, t), t, x, eta=1.0, generator=g).prev_sample
            out.append(x)
        assert abs(out[0].abs().sum().item() - out[1].abs().sum().item()) <= 1e-2
        assert abs(out[0].abs().mean().item() - out[1].abs().mean().item()) <= 1e-3


# ----------------------------------------------------------------------------- table checks
def test_table_matches_float64_math_closely():
    """The diffusers-float32 table is close to the float64 formulas of
    fused_ddpm.coefficients (it differs only by diffusers' float32 rounding)."""
    fused = FusedDDPMScheduler(clip_sample=False)
    fused.set_timesteps(50)
    c = fused.fused_coefficients()
    ref = fd.step_coefficients(c.schedule, timesteps=c.timesteps.tolist())
    rows = c.timesteps
    scale = ref.table64[rows].abs().amax(dim=0).clamp(min=1e-30)
    err = ((c.table64[rows] - ref.table64[rows]).abs().amax(dim=0) / scale)
    cols = [Col.U, Col.W, Col.P, Col.Q, Col.R, Col.S]
    assert err[cols].max() < 2e-3                    # β̃ at t=0 neighbours: f32 cancellation
    assert torch.equal(c.table64[:, [Col.VA, Col.VB]], torch.zeros(1000, 2, dtype=torch.float64))
    assert c.table.dtype == torch.float32 and c.table.shape == (1000, len(Col))
    assert c.precision == "diffusers_float32" and torch.equal(c.table, c.table64.float())


def test_schedule_from_alphas_cumprod_is_exact():
    for bs in ("linear", "squaredcos_cap_v2", "laplace"):
        for zero_snr in (False, True):
            stock = DDPMScheduler(beta_schedule=bs, rescale_betas_zero_snr=zero_snr)
            s = fdd.schedule_from_alphas_cumprod(stock.alphas_cumprod)
            assert torch.equal(s.alphas_cumprod.float(), stock.alphas_cumprod)


# ----------------------------------------------------------------------------- config I/O
def test_save_load_round_trip_and_from_config(tmp_path):
    cfg = dict(prediction_type="v_prediction", variance_type="fixed_large", clip_sample=False,
               timestep_spacing="trailing", beta_schedule="scaled_linear", beta_end=0.012)
    fused = FusedDDPMScheduler(**cfg)
    fused.save_pretrained(tmp_path)
    loaded = FusedDDPMScheduler.from_pretrained(tmp_path)
    assert isinstance(loaded, FusedDDPMScheduler)
    for k, v in cfg.items():
        assert loaded.config[k] == v
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == \
        "FusedDDPMScheduler"
    stock_loaded = DDPMScheduler.from_pretrained(tmp_path)    # stock diffusers reads it
    assert stock_loaded.config.prediction_type == "v_prediction"
    # from a stock scheduler's config
    stock = DDPMScheduler(**cfg)
    from_stock = FusedDDPMScheduler.from_config(stock.config)
    assert isinstance(from_stock, FusedDDPMScheduler)
    from_stock.set_timesteps(8)
    stock.set_timesteps(8)
    compare_steps(from_stock, stock, stock.timesteps[:2])
    back = DDPMScheduler.from_config(from_stock.config)
    assert type(back) is DDPMScheduler
    # DDIM: from a DDPM config too (compatible schedulers), and round trip
    ddim = FusedDDIMScheduler.from_config(stock.config, set_alpha_to_one=False)
    assert ddim.config.set_alpha_to_one is False and ddim.config.prediction_type == "v_prediction"
    ddim.save_pretrained(tmp_path / "ddim")
    again = FusedDDIMScheduler.from_pretrained(tmp_path / "ddim", noise="philox", backend="torch")
    assert again.noise == "philox" and again.backend == "torch"
    strip = lambda c: {k: v for k, v in c.items() if k != "_use_default_values"}  # noqa: E731
    assert strip(again.config) == strip(ddim.config)


def test_imports_without_diffusers(monkeypatch):
    """fused_ddpm.diffusers imports without diffusers; using a class says pip install."""
    for name in [n for n in list(sys.modules) if n == "diffusers" or n.startswith("diffusers.")
                 or n.startswith("fused_ddpm.diffusers")]:
        monkeypatch.delitem(sys.modules, name)              # restored after the test
    for attr in ("diffusers", "diffusers_samplers"):
        monkeypatch.setattr(fd, attr, getattr(fd, attr))     # the package's attributes too
    monkeypatch.setitem(sys.modules, "diffusers", None)       # import diffusers → ImportError
    mod = importlib.import_module("fused_ddpm.diffusers")
    assert mod is not fdd
    for cls in (mod.FusedDDPMScheduler, mod.FusedDDIMScheduler,
                mod.FusedDPMSolverMultistepScheduler, mod.FusedEulerAncestralDiscreteScheduler):
        with pytest.raises(ImportError, match="pip install diffusers"):
            cls()
        with pytest.raises(ImportError, match="pip install diffusers"):
            cls.from_pretrained("somewhere")


# ----------------------------------------------------------------------------- pipeline
def test_ddpm_pipeline_tiny_unet_same_images(backend):
    from diffusers import DDPMPipeline
    unet = tiny_unet()
    images = []
    fused, stock = pair(FusedDDPMScheduler, DDPMScheduler, backend)
    for sched in (fused, stock):
        pipe = DDPMPipeline(unet=unet, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0),
                       num_inference_steps=6, output_type="np")
        images.append(torch.from_numpy(out.images))
    assert images[0].shape == (2, 8, 8, 3)
    assert (images[0] - images[1]).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_in_step_on_cuda():
    dev = torch.device("cuda")
    if resolve("auto", dev, torch.float32) == "torch":
        pytest.skip("no GPU kernel backend built")
    for cls, kw in ((FusedDDPMScheduler, {}), (FusedDDIMScheduler, dict(eta=1.0))):
        sched = cls(thresholding=False)
        sched.set_timesteps(10, device=dev)
        x = torch.randn(2, 3, 8, 8, device=dev)
        g = torch.Generator(device=dev).manual_seed(0)
        sched.step(torch.randn_like(x), sched.timesteps[0], x, generator=g, **kw)  # warm caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in sched.timesteps:
                x = sched.step(torch.randn_like(x), t, x, generator=g, **kw).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(x).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loop_matches_stock_diffusers():
    dev = torch.device("cuda")
    fused, stock = FusedDDPMScheduler(), DDPMScheduler()
    for s in (fused, stock):
        s.set_timesteps(50, device=dev)
    x0 = torch.randn(4, 3, 8, 8, device=dev)
    out = []
    for s in (fused, stock):
        g = torch.Generator(device=dev).manual_seed(0)
        x = x0.clone()
        for t in s.timesteps:
            x = s.step(linear_model(x, t.to(dev)), t, x, generator=g).prev_sample
        out.append(x)
    assert rel_err(out[0].cpu(), out[1].cpu()) <= 1e-4
