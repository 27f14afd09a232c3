"""fused_ddpm.sample: noise rule, reproducibility, trajectory, CUDA graphs, and an end-to-end
check that sampling with the exact optimal predictor of a Gaussian mixture reproduces the
mixture's moments.
"""

import pytest
import torch

import fused_ddpm as fd
from fused_ddpm.backends import resolve
from fused_ddpm.demo import GaussianMixture, sample_stats
from fused_ddpm.philox import philox_normal
from fused_ddpm.sampler import clear_graph_cache, initial_noise, sample

from helpers import tiny_unet

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("one_thread")


SCHED = fd.NoiseSchedule(1000, "linear")


def toy_model(x, t):
    """Per-sample, cheap, deterministic: a fixed function of x and t."""
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) / 1000
    return 0.7 * x * (1 - 0.5 * tt) + 0.1 * torch.sin(x)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_initial_noise_is_philox_at_counter_T(backend):
    seeds = torch.tensor([3, -7, 2 ** 40 + 5], dtype=torch.int64)
    x = initial_noise(seeds, (3, 2, 5, 3), 1000, backend=backend)
    ref = philox_normal(seeds, torch.full((3,), 1000), (3, 2, 5, 3))
    assert torch.allclose(x, ref, atol=1e-6, rtol=0)


def test_sample_reproducible_and_batch_independent():
    coeffs = fd.step_coefficients(SCHED, num_inference_steps=20)
    seeds = torch.tensor([5, 6, 7], dtype=torch.int64)
    a = sample(toy_model, (3, 2, 4, 4), coeffs, seeds=seeds, progress=False)
    b = sample(toy_model, (3, 2, 4, 4), coeffs, seeds=seeds, progress=False)
    assert torch.equal(a, b)
    one = sample(toy_model, (1, 2, 4, 4), coeffs, seeds=torch.tensor([6]), progress=False)
    assert torch.allclose(one[0], a[1], atol=1e-6, rtol=0)
    c = sample(toy_model, (3, 2, 4, 4), coeffs, seeds=seeds + 1, progress=False)
    assert not torch.allclose(a, c)
    torch.manual_seed(1)
    d = sample(toy_model, (3, 2, 4, 4), coeffs, seeds=None, progress=False)
    torch.manual_seed(1)
    e = sample(toy_model, (3, 2, 4, 4), coeffs, progress=False)
    assert torch.equal(d, e)


#: (method, options) the loop is checked with: every step method, several options
LOOP_CASES = [
    ("ddpm", dict(prediction_type="v_prediction", clip_sample_range=2.0)),
    ("ddim", dict(prediction_type="v_prediction", clip_sample_range=2.0, eta=0.5)),
    ("dpmsolver++", dict(solver_type="midpoint")),
    ("dpmsolver++", dict(solver_type="heun", prediction_type="v_prediction")),
    ("sde-dpmsolver++", dict(prediction_type="sample")),
    ("euler_ancestral", dict(prediction_type="epsilon")),
]


def test_loop_cases_cover_every_method():
    assert {m for m, _ in LOOP_CASES} == set(fd.coefficients.STEP_METHODS)


def reference_loop(model, coeffs, seeds, shape, cond=None, uncond=None, g=None, phi=0.0):
    """The sampler written out with the float64 reference step: x_T, the model call of
    every step (scaled input, the model's timestep, guidance formed here from the two
    halves, with diffusers' rescale formula), and the previous step's x̂0 as history."""
    B = shape[0]
    x = philox_normal(seeds, torch.full((B,), coeffs.num_train_timesteps), shape)
    x = x.double() * coeffs.init_noise_sigma
    h = None
    for i in range(coeffs.timesteps.numel()):
        x_in = x * float(coeffs.input_scale[i])
        t_model = coeffs.timesteps[i].expand(B)
        if g is None:
            m = model(x_in, t_model) if cond is None else model(x_in, t_model, cond)
        else:
            m_u, m_c = model(x_in, t_model, uncond), model(x_in, t_model, cond)
            m = m_u + g * (m_c - m_u)
            if phi:
                dims = list(range(1, m.dim()))
                m = phi * m * (m_c.std(dim=dims, keepdim=True) / m.std(dim=dims, keepdim=True)) \
                    + (1 - phi) * m
        row = torch.full((B,), int(coeffs.rows[i]), dtype=torch.int64)
        x, h = fd.reference.ddpm_step(x, m, row, coeffs, seeds=seeds, return_x0=True,
                                      history=h)
    return x


