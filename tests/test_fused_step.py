"""fd.ddpm_step and fd.add_noise on every backend here (the ``backend`` fixture) vs the
float64 reference: configs, shapes, dtypes, layouts, out=, in-kernel noise, autograd,
opcheck and torch.compile."""
import itertools

import pytest
import torch

import fused_ddpm as fd
from fused_ddpm.coefficients import PREDICTION_TYPES
from fused_ddpm.methods import METHODS

from helpers import random_inputs
from kernel_cases import step_configs

# relative tolerance (to max |y|) per dtype: a few ulps of the storage type
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# float64 steps still take two float32 quantities: in-kernel noise (float32 Box–Muller by
# spec) and the dynamic-threshold scale; where either is involved, float32's tolerance holds.
# every sampler config of the registry indexed by timestep (the step-indexed ones, whose x̂0
# map reaches 1/α ≈ 160, are compared per element in tests/test_samplers.py)
CONFIGS = [c for c in step_configs() if METHODS[c["method"]].index_by == "timestep"]
SHAPES = [(1, 3, 5, 7), (3, 2, 9), (2, 4, 3, 5, 3), (5, 1, 13, 1), (2, 3, 16, 16)]


def _id(c):
    return "-".join(str(v) for v in c.values())


def _check(got, want, dtype, what="", f32_parts=False):
    tol = TOL[torch.float32] if (f32_parts and dtype == torch.float64) else TOL[dtype]
    scale = float(want.abs().max().clamp(min=1e-6))
    err = float((got.double() - want.double()).abs().max())
    assert err <= tol * scale * 4 + 1e-30, f"{what}: err {err:.3g} vs scale {scale:.3g}"
    assert got.dtype == dtype


def _inputs(c, shape, dtype, device, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x, m, z = random_inputs(c, shape, dtype=dtype, generator=g, channels_last=channels_last)
    ts = c.timesteps
    t = ts[torch.randint(len(ts), (shape[0],), generator=g)]
    t[-1] = 0
    return x.to(device), m.to(device), z.to(device), t.to(device)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_matches_reference_every_config(backend, cfg):
    c = fd.step_coefficients(fd.NoiseSchedule(), num_inference_steps=50, **cfg)
    dev = backend.device
    for i, dtype in enumerate(backend.dtypes):
        shape = SHAPES[(i + len(_id(cfg))) % len(SHAPES)]
        x, m, z, t = _inputs(c, shape, dtype, dev, seed=i * 1000 + len(_id(cfg)))
        want_y, want_x0 = fd.reference.ddpm_step(x.double().cpu(), m.double().cpu(), t.cpu(), c,
                                                 noise=z.double().cpu(), return_x0=True)
        y, x0 = fd.ddpm_step(x, m, t, c, noise=z, return_x0=True, backend=backend.name)
        thr = bool(cfg.get("thresholding"))
        _check(y.cpu(), want_y, dtype, f"y {dtype} {shape}", f32_parts=thr)
        _check(x0.cpu(), want_x0, dtype, f"x0 {dtype} {shape}", f32_parts=thr)


@pytest.mark.parametrize("channels_last", [False, True])
def test_in_kernel_noise_matches_philox_oracle(backend, channels_last):
    c = fd.step_coefficients(fd.NoiseSchedule(), variance_type="fixed_large")
    dev = backend.device
    x, m, _, t = _inputs(c, (3, 3, 7, 6), torch.float32, dev, seed=1, channels_last=channels_last)
    seeds = torch.tensor([0, -5, 2 ** 40 + 3], device=dev)
    y = fd.ddpm_step(x, m, t, c, seeds=seeds, backend=backend.name)
    want = fd.reference.ddpm_step(x.double().cpu(), m.double().cpu(), t.cpu(), c,
                                  seeds=seeds.cpu())
    _check(y.cpu(), want, torch.float32)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, fd.ddpm_step(x, m, t, c, seeds=seeds, backend=backend.name))
    other = fd.ddpm_step(x, m, t, c, seeds=seeds + 1, backend=backend.name)
    assert not torch.equal(y[:-1], other[:-1])          # t = 0 for the last sample: no noise


