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


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_sample_equals_manual_reference_loop(method):
    coeffs = fd.step_coefficients(SCHED, method=method, prediction_type="v_prediction",
                                  num_inference_steps=15, timestep_spacing="trailing",
                                  clip_sample_range=2.0, eta=0.5 if method == "ddim" else 0.0)
    seeds = torch.tensor([11, 12], dtype=torch.int64)
    shape = (2, 3, 4, 4)
    x = philox_normal(seeds, torch.full((2,), 1000), shape)
    for t in coeffs.timesteps.tolist():
        tb = torch.full((2,), t, dtype=torch.int64)
        x = fd.reference.ddpm_step(x, toy_model(x, tb), tb, coeffs, seeds=seeds)
    got, traj = sample(toy_model, shape, coeffs, seeds=seeds, progress=False,
                       return_trajectory=True)
    assert torch.allclose(got, x, atol=1e-5, rtol=1e-5)
    assert traj.shape == (16,) + shape
    assert torch.equal(traj[-1], got)
    assert torch.allclose(traj[0], philox_normal(seeds, torch.full((2,), 1000), shape), atol=1e-6)


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
@pytest.mark.gpu
@requires_cuda
def test_cuda_graph_matches_eager_and_fresh_noise():
    dev = torch.device("cuda")
    if resolve("auto", dev, torch.float32) == "torch":
        pytest.skip("no GPU kernel backend built")
    clear_graph_cache()
    coeffs = fd.step_coefficients(SCHED, num_inference_steps=25, device=dev)
    lin = torch.nn.Conv2d(3, 3, 3, padding=1).to(dev)

    def model(x, t):
        return lin(x) * (1 - t.float().reshape(-1, 1, 1, 1) / 2000)

    shape = (4, 3, 8, 8)
    s1 = torch.tensor([1, 2, 3, 4], device=dev)
    s2 = torch.tensor([9, 8, 7, 6], device=dev)
    with torch.no_grad():
        eager1 = sample(model, shape, coeffs, seeds=s1, progress=False)
        eager2 = sample(model, shape, coeffs, seeds=s2, progress=False)
        g1 = sample(model, shape, coeffs, seeds=s1, cuda_graph=True)
        g2 = sample(model, shape, coeffs, seeds=s2, cuda_graph=True)   # replay, new seeds
        g1b, traj = sample(model, shape, coeffs, seeds=s1, cuda_graph=True,
                           return_trajectory=True)
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
def test_cuda_eager_sample_has_no_host_sync():
    dev = torch.device("cuda")
    if resolve("auto", dev, torch.float32) == "torch":
        pytest.skip("no GPU kernel backend built")
    coeffs = fd.step_coefficients(SCHED, num_inference_steps=10, device=dev)
    seeds = torch.arange(4, device=dev)
    sample(toy_model, (4, 2, 8), coeffs, seeds=seeds, progress=False)   # warm caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = sample(toy_model, (4, 2, 8), coeffs, seeds=seeds, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()
