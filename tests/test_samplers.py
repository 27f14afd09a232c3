"""The #14 samplers through the public API on every backend here: DPM-Solver++ (2M, SDE) and
Euler-ancestral loops vs the float64 reference loop, classifier-free guidance (and its
rescale) vs the unfused formula and the reference, noise determinism, parity with
diffusers' schedulers, and bad input. Single steps of every config of the registry on every
backend, dtype and layout are in the contract suite (tests/test_kernels.py)."""
import math

import pytest
import torch

import fused_ddpm as fd
from fused_ddpm.guidance import rescale_factors

from helpers import random_inputs

SCHED = fd.NoiseSchedule(1000, "scaled_linear", beta_start=0.00085, beta_end=0.012)
NEW = ("dpmsolver++", "sde-dpmsolver++", "euler_ancestral")
#: (method, options) of the loop tests: every solver option of item 1 and both of item 2
LOOPS = [("dpmsolver++", {}), ("dpmsolver++", dict(solver_type="heun")),
         ("dpmsolver++", dict(solver_order=1, prediction_type="v_prediction")),
         ("dpmsolver++", dict(final_sigmas_type="sigma_min", lower_order_final=False,
                              prediction_type="sample", thresholding=True,
                              dynamic_thresholding_ratio=0.9, sample_max_value=1.5)),
         ("dpmsolver++", dict(euler_at_final=True, final_sigmas_type="sigma_min",
                              clip_sample_range=2.0)),
         ("sde-dpmsolver++", {}), ("sde-dpmsolver++", dict(solver_type="heun",
                                                           prediction_type="v_prediction")),
         ("euler_ancestral", {}), ("euler_ancestral", dict(prediction_type="v_prediction")),
         ("euler_ancestral", dict(prediction_type="sample", timestep_spacing="leading"))]


def _loop_id(p):
    return p[0] + "".join(f"-{k}={v}" for k, v in p[1].items())


def _model(i: int, x: torch.Tensor) -> torch.Tensor:
    """A fixed, x-dependent stand-in for a network (float64 math): the loop stays on the
    trajectory it produces, so errors of earlier steps show up in later ones."""
    g = torch.Generator().manual_seed(100 + i)
    w = torch.randn(x.shape[1:], generator=g, dtype=torch.float64)
    return (torch.tanh(x.double() * 0.3 + w) * 0.8).to(x.dtype)


def _run_loop(coeffs, x, step, seeds=None, noise=None):
    """The sampling loop of API_14 with ``step`` (fd.ddpm_step or fd.reference.ddpm_step)."""
    h = None
    for i in range(coeffs.num_rows):
        m = _model(i, x * float(coeffs.input_scale[i]))
        kw = {}
        if coeffs.adds_noise:
            kw = dict(seeds=seeds) if seeds is not None else dict(noise=noise[i])
        x, h = step(x, m, i, coeffs, return_x0=True, history=h, **kw)
    return x


@pytest.mark.parametrize("case", LOOPS, ids=_loop_id)
def test_loop_matches_reference_loop(backend, case):
    method, opts = case
    n = 7 if backend.name == "triton" else 13
    c = fd.step_coefficients(SCHED, method=method, num_inference_steps=n, **opts)
    g = torch.Generator().manual_seed(len(_loop_id(case)))
    shape = (2, 3, 5, 4) if backend.name == "triton" else (3, 2, 7, 5)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * c.init_noise_sigma
    noise = torch.randn((n,) + shape, generator=g, dtype=torch.float64)
    want = _run_loop(c, x, fd.reference.ddpm_step, noise=noise)
    dtypes = [d for d in (torch.float64, torch.float32) if d in backend.dtypes]
    for dtype in dtypes:
        got = _run_loop(c, x.to(dtype).to(backend.device),
                        lambda *a, **k: fd.ddpm_step(*a, backend=backend.name, **k),
                        noise=noise.to(dtype).to(backend.device))
        tol = 1e-10 if dtype == torch.float64 else 2e-4
        err = float((got.double().cpu() - want).abs().max())
        assert err <= tol * float(want.abs().max()), f"{dtype}: err {err:.3g}"


