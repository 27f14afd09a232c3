"""The reference step vs the closed forms of the derivation and vs diffusers (float64)."""
import itertools

import pytest
import torch

import fused_ddpm as fd
from fused_ddpm.coefficients import PREDICTION_TYPES, VARIANCE_TYPES
from fused_ddpm.schedule import BETA_SCHEDULES

from helpers import random_inputs

diffusers = pytest.importorskip("diffusers")
SHAPE = (3, 2, 5, 7)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# ------------------------------------------------------------------ closed forms (seed derivation)
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("n", [None, 37])
def test_epsilon_mean_is_seed_formula(beta_schedule, n):
    sched = fd.NoiseSchedule(beta_schedule=beta_schedule)
    c = fd.step_coefficients(sched, num_inference_steps=n)
    g = torch.Generator().manual_seed(1)
    x, eps, _ = random_inputs(c, SHAPE, generator=g)
    ts = c.timesteps
    t = ts[torch.randint(len(ts), (SHAPE[0],), generator=g)]
    mean = fd.reference.ddpm_step(x, eps, t, c, noise=torch.zeros_like(x))
    abar = sched.alphas_cumprod
    prev = c.prev_timesteps[t]
    ab_t = abar[t].reshape(-1, 1, 1, 1)
    ab_p = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.ones(())).reshape(-1, 1, 1, 1)
    alpha = ab_t / ab_p
    # μ = (1/√α_t)(x_t − (1−α_t)/√(1−ᾱ_t) ε)
    seed = (x - (1 - alpha) / (1 - ab_t).sqrt() * eps) / alpha.sqrt()
    # μ = μ̃(x_t, x̂0) with x̂0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t
    x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    posterior = ab_p.sqrt() * (1 - alpha) / (1 - ab_t) * x0 + alpha.sqrt() * (1 - ab_p) / (1 - ab_t) * x
    assert _rel(mean, seed) <= 1e-10
    assert _rel(mean, posterior) <= 1e-10


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
@pytest.mark.parametrize("n", [None, 25])
def test_parameterizations_agree(method, n):
    sched = fd.NoiseSchedule()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    eps = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    eta = dict(eta=0.5) if method == "ddim" else {}     # eta is an error with DDPM
    base = fd.step_coefficients(sched, method=method, num_inference_steps=n, **eta)
    t = base.timesteps[torch.randint(len(base.timesteps), (SHAPE[0],), generator=g)]
    ab = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    preds = {"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}
    z = torch.zeros_like(x_t)
    means = {}
    for p, m in preds.items():
        c = fd.step_coefficients(sched, method=method, prediction_type=p, num_inference_steps=n,
                                 **eta)
        means[p], x0_hat = fd.reference.ddpm_step(x_t, m, t, c, noise=z, return_x0=True)
        assert _rel(x0_hat, x0) <= 1e-10
    assert _rel(means["sample"], means["epsilon"]) <= 1e-10
    assert _rel(means["v_prediction"], means["epsilon"]) <= 1e-10


# ------------------------------------------------------------------ diffusers, float64 tables
def _stock_ddpm(sched, **kw):
    d = diffusers.DDPMScheduler(num_train_timesteps=sched.num_train_timesteps, **kw)
    d.betas = sched.betas.clone()
    d.alphas = 1 - sched.betas
    d.alphas_cumprod = sched.alphas_cumprod.clone()
    d.one = torch.tensor(1.0, dtype=torch.float64)
    return d


def _stock_ddim(sched, set_alpha_to_one, **kw):
    d = diffusers.DDIMScheduler(num_train_timesteps=sched.num_train_timesteps,
                                set_alpha_to_one=set_alpha_to_one, **kw)
    d.alphas_cumprod = sched.alphas_cumprod.clone()
    d.final_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one
                             else sched.alphas_cumprod[0].clone())
    return d


def _clip_kwargs(mode):
    if mode == "none":
        return dict(clip_sample=False), dict()
    if mode == "clip":
        return dict(clip_sample=True, clip_sample_range=1.3), dict(clip_sample_range=1.3)
    return (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5),
            dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5))


def _learned_ok(m, C, variance_type):
    if variance_type == "learned":
        m[:, C:] = m[:, C:].abs() + 0.05
    elif variance_type == "learned_range":
        m[:, C:] = m[:, C:].clamp(-1, 1)
    return m


