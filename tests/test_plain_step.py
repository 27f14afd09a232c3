"""The C++ fast path of fd.ddpm_step (``PlainStep``, csrc/direct_launch.cpp) and the drop-ins'
noise drawn inside it (``fused_ddpm.step.drawing_step``).

A call of the prepared kind must give the bits the validated Python path gives; a call of
any other kind must fall through to that path (and its errors); backends without the C++
entry never get one."""
import pytest
import torch

import fused_ddpm as fd
import fused_ddpm.step as fstep
from fused_ddpm.backends import get as get_backend
from fused_ddpm.backends import resolve

from helpers import random_inputs
from kernel_cases import coefficients

SHAPES = [(1, 4, 8, 8), (3, 2, 5, 7), (2, 3, 9)]
# relative tolerance (to max |y|) per dtype, as tests/test_fused_step.py
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CONFIGS = {
    "ddpm": dict(method="ddpm", prediction_type="epsilon", variance_type="fixed_small",
                 clip_sample_range=1.0),
    "ddpm-v-learned": dict(method="ddpm", prediction_type="v_prediction",
                           variance_type="learned_range"),
    "ddim-eta": dict(method="ddim", prediction_type="sample", variance_type="fixed_small",
                     eta=0.7),
    "ddim": dict(method="ddim", prediction_type="epsilon", variance_type="fixed_small"),
    "dpm2m": dict(method="dpmsolver++", prediction_type="epsilon", variance_type="fixed_small"),
    "sde": dict(method="sde-dpmsolver++", prediction_type="v_prediction",
                variance_type="fixed_small"),
    "euler": dict(method="euler_ancestral", prediction_type="epsilon",
                  variance_type="fixed_small"),
}


def _has_fast(backend) -> bool:
    """Whether the backend's launches are the C++ ops (the backends with a PlainStep)."""
    return get_backend(backend.name).torch_ops


def _refuses(backend, c, dtype):
    """A backend asked by name for a dtype it does not take refuses it, every time."""
    x, m, _ = random_inputs(c, (1, 2, 3, 3), dtype)
    for _ in range(2):
        with pytest.raises(fd.BackendUnavailableError, match=str(dtype).replace("torch.", "")):
            fd.ddpm_step(x.to(backend.device), m.to(backend.device), 1, c, seeds=0,
                         backend=backend.name)


def _count_prepared(monkeypatch):
    """Calls that took the Python path (built or looked up a Prepared launch)."""
    calls = []
    real = fstep.prepared

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(fstep, "prepared", counting)
    return calls


def _kw(c, noise_kind, z, B, device, history):
    kw = {}
    if c.multistep:
        kw["history"] = history
    if noise_kind == "seeds":
        kw["seeds"] = torch.arange(B, dtype=torch.int64, device=device) * 7919 + 3
    elif noise_kind == "noise":
        kw["noise"] = z
    return kw


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noise_kind", ["seeds", "noise"])
def test_fast_calls_give_the_validated_bits(backend, monkeypatch, name, dtype, noise_kind):
    """The first call of a kind runs the Python path and leaves a PlainStep; later calls of
    that kind (other values, other rows) skip it and give the same bits as that path."""
    c = coefficients(CONFIGS[name])
    dev = backend.device
    if dtype not in backend.dtypes:
        _refuses(backend, c, dtype)
        return
    calls = _count_prepared(monkeypatch)
    g = torch.Generator().manual_seed(hash((name, str(dtype), noise_kind)) % 2 ** 31)
    for shape in SHAPES:
        rows = [int(r) for r in c.rows[torch.randperm(len(c.rows), generator=g)[:4]]]
        for k, row in enumerate(rows):
            x, m, z = (a.to(dev) for a in random_inputs(c, shape, dtype, generator=g))
            h = torch.randn(shape, generator=g).to(dev, dtype)
            kw = _kw(c, noise_kind, z, shape[0], dev, h)
            before = len(calls)
            y, x0 = fd.ddpm_step(x, m, row, c, return_x0=True, backend=backend.name, **kw)
            fast = len(calls) == before
            # the same call through the Python path: a new kind each time (out=)
            y2 = torch.empty_like(y)
            _, x02 = fd.ddpm_step(x, m, row, c, return_x0=True, backend=backend.name, out=y2,
                                  **kw)
            assert torch.equal(y, y2) and torch.equal(x0, x02), (shape, row)
            want = fd.reference.ddpm_step(x, m, row, c, return_x0=True, **kw)
            scale = float(want[0].abs().max().clamp(min=1e-6))
            # a few ulps of the storage type (float32's for float64: float32 noise)
            tol = TOL[torch.float32 if dtype == torch.float64 else dtype]
            assert float((y.double() - want[0].double()).abs().max()) <= tol * scale * 4
            # learned variances split the model output in Python: never the fast kind
            assert fast == (_has_fast(backend) and k > 0 and
                            not c.config.learned_variance), (shape, k)
            assert y.dtype == dtype and y.shape == x.shape
    if not _has_fast(backend):
        assert not c._fast