def test_layouts_and_views(backend):
    c = fd.step_coefficients(fd.NoiseSchedule(), variance_type="learned_range",
                             clip_sample_range=1.5)
    dev = backend.device
    x, m, z, t = _inputs(c, (2, 3, 10, 12), torch.float32, dev, seed=7)
    want = fd.ddpm_step(x, m, t, c, noise=z, backend=backend.name)
    cl = lambda a: a.contiguous(memory_format=torch.channels_last)  # noqa: E731
    y_cl = fd.ddpm_step(cl(x), cl(m), t, c, noise=cl(z), backend=backend.name)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, want, rtol=0, atol=1e-6)
    # mixed layouts and strided views are copied once and still right
    y_mix = fd.ddpm_step(cl(x), m, t, c, noise=z.transpose(2, 3).contiguous().transpose(2, 3),
                         backend=backend.name)
    torch.testing.assert_close(y_mix, want, rtol=0, atol=1e-6)
    big_x = torch.zeros(2, 3, 20, 12, device=dev)
    big_x[:, :, ::2] = x
    y_view = fd.ddpm_step(big_x[:, :, ::2], m, t, c, noise=z, backend=backend.name)
    torch.testing.assert_close(y_view, want, rtol=0, atol=1e-6)


def test_out_and_empty(backend):
    c = fd.step_coefficients(fd.NoiseSchedule(), clip_sample_range=1.0)
    dev = backend.device
    x, m, z, t = _inputs(c, (2, 3, 5, 5), torch.float32, dev, seed=3)
    out = torch.full_like(x, float("nan")).contiguous(memory_format=torch.channels_last)
    res, x0 = fd.ddpm_step(x, m, t, c, noise=z, out=out, return_x0=True, backend=backend.name)
    assert res is out
    want, want_x0 = fd.ddpm_step(x, m, t, c, noise=z, return_x0=True, backend=backend.name)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(x0, want_x0, rtol=0, atol=0)
    empty = torch.empty(0, 3, 5, 5, device=dev)
    assert fd.ddpm_step(empty, empty, 5, c, seeds=1, backend=backend.name).shape == empty.shape


GRAD_CONFIGS = [dict(clip_sample_range=0.9), dict(variance_type="learned"),
                dict(variance_type="learned_range", prediction_type="v_prediction"),
                dict(method="ddim", eta=0.5, prediction_type="sample", clip_sample_range=1.0),
                dict(thresholding=True, dynamic_thresholding_ratio=0.7, sample_max_value=1.5)]


@pytest.mark.parametrize("cfg", GRAD_CONFIGS, ids=_id)
@pytest.mark.parametrize("noise_kind", ["external", "seeds"])
def test_gradients_match_reference_autograd(backend, cfg, noise_kind):
    c = fd.step_coefficients(fd.NoiseSchedule(), num_inference_steps=20, **cfg)
    dev = backend.device
    dtype = torch.float64 if torch.float64 in backend.dtypes else torch.float32
    x, m, z, t = _inputs(c, (2, 3, 6, 5), dtype, dev, seed=11)
    gy, gx0 = torch.randn_like(x), torch.randn_like(x)
    seeds = torch.tensor([4, 9], device=dev)

    def grads(fn, xx, mm, zz, **kw):
        xx, mm = xx.clone().requires_grad_(), mm.clone().requires_grad_()
        inputs = [xx, mm]
        if noise_kind == "external":
            zz = zz.clone().requires_grad_()
            inputs.append(zz)
            kw["noise"] = zz
        else:
            kw["seeds"] = seeds.to(xx.device)
        y, x0 = fn(xx, mm, t.to(xx.device), c, return_x0=True, **kw)
        return torch.autograd.grad((y * gy.to(y)).sum() + (x0 * gx0.to(y)).sum(), inputs)

    got = grads(lambda *a, **k: fd.ddpm_step(*a, backend=backend.name, **k), x, m, z)
    want = grads(fd.reference.ddpm_step, x.double().cpu(), m.double().cpu(), z.double().cpu())
    for g, w, name in zip(got, want, ("x", "model_output", "noise")):
        _check(g.cpu(), w, dtype, f"grad {name}",
               f32_parts=noise_kind == "seeds" or bool(cfg.get("thresholding")))