@pytest.mark.parametrize("method,options", LOOP_CASES)
def test_sample_equals_reference_loop(method, options):
    coeffs = fd.step_coefficients(SCHED, method=method, num_inference_steps=12,
                                  timestep_spacing="trailing", **options)
    seeds = torch.tensor([11, 12, 13], dtype=torch.int64)
    shape = (3, 3, 4, 5)
    x = reference_loop(toy_model, coeffs, seeds, shape)
    got, traj = sample(toy_model, shape, coeffs, seeds=seeds, progress=False,
                       return_trajectory=True)
    torch.testing.assert_close(got.double(), x, atol=2e-5, rtol=2e-5)
    assert traj.shape == (13,) + shape
    assert torch.equal(traj[-1], got)
    x_T = philox_normal(seeds, torch.full((3,), 1000), shape) * coeffs.init_noise_sigma
    torch.testing.assert_close(traj[0], x_T, atol=1e-5, rtol=1e-6)
    # a sample's trajectory is its own (the multistep state too): alone = in the batch
    one = sample(toy_model, (1,) + shape[1:], coeffs, seeds=seeds[1:2], progress=False)
    torch.testing.assert_close(one[0], got[1], atol=1e-6, rtol=0)
    # the first steps alone (what a CUDA graph's warm-up runs) are the trajectory's start
    from fused_ddpm.sampler import _Guidance, _plan, _run_loop
    plan = _plan(coeffs, torch.device("cpu"), torch.float32, 3, guided=False)
    bufs = (torch.empty(shape), torch.empty(shape))
    part = _run_loop(toy_model, coeffs, plan, _Guidance(None, None, 0.0), seeds, bufs,
                     "auto", None, None, False, steps=2)
    torch.testing.assert_close(part, traj[2], atol=1e-6, rtol=0)


def cond_model(x, t, c):
    """A conditional toy model: c (float [B]) shifts and scales the output."""
    cc = c.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return toy_model(x, t) * (1 + 0.3 * cc) + 0.2 * cc * torch.cos(x)


GUIDED_CASES = [("ddpm", 3.0, 0.0), ("ddim", 2.0, 0.7), ("dpmsolver++", 4.0, 0.5),
                ("sde-dpmsolver++", 2.5, 0.0), ("euler_ancestral", 3.0, 1.0)]


@pytest.mark.parametrize("method,g,phi", GUIDED_CASES)
def test_guided_sample_equals_reference_loop(method, g, phi):
    """fd.sample calls the model once per step on the doubled batch [uncond; cond] and the
    step forms the guided (and rescaled) prediction: the loop with guidance formed outside
    the reference step gives the same samples."""
    coeffs = fd.step_coefficients(SCHED, method=method, num_inference_steps=8)
    seeds = torch.tensor([5, 6, 7, 8], dtype=torch.int64)
    shape = (4, 2, 3, 5)
    c = torch.tensor([1.0, -0.5, 2.0, 0.25])
    u = torch.zeros(4)
    calls = []

    def model(x, t, cond):
        calls.append((x.shape[0], t.shape[0], cond.clone()))
        return cond_model(x, t, cond)

    got = sample(model, shape, coeffs, seeds=seeds, cond=c, uncond=u, guidance_scale=g,
                 guidance_rescale=phi, progress=False)
    assert len(calls) == 8 and all(n == 8 and nt == 8 for n, nt, _ in calls)
    assert torch.equal(calls[0][2], torch.cat([u, c]))
    ref = reference_loop(cond_model, coeffs, seeds, shape, c, u, g, phi)
    torch.testing.assert_close(got.double(), ref, atol=5e-5, rtol=5e-5)
    plain = sample(cond_model, shape, coeffs, seeds=seeds, cond=c, progress=False)
    assert (got - plain).abs().max() > 1e-3          # guidance changed the samples


