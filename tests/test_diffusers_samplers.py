"""FusedDPMSolverMultistepScheduler / FusedEulerAncestralDiscreteScheduler against stock
diffusers: whole loops with the same generator (single steps, scheduler state, generator
state), the configurations that fall back to the stock step (identical results), the path
each configuration takes, Philox noise, save/load and ``from_config`` both ways.

Each loop is run on the ``reference`` (the drop-in's ``ddpm_step`` replaced by
fused_ddpm.reference.ddpm_step, which computes from the sigmas and the config, not from the
table) and on every CPU backend but Triton (interpreted: too slow for loops; the kernel
suite covers it).
"""
import json
import warnings

import pytest
import torch

import fused_ddpm as fd
from fused_ddpm.contract import NoiseStream
from fused_ddpm.philox import philox_normal
from fused_ddpm.step import SEED_HIGH

from conftest import BACKEND_CASES
from helpers import tiny_unet

diffusers = pytest.importorskip("diffusers")
from diffusers import (DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler)

import fused_ddpm.diffusers as fdd  # noqa: E402
from fused_ddpm.diffusers import (FusedDPMSolverMultistepScheduler,  # noqa: E402
                                  FusedEulerAncestralDiscreteScheduler, StockFallbackWarning)

pytestmark = pytest.mark.usefixtures("one_thread")
RTOL = 1e-5
BACKENDS = ["reference"] + [c.name for c in BACKEND_CASES
                            if c.device == "cpu" and c.name != "triton"]
SHAPE = (2, 3, 5, 6)


def reference_step(x_t, model_output, t, coeffs, noise=None, seeds=None, return_x0=False,
                   out=None, backend="auto", generator=None, history=None):
    """fd.ddpm_step's signature, computed by the reference."""
    return fd.reference.ddpm_step(x_t, model_output, t, coeffs, noise=noise, seeds=seeds,
                                  return_x0=return_x0, generator=generator, history=history)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setattr(fdd, "ddpm_step", reference_step)
        monkeypatch.setattr(fdd, "drawing_step", lambda *args: None)  # always ddpm_step
    return request.param


@pytest.fixture
def fused_calls(monkeypatch):
    """The step positions at which the fused op (whatever backend) ran."""
    calls = []
    inner = fdd.ddpm_step          # (after the backend fixture: maybe the reference)

    inner_drawing = fdd.drawing_step

    def counting(x, m, t, *args, **kwargs):
        calls.append(int(t))
        return inner(x, m, t, *args, **kwargs)

    def counting_drawing(noise, coeffs, backend, x, m, t, *args):   # drawing its own noise
        res = inner_drawing(noise, coeffs, backend, x, m, t, *args)
        if res is not None:
            calls.append(int(t))
        return res
    monkeypatch.setattr(fdd, "ddpm_step", counting)
    monkeypatch.setattr(fdd, "drawing_step", counting_drawing)
    return calls