def test_a_wrong_coefficient_is_caught():
    """The loop comparison sees a perturbed H (multistep) or S (noise) column."""
    n, shape = 9, (2, 2, 4, 4)
    for method, col in (("dpmsolver++", fd.contract.Col.H), ("sde-dpmsolver++", fd.contract.Col.S),
                        ("euler_ancestral", fd.contract.Col.R)):
        c = fd.step_coefficients(SCHED, method=method, num_inference_steps=n)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(shape, generator=g, dtype=torch.float64) * c.init_noise_sigma
        noise = torch.randn((n,) + shape, generator=g, dtype=torch.float64)
        want = _run_loop(c, x, fd.reference.ddpm_step, noise=noise)
        good = _run_loop(c, x, lambda *a, **k: fd.ddpm_step(*a, backend="torch", **k),
                         noise=noise)
        assert float((good - want).abs().max()) <= 1e-10 * float(want.abs().max())
        c.table64[3, col] *= 1.001
        bad = _run_loop(c, x, lambda *a, **k: fd.ddpm_step(*a, backend="torch", **k),
                        noise=noise)
        assert float((bad - want).abs().max()) > 1e-6 * float(want.abs().max()), method


def test_dpm_first_order_is_ddim():
    """DPM-Solver++ of order 1 is DDIM (η = 0) on the same timesteps (Lu et al. 2022)."""
    n = 10
    dpm = fd.step_coefficients(SCHED, method="dpmsolver++", num_inference_steps=n,
                               solver_order=1)
    ddim = fd.step_coefficients(SCHED, method="ddim", timesteps=dpm.timesteps.tolist())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    for i, t in enumerate(dpm.timesteps.tolist()):
        m = _model(i, x)
        y_dpm = fd.ddpm_step(x, m, i, dpm, backend="torch")
        y_ddim = fd.ddpm_step(x, m, t, ddim, backend="torch")
        torch.testing.assert_close(y_dpm, y_ddim, rtol=1e-9, atol=1e-9)
        x = y_ddim