def test_guidance_scale_one_is_the_conditional_sampler():
    coeffs = fd.step_coefficients(SCHED, method="dpmsolver++", num_inference_steps=6)
    c, u = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
    a = sample(cond_model, (2, 3, 4), coeffs, seeds=3, cond=c, progress=False)
    b = sample(cond_model, (2, 3, 4), coeffs, seeds=3, cond=c, uncond=u, guidance_scale=1.0,
               progress=False)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


class _Output:
    def __init__(self, sample):
        self.sample = sample


@pytest.mark.parametrize("wrap", [lambda m: _Output(m), lambda m: (m,), lambda m: [m, None]])
def test_model_output_kinds(wrap):
    coeffs = fd.step_coefficients(SCHED, num_inference_steps=4)
    ref = sample(toy_model, (2, 1, 3), coeffs, seeds=1, progress=False)
    got = sample(lambda x, t: wrap(toy_model(x, t)), (2, 1, 3), coeffs, seeds=1,
                 progress=False)
    assert torch.equal(got, ref)


def test_diffusers_unet_is_a_model_as_it_is():
    unet = tiny_unet(1, num_class_embeds=4)
    labels, null = torch.tensor([0, 2]), torch.tensor([3, 3])
    for method in ("ddim", "euler_ancestral"):
        coeffs = fd.step_coefficients(SCHED, method=method, num_inference_steps=3)
        got = sample(unet, (2, 1, 8, 8), coeffs, seeds=4, cond=labels, progress=False)
        ref = sample(lambda x, t, c: unet(x, t, class_labels=c).sample, (2, 1, 8, 8), coeffs,
                     seeds=4, cond=labels, progress=False)
        assert torch.equal(got, ref)
        guided = sample(unet, (2, 1, 8, 8), coeffs, seeds=4, cond=labels, uncond=null,
                        guidance_scale=2.0, progress=False)
        assert guided.shape == (2, 1, 8, 8) and torch.isfinite(guided).all()


def test_bad_models_and_guidance_arguments():
    coeffs = fd.step_coefficients(SCHED, num_inference_steps=3)
    c = torch.tensor([1.0, 2.0])
    shape = (2, 1, 3)
    with pytest.raises(TypeError, match=r"\.sample"):
        sample(lambda x, t: {"sample": x}, shape, coeffs, seeds=0, progress=False)
    with pytest.raises(TypeError, match="callable"):
        sample("unet", shape, coeffs, seeds=0)
    with pytest.raises(ValueError, match="batch of 1"):
        sample(lambda x, t: x[:1], shape, coeffs, seeds=0, progress=False)
    cases = [
        (dict(guidance_scale=2.0), ValueError, "uncond"),
        (dict(cond=c, guidance_scale=2.0), ValueError, "uncond"),
        (dict(cond=c, uncond=c), ValueError, "guidance_scale"),
        (dict(cond=c, guidance_rescale=0.5), ValueError, "guidance_rescale needs"),
        (dict(cond=c, uncond=c, guidance_scale=2.0, guidance_rescale=1.5), ValueError,
         r"\[0, 1\]"),
        (dict(cond=c, uncond=c, guidance_scale="2"), TypeError, "guidance_scale"),
        (dict(cond=c, uncond=c, guidance_scale=float("nan")), ValueError, "finite"),
        (dict(cond=torch.ones(3)), ValueError, "B=2"),
        (dict(cond=[1, 2]), TypeError, "cond must be a torch.Tensor"),
        (dict(cond=c, uncond=torch.ones(2, 1), guidance_scale=2.0), ValueError, "same shape"),
    ]
    for kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            sample(cond_model, shape, coeffs, seeds=0, progress=False, **kwargs)


def test_graph_cache_key_holds_what_a_graph_bakes_in():
    """A captured graph bakes in the guidance options and the conditioning's shape: each
    gives its own cache entry (replays only copy seeds, conditioning and x_T)."""
    from fused_ddpm.sampler import _graph_key, _guidance
    coeffs = fd.step_coefficients(SCHED, num_inference_steps=3)
    dev = torch.device("cpu")
    c = torch.ones(2)

    def key(**kw):
        g = _guidance(2, dev, kw.get("cond"), kw.get("uncond"), kw.get("g"),
                      kw.get("phi", 0.0))
        return _graph_key(toy_model, (2, 1, 3), coeffs, g, dev, torch.float32, False, "auto",
                          False)
    keys = [key(), key(cond=c), key(cond=torch.ones(2, 4)), key(cond=c, uncond=c, g=2.0),
            key(cond=c, uncond=c, g=3.0), key(cond=c, uncond=c, g=3.0, phi=0.5)]
    assert len(set(keys)) == len(keys)
    assert key(cond=c) == key(cond=torch.zeros(2))       # new values: the same graph


