"""fd.ddpm_step on every kernel backend here vs the float64 reference: configs, shapes,
dtypes, layouts, out=, in-kernel noise, autograd, opcheck and torch.compile."""
import itertools

import pytest
import torch

import fused_ddpm as fd
from fused_ddpm.coefficients import PREDICTION_TYPES, VARIANCE_TYPES

from helpers import random_inputs

KERNELS = [b for b in ("cpu", "triton", "cuda") if fd.backends()[b].startswith("available")]
if not KERNELS:
    pytest.skip("no kernel backend was built here", allow_module_level=True)


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) \
        else "cpu"


# relative tolerance (to max |y|) per dtype: a few ulps of the storage type
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# float64 steps still take two float32 quantities: in-kernel noise (float32 Box–Muller by
# spec) and the dynamic-threshold scale; where either is involved, float32's tolerance holds.
DTYPES = {"cpu": [torch.float32, torch.float64, torch.float16, torch.bfloat16],
          "triton": [torch.float32, torch.float16, torch.bfloat16],
          "cuda": [torch.float32, torch.float16, torch.bfloat16]}
CLIPS = {"none": {}, "clip": dict(clip_sample_range=1.0),
         "thresh": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)}
CONFIGS = ([dict(method="ddpm", prediction_type=p, variance_type=v, **CLIPS[c])
            for p, v, c in itertools.product(PREDICTION_TYPES, VARIANCE_TYPES, CLIPS)] +
           [dict(method="ddim", prediction_type=p, eta=0.8, use_clipped_model_output=u, **CLIPS[c])
            for p, u, c in itertools.product(PREDICTION_TYPES, (False, True), CLIPS)])
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


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_matches_reference_every_config(backend, cfg):
    c = fd.step_coefficients(fd.NoiseSchedule(), num_inference_steps=50, **cfg)
    dev = _device(backend)
    for i, dtype in enumerate(DTYPES[backend]):
        shape = SHAPES[(i + len(_id(cfg))) % len(SHAPES)]
        x, m, z, t = _inputs(c, shape, dtype, dev, seed=i * 1000 + len(_id(cfg)))
        want_y, want_x0 = fd.reference.ddpm_step(x.double().cpu(), m.double().cpu(), t.cpu(), c,
                                                 noise=z.double().cpu(), return_x0=True)
        y, x0 = fd.ddpm_step(x, m, t, c, noise=z, return_x0=True, backend=backend)
        thr = bool(cfg.get("thresholding"))
        _check(y.cpu(), want_y, dtype, f"y {dtype} {shape}", f32_parts=thr)
        _check(x0.cpu(), want_x0, dtype, f"x0 {dtype} {shape}", f32_parts=thr)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_in_kernel_noise_matches_philox_oracle(backend, channels_last):
    c = fd.step_coefficients(fd.NoiseSchedule(), variance_type="fixed_large")
    dev = _device(backend)
    x, m, _, t = _inputs(c, (3, 3, 7, 6), torch.float32, dev, seed=1, channels_last=channels_last)
    seeds = torch.tensor([0, -5, 2 ** 40 + 3], device=dev)
    y = fd.ddpm_step(x, m, t, c, seeds=seeds, backend=backend)
    want = fd.reference.ddpm_step(x.double().cpu(), m.double().cpu(), t.cpu(), c,
                                  seeds=seeds.cpu())
    _check(y.cpu(), want, torch.float32)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, fd.ddpm_step(x, m, t, c, seeds=seeds, backend=backend))
    other = fd.ddpm_step(x, m, t, c, seeds=seeds + 1, backend=backend)
    assert not torch.equal(y[:-1], other[:-1])          # t = 0 for the last sample: no noise


