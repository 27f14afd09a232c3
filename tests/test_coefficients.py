"""The coefficient table, applied as the kernels apply it (the torch backend: the contract
in plain torch, float64 for float64 inputs), reproduces the reference."""
import itertools

import pytest
import torch

import fused_ddpm as fd
from fused_ddpm.coefficients import METHODS, PREDICTION_TYPES, VARIANCE_TYPES
from fused_ddpm.contract import NUM_COLS, TERM_COLS, Col, In, Var

from helpers import random_inputs


def affine_step(x, m, z, t, c, table=None, history=None):
    """The step as the kernels compute it, from ``table`` (default: the coefficients'
    float64 table), on the torch backend in float64 (with the dynamic-threshold scale in
    float64 too, where the contract has float32, so that only the table is tested)."""
    from fused_ddpm import torch_backend
    from fused_ddpm.reference import dynamic_threshold_scale
    from fused_ddpm.step import prepared
    plan = prepared(c, x, m, t, z, None, None, "torch", history=history)
    ins = plan.streams(x, m, z, history)
    tt = plan.timesteps(t, x.shape[0])
    table = c.table64 if table is None else table
    thresh = None
    if c.config.thresholding:
        rows = table[tt]
        shape = (-1,) + (1,) * (x.dim() - 1)
        xr = rows[:, Col.U].reshape(shape) * x + rows[:, Col.W].reshape(shape) * ins[In.M]
        thresh = dynamic_threshold_scale(xr, c.config.dynamic_thresholding_ratio,
                                         c.config.sample_max_value)
    y, x0 = torch.empty_like(x), torch.empty_like(x)
    torch_backend.step_forward(ins, tt, None, table, thresh, None, [y, x0], plan.flags,
                               plan.scalars)
    return y, x0

CLIPS = [dict(), dict(clip_sample_range=0.8),
         dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=3.0)]
DDPM = [dict(method="ddpm", prediction_type=p, variance_type=v, **c)
        for p, v, c in itertools.product(PREDICTION_TYPES, VARIANCE_TYPES, CLIPS)]
DDIM = [dict(method="ddim", prediction_type=p, eta=e, use_clipped_model_output=u,
             set_alpha_to_one=a, variance_type=v, **c)
        for p, (e, u, a, v), c in itertools.product(
            PREDICTION_TYPES, [(0.0, False, True, "fixed_small"), (0.6, False, False, "learned"),
                               (1.0, True, True, "learned_log")], CLIPS)]
SCHEDULES = [dict(), dict(num_inference_steps=17, timestep_spacing="trailing"),
             dict(timesteps=[977, 500, 499, 31, 0])]


def _id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items())


@pytest.mark.parametrize("cfg", DDPM + DDIM, ids=_id)
@pytest.mark.parametrize("spacing", SCHEDULES, ids=_id)
def test_table_reproduces_reference(cfg, spacing):
    sched = fd.NoiseSchedule(beta_schedule="squaredcos_cap_v2")
    c = fd.step_coefficients(sched, **cfg, **spacing)
    g = torch.Generator().manual_seed(len(_id(cfg)) * 31 + len(c.timesteps))
    shape = (4, 3, 6, 5)
    x, m, z = random_inputs(c, shape, generator=g)
    ts = c.timesteps
    t = ts[torch.randint(len(ts), (shape[0],), generator=g)]
    t[0] = ts[-1]                               # the last step (t′ = the end) is always in
    want_y, want_x0 = fd.reference.ddpm_step(x, m, t, c, noise=z, return_x0=True)
    got_y, got_x0 = affine_step(x, m, z, t, c)
    scale = want_y.abs().max()
    assert float((got_y - want_y).abs().max() / scale) <= 1e-10
    assert float((got_x0 - want_x0).abs().max() / want_x0.abs().max()) <= 1e-10