def test_sample_x_T_dtype_and_errors():
    coeffs = fd.step_coefficients(SCHED, num_inference_steps=5)
    x_T = torch.zeros(2, 1, 3)
    y = sample(toy_model, (2, 1, 3), coeffs, seeds=0, x_T=x_T, progress=False)
    assert y.shape == (2, 1, 3)
    y64 = sample(toy_model, (2, 1, 3), coeffs, seeds=0, dtype=torch.float64, progress=False)
    assert y64.dtype == torch.float64
    with pytest.raises(ValueError, match="cuda_graph"):
        sample(toy_model, (2, 1, 3), coeffs, seeds=0, cuda_graph=True)
    with pytest.raises(ValueError, match="x_T"):
        sample(toy_model, (2, 1, 3), coeffs, seeds=0, x_T=torch.zeros(3, 1, 3))
    with pytest.raises(TypeError):
        sample(toy_model, (2, 1, 3), "coeffs")


# ----------------------------------------------------------------------------- mixture
N_SAMPLES = 3000
Z = 5.0     # standard errors allowed: P(|N(0,1)| > 5) = 5.7e-7 per check


def tolerances(gm: GaussianMixture, n: int):
    """Standard errors of the sample mean, the sample covariance and the mode weights for n
    independent draws from the mixture.

    mean_j: SE = √(Σ_jj / n). Covariance entry (i, j): the sample covariance is (up to
    O(1/n)) the mean of Y = (x_i − μ_i)(x_j − μ_j), so SE = √(Var[Y] / n); Var[Y] (a fourth
    moment of the mixture) is evaluated on 400 000 exact draws. Mode weight k: binomial,
    SE = √(π_k (1 − π_k) / n). A sampler with the exact optimal predictor only adds the
    discretisation bias of 100 steps, which must stay well inside Z = 5 standard errors.
    """
    ref = gm.draw(400_000, torch.Generator().manual_seed(0))
    c = ref - gm.mean
    Y = c[:, :, None] * c[:, None, :]
    return ((gm.cov.diagonal() / n).sqrt(), (Y.var(0) / n).sqrt(),
            (gm.weights * (1 - gm.weights) / n).sqrt())


CASES = [(m, p) for m in ("ddpm", "ddim") for p in ("epsilon", "sample", "v_prediction")]


@pytest.mark.parametrize("method,prediction_type", CASES)
def test_mixture_moments(method, prediction_type):
    gm = GaussianMixture.default()
    spacing = "leading" if prediction_type == "epsilon" else "trailing"
    coeffs = fd.step_coefficients(SCHED, method=method, prediction_type=prediction_type,
                                  num_inference_steps=100, timestep_spacing=spacing,
                                  eta=1.0 if (method == "ddim" and prediction_type == "sample")
                                  else 0.0)
    seeds = torch.arange(N_SAMPLES, dtype=torch.int64) * 7919 + 1
    x = sample(gm.model(coeffs), (N_SAMPLES, gm.D), coeffs, seeds=seeds, progress=False)
    st = sample_stats(x, gm)
    se_mean, se_cov, se_w = tolerances(gm, N_SAMPLES)
    z_mean = ((st["mean"] - gm.mean).abs() / se_mean).max().item()
    z_cov = ((st["cov"] - gm.cov).abs() / se_cov).max().item()
    z_w = ((st["weights"] - gm.weights).abs() / se_w).max().item()
    assert z_mean <= Z and z_cov <= Z and z_w <= Z, (z_mean, z_cov, z_w)