@pytest.mark.parametrize("backend", KERNELS)
def test_layouts_and_views(backend):
    c = fd.step_coefficients(fd.NoiseSchedule(), variance_type="learned_range",
                             clip_sample_range=1.5)
    dev = _device(backend)
    x, m, z, t = _inputs(c, (2, 3, 10, 12), torch.float32, dev, seed=7)
    want = fd.ddpm_step(x, m, t, c, noise=z, backend=backend)
    cl = lambda a: a.contiguous(memory_format=torch.channels_last)  # noqa: E731
    y_cl = fd.ddpm_step(cl(x), cl(m), t, c, noise=cl(z), backend=backend)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, want, rtol=0, atol=1e-6)
    # mixed layouts and strided views are copied once and still right
    y_mix = fd.ddpm_step(cl(x), m, t, c, noise=z.transpose(2, 3).contiguous().transpose(2, 3),
                         backend=backend)
    torch.testing.assert_close(y_mix, want, rtol=0, atol=1e-6)
    big_x = torch.zeros(2, 3, 20, 12, device=dev)
    big_x[:, :, ::2] = x
    y_view = fd.ddpm_step(big_x[:, :, ::2], m, t, c, noise=z, backend=backend)
    torch.testing.assert_close(y_view, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", KERNELS)
def test_out_and_empty(backend):
    c = fd.step_coefficients(fd.NoiseSchedule(), clip_sample_range=1.0)
    dev = _device(backend)
    x, m, z, t = _inputs(c, (2, 3, 5, 5), torch.float32, dev, seed=3)
    out = torch.full_like(x, float("nan")).contiguous(memory_format=torch.channels_last)
    res, x0 = fd.ddpm_step(x, m, t, c, noise=z, out=out, return_x0=True, backend=backend)
    assert res is out
    want, want_x0 = fd.ddpm_step(x, m, t, c, noise=z, return_x0=True, backend=backend)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(x0, want_x0, rtol=0, atol=0)
    empty = torch.empty(0, 3, 5, 5, device=dev)
    assert fd.ddpm_step(empty, empty, 5, c, seeds=1, backend=backend).shape == empty.shape


GRAD_CONFIGS = [dict(clip_sample_range=0.9), dict(variance_type="learned"),
                dict(variance_type="learned_range", prediction_type="v_prediction"),
                dict(method="ddim", eta=0.5, prediction_type="sample", clip_sample_range=1.0),
                dict(thresholding=True, dynamic_thresholding_ratio=0.7, sample_max_value=1.5)]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("cfg", GRAD_CONFIGS, ids=_id)
@pytest.mark.parametrize("noise_kind", ["external", "seeds"])
def test_gradients_match_reference_autograd(backend, cfg, noise_kind):
    c = fd.step_coefficients(fd.NoiseSchedule(), num_inference_steps=20, **cfg)
    dev = _device(backend)
    dtype = torch.float64 if backend == "cpu" else torch.float32
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

    got = grads(lambda *a, **k: fd.ddpm_step(*a, backend=backend, **k), x, m, z)
    want = grads(fd.reference.ddpm_step, x.double().cpu(), m.double().cpu(), z.double().cpu())
    for g, w, name in zip(got, want, ("x", "model_output", "noise")):
        _check(g.cpu(), w, dtype, f"grad {name}",
               f32_parts=noise_kind == "seeds" or bool(cfg.get("thresholding")))


@pytest.mark.parametrize("backend", KERNELS)
def test_autograd_function(backend):
    c = fd.step_coefficients(fd.NoiseSchedule(), variance_type="learned_range")
    dev = _device(backend)
    dtype = torch.float64 if backend == "cpu" else torch.float32
    x, m, z, t = _inputs(c, (2, 2, 4, 3), dtype, dev, seed=5)
    x.requires_grad_()
    m.requires_grad_()
    y = fd.DDPMStepFunction.apply(x, m, t, c, None, torch.tensor([1, 2], device=dev), backend)
    gx, gm = torch.autograd.grad(y.sum(), (x, m))
    x2, m2 = x.detach().double().cpu().requires_grad_(), m.detach().double().cpu().requires_grad_()
    y2 = fd.reference.ddpm_step(x2, m2, t.cpu(), c, seeds=torch.tensor([1, 2]))
    _check(y.detach().cpu(), y2.detach(), dtype, f32_parts=True)
    wx, wm = torch.autograd.grad(y2.sum(), (x2, m2))
    _check(gx.cpu(), wx, dtype, f32_parts=True)
    _check(gm.cpu(), wm, dtype, f32_parts=True)


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    dev = _device(backend)
    c = fd.step_coefficients(fd.NoiseSchedule(), variance_type="learned_range",
                             clip_sample_range=1.0)
    x, m, z, t = _inputs(c, (2, 3, 4, 5), torch.float32, dev, seed=2)
    seeds = torch.tensor([3, 4], device=dev)
    table = c.table_on(dev)
    base = (x, m, t, table)
    for noise, sd in ((z, None), (None, seeds)):
        args = base + (noise, sd, None, 1.0, 1, 2, True, backend)
        torch.library.opcheck(torch.ops.fused_ddpm.step.default, args)
        gargs = (torch.randn_like(x), torch.randn_like(x)) + base + (noise, sd, None, 1.0, 1, 2,
                                                                     backend)
        torch.library.opcheck(torch.ops.fused_ddpm.step_backward.default, gargs)
    out = torch.empty_like(x)
    torch.library.opcheck(torch.ops.fused_ddpm.step_out.default,
                          base + (z, None, None, 1.0, 1, 2, backend, out, None))


@pytest.mark.parametrize("backend", KERNELS)
def test_compile_fullgraph_matches_eager(backend):
    dev = _device(backend)
    c = fd.step_coefficients(fd.NoiseSchedule(), num_inference_steps=10, clip_sample_range=1.0)
    x, m, z, t = _inputs(c, (2, 3, 8, 8), torch.float32, dev, seed=9)
    seeds = torch.tensor([1, 2], device=dev)

    def step(x, m, t, seeds):
        return fd.ddpm_step(x * 1.0, m, t, c, seeds=seeds, backend=backend) + 0.0

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(x, m, t, seeds), step(x, m, t, seeds), rtol=0, atol=0)