STEP_METHODS = [dict(method=mt, prediction_type=p, **o, **c)
                for mt, o in (("dpmsolver++", {}), ("dpmsolver++", dict(solver_type="heun")),
                              ("dpmsolver++", dict(solver_order=1,
                                                   final_sigmas_type="sigma_min")),
                              ("sde-dpmsolver++", dict(euler_at_final=True)),
                              ("sde-dpmsolver++", dict(solver_type="heun",
                                                       lower_order_final=False,
                                                       final_sigmas_type="sigma_min")),
                              ("euler_ancestral", {}))
                for p, c in itertools.product(PREDICTION_TYPES, CLIPS)]
STEP_SCHEDULES = [dict(num_inference_steps=9), dict(num_inference_steps=16,
                                                    timestep_spacing="trailing"),
                  dict(timesteps=[977.5, 500, 31, 0.25], sigmas=[60.0, 3.0, 0.5, 0.1, 0.02])]


@pytest.mark.parametrize("cfg", STEP_METHODS, ids=_id)
@pytest.mark.parametrize("spacing", STEP_SCHEDULES, ids=_id)
def test_step_indexed_table_reproduces_reference(cfg, spacing):
    """Every row of a step-indexed table (t = 0 … n − 1 in one batch), with a history."""
    sched = fd.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    c = fd.step_coefficients(sched, **cfg, **spacing)
    n = c.num_rows
    g = torch.Generator().manual_seed(len(_id(cfg)) * 7 + n)
    shape = (n, 3, 4, 5)
    x, m, z = random_inputs(c, shape, generator=g)
    x = x * torch.linspace(1, 20, n, dtype=torch.float64).reshape(-1, 1, 1, 1)
    h = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.arange(n)
    want_y, want_x0 = fd.reference.ddpm_step(x, m, t, c, noise=z, return_x0=True, history=h)
    got_y, got_x0 = affine_step(x, m, z, t, c, history=h)
    err = (got_y - want_y).abs().amax(dim=(1, 2, 3)) / want_y.abs().amax(dim=(1, 2, 3))
    assert float(err.max()) <= 1e-10, err
    err0 = (got_x0 - want_x0).abs().amax(dim=(1, 2, 3)) / want_x0.abs().amax(dim=(1, 2, 3))
    assert float(err0.max()) <= 1e-10, err0


def test_solver_orders_follow_the_reference_rule():
    sched = fd.NoiseSchedule()
    from fused_ddpm.methods import solver_orders
    for n in (1, 2, 3, 14, 15, 16):
        for kw in itertools.product((1, 2), (True, False), (True, False), ("zero", "sigma_min")):
            c = fd.step_coefficients(sched, method="dpmsolver++", num_inference_steps=n,
                                     **dict(zip(("solver_order", "lower_order_final",
                                                 "euler_at_final", "final_sigmas_type"), kw)))
            want = [fd.reference.dpm_order(i, n, c.config) for i in range(n)]
            assert solver_orders(n, c.config).tolist() == want
            assert c.multistep == (2 in want)
            second = torch.tensor(want) == 2
            assert bool((c.table64[second, Col.H] != 0).all())
            assert bool((c.table64[~second, Col.H] == 0).all())


def test_step_indexed_precision_policies_agree():
    sched = fd.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for cfg in (dict(method="dpmsolver++"), dict(method="sde-dpmsolver++", solver_type="heun",
                                                 final_sigmas_type="sigma_min"),
                dict(method="euler_ancestral", prediction_type="v_prediction")):
        a = fd.step_coefficients(sched, num_inference_steps=20, **cfg)
        b = fd.step_coefficients(sched, num_inference_steps=20, precision="diffusers_float32",
                                 **cfg)
        scale = a.table64.abs().amax(dim=0).clamp(min=1e-30)
        err = (a.table64 - b.table64).abs().amax(dim=0) / scale
        assert float(err.max()) < 1e-5, cfg
        assert a.terms == b.terms