def test_other_kinds_fall_through(backend, monkeypatch):
    """Another shape, dtype, t kind, noise kind, out=, a gradient: the Python path (same
    results as the reference); errors name the argument as before."""
    c = coefficients(CONFIGS["ddpm"])
    dev, name = backend.device, backend.name
    x, m, z = (a.to(dev) for a in random_inputs(c, (2, 3, 4, 4), torch.float32,
                                                 generator=torch.Generator().manual_seed(1)))
    seeds = torch.tensor([5, 6], device=dev)
    fd.ddpm_step(x, m, 500, c, seeds=seeds, backend=name)
    fd.ddpm_step(x, m, 400, c, seeds=seeds, backend=name)
    calls = _count_prepared(monkeypatch)

    def ref(*args, **kwargs):
        return fd.reference.ddpm_step(*args, **kwargs)

    cases = [
        ((x[:1], m[:1], 500, c), dict(seeds=seeds[:1])),                 # shape
        ((x.double(), m.double(), 500, c), dict(seeds=seeds)),           # dtype
        ((x, m, torch.tensor(500), c), dict(seeds=seeds)),               # a tensor t
        ((x, m, 500, c), dict(noise=z)),                                  # external noise
        ((x, m, 500, c), dict(seeds=7)),                                  # an int seed
        ((x.transpose(2, 3), m.transpose(2, 3), 500, c), dict(seeds=seeds)),  # strides
    ]
    for args, kw in cases:
        if args[0].dtype not in backend.dtypes:
            continue
        before = len(calls)
        y = fd.ddpm_step(*args, backend=name, **kw)
        assert len(calls) == before + 1
        want = ref(*args, **kw)
        assert float((y.double() - want.double()).abs().max()) <= 1e-4
    with pytest.raises(ValueError, match="t=1000"):
        fd.ddpm_step(x, m, 1000, c, seeds=seeds, backend=name)
    with pytest.raises(ValueError, match="t=-1"):
        fd.ddpm_step(x, m, -1, c, seeds=seeds, backend=name)
    with pytest.raises(TypeError):
        fd.ddpm_step(x, m, 500.0, c, seeds=seeds, backend=name)
    # a gradient: the autograd op, whose gradient is that of the reference
    xg = x.clone().requires_grad_()
    before = len(calls)
    y = fd.ddpm_step(xg, m, 500, c, seeds=seeds, backend=name)
    assert len(calls) == before + 1 and y.requires_grad
    (gx,) = torch.autograd.grad(y.sum(), xg)
    xr = x.double().requires_grad_()
    (gr,) = torch.autograd.grad(ref(xr, m.double(), 500, c, seeds=seeds).sum(), xr)
    assert torch.allclose(gx.double(), gr, rtol=1e-5, atol=1e-6)
    fd.ddpm_step(x, m, 500, c, seeds=seeds, backend=name)    # this kind's PlainStep again
    with torch.no_grad():                               # no gradient wanted: fast again
        before = len(calls)
        fd.ddpm_step(xg, m, 500, c, seeds=seeds, backend=name)
        assert len(calls) == before + (0 if _has_fast(backend) else 1)


def test_history_rows_still_checked(backend):
    """Without a history, a row that reads one raises, whether or not a PlainStep exists."""
    c = coefficients(CONFIGS["dpm2m"])
    dev = backend.device
    x, m, _ = (a.to(dev) for a in random_inputs(c, (1, 2, 3, 3), torch.float32))
    needs = [int(i) for i in range(c.num_rows) if c.table64[i, fd.contract.Col.H] != 0]
    free = [int(i) for i in range(c.num_rows) if c.table64[i, fd.contract.Col.H] == 0]
    for _ in range(2):
        fd.ddpm_step(x, m, free[0], c, backend=backend.name)
    with pytest.raises(ValueError, match="history is needed"):
        fd.ddpm_step(x, m, needs[0], c, backend=backend.name)


