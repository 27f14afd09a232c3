"""Property-based tests (hypothesis): random shapes, strides, dtypes, configs and timesteps
on every available backend vs the float64 reference.

Budget: FUSED_DDPM_HYPOTHESIS_EXAMPLES examples per backend (default 40, which keeps CI
fast; e.g. 2000 for a long run by hand). The number of cases run is printed at the end of
the pytest run.

Reproducible: the examples are derived from FUSED_DDPM_HYPOTHESIS_SEED (default 0), the same
on every run unless that variable changes; a failure prints the seed to rerun it with.
"""
import os

import pytest
import torch

import fused_ddpm as fd
from fused_ddpm.coefficients import PREDICTION_TYPES, STEP_METHODS
from fused_ddpm.methods import METHODS

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, seed, settings, strategies as st  # noqa: E402

from helpers import random_inputs  # noqa: E402

EXAMPLES = int(os.environ.get("FUSED_DDPM_HYPOTHESIS_EXAMPLES", "40"))
SEED = int(os.environ.get("FUSED_DDPM_HYPOTHESIS_SEED", "0"))
CASES = {}
SCHEDULE = fd.NoiseSchedule(num_train_timesteps=200, beta_schedule="scaled_linear",
                            beta_start=0.00085, beta_end=0.012)
TOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
#: how to draw each option a method reads (fused_ddpm.methods.Method.options)
OPTIONS = {"eta": st.floats(0.0, 1.0), "use_clipped_model_output": st.booleans(),
           "set_alpha_to_one": st.booleans()}


#: methods indexed by timestep (the step-indexed samplers of tests/test_samplers.py reach
#: x̂0 maps of 1/α ≈ 160, beyond this test's max-scaled tolerance)
TIMESTEP_METHODS = [m for m in STEP_METHODS if METHODS[m].index_by == "timestep"]


@st.composite
def step_case(draw):
    method = draw(st.sampled_from(TIMESTEP_METHODS))
    cfg = dict(method=method, prediction_type=draw(st.sampled_from(PREDICTION_TYPES)))
    clip = draw(st.sampled_from(["none", "clip", "thresh"]))
    if clip == "clip":
        cfg["clip_sample_range"] = draw(st.floats(0.5, 3.0))
    elif clip == "thresh":
        cfg.update(thresholding=True, dynamic_thresholding_ratio=draw(st.floats(0.5, 1.0)),
                   sample_max_value=draw(st.floats(1.0, 4.0)))
    cfg["variance_type"] = draw(st.sampled_from(METHODS[method].variance_types))
    for option in METHODS[method].options:
        cfg[option] = draw(OPTIONS[option])
    n = draw(st.one_of(st.none(), st.integers(1, 200)))
    if n is not None:
        cfg.update(num_inference_steps=n,
                   timestep_spacing=draw(st.sampled_from(["leading", "trailing", "linspace"])))
    rank = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, 4))] + [draw(st.integers(1, 7)) for _ in range(rank - 1)]
    layout = draw(st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    noise = draw(st.sampled_from(["external", "seeds"]))
    data_seed = draw(st.integers(0, 2 ** 31 - 1))
    return cfg, shape, layout, dtype, noise, data_seed


def _relayout(a, layout):
    if layout == "channels_last" and a.dim() in (4, 5):
        return a.contiguous(memory_format=torch.channels_last if a.dim() == 4
                            else torch.channels_last_3d)
    if layout == "transposed" and a.dim() >= 3:
        return a.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        big = torch.zeros(a.shape[0], a.shape[1], *(2 * s for s in a.shape[2:]), dtype=a.dtype)
        view = big[(slice(None), slice(None)) + tuple(slice(None, None, 2) for _ in a.shape[2:])]
        view.copy_(a)
        return view
    return a


def test_random_steps_match_reference(backend):
    device = backend.device

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(step_case())
    def run(case):
        cfg, shape, layout, dtype, noise_kind, seed_ = case
        if dtype not in backend.dtypes:
            dtype = torch.float32          # e.g. GPU kernels take fp16/bf16/fp32 only
        c = fd.step_coefficients(SCHEDULE, **cfg)
        g = torch.Generator().manual_seed(seed_)
        x, m, z = (_relayout(a, layout).to(device)
                   for a in random_inputs(c, shape, dtype=dtype, generator=g))
        ts = c.timesteps
        t = ts[torch.randint(len(ts), (shape[0],), generator=g)].to(device)
        kw = dict(noise=z) if noise_kind == "external" else \
            dict(seeds=torch.randint(-2 ** 62, 2 ** 62, (shape[0],), generator=g).to(device))
        y, x0 = fd.ddpm_step(x, m, t, c, return_x0=True, backend=backend.name, **kw)
        ref_kw = {k: (v.double().cpu() if k == "noise" else v.cpu()) for k, v in kw.items()}
        want_y, want_x0 = fd.reference.ddpm_step(x.double().cpu(), m.double().cpu(), t.cpu(), c,
                                                 return_x0=True, **ref_kw)
        assert y.shape == x.shape and y.dtype == x.dtype
        for got, want in ((y, want_y), (x0, want_x0)):
            scale = float(want.abs().max().clamp(min=1.0))
            err = float((got.cpu().double() - want).abs().max())
            assert err <= TOL[dtype] * scale, (cfg, shape, layout, dtype, noise_kind, err,
                                               f"FUSED_DDPM_HYPOTHESIS_SEED={SEED}")
        CASES[str(backend)] = CASES.get(str(backend), 0) + 1

    run()
    assert CASES.get(str(backend), 0) >= min(EXAMPLES, 10)