def test_step_indexed_coefficients_facts():
    sched = fd.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    c = fd.step_coefficients(sched, method="euler_ancestral", num_inference_steps=7)
    assert c.index_by == "step" and c.num_rows == 7 and c.rows.tolist() == list(range(7))
    assert c.timesteps.dtype == torch.float64              # linspace: fractional
    assert c.noise_stream == fd.contract.NoiseStream.STEP and c.prev_timesteps is None
    abar = sched.alphas_cumprod
    assert float(c.sigmas[0]) == pytest.approx(float(((1 - abar[-1]) / abar[-1]) ** 0.5))
    assert float(c.sigmas[-1]) == 0.0
    torch.testing.assert_close(c.input_scale, 1 / (c.sigmas[:-1] ** 2 + 1) ** 0.5)
    assert c.init_noise_sigma == pytest.approx(float(c.sigmas[0]))
    lead = fd.step_coefficients(sched, method="euler_ancestral", num_inference_steps=7,
                                timestep_spacing="leading")
    assert lead.timesteps.dtype == torch.int64
    assert lead.init_noise_sigma == pytest.approx((float(lead.sigmas[0]) ** 2 + 1) ** 0.5)
    d = fd.step_coefficients(sched, method="dpmsolver++", num_inference_steps=7)
    assert d.init_noise_sigma == 1.0 and bool((d.input_scale == 1).all())
    ddpm = fd.step_coefficients(sched, num_inference_steps=7)
    assert ddpm.index_by == "timestep" and ddpm.sigmas is None and not ddpm.multistep


def test_table_shape_device_and_p_zero_without_clip():
    c = fd.step_coefficients(fd.NoiseSchedule(num_train_timesteps=50))
    assert c.table.shape == (50, NUM_COLS) and c.table.dtype == torch.float32
    assert c.table64.dtype == torch.float64
    assert torch.equal(c.table, c.table64.float())
    assert torch.all(c.table64[:, Col.P] == 0)          # collapsed form when not clipping
    clipped = fd.step_coefficients(fd.NoiseSchedule(num_train_timesteps=50), clip_sample_range=1.)
    assert torch.all(clipped.table64[1:, Col.P] > 0)


@pytest.mark.parametrize("cfg", DDPM + DDIM, ids=_id)
def test_terms_mask_is_the_nonzero_columns(cfg):
    """TERMS has the bit of exactly the columns that are nonzero in some row."""
    c = fd.step_coefficients(fd.NoiseSchedule(num_train_timesteps=60), **cfg)
    for col in TERM_COLS:
        assert bool(c.terms >> int(col) & 1) == bool((c.table64[:, col] != 0).any()), col.name
    assert c.adds_noise == bool((c.table64[:, Col.S] != 0).any())
    assert not c.terms >> int(Col.E) & 1 and not c.terms >> int(Col.H) & 1
    if cfg["prediction_type"] == "sample":          # ε-free x̂0: U = 0 in every row
        assert not c.terms >> int(Col.U) & 1


@pytest.mark.parametrize("vt", ["learned", "learned_range", "learned_log"])
def test_learned_variance_columns(vt):
    """learned: σ = S·√v (S the t > 0 gate); learned_range: σ = exp(VA + VB·v) with
    VA = ¼(log β + log β̃), VB = ¼(log β − log β̃); learned_log: σ = exp(½ v)."""
    sched = fd.NoiseSchedule(num_train_timesteps=80)
    c = fd.step_coefficients(sched, variance_type=vt, num_inference_steps=20)
    cfg = c.config
    assert cfg.model_channels == 2 and cfg.learned_variance
    assert cfg.variance_mode == (Var.SQRT if vt == "learned" else Var.EXP)
    gate = (torch.arange(80) > 0).double()
    assert torch.equal(c.table64[:, Col.S], gate)
    rows = c.timesteps
    if vt == "learned_range":
        abar = sched.alphas_cumprod
        prev = c.prev_timesteps[rows]
        ab_p = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.ones(()))
        beta = 1 - abar[rows] / ab_p
        bt = (beta * (1 - ab_p) / (1 - abar[rows])).clamp(min=1e-20)
        torch.testing.assert_close(c.table64[rows, Col.VA], 0.25 * (beta.log() + bt.log()))
        torch.testing.assert_close(c.table64[rows, Col.VB], 0.25 * (beta.log() - bt.log()))
    elif vt == "learned_log":
        assert torch.equal(c.table64[:, Col.VA], torch.zeros(80, dtype=torch.float64))
        assert torch.equal(c.table64[:, Col.VB], torch.full((80,), 0.5, dtype=torch.float64))