def rel_err(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def model(x, t):
    """A cheap deterministic 'model' of x and t (bounded, the scale of an ε prediction)."""
    tt = float(t) / 1000.0
    return torch.tanh(x) * (0.5 + 0.4 * tt) + 0.05 * torch.sin(3.0 * x)


def pair(cls_fused, cls_stock, backend, n, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)     # diffusers' deprecations
        fused, stock = cls_fused(**cfg), cls_stock(**cfg)
    if backend != "reference":
        fused.backend = backend
    for s in (fused, stock):
        s.set_timesteps(n)
    return fused, stock


def run_loops(fused, stock, seed=0, begin=None, **step_kw):
    """Both schedulers through their whole loop from the same x_T and generator; compares
    every step's outputs (and the DPM state) and the generators afterwards."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * stock.init_noise_sigma
    xa, xb = x.clone(), x.clone()
    ga, gb = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    timesteps = stock.timesteps
    if begin is not None:
        fused.set_begin_index(begin)
        stock.set_begin_index(begin)
        timesteps = timesteps[begin:]
    for t in timesteps:
        ia, ib = fused.scale_model_input(xa, t), stock.scale_model_input(xb, t)
        a = fused.step(model(ia, t), t, xa, generator=ga, **step_kw)
        b = stock.step(model(ib, t), t, xb, generator=gb, **step_kw)
        assert rel_err(a.prev_sample, b.prev_sample) <= RTOL, (int(t), "prev_sample")
        assert a.prev_sample.dtype == b.prev_sample.dtype
        if hasattr(b, "pred_original_sample"):
            assert rel_err(a.pred_original_sample, b.pred_original_sample) <= RTOL, int(t)
        if hasattr(stock, "model_outputs"):
            assert fused.lower_order_nums == stock.lower_order_nums
            for u, v in zip(fused.model_outputs, stock.model_outputs):
                assert (u is None) == (v is None)
                if u is not None:
                    assert rel_err(u, v) <= RTOL, (int(t), "model_outputs")
        assert fused.step_index == stock.step_index
        xa, xb = a.prev_sample, b.prev_sample
    assert torch.equal(ga.get_state(), gb.get_state())
    return xa, xb


# ----------------------------------------------------------------------------- DPM-Solver++
# every option of the issue on the fused path, each varied from a base configuration
DPM_FUSED = {
    "2M": {},
    "2M_heun": dict(solver_type="heun"),
    "order1": dict(solver_order=1),
    "sde_2M": dict(algorithm_type="sde-dpmsolver++"),
    "sde_order1_heun": dict(algorithm_type="sde-dpmsolver++", solver_order=1,
                            solver_type="heun"),
    "sample": dict(prediction_type="sample"),
    "v": dict(prediction_type="v_prediction", timestep_spacing="trailing"),
    "no_lower_order_final": dict(lower_order_final=False, final_sigmas_type="sigma_min"),
    "euler_at_final": dict(euler_at_final=True, final_sigmas_type="sigma_min",
                           lower_order_final=False),
    "sigma_min": dict(final_sigmas_type="sigma_min"),
    "thresholding": dict(thresholding=True, prediction_type="sample", sample_max_value=1.5,
                         dynamic_thresholding_ratio=0.9),
    "karras": dict(use_karras_sigmas=True, beta_schedule="scaled_linear", beta_end=0.012),
    "lu_lambdas": dict(use_lu_lambdas=True),
    "leading": dict(timestep_spacing="leading", steps_offset=1),
    "zero_snr_v": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                       timestep_spacing="trailing"),
    "cosine_clipped": dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
}


@pytest.mark.parametrize("name", list(DPM_FUSED))
def test_dpm_fused_loops_match_stock(backend, name, fused_calls):
    cfg = DPM_FUSED[name]
    for n in (8, 16):       # below 15 steps lower_order_final changes the last two steps
        fused, stock = pair(FusedDPMSolverMultistepScheduler, DPMSolverMultistepScheduler,
                            backend, n, **cfg)
        assert fused.fused_path == "fused" and fused.fused_path_reason is None
        del fused_calls[:]
        run_loops(fused, stock, seed=n)
        assert fused_calls == list(range(n))


def test_dpm_sde_variance_noise_and_return_tuple(backend):
    fused, stock = pair(FusedDPMSolverMultistepScheduler, DPMSolverMultistepScheduler,
                        backend, 6, algorithm_type="sde-dpmsolver++")
    x = torch.randn(SHAPE)
    for i, t in enumerate(stock.timesteps):
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        a = fused.step(model(x, t), t, x, variance_noise=z, return_dict=False)
        b = stock.step(model(x, t), t, x, variance_noise=z, return_dict=False)
        assert isinstance(a, tuple) and len(a) == 1
        assert rel_err(a[0], b[0]) <= RTOL
        x = b[0]


def test_dpm_begin_index_mid_schedule(fused_calls):
    """Started mid-schedule (img2img), diffusers' first step is first order: that one step
    runs diffusers' step, the rest are fused."""
    fused, stock = pair(FusedDPMSolverMultistepScheduler, DPMSolverMultistepScheduler,
                        "torch", 10)
    run_loops(fused, stock, begin=4)
    assert fused_calls == list(range(5, 10))


DPM_STOCK = {
    "order3": dict(solver_order=3),
    "dpmsolver": dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    "sde_dpmsolver": dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
    "flow": dict(use_flow_sigmas=True, prediction_type="flow_prediction"),
    "learned_variance": dict(variance_type="learned_range"),
    # Karras sigmas end at sigma_min, and "sigma_min" appends it again: a zero-length last
    # step, which the table (strictly decreasing sigmas) does not take
    "karras_sigma_min": dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"),
}


@pytest.mark.parametrize("name", list(DPM_STOCK))
def test_dpm_fallback_configs_equal_stock_exactly(name, fused_calls):
    fused, stock = pair(FusedDPMSolverMultistepScheduler, DPMSolverMultistepScheduler,
                        "torch", 7, **DPM_STOCK[name])
    assert fused.fused_path == "stock" and fused.fused_path_reason
    x = torch.randn(SHAPE)
    xa, xb = x.clone(), x.clone()
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    channels = 2 if name == "learned_variance" else 1
    for t in stock.timesteps:
        ma = torch.cat([model(xa, t)] * channels, dim=1)
        mb = torch.cat([model(xb, t)] * channels, dim=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StockFallbackWarning)
            xa = fused.step(ma, t, xa, generator=ga).prev_sample
        xb = stock.step(mb, t, xb, generator=gb).prev_sample
        assert torch.equal(xa, xb)
    assert fused_calls == []


# ----------------------------------------------------------------------------- Euler ancestral
EULER_FUSED = {
    "linspace": {},
    "v": dict(prediction_type="v_prediction"),
    "leading": dict(timestep_spacing="leading", steps_offset=1),
    "trailing_scaled": dict(timestep_spacing="trailing", beta_schedule="scaled_linear",
                            beta_end=0.012),
    "zero_snr_v": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                       timestep_spacing="trailing"),
}