# the registry's types that stock diffusers has too (learned_log is improved-diffusion's)
DIFFUSERS_PREDICTIONS = [p for p in PREDICTION_TYPES if p in ("epsilon", "sample",
                                                               "v_prediction")]
DIFFUSERS_VARIANCES = [v for v in VARIANCE_TYPES if v in (
    "fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")]
DDPM_GRID = list(itertools.product(DIFFUSERS_PREDICTIONS, DIFFUSERS_VARIANCES,
                                   ["none", "clip", "threshold"]))


@pytest.mark.parametrize("prediction_type, variance_type, clip", DDPM_GRID)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddpm_matches_diffusers(prediction_type, variance_type, clip, beta_schedule):
    sched = fd.NoiseSchedule(beta_schedule=beta_schedule)
    dkw, okw = _clip_kwargs(clip)
    d = _stock_ddpm(sched, prediction_type=prediction_type, variance_type=variance_type, **dkw)
    c = fd.step_coefficients(sched, prediction_type=prediction_type, variance_type=variance_type,
                             **okw)
    g = torch.Generator().manual_seed(hash((prediction_type, variance_type, clip)) % 2 ** 31)
    for t in (999, 500, 0):
        x, m, _ = random_inputs(c, SHAPE, generator=g)
        m = _learned_ok(m, SHAPE[1], variance_type)
        z = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        want = d.step(m, t, x, generator=torch.Generator().manual_seed(t))
        got, x0 = fd.reference.ddpm_step(x, m, t, c, noise=z, return_x0=True)
        assert _rel(got, want.prev_sample) <= 1e-9, t
        assert _rel(x0, want.pred_original_sample) <= 1e-9, t


@pytest.mark.parametrize("spacing, n, offset", [("leading", 10, 0), ("leading", 7, 1),
                                                ("trailing", 10, 0), ("trailing", 7, 0),
                                                ("linspace", 13, 0), ("custom", None, 0)])