def test_ddim_ignores_variance_half_and_ddpm_reads_it():
    c = fd.step_coefficients(fd.NoiseSchedule(num_train_timesteps=50), method="ddim",
                             variance_type="learned_range")
    assert c.config.model_channels == 2 and c.config.variance_mode == Var.FIXED


def test_add_noise_rows():
    """x_t = √ᾱ x0 + √(1−ᾱ) z in Y (Q, S); the target in X0 (U, E) per prediction type."""
    sched = fd.NoiseSchedule(num_train_timesteps=40)
    sa, sb = sched.alphas_cumprod.sqrt(), (1 - sched.alphas_cumprod).sqrt()
    want = {"epsilon": (0, 1), "sample": (1, 0), "v_prediction": (-sb, sa)}
    for pred, (u, e) in want.items():
        c = fd.add_noise_coefficients(sched, pred)
        t = c.table64
        torch.testing.assert_close(t[:, Col.Q], sa)
        torch.testing.assert_close(t[:, Col.S], sb)
        torch.testing.assert_close(t[:, Col.U], torch.as_tensor(u, dtype=torch.float64).expand(40))
        torch.testing.assert_close(t[:, Col.E], torch.as_tensor(e, dtype=torch.float64).expand(40))
        for col in (Col.W, Col.P, Col.R, Col.H):
            assert not bool(t[:, col].any())


def test_registry_entries_are_complete():
    """Every method names its accepted variance types from the registry."""
    for name, m in METHODS.items():
        assert set(m.variance_types) <= set(VARIANCE_TYPES), name
    assert set(VARIANCE_TYPES) >= {"fixed_small", "fixed_small_log", "fixed_large", "learned",
                                   "learned_range", "learned_log"}


def test_diffusers_precision_is_the_same_builder():
    """precision="diffusers_float32" is a policy of the same builder: close to float64
    (float32 roundings of the same algebra), not a second table."""
    sched = fd.NoiseSchedule()
    for cfg in (dict(), dict(clip_sample_range=1.0), dict(variance_type="learned_range"),
                dict(method="ddim", eta=0.4)):
        a = fd.step_coefficients(sched, num_inference_steps=50, **cfg)
        b = fd.step_coefficients(sched, num_inference_steps=50, precision="diffusers_float32",
                                 **cfg)
        rows = a.timesteps[:-1]             # β̃ at the last step cancels in float32
        scale = a.table64[rows].abs().amax(dim=0).clamp(min=1e-30)
        err = (a.table64[rows] - b.table64[rows]).abs().amax(dim=0) / scale
        assert float(err.max()) < 1e-4, cfg
        assert a.terms == b.terms and b.precision == "diffusers_float32"


def test_wrong_coefficient_is_caught():
    """The comparison above is sharp: perturbing one coefficient by 1e-6 fails it."""
    # DDIM, v-prediction, clipped, η > 0: u, w, p, q, r, σ are all nonzero.
    c = fd.step_coefficients(fd.NoiseSchedule(), method="ddim", prediction_type="v_prediction",
                             eta=0.5, clip_sample_range=2.0)
    x, m, z = random_inputs(c, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 10])
    cols = (Col.U, Col.W, Col.P, Col.Q, Col.R, Col.S)
    assert all(bool(torch.all(c.table64[t, col] != 0)) for col in cols)
    want = fd.reference.ddpm_step(x, m, t, c, noise=z)
    for col in cols:
        table = c.table64.clone()
        table[:, col] *= 1 + 1e-6
        got, _ = affine_step(x, m, z, t, c, table=table)
        assert float((got - want).abs().max() / want.abs().max()) > 1e-10, col