@pytest.mark.parametrize("name", list(EULER_FUSED))
def test_euler_ancestral_fused_loops_match_stock(backend, name, fused_calls):
    fused, stock = pair(FusedEulerAncestralDiscreteScheduler, EulerAncestralDiscreteScheduler,
                        backend, 12, **EULER_FUSED[name])
    assert fused.fused_path == "fused"
    run_loops(fused, stock)
    assert fused_calls == list(range(12))


def test_euler_ancestral_stock_behaviour_kept():
    """Integer timesteps raise as in diffusers; "sample" is stock (diffusers raises)."""
    fused, stock = pair(FusedEulerAncestralDiscreteScheduler, EulerAncestralDiscreteScheduler,
                        "torch", 5)
    x = torch.randn(SHAPE)
    for sched in (fused, stock):
        with pytest.raises(ValueError, match="integer indices"):
            sched.step(x, 3, x)
    fused, stock = pair(FusedEulerAncestralDiscreteScheduler, EulerAncestralDiscreteScheduler,
                        "torch", 5, prediction_type="sample")
    assert fused.fused_path == "stock"
    for sched in (fused, stock):
        with pytest.raises(NotImplementedError), warnings.catch_warnings():
            warnings.simplefilter("ignore", StockFallbackWarning)
            sched.step(x, stock.timesteps[0], x)


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_match_stock(dtype):
    """Samples and model outputs in half and double precision: the output dtype is stock's,
    and every step (from stock's sample) agrees to about one rounding of that dtype (stock
    computes the update in float32, the kernels in float32 registers)."""
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: RTOL}[dtype]
    cases = [(FusedDPMSolverMultistepScheduler, DPMSolverMultistepScheduler, {}),
             (FusedDPMSolverMultistepScheduler, DPMSolverMultistepScheduler,
              dict(algorithm_type="sde-dpmsolver++", solver_type="heun")),
             (FusedEulerAncestralDiscreteScheduler, EulerAncestralDiscreteScheduler, {})]
    for fused_cls, stock_cls, cfg in cases:
        fused, stock = pair(fused_cls, stock_cls, "torch", 8, **cfg)
        x = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) *
             stock.init_noise_sigma).to(dtype)
        ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        for t in stock.timesteps:
            m = model(stock.scale_model_input(x, t), t).to(dtype)
            fused.scale_model_input(x, t)
            a = fused.step(m, t, x, generator=ga).prev_sample
            b = stock.step(m, t, x, generator=gb).prev_sample
            assert a.dtype == b.dtype == dtype
            assert rel_err(a, b) <= tol, (fused_cls.__name__, cfg, int(t))
            x = b


# ----------------------------------------------------------------------------- Philox noise
@pytest.mark.parametrize("which", ["dpm_sde", "euler"])
def test_philox_noise_equals_stock_with_that_noise(which):
    """noise="philox": each step equals stock diffusers given the noise the kernel drew
    (Philox of the seeds drawn from the generator, at the step's row, stream STEP)."""
    if which == "dpm_sde":
        fused, stock = pair(FusedDPMSolverMultistepScheduler, DPMSolverMultistepScheduler,
                            "torch", 6, algorithm_type="sde-dpmsolver++")
    else:
        fused, stock = pair(FusedEulerAncestralDiscreteScheduler,
                            EulerAncestralDiscreteScheduler, "torch", 6)
    fused.noise = "philox"
    x = torch.randn(SHAPE) * stock.init_noise_sigma
    g = torch.Generator().manual_seed(3)
    for i, t in enumerate(stock.timesteps):
        seeds = torch.randint(0, SEED_HIGH, (SHAPE[0],), dtype=torch.int64,
                              generator=torch.Generator().manual_seed(100 + i))
        g.manual_seed(100 + i)
        m = model(stock.scale_model_input(x, t), t)
        fused.scale_model_input(x, t)
        a = fused.step(m, t, x, generator=g).prev_sample
        z = philox_normal(seeds, torch.full((SHAPE[0],), i), SHAPE, stream=NoiseStream.STEP)
        if which == "dpm_sde":
            b = stock.step(m, t, x, variance_noise=z).prev_sample
        else:       # stock Euler takes no noise argument: feed it through its generator
            real = diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor
            diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor = \
                lambda *a, **k: z.clone()
            try:
                b = stock.step(m, t, x).prev_sample
            finally:
                diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor = real
        assert rel_err(a, b) <= RTOL, i
        x = b