@pytest.mark.parametrize("method", ["sde-dpmsolver++", "euler_ancestral"])
def test_in_kernel_noise_same_on_every_backend(backend, method):
    """Same seeds → the reference's Philox noise (stream STEP, counter word = step), and a
    different step position → different noise."""
    c = fd.step_coefficients(SCHED, method=method, num_inference_steps=8)
    g = torch.Generator().manual_seed(11)
    x, m, _ = random_inputs(c, (3, 2, 6, 5), generator=g)
    h = torch.randn_like(x)
    seeds = torch.tensor([7, -3, 2 ** 45 + 1])
    t = torch.tensor([1, 4, 6])
    y = fd.ddpm_step(x.float().to(backend.device), m.float().to(backend.device),
                     t.to(backend.device), c, seeds=seeds.to(backend.device),
                     history=h.float().to(backend.device), backend=backend.name)
    want = fd.reference.ddpm_step(x, m, t, c, seeds=seeds, history=h)
    noiseless = fd.reference.ddpm_step(x, m, t, c, noise=torch.zeros_like(x), history=h)
    assert float((want - noiseless).abs().max()) > 1e-2                  # noise is there
    torch.testing.assert_close(y.double().cpu(), want, rtol=1e-5, atol=1e-5)
    y2 = fd.ddpm_step(x.float().to(backend.device), m.float().to(backend.device),
                      t.to(backend.device), c, seeds=seeds.to(backend.device),
                      history=h.float().to(backend.device), backend=backend.name)
    assert torch.equal(y, y2)
    other = fd.ddpm_step(x.float().to(backend.device), m.float().to(backend.device),
                         (t - 1).to(backend.device), c, seeds=seeds.to(backend.device),
                         history=h.float().to(backend.device), backend=backend.name)
    want_other = fd.reference.ddpm_step(x, m, t - 1, c, seeds=seeds, history=h)
    torch.testing.assert_close(other.double().cpu(), want_other, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- guidance
GUIDED = [dict(method="ddpm"), dict(method="ddpm", variance_type="learned_range"),
          dict(method="ddim", eta=0.5, num_inference_steps=20),
          dict(method="dpmsolver++", num_inference_steps=10),
          dict(method="sde-dpmsolver++", num_inference_steps=10, thresholding=True),
          dict(method="euler_ancestral", num_inference_steps=10,
               prediction_type="v_prediction")]


def _guided_inputs(c, shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x, mu, z = random_inputs(c, shape, generator=g)
    _, mc, _ = random_inputs(c, shape, generator=g)
    mc = mc * 1.3 + 0.2
    h = torch.randn(shape, generator=g, dtype=torch.float64)
    t = c.rows[torch.randint(len(c.rows), (shape[0],), generator=g)]
    return [a.to(dtype) for a in (x, mu, mc, z, h)] + [t]


@pytest.mark.parametrize("cfg", GUIDED, ids=lambda c: "-".join(map(str, c.values())))
def test_guidance_matches_unfused_formula(backend, cfg):
    c = fd.step_coefficients(SCHED, **cfg)
    dt = torch.float64 if torch.float64 in backend.dtypes else torch.float32
    shape = (2, 3, 4, 5) if backend.name == "triton" else (3, 2, 6, 7)
    x, mu, mc, z, h, t = _guided_inputs(c, shape, seed=len(str(cfg)), dtype=dt)
    dev = backend.device
    x, mu, mc, z, h, t = (a.to(dev) for a in (x, mu, mc, z, h, t))
    C = shape[1]
    g = 4.5
    # the unfused formula: m = m_u + g (m_c − m_u); a learned variance from the conditional half
    m = mu[:, :C] + g * (mc[:, :C] - mu[:, :C])
    if c.config.learned_variance:
        m = torch.cat([m, mc[:, C:]], dim=1)
    kw = dict(noise=z, history=h, return_x0=True, backend=backend.name)
    want_y, want_x0 = fd.ddpm_step(x, m, t, c, **kw)
    tol = dict(rtol=1e-9, atol=1e-9) if dt == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for mo in (torch.cat([mu, mc]), (mu, mc)):
        y, x0 = fd.ddpm_step(x, mo, t, c, guidance_scale=g, **kw)
        torch.testing.assert_close(y, want_y, **tol)
        torch.testing.assert_close(x0, want_x0, **tol)
    ref_y = fd.reference.ddpm_step(x.cpu(), torch.cat([mu, mc]).cpu(), t.cpu(), c,
                                   noise=z.cpu(), history=h.cpu(), guidance_scale=g)
    torch.testing.assert_close(y.double().cpu(), ref_y.double(), rtol=1e-4, atol=1e-4)
    # g = 1 is the conditional step exactly
    y1 = fd.ddpm_step(x, (mu, mc), t, c, guidance_scale=1.0, **kw)[0]
    assert torch.equal(y1, fd.ddpm_step(x, mc, t, c, **kw)[0])


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale(backend, phi):
    c = fd.step_coefficients(SCHED, method="dpmsolver++", num_inference_steps=10,
                             thresholding=phi == 0.7)
    dt = torch.float64 if torch.float64 in backend.dtypes else torch.float32
    x, mu, mc, z, h, t = _guided_inputs(c, (3, 2, 5, 6), seed=int(phi * 10), dtype=dt)
    dev = backend.device
    y, x0 = fd.ddpm_step(x.to(dev), (mu.to(dev), mc.to(dev)), t.to(dev), c, history=h.to(dev),
                         guidance_scale=6.0, guidance_rescale=phi, return_x0=True,
                         backend=backend.name)
    want_y, want_x0 = fd.reference.ddpm_step(x.double(), (mu.double(), mc.double()), t, c,
                                             history=h.double(), guidance_scale=6.0,
                                             guidance_rescale=phi, return_x0=True)
    torch.testing.assert_close(y.double().cpu(), want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0.double().cpu(), want_x0, rtol=1e-4, atol=1e-4)
    unscaled = fd.reference.ddpm_step(x.double(), (mu.double(), mc.double()), t, c,
                                      history=h.double(), guidance_scale=6.0)
    if phi:
        assert float((unscaled - want_y).abs().max()) > 1e-2     # the rescale is visible


def test_rescale_factors_against_the_reference():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    mc = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2 + 0.5
    for gs, phi in ((7.5, 0.7), (1.0, 1.0), (3.0, 0.0), (0.0, 0.3)):
        m_cfg = mu + gs * (mc - mu)
        k = rescale_factors(mu, mc, gs, phi).double().reshape(-1, 1, 1, 1)
        want = fd.reference.rescale_guidance(m_cfg, mc, phi)
        torch.testing.assert_close(k * m_cfg, want, rtol=1e-6, atol=1e-6)
        k32 = rescale_factors(mu.float(), mc.float(), gs, phi)
        assert k32.dtype == torch.float32
        torch.testing.assert_close(k32.double().reshape(-1, 1, 1, 1), k, rtol=1e-5, atol=0)


def test_guided_gradients_reach_both_halves(backend):
    c = fd.step_coefficients(SCHED, method="ddpm", variance_type="learned", num_inference_steps=20)
    dt = torch.float64 if torch.float64 in backend.dtypes else torch.float32
    x, mu, mc, z, h, t = _guided_inputs(c, (2, 2, 3, 4), seed=9, dtype=dt)
    dev = backend.device
    mo = torch.cat([mu, mc]).to(dev).requires_grad_()
    xx = x.to(dev).clone().requires_grad_()
    y = fd.ddpm_step(xx, mo, t.to(dev), c, noise=z.to(dev), guidance_scale=3.0,
                     backend=backend.name)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    mo64 = torch.cat([mu, mc]).double().requires_grad_()
    x64 = x.double().clone().requires_grad_()
    y64 = fd.reference.ddpm_step(x64, mo64, t, c, noise=z.double(), guidance_scale=3.0)
    (y64 * gy.double().cpu()).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mo.grad.double().cpu(), mo64.grad, **tol)
    torch.testing.assert_close(xx.grad.double().cpu(), x64.grad, **tol)
    C = x.shape[1]
    assert float(mo64.grad[:2, :C].abs().max()) > 0 and float(mo64.grad[2:, :C].abs().max()) > 0
    assert float(mo64.grad[:2, C:].abs().max()) == 0          # uncond variance unused
    # the autograd.Function form, with a history (gradient reaches it too)
    d = fd.step_coefficients(SCHED, method="dpmsolver++", num_inference_steps=10)
    hh = h.to(dev).clone().requires_grad_()
    mo2 = torch.cat([mu, mc])[:, :C].to(dev).requires_grad_()
    y2 = fd.DDPMStepFunction.apply(x.to(dev), mo2, torch.tensor([3, 5]).to(dev), d, None, None,
                                   backend.name, hh, 2.0, 0.0)
    y2.sum().backward()
    h64 = h.double().clone().requires_grad_()
    mo264 = torch.cat([mu, mc])[:, :C].double().requires_grad_()
    fd.reference.ddpm_step(x.double(), mo264, torch.tensor([3, 5]), d, history=h64,
                           guidance_scale=2.0).sum().backward()
    torch.testing.assert_close(hh.grad.double().cpu(), h64.grad, **tol)
    torch.testing.assert_close(mo2.grad.double().cpu(), mo264.grad, **tol)


# ----------------------------------------------------------------------------- history
def test_history_rules():
    c = fd.step_coefficients(SCHED, method="dpmsolver++", num_inference_steps=6)
    assert c.multistep and c.index_by == "step" and c.num_rows == 6
    x = torch.randn(2, 2, 3, 3)
    m = torch.randn(2, 2, 3, 3)
    y0 = fd.ddpm_step(x, m, 0, c, backend="torch")            # row 0: no history needed
    assert torch.equal(y0, fd.ddpm_step(x, m, 0, c, history=torch.zeros_like(x),
                                        backend="torch"))
    with pytest.raises(ValueError, match="history is needed"):
        fd.ddpm_step(x, m, 2, c, backend="torch")
    with pytest.raises(ValueError, match="history is needed"):
        fd.ddpm_step(x, m, torch.tensor([0, 2]), c, backend="torch")
    first = fd.step_coefficients(SCHED, method="dpmsolver++", num_inference_steps=6,
                                 solver_order=1)
    assert not first.multistep             # a history it does not read is ignored
    torch.testing.assert_close(fd.ddpm_step(x, m, 3, first, history=torch.randn_like(x)),
                               fd.ddpm_step(x, m, 3, first))


# ----------------------------------------------------------------------------- diffusers
diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("kw", [dict(), dict(solver_type="heun"), dict(solver_order=1),
                                dict(algorithm_type="sde-dpmsolver++"),
                                dict(algorithm_type="sde-dpmsolver++", solver_type="heun",
                                     final_sigmas_type="sigma_min"),
                                dict(prediction_type="v_prediction", timestep_spacing="leading"),
                                dict(prediction_type="sample", thresholding=True,
                                     timestep_spacing="trailing"),
                                dict(euler_at_final=True, final_sigmas_type="sigma_min",
                                     lower_order_final=False)], ids=str)
def test_dpmsolver_loop_matches_diffusers(kw):
    _diffusers_loop("dpm", kw, n=12)


@pytest.mark.parametrize("kw", [dict(), dict(prediction_type="v_prediction"),
                                dict(timestep_spacing="leading"),
                                dict(timestep_spacing="trailing")], ids=str)
def test_euler_ancestral_loop_matches_diffusers(kw):
    _diffusers_loop("euler", kw, n=10)


def _diffusers_loop(kind: str, kw: dict, n: int) -> None:
    sched_kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if kind == "euler":
        stock = diffusers.EulerAncestralDiscreteScheduler(**sched_kw, **kw)
        method = "euler_ancestral"
    else:
        stock = diffusers.DPMSolverMultistepScheduler(**sched_kw, **kw)
        method = kw.get("algorithm_type", "dpmsolver++")
    stock.set_timesteps(n)
    opts = {k: v for k, v in kw.items() if k != "algorithm_type"}
    # the table from diffusers' own timesteps and sigmas, in its float32 arithmetic
    c = fd.step_coefficients(SCHED, method=method, timesteps=stock.timesteps,
                             sigmas=stock.sigmas, precision="diffusers_float32", **opts)
    # ... and the one this library builds itself agrees on timesteps and sigmas
    own = fd.step_coefficients(SCHED, method=method, num_inference_steps=n, **opts)
    assert torch.equal(torch.as_tensor(own.timesteps).double(), stock.timesteps.double())
    torch.testing.assert_close(own.sigmas.float(), stock.sigmas, rtol=1e-4, atol=0)
    assert math.isclose(own.init_noise_sigma, float(stock.init_noise_sigma), rel_tol=1e-4)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, 8, 8, generator=g) * float(stock.init_noise_sigma)
    mine, h = x.clone(), None
    for i, t in enumerate(stock.timesteps):
        if kind == "euler":
            m = _model(i, stock.scale_model_input(x, t))
            torch.testing.assert_close(stock.scale_model_input(x, t),
                                       x * float(c.input_scale[i]), rtol=1e-6, atol=0)
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
            x = stock.step(m, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        else:
            m = _model(i, x)
            z = torch.randn(x.shape, generator=g)
            x = stock.step(m, t, x, variance_noise=z).prev_sample
        mine, h = fd.ddpm_step(mine, m, i, c, history=h, return_x0=True,
                               noise=z if c.adds_noise else None)
        torch.testing.assert_close(mine, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    c = fd.step_coefficients(SCHED, method="dpmsolver++", num_inference_steps=5)
    x = torch.randn(2, 3, 4, 4)
    m = torch.randn(2, 3, 4, 4)
    bad = [
        (TypeError, "guidance_scale", dict(guidance_scale="7")),
        (ValueError, "guidance_scale", dict(guidance_scale=math.inf)),
        (ValueError, "guidance_rescale must be in", dict(guidance_scale=2.0,
                                                         guidance_rescale=1.5)),
        (ValueError, "guidance_rescale needs", dict(guidance_rescale=0.5)),
        (ValueError, r"model_output must have shape \[4", dict(guidance_scale=2.0)),
        (ValueError, "history must match", dict(history=torch.randn(2, 3, 4))),
        (TypeError, "history must be", dict(history=[1.0])),
    ]
    for exc, msg, kw in bad:
        with pytest.raises(exc, match=msg):
            fd.ddpm_step(x, m, 0, c, **kw)
    with pytest.raises(TypeError, match="pair needs guidance_scale"):
        fd.ddpm_step(x, (m, m), 0, c)
    with pytest.raises(ValueError, match=r"model_output\[1\] must have shape"):
        fd.ddpm_step(x, (m, m[:1]), 0, c, guidance_scale=2.0)
    with pytest.raises(ValueError, match="out of range"):
        fd.ddpm_step(x, m, 5, c)                      # 5 steps: rows 0 … 4
    for kw, msg in [(dict(solver_order=3), "solver_order"),
                    (dict(solver_type="bh2"), "solver_type"),
                    (dict(final_sigmas_type="one"), "final_sigmas_type"),
                    (dict(step_gap=2), "step_gap"),
                    (dict(sigmas=[3.0, 1.0]), "needs timesteps|either"),
                    (dict(num_inference_steps=None, timesteps=[900, 500],
                          sigmas=[3.0, 4.0, 0.0]), "strictly decreasing"),
                    (dict(num_inference_steps=None, timesteps=[900, 500],
                          sigmas=[3.0, 0.0]), "n \\+ 1"),
                    (dict(num_inference_steps=None), "needs num_inference_steps")]:
        args = dict(method="dpmsolver++", num_inference_steps=5)
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            fd.step_coefficients(SCHED, **args)
    for method, kw in [("ddpm", dict(solver_order=1)), ("euler_ancestral",
                                                       dict(solver_type="heun")),
                       ("euler_ancestral", dict(final_sigmas_type="sigma_min")),
                       ("ddpm", dict(sigmas=[1.0, 0.0])), ("dpmsolver++", dict(eta=0.5))]:
        with pytest.raises(ValueError, match="does not apply"):
            fd.step_coefficients(SCHED, method=method, num_inference_steps=5, **kw)


# ----------------------------------------------------------------------------- analytic
@pytest.mark.parametrize("method, n", [("ddpm", 100), ("ddim", 50), ("dpmsolver++", 25),
                                       ("sde-dpmsolver++", 40), ("euler_ancestral", 60)])
def test_guided_sampler_draws_the_guided_gaussian(method, n):
    """Data x0 ~ N(μ, I) given the condition, N(0, I) without: the exact noise predictions
    are ε_c = √(1−ᾱ)(x − √ᾱ μ) and ε_u = √(1−ᾱ)·x, so the guided one is the exact ε of
    N(g·μ, I) at every noise level; a whole guided loop must end there (statistically)."""
    sched = fd.NoiseSchedule()
    c = fd.step_coefficients(sched, method=method, num_inference_steps=n)
    B, mu, g = 20000, 0.8, 2.5
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, 1, 1, generator=gen, dtype=torch.float64) * c.init_noise_sigma
    h = None
    for i in range(len(c.timesteps)):
        if c.sigmas is not None:
            abar = 1 / (1 + float(c.sigmas[i]) ** 2)
            t = i
        else:
            t = int(c.timesteps[i])
            abar = float(sched.alphas_cumprod[t])
        xin = x * float(c.input_scale[i])
        eps_u = (1 - abar) ** 0.5 * xin
        eps_c = (1 - abar) ** 0.5 * (xin - abar ** 0.5 * mu)
        z = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x, h = fd.ddpm_step(x, (eps_u, eps_c), t, c, noise=z, history=h, return_x0=True,
                            guidance_scale=g, backend="torch")
    assert abs(float(x.mean()) - g * mu) < 0.05, float(x.mean())
    assert abs(float(x.std()) - 1.0) < 0.1, float(x.std())
