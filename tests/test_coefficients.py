"""The coefficient table, applied as the kernels apply it, reproduces the reference."""
import itertools

import pytest
import torch

import fused_ddpm as fd
from fused_ddpm.coefficients import COL_P, PREDICTION_TYPES, VARIANCE_TYPES

from helpers import affine_step, random_inputs

CLIPS = [dict(), dict(clip_sample_range=0.8),
         dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=3.0)]
DDPM = [dict(method="ddpm", prediction_type=p, variance_type=v, **c)
        for p, v, c in itertools.product(PREDICTION_TYPES, VARIANCE_TYPES, CLIPS)]
DDIM = [dict(method="ddim", prediction_type=p, eta=e, use_clipped_model_output=u,
             set_alpha_to_one=a, **c)
        for p, (e, u, a), c in itertools.product(
            PREDICTION_TYPES, [(0.0, False, True), (0.6, False, False), (1.0, True, True)], CLIPS)]
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


def test_table_shape_device_and_p_zero_without_clip():
    c = fd.step_coefficients(fd.NoiseSchedule(num_train_timesteps=50))
    assert c.table.shape == (50, 8) and c.table.dtype == torch.float32
    assert c.table64.dtype == torch.float64
    assert torch.equal(c.table, c.table64.float())
    assert torch.all(c.table64[:, COL_P] == 0)          # collapsed form when not clipping
    clipped = fd.step_coefficients(fd.NoiseSchedule(num_train_timesteps=50), clip_sample_range=1.)
    assert torch.all(clipped.table64[1:, COL_P] > 0)


def test_wrong_coefficient_is_caught():
    """The comparison above is sharp: perturbing one coefficient by 1e-6 fails it."""
    # DDIM, v-prediction, clipped, η > 0: u, w, p, q, r, σ are all nonzero.
    c = fd.step_coefficients(fd.NoiseSchedule(), method="ddim", prediction_type="v_prediction",
                             eta=0.5, clip_sample_range=2.0)
    x, m, z = random_inputs(c, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 10])
    assert torch.all(c.table64[t, :6] != 0)
    want = fd.reference.ddpm_step(x, m, t, c, noise=z)
    for col in range(6):
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


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="euler"), "method"),
    (dict(prediction_type="eps"), "prediction_type"),
    (dict(variance_type="fixed_large_log"), "variance_type"),
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