# ----------------------------------------------------------------------------- config I/O
@pytest.mark.parametrize("fused_cls,stock_cls,cfg", [
    (FusedDPMSolverMultistepScheduler, DPMSolverMultistepScheduler,
     dict(algorithm_type="sde-dpmsolver++", solver_type="heun", use_karras_sigmas=True,
          prediction_type="v_prediction", lower_order_final=False)),
    (FusedEulerAncestralDiscreteScheduler, EulerAncestralDiscreteScheduler,
     dict(prediction_type="v_prediction", timestep_spacing="trailing")),
])
def test_save_load_and_from_config_both_ways(tmp_path, fused_cls, stock_cls, cfg):
    fused = fused_cls(**cfg, noise="philox")
    fused.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == fused_cls.__name__
    assert "noise" not in saved and "backend" not in saved
    loaded = fused_cls.from_pretrained(tmp_path)
    assert type(loaded) is fused_cls and loaded.noise == "randn"
    stock = stock_cls.from_pretrained(tmp_path)
    assert type(stock) is stock_cls
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert strip(loaded.config) == strip(fused.config) == strip(stock.config)
    # stock -> fused -> stock, and across the compatible schedulers
    again = fused_cls.from_config(stock_cls(**cfg).config, backend="torch")
    assert type(again) is fused_cls and again.backend == "torch"
    assert strip(again.config) == strip(stock.config)
    assert type(stock_cls.from_config(again.config)) is stock_cls
    for other in (FusedDPMSolverMultistepScheduler, FusedEulerAncestralDiscreteScheduler):
        switched = other.from_config(again.config)
        assert type(switched) is other
        assert switched.config.prediction_type == cfg["prediction_type"]
    # the loaded fused scheduler steps as stock does
    for s in (loaded, stock):
        s.set_timesteps(5)
    assert loaded.fused_path == "fused"
    run_loops(loaded, stock)


def test_pipeline_save_load_keeps_the_fused_class(tmp_path):
    from diffusers import DDPMPipeline
    unet = tiny_unet()
    for cls in (FusedDPMSolverMultistepScheduler, FusedEulerAncestralDiscreteScheduler):
        DDPMPipeline(unet=unet, scheduler=cls(prediction_type="v_prediction")).save_pretrained(
            tmp_path / cls.__name__)
        loaded = DDPMPipeline.from_pretrained(tmp_path / cls.__name__)
        assert type(loaded.scheduler) is cls
        assert loaded.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused_cls,stock_cls,cfg", [
    (FusedDPMSolverMultistepScheduler, DPMSolverMultistepScheduler,
     dict(algorithm_type="sde-dpmsolver++")),
    (FusedEulerAncestralDiscreteScheduler, EulerAncestralDiscreteScheduler, {}),
])
def test_cuda_loop_no_host_sync_after_the_first_step(fused_cls, stock_cls, cfg):
    """After diffusers' own one-time index lookup, no step synchronises with the host; the
    loop matches stock diffusers on the device."""
    dev = torch.device("cuda")
    fused, stock = fused_cls(**cfg), stock_cls(**cfg)
    for s in (fused, stock):
        s.set_timesteps(12, device=dev)
    x0 = torch.randn(4, 3, 16, 16, device=dev) * stock.init_noise_sigma
    out = []
    for s in (fused, stock):
        g = torch.Generator(device=dev).manual_seed(0)
        x = x0.clone()
        for i, t in enumerate(s.timesteps):
            xin = s.scale_model_input(x, t)
            m = torch.tanh(xin) * 0.7 + 0.05 * torch.sin(3.0 * xin)   # t stays on the device
            if s is fused and i >= 1:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                x = s.step(m, t, x, generator=g).prev_sample
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out.append(x)
    assert rel_err(out[0].cpu(), out[1].cpu()) <= 1e-4