def test_autograd_function(backend):
    c = fd.step_coefficients(fd.NoiseSchedule(), variance_type="learned_range")
    dev = backend.device
    dtype = torch.float64 if torch.float64 in backend.dtypes else torch.float32
    x, m, z, t = _inputs(c, (2, 2, 4, 3), dtype, dev, seed=5)
    x.requires_grad_()
    m.requires_grad_()
    y = fd.DDPMStepFunction.apply(x, m, t, c, None, torch.tensor([1, 2], device=dev),
                                  backend.name)
    gx, gm = torch.autograd.grad(y.sum(), (x, m))
    x2, m2 = x.detach().double().cpu().requires_grad_(), m.detach().double().cpu().requires_grad_()
    y2 = fd.reference.ddpm_step(x2, m2, t.cpu(), c, seeds=torch.tensor([1, 2]))
    _check(y.detach().cpu(), y2.detach(), dtype, f32_parts=True)
    wx, wm = torch.autograd.grad(y2.sum(), (x2, m2))
    _check(gx.cpu(), wx, dtype, f32_parts=True)
    _check(gm.cpu(), wm, dtype, f32_parts=True)


def test_opcheck(backend):
    """The registered ops (step, its backward, step_out) as ddpm_step calls them."""
    from fused_ddpm import ops
    from fused_ddpm.step import prepared
    dev = backend.device
    c = fd.step_coefficients(fd.NoiseSchedule(), variance_type="learned_range",
                             clip_sample_range=1.0)
    x, m, z, t = _inputs(c, (2, 3, 4, 5), torch.float32, dev, seed=2)
    seeds = torch.tensor([3, 4], device=dev)
    for noise, sd in ((z, None), (None, seeds)):
        plan = prepared(c, x, m, t, noise, sd, None, backend.name)
        ins = plan.streams(x, m, noise)
        streams, present = ops.pack(ins)
        tt, sdd = plan.timesteps(t, 2), plan.seeds(sd, 2, None)
        args = (streams, present, tt, sdd, plan.table, None, None, plan.flags, plan.scalars)
        torch.library.opcheck(torch.ops.fused_ddpm.step.default, args + (True, backend.name))
        wanted = sum(1 << int(s) for s in fd.contract.In if ins[s] is not None)
        torch.library.opcheck(torch.ops.fused_ddpm.step_backward.default,
                              (streams, present, wanted, torch.randn_like(x),
                               torch.randn_like(x)) + args[2:] + (backend.name,))
        out = torch.empty_like(x)
        torch.library.opcheck(torch.ops.fused_ddpm.step_out.default,
                              args + (backend.name, out, None))


def test_compile_fullgraph_matches_eager(backend):
    dev = backend.device
    c = fd.step_coefficients(fd.NoiseSchedule(), num_inference_steps=10, clip_sample_range=1.0)
    x, m, z, t = _inputs(c, (2, 3, 8, 8), torch.float32, dev, seed=9)
    seeds = torch.tensor([1, 2], device=dev)

    def step(x, m, t, seeds):
        return fd.ddpm_step(x * 1.0, m, t, c, seeds=seeds, backend=backend.name) + 0.0

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(x, m, t, seeds), step(x, m, t, seeds), rtol=0, atol=0)