def test_add_noise_never_takes_a_plain_step(backend):
    """fd.add_noise (the training op: no model output) with an int t stays on its own path."""
    s = fd.NoiseSchedule(num_train_timesteps=1000)
    x0 = torch.randn(2, 3, 4, 4, device=backend.device)
    z = torch.randn(2, 3, 4, 4, device=backend.device)
    for t in (10, 500, 999):
        xt, target = fd.add_noise(x0, t, s, noise=z, backend=backend.name)
        ab = float(s.alphas_cumprod[t])
        want = ab ** 0.5 * x0.double() + (1 - ab) ** 0.5 * z.double()
        assert torch.allclose(xt.double(), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(target, z)
    assert not fd.training._coefficients(s, "epsilon")._fast


def test_environment_override_is_read_per_call(monkeypatch):
    """backend="auto" keys the PlainStep by FUSED_DDPM_BACKEND: setting it after fast calls
    still changes the backend."""
    c = coefficients(CONFIGS["ddim"])
    x, m, _ = random_inputs(c, (1, 2, 4, 4), torch.float32)
    monkeypatch.delenv("FUSED_DDPM_BACKEND", raising=False)
    for _ in range(3):
        y_auto = fd.ddpm_step(x, m, 500, c)
    assert {p.backend for p in c._plans.values()} == {resolve("auto", x.device, x.dtype)}
    monkeypatch.setenv("FUSED_DDPM_BACKEND", "torch")
    y_torch = fd.ddpm_step(x, m, 500, c)
    assert "torch" in {p.backend for p in c._plans.values()}
    assert torch.allclose(y_auto, y_torch, rtol=1e-5, atol=1e-6)


def _draw(noise, x, generator):
    """What the drop-ins draw for a step, in Python: (noise, seeds) keywords of ddpm_step."""
    if noise == "randn":
        return dict(noise=torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                      device=x.device))
    return dict(seeds=fd.step.draw_seeds(x.shape[0], x.device, generator))


def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("noise", ["randn", "philox"])
def test_drawing_step_draws_as_the_drop_ins(backend, dtype, noise):
    """drawing_step gives the bits of ddpm_step with the noise (or seeds) drawn in Python from
    the same generator state, and leaves the generator where that draw leaves it; None
    (nothing drawn) when no PlainStep of the kind is there or the generator is not one
    torch.Generator."""
    c = coefficients(CONFIGS["ddpm"])
    dev = backend.device
    if dtype not in backend.dtypes:
        _refuses(backend, c, dtype)
        return
    x, m, _ = (a.to(dev) for a in random_inputs(c, (2, 4, 6, 5), dtype))
    g = _gen(dev, 3)
    assert fd.step.drawing_step(noise, c, backend.name, x, m, 500, g) is None
    assert torch.equal(g.get_state(), _gen(dev, 3).get_state())
    fd.ddpm_step(x, m, 500, c, return_x0=True, backend=backend.name, **_draw(noise, x, g))
    for row, seed in ((500, 4), (10, 5)):
        g1, g2 = _gen(dev, seed), _gen(dev, seed)
        got = fd.step.drawing_step(noise, c, backend.name, x, m, row, g1)
        assert (got is None) == (not _has_fast(backend))
        if got is None:
            continue
        want = fd.ddpm_step(x, m, row, c, return_x0=True, backend=backend.name,
                            **_draw(noise, x, g2))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(torch.randn(3, generator=g1, device=dev),
                           torch.randn(3, generator=g2, device=dev))
    # the default generator
    torch.manual_seed(11)
    got = fd.step.drawing_step(noise, c, backend.name, x, m, 500, None)
    torch.manual_seed(11)
    want = fd.ddpm_step(x, m, 500, c, return_x0=True, backend=backend.name,
                        **_draw(noise, x, None))
    assert (got is None) == (not _has_fast(backend))
    assert got is None or torch.equal(got[0], want[0])
    # a list of generators is left to the caller, undrawn
    g3 = _gen(dev, 9)
    assert fd.step.drawing_step(noise, c, backend.name, x, m, 500, [g3, g3]) is None
    assert torch.equal(g3.get_state(), _gen(dev, 9).get_state())
    with pytest.raises(ValueError, match="noise='gauss'"):
        fd.step.drawing_step("gauss", c, backend.name, x, m, 500, g3)