@pytest.mark.parametrize("prediction_type", DIFFUSERS_PREDICTIONS)
def test_ddpm_respaced_matches_diffusers(spacing, n, offset, prediction_type):
    sched = fd.NoiseSchedule()
    if spacing == "custom":
        ts = [901, 650, 420, 419, 100, 3, 0]
        c = fd.step_coefficients(sched, prediction_type=prediction_type, timesteps=ts)
    else:
        c = fd.step_coefficients(sched, prediction_type=prediction_type, num_inference_steps=n,
                                 timestep_spacing=spacing, steps_offset=offset)
    # diffusers steps to t − T//n for spaced schedules; its custom-timesteps mode steps to the
    # next listed timestep — which is what a step does here for every spacing.
    d = _stock_ddpm(sched, prediction_type=prediction_type, variance_type="fixed_small",
                    clip_sample=False)
    d.set_timesteps(timesteps=c.timesteps.tolist())
    g = torch.Generator().manual_seed(5)
    ts = c.timesteps.tolist()
    for t in (ts[0], ts[len(ts) // 2], ts[-1]):
        x, m, _ = random_inputs(c, SHAPE, generator=g)
        z = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        want = d.step(m, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert _rel(fd.reference.ddpm_step(x, m, t, c, noise=z), want) <= 1e-9


@pytest.mark.parametrize("prediction_type", DIFFUSERS_PREDICTIONS)
@pytest.mark.parametrize("clip", ["none", "clip", "threshold"])
@pytest.mark.parametrize("eta, use_clipped", [(0.0, False), (0.7, False), (1.0, True)])
@pytest.mark.parametrize("spacing, offset, set_alpha_to_one", [("leading", 1, True),
                                                               ("trailing", 0, False)])
def test_ddim_matches_diffusers(prediction_type, clip, eta, use_clipped, spacing, offset,
                                set_alpha_to_one):
    sched = fd.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    dkw, okw = _clip_kwargs(clip)
    d = _stock_ddim(sched, set_alpha_to_one, prediction_type=prediction_type,
                    timestep_spacing=spacing, steps_offset=offset, **dkw)
    d.set_timesteps(20)
    c = fd.step_coefficients(sched, method="ddim", prediction_type=prediction_type,
                             num_inference_steps=20, timestep_spacing=spacing,
                             steps_offset=offset, eta=eta, use_clipped_model_output=use_clipped,
                             set_alpha_to_one=set_alpha_to_one, **okw)
    assert c.timesteps.tolist() == d.timesteps.tolist()
    g = torch.Generator().manual_seed(11)
    ts = c.timesteps.tolist()
    for t in (ts[0], ts[len(ts) // 2], ts[-1]):
        x, m, z = random_inputs(c, SHAPE, generator=g)
        want = d.step(m, t, x, eta=eta, use_clipped_model_output=use_clipped, variance_noise=z)
        got, x0 = fd.reference.ddpm_step(x, m, t, c, noise=z, return_x0=True)
        assert _rel(got, want.prev_sample) <= 1e-9, t
        assert _rel(x0, want.pred_original_sample) <= 1e-9, t


def test_ddim_linspace_follows_the_schedule():
    """diffusers' DDIM steps to t − T//n, which is not the next timestep for `linspace`
    spacing (diffusers issue 11347). Here a step goes to the next scheduled timestep: with
    n = 10 over T = 1000 the schedule is 999, 888, …, 0 (gaps of 111), which diffusers
    reproduces when told the gap is 111 (num_inference_steps = 1000 // 111 = 9)."""
    sched = fd.NoiseSchedule()
    c = fd.step_coefficients(sched, method="ddim", num_inference_steps=10,
                             timestep_spacing="linspace", eta=0.3)
    assert c.timesteps.tolist() == list(range(999, -1, -111))
    d = _stock_ddim(sched, True, timestep_spacing="linspace", clip_sample=False)
    d.set_timesteps(10)
    d.num_inference_steps = 9
    g = torch.Generator().manual_seed(3)
    for t in (999, 444, 0):
        x, m, z = random_inputs(c, SHAPE, generator=g)
        want = d.step(m, t, x, eta=0.3, variance_noise=z).prev_sample
        assert _rel(fd.reference.ddpm_step(x, m, t, c, noise=z), want) <= 1e-9


def test_per_sample_timesteps_equal_separate_steps():
    sched = fd.NoiseSchedule()
    c = fd.step_coefficients(sched, variance_type="fixed_large", clip_sample_range=1.0)
    g = torch.Generator().manual_seed(4)
    x, m, z = random_inputs(c, SHAPE, generator=g)
    t = torch.tensor([999, 0, 321])
    y = fd.reference.ddpm_step(x, m, t, c, noise=z)
    for b in range(3):
        yb = fd.reference.ddpm_step(x[b:b + 1], m[b:b + 1], int(t[b]), c, noise=z[b:b + 1])
        assert torch.equal(y[b:b + 1], yb)


def test_generator_noise_reproducible():
    c = fd.step_coefficients(fd.NoiseSchedule())
    x = torch.randn(SHAPE, dtype=torch.float64)
    m = torch.randn(SHAPE, dtype=torch.float64)
    a = fd.reference.ddpm_step(x, m, 500, c, generator=torch.Generator().manual_seed(9))
    b = fd.reference.ddpm_step(x, m, 500, c, generator=torch.Generator().manual_seed(9))
    d = fd.reference.ddpm_step(x, m, 500, c, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, d)


# ------------------------------------------------------------------ learned_log, float64 math
@pytest.mark.parametrize("clip", ["none", "clip"])
def test_learned_log_is_learned_in_log_space(clip):
    """improved-diffusion's LEARNED output holds log σ²; diffusers' "learned" holds σ²: the
    same σ from v = σ² and from v = log σ²."""
    sched = fd.NoiseSchedule()
    okw = _clip_kwargs(clip)[1]
    lin = fd.step_coefficients(sched, variance_type="learned", num_inference_steps=30, **okw)
    log = fd.step_coefficients(sched, variance_type="learned_log", num_inference_steps=30, **okw)
    g = torch.Generator().manual_seed(8)
    x, m, z = random_inputs(lin, SHAPE, generator=g)
    t = lin.timesteps[torch.randint(30, (SHAPE[0],), generator=g)]
    t[0] = 0
    m_log = m.clone()
    m_log[:, SHAPE[1]:] = m[:, SHAPE[1]:].log()
    a = fd.reference.ddpm_step(x, m, t, lin, noise=z)
    b = fd.reference.ddpm_step(x, m_log, t, log, noise=z)
    assert _rel(a, b) <= 1e-12
    # and the formula: σ = exp(½ v) for t > 0
    mean = fd.reference.ddpm_step(x, m_log, t, log, noise=torch.zeros_like(z))
    sigma = torch.exp(0.5 * m_log[:, SHAPE[1]:]) * (t > 0).double().reshape(-1, 1, 1, 1)
    assert _rel(b, mean + sigma * z) <= 1e-12


def test_float32_inputs_are_computed_in_float64():
    """The oracle computes in float64 whatever the input dtype (1 − ᾱ_t would cancel in
    float32 near t = 0): float32 inputs give the float64 result rounded once. The case
    5000 hypothesis examples found: ddpm, epsilon, learned, [4, 4, 6, 6], external noise."""
    sched = fd.NoiseSchedule(num_train_timesteps=200, beta_schedule="scaled_linear",
                             beta_start=0.00085, beta_end=0.012)
    c = fd.step_coefficients(sched, variance_type="learned")
    g = torch.Generator().manual_seed(0)
    x, m, z = random_inputs(c, (4, 4, 6, 6), generator=g)
    t = torch.tensor([1, 0, 2, 150])
    x32, m32, z32 = x.float(), m.float(), z.float()
    y32, x0_32 = fd.reference.ddpm_step(x32, m32, t, c, noise=z32, return_x0=True)
    y64, x0_64 = fd.reference.ddpm_step(x32.double(), m32.double(), t, c, noise=z32.double(),
                                        return_x0=True)
    assert y32.dtype == torch.float32
    assert torch.equal(y32, y64.float()) and torch.equal(x0_32, x0_64.float())


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_add_noise_formula(prediction_type):
    """x_t = √ᾱ x0 + √(1−ᾱ) ε, and the target converts back: the prediction type's own x̂0
    of (x_t, target) is x0 (so a perfect model would be exact)."""
    sched = fd.NoiseSchedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    eps = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    t = torch.tensor([999, 0, 400])
    x_t, target = fd.reference.add_noise(x0, t, sched, noise=eps, prediction_type=prediction_type)
    ab = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert _rel(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps) <= 1e-14
    c = fd.step_coefficients(sched, prediction_type=prediction_type)
    _, x0_hat = fd.reference.ddpm_step(x_t, target, t, c, noise=eps, return_x0=True)
    assert _rel(x0_hat, x0) <= 1e-9


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.995, 1.0])
def test_production_threshold_scale_matches_the_oracles(n, ratio):
    """fused_ddpm.thresholding (k-th values) vs the reference's own quantile (a sort and an
    interpolation) vs torch.quantile; NaN in a sample makes its scale NaN in all three."""
    from fused_ddpm.thresholding import threshold_scale
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=g, dtype=torch.float64) * 3
    x[1] = x[1].abs() * 0.1                        # below 1: clamped up to 1
    if n > 1:
        x[3, n // 2] = float("nan")
    want = fd.reference.dynamic_threshold_scale(x, ratio, 2.5)
    q = torch.quantile(x.abs(), ratio, dim=1).clamp(1.0, 2.5)
    for dtype in (torch.float64, torch.float32):
        got = threshold_scale(x.to(dtype), ratio, 2.5)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(want, q, rtol=1e-12, atol=0, equal_nan=True)
    assert bool(torch.isnan(want[3])) == (n > 1) and float(want[1]) == 1.0


# ------------------------------------------------------------------ #14: sigma-based samplers
def _sigma_loop(stock, coeffs, n, seed):
    """diffusers' loop and the reference's on the same inputs (external noise); returns
    the largest relative difference of x over the steps, and of the x̂0 state."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float32) * float(stock.init_noise_sigma)
    mine, h, worst = x.double(), None, 0.0
    for i, t in enumerate(stock.timesteps):
        m = torch.randn(SHAPE, generator=g, dtype=torch.float32)
        z = torch.randn(SHAPE, generator=g, dtype=torch.float32)
        if type(stock).__name__.startswith("Euler"):
            stock.scale_model_input(x, t)
            out = stock.step(m, t, x, generator=torch.Generator().manual_seed(i))
            z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
            x0_stock = out.pred_original_sample
        else:
            out = stock.step(m, t, x, variance_noise=z)
            x0_stock = stock.model_outputs[-1]
        mine, h = fd.reference.ddpm_step(mine, m.double(), i, coeffs, noise=z.double(),
                                         history=h, return_x0=True)
        x = out.prev_sample
        worst = max(worst, _rel(mine, x.double()), _rel(h, x0_stock.double()))
        mine = x.double()         # follow diffusers' trajectory: compare steps, not drift
    return worst


DPM_GRID = [dict(), dict(solver_type="heun"), dict(solver_order=1),
            dict(algorithm_type="sde-dpmsolver++"),
            dict(algorithm_type="sde-dpmsolver++", solver_type="heun"),
            dict(final_sigmas_type="sigma_min", lower_order_final=False),
            dict(euler_at_final=True, final_sigmas_type="sigma_min"),
            dict(prediction_type="v_prediction", timestep_spacing="trailing"),
            dict(prediction_type="sample", thresholding=True, sample_max_value=2.0,
                 timestep_spacing="leading"),
            dict(use_karras_sigmas=True)]


@pytest.mark.parametrize("kw", DPM_GRID, ids=str)
@pytest.mark.parametrize("n", [8, 20])
def test_dpmsolver_matches_diffusers(kw, n):
    """The reference's DPM-Solver++ (log-sigma form) vs diffusers' DPMSolverMultistepScheduler
    (its λ form), step by step, with diffusers' own timesteps and sigmas."""
    sched = fd.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    stock = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear",
                                                  beta_start=0.00085, beta_end=0.012, **kw)
    stock.set_timesteps(n)
    opts = {k: v for k, v in kw.items() if k not in ("algorithm_type", "use_karras_sigmas")}
    c = fd.step_coefficients(sched, method=kw.get("algorithm_type", "dpmsolver++"),
                             timesteps=stock.timesteps, sigmas=stock.sigmas, **opts)
    assert _sigma_loop(stock, c, n, seed=n) <= 2e-5


@pytest.mark.parametrize("kw", [dict(), dict(prediction_type="v_prediction"),
                                dict(timestep_spacing="leading"),
                                dict(timestep_spacing="trailing")], ids=str)
def test_euler_ancestral_matches_diffusers(kw):
    sched = fd.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    stock = diffusers.EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear",
                                                      beta_start=0.00085, beta_end=0.012, **kw)
    stock.set_timesteps(12)
    opts = {k: v for k, v in kw.items()}
    c = fd.step_coefficients(sched, method="euler_ancestral", timesteps=stock.timesteps,
                             sigmas=stock.sigmas, **opts)
    assert _sigma_loop(stock, c, 12, seed=3) <= 2e-5


def test_guided_reference_is_the_guidance_formula():
    """The reference's guidance is m_u + g·(m_c − m_u), rescaled by Lin et al.'s rule: equal
    to the unguided reference on that m (and the variance half from the conditional one)."""
    sched = fd.NoiseSchedule()
    c = fd.step_coefficients(sched, variance_type="learned_range", num_inference_steps=20)
    g = torch.Generator().manual_seed(4)
    x, mu, z = random_inputs(c, SHAPE, generator=g)
    _, mc, _ = random_inputs(c, SHAPE, generator=g)
    C = SHAPE[1]
    t = c.timesteps[:SHAPE[0]]
    m = mu[:, :C] + 5.0 * (mc[:, :C] - mu[:, :C])
    dims = (1, 2, 3)
    std_c = mc[:, :C].std(dim=dims, keepdim=True)
    rescaled = m * std_c / m.std(dim=dims, keepdim=True)
    m = 0.6 * rescaled + 0.4 * m
    want = fd.reference.ddpm_step(x, torch.cat([m, mc[:, C:]], dim=1), t, c, noise=z)
    got = fd.reference.ddpm_step(x, torch.cat([mu, mc]), t, c, noise=z, guidance_scale=5.0,
                                 guidance_rescale=0.6)
    assert _rel(got, want) <= 1e-12