# ----------------------------------------------------------------------------- add_noise
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_add_noise_matches_reference(backend, prediction_type):
    sched = fd.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    dev = backend.device
    for i, (dtype, noise_kind, cl) in enumerate(itertools.product(
            backend.dtypes, ("external", "seeds"), (False, True))):
        g = torch.Generator().manual_seed(i)
        shape = SHAPES[i % len(SHAPES)]
        x0 = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        z = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        if cl and len(shape) == 4:
            x0, z = (a.contiguous(memory_format=torch.channels_last) for a in (x0, z))
        t = torch.randint(0, 1000, (shape[0],), generator=g)
        t[0] = 0
        seeds = torch.randint(-2 ** 62, 2 ** 62, (shape[0],), generator=g)
        kw = dict(noise=z.to(dev)) if noise_kind == "external" else dict(seeds=seeds.to(dev))
        x_t, target = fd.add_noise(x0.to(dev), t.to(dev), sched, prediction_type=prediction_type,
                                   backend=backend.name, **kw)
        ref_kw = dict(noise=z.double()) if noise_kind == "external" else dict(seeds=seeds)
        want_x, want_target = fd.reference.add_noise(x0.double(), t, sched,
                                                     prediction_type=prediction_type, **ref_kw)
        assert x_t.dtype == dtype and x_t.shape == x0.shape
        if cl and len(shape) == 4:
            assert x_t.is_contiguous(memory_format=torch.channels_last)
        f32_noise = noise_kind == "seeds"       # the normals are float32 by spec
        _check(x_t.cpu(), want_x, dtype, f"x_t {dtype} {noise_kind}", f32_parts=f32_noise)
        _check(target.cpu(), want_target, dtype, f"target {dtype} {noise_kind}",
               f32_parts=f32_noise)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_add_noise_gradients(backend, prediction_type):
    """Differentiable in x0 and in an external noise, as the formula."""
    sched = fd.NoiseSchedule()
    dev = backend.device
    dtype = torch.float64 if torch.float64 in backend.dtypes else torch.float32
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    z = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    gx, gt = torch.randn_like(x0), torch.randn_like(x0)
    t = torch.tensor([7, 901])

    def grads(fn, a, b, **kw):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        x_t, target = fn(a, t.to(a.device), sched, noise=b, prediction_type=prediction_type,
                         **kw)
        return torch.autograd.grad((x_t * gx.to(x_t)).sum() + (target * gt.to(x_t)).sum(),
                                   (a, b))

    got = grads(fd.add_noise, x0.to(dev, dtype), z.to(dev, dtype), backend=backend.name)
    want = grads(fd.reference.add_noise, x0, z)
    for a, w, name in zip(got, want, ("x0", "noise")):
        _check(a.cpu(), w, dtype, f"grad {name}")


def test_add_noise_philox_is_the_step_noise(backend):
    """With seeds, ε is the Philox noise of (seed, t) on stream TIMESTEP: the noise a
    sampler step at t with the same seed adds."""
    from fused_ddpm import philox
    sched = fd.NoiseSchedule()
    seeds = torch.tensor([11, -3, 2 ** 45])
    t = torch.tensor([999, 0, 500])
    x0 = torch.zeros(3, 2, 6, 5, device=backend.device)
    _, eps = fd.add_noise(x0, t.to(backend.device), sched, seeds=seeds.to(backend.device),
                          backend=backend.name)
    want = philox.philox_normal(seeds, t, x0.shape)
    assert float((eps.cpu() - want).abs().max()) <= backend.noise_tol


def test_numpy_timesteps_and_seeds(backend):
    """t and seeds given as NumPy integers (or integer arrays) are accepted."""
    np = pytest.importorskip("numpy")
    c = fd.step_coefficients(fd.NoiseSchedule(), num_inference_steps=10)
    dev = backend.device
    x, m, z, _ = _inputs(c, (2, 3, 4, 4), torch.float32, dev, seed=4)
    want = fd.ddpm_step(x, m, 901, c, seeds=5, backend=backend.name)
    for t in (np.int64(901), np.int32(901), np.array(901), np.array([901, 901])):
        for seeds in (5, np.int64(5), np.uint64(5)):
            got = fd.ddpm_step(x, m, t, c, seeds=seeds, backend=backend.name)
            assert torch.equal(got, want), (type(t), type(seeds))