def test_mixture_predictor_is_consistent():
    """x_t = √ᾱ x̂0 + √(1−ᾱ) ε̂, and ε̂ matches a Monte-Carlo E[ε | x_t] near a mode."""
    gm = GaussianMixture.default()
    x = torch.randn(64, 2, dtype=torch.float64)
    abar = torch.full((64,), 0.3, dtype=torch.float64)
    eps, x0 = gm.predict(x, abar)
    assert torch.allclose(x, 0.3 ** 0.5 * x0 + 0.7 ** 0.5 * eps, atol=1e-12)
    # wrong prediction type conversions would break this: v → x0 round trip
    coeffs = fd.step_coefficients(SCHED, prediction_type="v_prediction")
    t = torch.full((64,), 500, dtype=torch.int64)
    v = gm.model(coeffs)(x.float(), t).double()
    a = SCHED.alphas_cumprod[500]
    eps5, x05 = gm.predict(x.float(), torch.full((64,), float(a)))
    assert torch.allclose(a.sqrt() * x - (1 - a).sqrt() * v, x05, atol=1e-5)


# ----------------------------------------------------------------------------- CUDA graphs
#: (method, guidance scale, rescale): the plain DDPM loop and the multistep / ancestral
#: loops with guidance (doubled model batch, state in device buffers)
GPU_CASES = [("ddpm", None, 0.0), ("dpmsolver++", 3.0, 0.5), ("sde-dpmsolver++", 2.0, 0.0),
             ("euler_ancestral", 2.0, 0.0)]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("method,g,phi", GPU_CASES)
def test_cuda_graph_matches_eager_and_fresh_noise(method, g, phi):
    dev = torch.device("cuda")
    if resolve("auto", dev, torch.float32) == "torch":
        pytest.skip("no GPU kernel backend built")
    clear_graph_cache()
    coeffs = fd.step_coefficients(SCHED, method=method, num_inference_steps=25, device=dev)
    lin = torch.nn.Conv2d(3, 3, 3, padding=1).to(dev)

    def model(x, t, c):
        return lin(x) * (1 - t.float().reshape(-1, 1, 1, 1) / 2000) + \
            0.1 * c.reshape(-1, 1, 1, 1)

    shape = (4, 3, 8, 8)
    s1 = torch.tensor([1, 2, 3, 4], device=dev)
    s2 = torch.tensor([9, 8, 7, 6], device=dev)
    c1 = torch.tensor([1.0, 2.0, -1.0, 0.5], device=dev)
    c2 = torch.tensor([0.0, -2.0, 1.0, 3.0], device=dev)
    guide = dict(uncond=torch.zeros(4, device=dev), guidance_scale=g,
                 guidance_rescale=phi) if g is not None else {}
    with torch.no_grad():
        eager1 = sample(model, shape, coeffs, seeds=s1, cond=c1, progress=False, **guide)
        eager2 = sample(model, shape, coeffs, seeds=s2, cond=c2, progress=False, **guide)
        g1 = sample(model, shape, coeffs, seeds=s1, cond=c1, cuda_graph=True, **guide)
        # replay with new seeds and conditioning
        g2 = sample(model, shape, coeffs, seeds=s2, cond=c2, cuda_graph=True, **guide)
        g1b, traj = sample(model, shape, coeffs, seeds=s1, cond=c1, cuda_graph=True,
                           return_trajectory=True, **guide)
    torch.testing.assert_close(g1, eager1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g2, eager2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(g1, g2)
    torch.testing.assert_close(g1b, g1, atol=0, rtol=0)
    assert traj.shape == (26,) + shape
    from fused_ddpm import sampler as smp
    assert len(smp._GRAPHS) == 2
    clear_graph_cache()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("method,g,phi", GPU_CASES)
def test_cuda_eager_sample_has_no_host_sync(method, g, phi):
    dev = torch.device("cuda")
    if resolve("auto", dev, torch.float32) == "torch":
        pytest.skip("no GPU kernel backend built")
    coeffs = fd.step_coefficients(SCHED, method=method, num_inference_steps=10, device=dev)
    seeds = torch.arange(4, device=dev)
    c = torch.arange(4, device=dev, dtype=torch.float32)
    guide = dict(uncond=torch.zeros(4, device=dev), guidance_scale=g,
                 guidance_rescale=phi) if g is not None else {}
    sample(cond_model, (4, 2, 8), coeffs, seeds=seeds, cond=c, progress=False, **guide)
    torch.cuda.synchronize()                                          # caches warm
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = sample(cond_model, (4, 2, 8), coeffs, seeds=seeds, cond=c, progress=False,
                   **guide)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()