def test_rows_outside_schedule_step_to_next_lower():
    c = fd.step_coefficients(fd.NoiseSchedule(), timesteps=[900, 500, 0])
    assert c.prev_timesteps[900].item() == 500
    assert c.prev_timesteps[700].item() == 500
    assert c.prev_timesteps[500].item() == 0
    assert c.prev_timesteps[0].item() == -1


def test_zero_snr_epsilon_rejected_v_prediction_ok():
    s = fd.NoiseSchedule(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="v_prediction"):
        fd.step_coefficients(s, num_inference_steps=10, timestep_spacing="trailing")
    c = fd.step_coefficients(s, prediction_type="v_prediction", num_inference_steps=10,
                             timestep_spacing="trailing")
    assert torch.isfinite(c.table64[c.timesteps]).all()


def test_coefficients_move_once_per_device():
    c = fd.step_coefficients(fd.NoiseSchedule())
    a = c.table_on("cpu", torch.float16)
    assert a is c.table_on("cpu", torch.float16) and a.dtype == torch.float16
    assert c.table_on("cpu") is c.table and c.table_on("cpu", torch.float64) is c.table64
    assert c.row_index(7, torch.device("cpu")).item() == 7
    assert c.row_index(7, torch.device("cpu")).untyped_storage().data_ptr() == \
        c.row_index(9, torch.device("cpu")).untyped_storage().data_ptr()     # one cached tensor
    moved = c.to("cpu")
    assert moved is not c and torch.equal(moved.table64, c.table64)


def test_one_constructor_whose_invariants_hold():
    """StepCoefficients is built one way; its table is always the builder's float64 table,
    the device table its float32 rounding, the timesteps a real descending schedule."""
    sched = fd.NoiseSchedule(num_train_timesteps=30)
    c = fd.coefficients.StepCoefficients(sched, fd.StepConfig(), torch.tensor([20, 10, 0]))
    assert c.table64.shape == (30, NUM_COLS) and c.table64.dtype == torch.float64
    assert torch.equal(c.table, c.table64.float())
    assert c.prev_timesteps[20].item() == 10 and c.prev_timesteps[5].item() == 0
    assert torch.equal(c.rows, c.timesteps) and c.index_by == "timestep"
    for bad in ([10, 20], [30, 0], [], [5, -1]):
        with pytest.raises(ValueError, match="timesteps"):
            fd.coefficients.StepCoefficients(sched, fd.StepConfig(), torch.tensor(bad))
    with pytest.raises(TypeError, match="config"):
        fd.coefficients.StepCoefficients(sched, {"method": "ddpm"}, torch.tensor([5]))
    gap = fd.coefficients.StepCoefficients(sched, fd.StepConfig(method="ddim"),
                                           torch.tensor([25, 15, 5]), step_gap=10)
    assert gap.prev_timesteps[25].item() == 15 and gap.prev_timesteps[7].item() == -1


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="euler"), "method"),
    (dict(prediction_type="eps"), "prediction_type"),
    (dict(variance_type="fixed_large_log"), "variance_type"),
    (dict(variance_type="learned_lognormal"), "variance_type"),
    (dict(clip_sample_range=0.0), "clip_sample_range"),
    (dict(clip_sample_range=-1.0), "clip_sample_range"),
    (dict(thresholding=True, dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio"),
    (dict(thresholding=True, sample_max_value=0.5), "sample_max_value"),
    (dict(method="ddim", eta=-0.1), "eta"),
    (dict(timesteps=[10, 20]), "descending"),
    (dict(timestep_spacing="even", num_inference_steps=5), "timestep_spacing"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fd.step_coefficients(fd.NoiseSchedule(), **kwargs)


def test_schedule_type_error():
    with pytest.raises(TypeError, match="schedule"):
        fd.step_coefficients("linear")
