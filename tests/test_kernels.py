"""The kernel contract (docs/kernels.md), one suite for every backend.

Every test takes the ``backend`` fixture (tests/conftest.py): each available backend on
each device. Launch arguments come from :func:`kernel_cases.sample_inputs` (built by the
production layer), outputs are compared with the float64 reference, element by element,
within a few roundings of the dtype; in-kernel noise with the Philox oracle.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import fused_ddpm as fd
from fused_ddpm import philox
from fused_ddpm.backends import get as get_backend
from fused_ddpm.contract import (NUM_COLS, NUM_FLAGS, NUM_SCALARS, Clip, Col, Flag, In,
                                 Layout, Noise, NoiseStream, Out, Scalar, Var, terms_mask)

from kernel_cases import (SCHED, SHAPES, Case, Launch, assert_close_scaled, config_id,
                          relayout, sample_inputs, step_configs)

CONFIGS = step_configs()
NAN = float("nan")
ADD_NOISE = [dict(method="add_noise", prediction_type=p)
             for p in ("epsilon", "sample", "v_prediction")]


def launchers(backend):
    return get_backend(backend.name).launchers


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("cfg", CONFIGS + ADD_NOISE, ids=config_id)
def test_forward_matches_reference(backend, cfg):
    for case in sample_inputs(backend, [cfg], seed=len(config_id(cfg))):
        y, x0 = case.launch.forward(backend.name)
        y_ref, x0_ref, _ = case.reference()
        b0, by = case.scales()
        assert_close_scaled(y, y_ref, by, case.tol(), f"y {case}")
        assert_close_scaled(x0, x0_ref, b0, case.tol(), f"x0 {case}")
        assert y.stride() == case.launch.x.stride()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", list(Layout), ids=lambda v: v.name)
def test_every_dtype_shape_layout(backend, shape, layout):
    """Two configs using every column kind, every dtype the backend takes, both noise
    sources, on each shape and layout."""
    cfgs = [dict(method="ddpm", prediction_type="epsilon", variance_type="learned_range",
                 clip_sample_range=1.0),
            dict(method="ddim", prediction_type="v_prediction", eta=0.5, thresholding=True,
                 dynamic_thresholding_ratio=0.9, sample_max_value=2.5)]
    for (k, cfg), dtype, noise in itertools.product(enumerate(cfgs), backend.dtypes,
                                                    ("external", "philox")):
        case = Case(cfg, shape, dtype, layout, noise, backend.name, backend.device,
                    seed=k + 7 * len(shape))
        dense_cl = len(shape) in (4, 5) and min(shape[1], math.prod(shape[2:])) > 1
        assert Layout(case.launch.flags[Flag.LAYOUT]) == (
            layout if dense_cl else Layout.CONTIGUOUS)
        y, x0 = case.launch.forward(backend.name)
        y_ref, x0_ref, _ = case.reference()
        b0, by = case.scales()
        assert_close_scaled(y, y_ref, by, case.tol(), f"y {case}")
        assert_close_scaled(x0, x0_ref, b0, case.tol(), f"x0 {case}")


def test_wrong_coefficient_is_caught(backend):
    """The comparison is sharp: one column of the table off by 1e-3 (relative) fails it."""
    cfg = dict(method="ddim", prediction_type="v_prediction", eta=0.5, clip_sample_range=2.0)
    case = Case(cfg, (2, 3, 4, 4), torch.float32, Layout.CONTIGUOUS, "external",
                backend.name, backend.device, seed=0, t=[500, 10])
    y_ref, _, _ = case.reference()
    _, by = case.scales()
    table = case.launch.table
    for col in (Col.U, Col.W, Col.P, Col.Q, Col.R, Col.S):
        assert bool((table[case.t, col] != 0).all()), col
        bad = table.clone()
        bad[:, col] *= 1 + 1e-3
        launch = Launch(case.launch.ins, case.launch.t, case.launch.seeds, bad,
                        case.launch.thresh, None, case.launch.flags, case.launch.scalars)
        y, _ = launch.forward(backend.name)
        with pytest.raises(AssertionError):
            assert_close_scaled(y, y_ref, by, case.tol(), col.name)


def test_views_of_2c_output_and_no_x0(backend):
    cfg = dict(method="ddpm", prediction_type="epsilon", variance_type="learned")
    case = Case(cfg, (3, 4, 6, 5), torch.float32, Layout.CONTIGUOUS, "philox", backend.name,
                backend.device, seed=3)
    m = case.launch.ins[In.M]
    assert m.stride(0) == 2 * 4 * 30 and not m.is_contiguous()
    y, x0 = case.launch.forward(backend.name, write_x0=False)
    assert x0 is None
    _, by = case.scales()
    assert_close_scaled(y, case.reference()[0], by, case.tol(), "y")
    ins = list(case.launch.ins)
    ins[In.M], ins[In.V] = ins[In.M].contiguous(), ins[In.V].contiguous()
    compact = Launch(ins, *[getattr(case.launch, f) for f in
                            ("t", "seeds", "table", "thresh", "gscale", "flags", "scalars")])
    assert torch.equal(compact.forward(backend.name, write_x0=False)[0], y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_outputs_may_alias_inputs(backend, dtype):
    """y written over x (an in-place sampling loop), grad_x over grad_y: same results."""
    cfg = dict(method="ddpm", prediction_type="epsilon", variance_type="learned_range",
               clip_sample_range=1.0)
    case = Case(cfg, (2, 3, 9, 11), dtype, Layout.CONTIGUOUS, "philox", backend.name,
                backend.device, seed=4)
    L = case.launch
    y, _ = L.forward(backend.name)
    xy = L.x.clone()
    ins = list(L.ins)
    ins[In.X] = xy
    launchers(backend).forward(ins, L.t, L.seeds, L.table, L.thresh, None, [xy, None], L.flags,
                               L.scalars)
    assert torch.equal(xy, y)
    gy = torch.randn(L.x.shape, device=backend.device).to(dtype)
    want = L.backward(backend.name, gy.clone())
    g = gy.clone()
    grads = [None] * len(In)
    grads[In.X], grads[In.M], grads[In.V] = g, torch.empty_like(g), torch.empty_like(g)
    launchers(backend).backward(L.ins, g, None, L.t, L.seeds, L.table, L.thresh, None, grads,
                                L.flags, L.scalars)
    for s in (In.X, In.M, In.V):
        assert torch.equal(grads[s], want[s]), s.name


def test_empty_tensors(backend):
    """B = 0 or N = 0: nothing is launched or written, nothing fails."""
    cfg = dict(method="ddpm", prediction_type="epsilon", clip_sample_range=1.0)
    for shape in ((0, 3, 4, 4), (2, 0, 4), (3, 2, 0)):
        case = Case(cfg, shape, torch.float32, Layout.CONTIGUOUS, "philox", backend.name,
                    backend.device, seed=0, t=[500] * shape[0])
        y, x0 = case.launch.forward(backend.name)
        assert y.shape == shape
        grads = case.launch.backward(backend.name, torch.zeros(shape, device=backend.device))
        assert grads[In.X].shape == shape
    seeds = torch.zeros(2, dtype=torch.int64, device=backend.device)
    assert launchers(backend).philox_uint32(seeds, seeds, 0, 0).shape == (2, 0)


def test_stride0_t_and_seeds(backend):
    cfg = dict(method="ddpm", prediction_type="epsilon", variance_type="fixed_large")
    t = torch.tensor(400, device=backend.device).expand(3)
    seeds = torch.tensor(-12345, device=backend.device).expand(3)
    case = Case(cfg, (3, 3, 8, 8), torch.float32, Layout.CONTIGUOUS, "philox", backend.name,
                backend.device, seed=1, t=t, seeds=seeds)
    assert case.launch.t.stride(0) == 0 and case.launch.seeds.stride(0) == 0
    y, _ = case.launch.forward(backend.name)
    _, by = case.scales()
    assert_close_scaled(y, case.reference()[0], by, case.tol(), "y")
    # one seed for every sample at the same t: the same noise in every sample
    L = case.launch
    ins = list(L.ins)
    ins[In.X] = torch.zeros_like(L.x)
    ins[In.M] = torch.zeros_like(L.x)
    z, _ = Launch(ins, L.t, L.seeds, L.table, None, None, L.flags, L.scalars).forward(
        backend.name)
    assert torch.equal(z[0], z[1]) and torch.equal(z[1], z[2]) and bool(z.abs().sum() > 0)


def test_t_out_of_range_is_clamped(backend):
    cfg = dict(method="ddpm", prediction_type="epsilon", clip_sample_range=1.0)
    case = Case(cfg, (2, 3, 4, 4), torch.float32, Layout.CONTIGUOUS, "external", backend.name,
                backend.device, seed=2, t=[0, 999])
    L = case.launch
    y_in, _ = L.forward(backend.name)
    out = Launch(L.ins, torch.tensor([-5, 10 ** 6], device=backend.device), L.seeds, L.table,
                 L.thresh, None, L.flags, L.scalars)
    assert torch.equal(out.forward(backend.name)[0], y_in)


# ----------------------------------------------------------------------------- backward
def _grad_dtype(backend) -> torch.dtype:
    return torch.float64 if torch.float64 in backend.dtypes else torch.float32


def _check_grads(case: Case, backend, gy, gx0) -> None:
    """Kernel gradients of every stream vs torch.autograd through the reference."""
    grads = case.launch.backward(backend.name, gy, gx0)
    y, x0, leaves = case.reference(requires_grad=True)
    loss = (y * gy.double().cpu()).sum()
    if gx0 is not None:
        loss = loss + (x0 * gx0.double().cpu()).sum()
    loss.backward()
    C = case.shape[1]
    col = case.rows()
    L = case.launch
    # elements whose x̂0 sits on a clip bound have a kink there: leave them out
    keep = torch.ones(case.shape, dtype=torch.bool)
    xr = None
    if L.flags[Flag.CLIP] != Clip.NONE:
        bound = (L.scalars[Scalar.CLIP] if L.flags[Flag.CLIP] == Clip.STATIC
                 else L.thresh.double().cpu().reshape(col(Col.U).shape))
        x, m = case.x.double().cpu(), case.model()
        rows = case.coeffs.table64[case.t.cpu()]
        shape = col(Col.U).shape
        xr = rows[:, Col.U].reshape(shape) * x + rows[:, Col.W].reshape(shape) * m
        keep = (xr.abs() - bound).abs() > 1e-4 * (1 + xr.abs())
    dh = 1.0 if L.thresh is None else 1.0 / L.thresh.double().cpu().reshape(col(Col.U).shape)
    gya = gy.double().cpu().abs()
    a = gya * col(Col.P) * dh + (gx0.double().cpu().abs() * dh if gx0 is not None else 0)
    tol = case.tol()
    x_leaf = leaves[0]
    scale_x = gya * col(Col.Q) + a * col(Col.U)
    assert_close_scaled(torch.where(keep, grads[In.X].double().cpu(), 0),
                        torch.where(keep, x_leaf.grad, 0), scale_x, tol, f"grad X {case}")
    if not case.training:
        mo = leaves[1]
        scale_m = gya * col(Col.R) + a * col(Col.W)
        assert_close_scaled(torch.where(keep, grads[In.M].double().cpu(), 0),
                            torch.where(keep, mo.grad[:, :C], 0), scale_m, tol,
                            f"grad M {case}")
        if L.ins[In.V] is not None:
            want = mo.grad[:, C:]
            assert_close_scaled(grads[In.V], want, want.abs(), tol, f"grad V {case}")
        elif mo.grad.shape[1] > C:           # DDIM ignores the variance half
            assert torch.equal(mo.grad[:, C:], torch.zeros_like(mo.grad[:, C:]))
    if L.ins[In.H] is not None:
        want = case.h_leaf.grad
        assert_close_scaled(grads[In.H], want, gya * col(Col.H), tol, f"grad H {case}")
    if L.ins[In.Z] is not None:
        want = leaves[-1].grad
        assert_close_scaled(grads[In.Z], want, want.abs() + a * col(Col.E), tol,
                            f"grad Z {case}")


@pytest.mark.parametrize("cfg", CONFIGS + ADD_NOISE, ids=config_id)
def test_backward_matches_autograd(backend, cfg):
    dtype = _grad_dtype(backend)
    for k, case in enumerate(sample_inputs(backend, [cfg], seed=len(config_id(cfg)) + 1,
                                           dtypes=[dtype])):
        g = torch.Generator().manual_seed(k)
        gy = relayout(torch.randn(case.shape, generator=g, dtype=dtype), case.layout)
        gx0 = (relayout(torch.randn(case.shape, generator=g, dtype=dtype), case.layout)
               if k % 2 == 0 else None)
        _check_grads(case, backend, gy.to(backend.device),
                     None if gx0 is None else gx0.to(backend.device))


@pytest.mark.parametrize("layout", list(Layout), ids=lambda v: v.name)
def test_backward_dtypes_layouts(backend, layout):
    for cfg in (dict(method="ddpm", prediction_type="v_prediction", variance_type="learned_range",
                     clip_sample_range=1.0),
                dict(method="ddpm", prediction_type="epsilon", variance_type="learned")):
        for dtype, noise in itertools.product(backend.dtypes, ("external", "philox")):
            case = Case(cfg, (2, 3, 7, 5), dtype, layout, noise, backend.name, backend.device,
                        seed=5)
            gy = relayout(torch.randn(case.shape).to(dtype), layout).to(backend.device)
            gx0 = relayout(torch.randn(case.shape).to(dtype), layout).to(backend.device)
            _check_grads(case, backend, gy, gx0)


def test_backward_optional_outputs(backend):
    """Only the gradients asked for are written; each equals the full launch's."""
    cfg = dict(method="ddpm", prediction_type="epsilon", variance_type="learned_range",
               **dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5))
    case = Case(cfg, (2, 3, 6, 5), torch.float32, Layout.CONTIGUOUS, "external", backend.name,
                backend.device, seed=6)
    gy = torch.randn(case.shape, device=backend.device)
    full = case.launch.backward(backend.name, gy)
    for s in (In.X, In.M, In.V, In.Z):
        only = case.launch.backward(backend.name, gy, wanted={s})
        assert torch.equal(only[s], full[s]), s.name
        assert all(g is None for i, g in enumerate(only) if i != s)


# ----------------------------------------------------------------------------- guided, H
def _hand_table(R: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """A table with every column nonzero (random), rows differing."""
    table = torch.rand(R, NUM_COLS, generator=gen, dtype=torch.float64) + 0.25
    table[:, Col.VB] = table[:, Col.VB] - 0.5
    return table.to(dtype)


def _flags(clip, var, noise, layout, table) -> list:
    flags = [0] * NUM_FLAGS
    flags[Flag.CLIP], flags[Flag.VAR], flags[Flag.NOISE] = int(clip), int(var), int(noise)
    flags[Flag.LAYOUT] = int(layout)
    flags[Flag.TERMS] = terms_mask([c for c in (Col.U, Col.W, Col.E, Col.P, Col.Q, Col.R,
                                                Col.H, Col.S) if bool((table[:, c] != 0).any())])
    flags[Flag.NOISE_STREAM] = int(NoiseStream.STEP)
    return flags


def _formula(x, m, mc, v, z, h, rows, g, k, clip, thresh):
    """docs/kernels.md "The step, per element", written out in float64 for this test."""
    c = lambda col: rows[:, col].reshape(-1, 1, 1, 1)  # noqa: E731
    mm = k * ((1 - g) * m + g * mc)
    xr = c(Col.U) * x + c(Col.W) * mm + c(Col.E) * z
    if clip == Clip.STATIC:
        xh = xr.clamp(-1.5, 1.5)
    else:
        s = thresh.reshape(-1, 1, 1, 1)
        xh = torch.minimum(torch.maximum(xr, -s), s) / s
    sigma = c(Col.S) * torch.exp(c(Col.VA) + c(Col.VB) * v)
    y = c(Col.P) * xh + c(Col.Q) * x + c(Col.R) * mm + c(Col.H) * h + sigma * z
    return y, xh


@pytest.mark.parametrize("clip", [Clip.STATIC, Clip.DYNAMIC], ids=lambda v: v.name)
@pytest.mark.parametrize("layout", list(Layout), ids=lambda v: v.name)
def test_guided_and_h_streams(backend, clip, layout):
    """MC (guidance g, per-sample gscale) and H streams, E and every other column, on a
    hand-made step-indexed table, against the formula written above; and the backward
    against torch.autograd of that formula."""
    gen = torch.Generator().manual_seed(int(clip) * 10 + int(layout))
    B, shape = 3, (3, 4, 5, 6)
    table = _hand_table(7, gen)
    names = ("x", "m", "mc", "v", "z", "h")
    vals = {n: torch.randn(shape, generator=gen, dtype=torch.float64) for n in names}
    t = torch.tensor([6, 0, 3])
    gscale = torch.rand(B, generator=gen) + 0.5
    thresh = torch.rand(B, generator=gen) + 1.0
    g = 3.5
    dev = backend.device
    dtype = torch.float32
    ins = [None] * len(In)
    for s, n in zip((In.X, In.M, In.MC, In.V, In.Z, In.H), names):
        ins[s] = relayout(vals[n].to(dtype), layout).to(dev)
    scalars = [0.0] * NUM_SCALARS
    scalars[Scalar.CLIP], scalars[Scalar.GUIDANCE] = 1.5, g
    flags = _flags(clip, Var.EXP, Noise.EXTERNAL, layout, table)
    launch = Launch(ins, t.to(dev), None, table.to(dev),
                    thresh.to(dev) if clip == Clip.DYNAMIC else None, gscale.to(dev), flags,
                    scalars)
    y, x0 = launch.forward(backend.name)
    leaves = {n: ins[s].double().cpu().requires_grad_() for s, n in
              zip((In.X, In.M, In.MC, In.V, In.Z, In.H), names)}
    rows = table.double()[t]
    want_y, want_x0 = _formula(*[leaves[n] for n in names], rows, g,
                               gscale.double().reshape(-1, 1, 1, 1), clip, thresh.double())
    torch.testing.assert_close(y.double().cpu(), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0.double().cpu(), want_x0, rtol=1e-5, atol=1e-5)
    gy = torch.randn(shape, generator=gen)
    gx0 = torch.randn(shape, generator=gen)
    grads = launch.backward(backend.name, relayout(gy, layout).to(dev),
                            relayout(gx0, layout).to(dev))
    want = torch.autograd.grad((want_y * gy.double()).sum() + (want_x0 * gx0.double()).sum(),
                               [leaves[n] for n in names])
    for s, n, w in zip((In.X, In.M, In.MC, In.V, In.Z, In.H), names, want):
        torch.testing.assert_close(grads[s].double().cpu(), w, rtol=1e-4, atol=1e-4,
                                   msg=lambda msg: f"grad {n}: {msg}")


def test_missing_and_extra_streams_are_errors(backend):
    """Streams present exactly when needed (docs/kernels.md): M iff W or R, V iff VAR, Z iff
    EXTERNAL, H iff the H bit; the same exception type on every backend."""
    cfg = dict(method="ddpm", prediction_type="epsilon", variance_type="learned_range")
    case = Case(cfg, (2, 3, 4, 4), torch.float32, Layout.CONTIGUOUS, "external", backend.name,
                backend.device, seed=9)
    L = case.launch
    for s, present in ((In.M, None), (In.V, None), (In.Z, None), (In.H, L.x)):
        ins = list(L.ins)
        ins[s] = present
        with pytest.raises(ValueError, match=rf"ins\[{s.name}\]"):
            launchers(backend).forward(ins, L.t, L.seeds, L.table, L.thresh, None,
                                       [L.poisoned(), None], L.flags, L.scalars)


# ----------------------------------------------------------------------------- noise
@pytest.mark.parametrize("numel", [0, 1, 3, 4, 37, 1000, 4099])
def test_philox_uint32_bit_identical(backend, numel):
    dev = backend.device
    seeds = torch.tensor([0, 1, -1, 2 ** 40 + 7, -(2 ** 63), 2 ** 63 - 1, 123456789])
    t = torch.tensor([0, 999, 17, 2 ** 33 + 5, 1, 500, -3])
    for stream in NoiseStream:
        got = launchers(backend).philox_uint32(seeds.to(dev), t.to(dev), numel, int(stream))
        assert got.dtype == torch.int64 and got.shape == (7, numel)
        assert torch.equal(got.cpu(), philox.philox_uint32(seeds, t, numel, int(stream)))
    got = launchers(backend).philox_uint32(torch.tensor(5, device=dev).expand(3),
                                           torch.tensor(9, device=dev).expand(3), numel, 0)
    assert torch.equal(got.cpu(), philox.philox_uint32(torch.full((3,), 5), torch.full((3,), 9),
                                                       numel))


def test_philox_known_answer(backend):
    """Philox4x32-10 of counter 0, key 0 (Salmon et al. 2011's known-answer vector)."""
    z = torch.zeros(1, dtype=torch.int64, device=backend.device)
    got = launchers(backend).philox_uint32(z, z, 4, 0)
    assert [hex(v) for v in got[0].tolist()] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c",
                                                 "0x9b00dbd8"]
    other = launchers(backend).philox_uint32(z, z, 4, int(NoiseStream.STEP))
    assert not torch.equal(got, other)


def _noise_launch(shape, seeds, t, layout, dtype, device, stream=NoiseStream.TIMESTEP):
    """A launch whose every row makes y = z exactly (only S = 1)."""
    table = torch.zeros(1000, NUM_COLS, dtype=torch.float64 if dtype == torch.float64
                        else torch.float32)
    table[:, Col.S] = 1.0
    x = relayout(torch.zeros(shape, dtype=dtype), layout).to(device)
    ins = [None] * len(In)
    ins[In.X] = x
    flags = _flags(Clip.NONE, Var.FIXED, Noise.PHILOX, layout, table)
    flags[Flag.NOISE_STREAM] = int(stream)
    return Launch(ins, t.to(device), seeds.to(device), table.to(device), None, None, flags,
                  [0.0] * NUM_SCALARS)


@pytest.mark.parametrize("shape", [(3, 3, 17, 9), (2, 1, 5), (1, 4, 3, 2, 5), (2, 3, 19, 23),
                                   (1, 1, 1)], ids=str)
@pytest.mark.parametrize("layout", list(Layout), ids=lambda v: v.name)
def test_in_kernel_normals_are_the_spec(backend, shape, layout):
    """The step's noise (a table with only S = 1) and philox_normal_kernel: the Philox
    oracle's normals, on both stream words and in every dtype, bit-equal to each other."""
    B = shape[0]
    seeds = torch.tensor([3, -2 ** 50, 77][:B])
    t = torch.tensor([0, 999, 321][:B])
    cases = [(NoiseStream.STEP, torch.float32)] + [(NoiseStream.TIMESTEP, d)
                                                   for d in backend.dtypes]
    for stream, dtype in cases:
        want = philox.philox_normal(seeds, t, shape, stream=int(stream))
        launch = _noise_launch(shape, seeds, t, layout, dtype, backend.device, stream)
        y, _ = launch.forward(backend.name, write_x0=False)
        exact = dtype in (torch.float32, torch.float64)
        tol = backend.noise_tol if exact else (4e-3 if dtype == torch.float16 else 3e-2)
        err = float((y.double().cpu() - want.double()).abs().max()) if y.numel() else 0.0
        assert err <= tol * (1 if exact else float(want.abs().max())), (stream, dtype, err)
        if dtype == torch.float64:          # the normals are float32 values, carried exactly
            assert torch.equal(y.cpu().float().double(), y.cpu())
        out = relayout(torch.full(shape, NAN, dtype=dtype), layout).to(backend.device)
        launchers(backend).philox_normal(seeds.to(backend.device), t.to(backend.device),
                                         int(stream), int(layout), out)
        assert torch.equal(out, y), "philox_normal_kernel == the step's noise"
    again = _noise_launch(shape, seeds, t, layout, torch.float32, backend.device)
    assert torch.equal(again.forward(backend.name)[0],
                       _noise_launch(shape, seeds, t, layout, torch.float32,
                                     backend.device).forward(backend.name)[0])


def test_noise_batch_and_layout_invariance(backend):
    shape = (5, 3, 6, 11)
    seeds = torch.tensor([3, 1 << 35, -9, 77, 0])
    t = torch.tensor([999, 0, 5, 5, 123])
    a = _noise_launch(shape, seeds, t, Layout.CONTIGUOUS, torch.float32,
                      backend.device).forward(backend.name)[0].cpu()
    b = _noise_launch(shape, seeds, t, Layout.CHANNELS_LAST, torch.float32,
                      backend.device).forward(backend.name)[0].cpu()
    assert torch.equal(a, b)
    for k in range(5):
        alone = _noise_launch((1,) + shape[1:], seeds[k:k + 1], t[k:k + 1], Layout.CONTIGUOUS,
                              torch.float32, backend.device).forward(backend.name)[0].cpu()
        assert torch.equal(alone[0], a[k])


def test_step_batch_and_layout_invariance(backend):
    """A sample's result does not depend on its batch or on the memory format (bit-exact),
    forward and backward."""
    cfg = dict(method="ddpm", prediction_type="epsilon", variance_type="learned_range",
               clip_sample_range=1.0)
    for shape in ((5, 3, 9, 7), (2, 4, 3, 5, 2)):
        a = Case(cfg, shape, torch.float32, Layout.CONTIGUOUS, "philox", backend.name,
                 backend.device, seed=11)
        b = Case(cfg, shape, torch.float32, Layout.CHANNELS_LAST, "philox", backend.name,
                 backend.device, seed=11)
        assert torch.equal(a.x, b.x) and torch.equal(a.mo, b.mo)
        ya, x0a = a.launch.forward(backend.name)
        yb, x0b = b.launch.forward(backend.name)
        assert torch.equal(ya, yb) and torch.equal(x0a, x0b)
        gy = torch.randn(shape, device=backend.device)
        ga = a.launch.backward(backend.name, gy)
        gb = b.launch.backward(backend.name, relayout(gy, Layout.CHANNELS_LAST))
        for u, v in zip(ga, gb):
            if u is not None:
                assert torch.equal(u, v)
        L = a.launch
        for k in range(shape[0]):
            ins = [None if s is None else s[k:k + 1] for s in L.ins]
            one = Launch(ins, L.t[k:k + 1], L.seeds[k:k + 1], L.table, None, None, L.flags,
                         L.scalars)
            assert torch.equal(one.forward(backend.name)[0][0], ya[k])


def test_noise_statistics():
    """The noise spec gives standard normals: mean, variance, a KS test, each Box–Muller
    lane alone, no neighbour correlation. (Every backend's normals equal the spec's within
    the noise tolerance, test_in_kernel_normals_are_the_spec.)"""
    from scipy import stats
    shape = (2, 1, 65536)                      # 131072 draws
    z = philox.philox_normal(torch.tensor([2024, -5]), torch.tensor([17, 999]), shape).double()
    flat = z.flatten()
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / math.sqrt(n)
    assert abs(flat.std().item() - 1) < 5 * math.sqrt(0.5 / n)
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    for lane in range(4):                      # each Box–Muller output on its own
        zl = z[..., lane::4].flatten()
        assert abs(zl.mean().item()) < 5 / math.sqrt(zl.numel())
        assert abs(zl.std().item() - 1) < 5 * math.sqrt(0.5 / zl.numel())
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 5 / math.sqrt(n)


# ----------------------------------------------------------------------------- checks
def test_argument_errors(backend):
    """The contract's checks, with the same exception type on every backend."""
    cfg = dict(method="ddpm", prediction_type="epsilon")
    case = Case(cfg, (2, 3, 4, 4), torch.float32, Layout.CONTIGUOUS, "philox", backend.name,
                backend.device, seed=0)
    L = case.launch
    f = launchers(backend).forward
    x = L.x
    y = L.poisoned()

    def call(ins=None, t=L.t, seeds=L.seeds, table=L.table, thresh=None, outs=None,
             flags=L.flags):
        f(list(L.ins) if ins is None else ins, t, seeds, table, thresh, None,
          [y, None] if outs is None else outs, list(flags), L.scalars)

    def with_in(s, value):
        ins = list(L.ins)
        ins[s] = value
        return ins

    def with_flag(k, value):
        flags = list(L.flags)
        flags[k] = value
        return flags

    cases = [
        (TypeError, r"ins\[M\]", dict(ins=with_in(In.M, x.double()))),
        (ValueError, r"ins\[M\]", dict(ins=with_in(In.M, x.transpose(2, 3)))),
        (ValueError, r"ins\[M\]", dict(ins=with_in(In.M, x[:, :2]))),
        (ValueError, r"ins\[M\]", dict(ins=with_in(In.M, x.contiguous(
            memory_format=torch.channels_last)))),
        (ValueError, r"outs\[Y\]", dict(outs=[y[:, :, ::2], None])),
        (ValueError, "seeds", dict(seeds=None)),
        (ValueError, "seeds", dict(seeds=L.seeds[:1])),
        (TypeError, "seeds", dict(seeds=L.seeds.int())),
        (TypeError, "table", dict(table=L.table.double())),
        (ValueError, "table", dict(table=L.table[:, :NUM_COLS - 1].contiguous())),
        (TypeError, r"\bt\b", dict(t=L.t.int())),
        (ValueError, r"\bt\b", dict(t=L.t[:1])),
        (ValueError, "thresh", dict(flags=with_flag(Flag.CLIP, Clip.DYNAMIC))),
        (ValueError, "thresh", dict(thresh=torch.ones(2, device=x.device))),
        (ValueError, r"ins\[V\]", dict(flags=with_flag(Flag.VAR, Var.SQRT))),
        (ValueError, r"flags\[CLIP\]", dict(flags=with_flag(Flag.CLIP, 3))),
        (ValueError, r"flags\[LAYOUT\]", dict(flags=with_flag(Flag.LAYOUT, 7))),
        (ValueError, r"flags\[TERMS\]", dict(flags=with_flag(Flag.TERMS, 1 << NUM_COLS))),
        (ValueError, r"flags\[NOISE\]", dict(flags=with_flag(Flag.NOISE, Noise.NONE),
                                             seeds=None)),
        (ValueError, "flags", dict(flags=L.flags[:-1])),
        (ValueError, "ins", dict(ins=L.ins[:-1])),
        (ValueError, r"scalars\[CLIP\]", dict(flags=with_flag(Flag.CLIP, Clip.STATIC))),
        (ValueError, r"flags\[NOISE_STREAM\]", dict(flags=with_flag(Flag.NOISE_STREAM, 5))),
        (ValueError, r"outs\[Y\]", dict(outs=[None, None])),
        (ValueError, r"outs\[Y\].*overlap", dict(outs=[y[:1].expand(2, -1, -1, -1), None])),
    ]
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            call(**kw)
    s = L.seeds.contiguous()
    u32, normal = launchers(backend).philox_uint32, launchers(backend).philox_normal
    for exc, match, args in [
            (TypeError, "seeds", (s.int(), s, 4, 0)), (TypeError, r"\bt\b", (s, s.float(), 4, 0)),
            (ValueError, "shape", (s, s[:1], 4, 0)), (ValueError, "numel", (s, s, -1, 0)),
            (ValueError, "stream", (s, s, 4, 9))]:
        with pytest.raises(exc, match=match):
            u32(*args)
    out = torch.empty_like(x)
    for exc, match, args in [
            (ValueError, "layout", (s, s, 0, 5, out)), (ValueError, "stream", (s, s, 9, 0, out)),
            (ValueError, "sample-dense", (s, s, 0, 0, out.transpose(2, 3))),
            (TypeError, "out", (s, s, 0, 0, out.int()))]:
        with pytest.raises(exc, match=match):
            normal(*args)
    if torch.float64 not in backend.dtypes:
        with pytest.raises(TypeError, match=r"ins\[X\]"):
            d = x.double()
            call(ins=[d, d] + [None] * (len(In) - 2), table=L.table.double(),
                 outs=[d.clone(), None])


def test_opcheck(backend):
    """opcheck (schema, fake, aliasing, autograd registration) of the registered step op on
    a launch of this backend, and of the kernels themselves where they are torch ops."""
    cfg = dict(method="ddpm", prediction_type="v_prediction", variance_type="learned_range",
               clip_sample_range=1.0)
    case = Case(cfg, (2, 3, 4, 5), torch.float32, Layout.CONTIGUOUS, "external", backend.name,
                backend.device, seed=0)
    L = case.launch
    ops = torch.ops.fused_ddpm
    streams, present = fd.ops.pack([a if a is None else a.contiguous() for a in L.ins])
    torch.library.opcheck(ops.step.default, (streams, present, L.t, L.seeds, L.table, L.thresh,
                                             None, L.flags, L.scalars, True, backend.name))
    if not get_backend(backend.name).torch_ops:
        return                       # Python launchers: no kernel op of their own
    # torch 2.13's auto_functionalize fails on a mutable Tensor?[] holding None
    # ('dict' object has no attribute 'append'), which the kernels' grads list always has:
    # the AOT-dispatch check is left out for the kernel ops (fused_ddpm::step, which
    # torch.compile sees instead, passes all of them above).
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.step_forward_kernel.default,
                          ([a if a is None else a.contiguous() for a in L.ins], L.t, L.seeds,
                           L.table, L.thresh, None, [L.poisoned(), L.poisoned()], L.flags,
                           L.scalars), test_utils=utils)
    gy = torch.randn(L.x.shape, device=backend.device)
    grads = [None if a is None else torch.empty_like(L.x) for a in L.ins]
    torch.library.opcheck(ops.step_backward_kernel.default,
                          ([a if a is None else a.contiguous() for a in L.ins], gy, gy.clone(),
                           L.t, L.seeds, L.table, L.thresh, None, grads, L.flags, L.scalars),
                          test_utils=utils)
    s = torch.tensor([1, 2], device=backend.device)
    torch.library.opcheck(ops.philox_uint32.default, (s, s + 2, 10, 0))
    torch.library.opcheck(ops.philox_normal_kernel.default,
                          (s, s, 0, 0, torch.empty(2, 3, 4, device=backend.device)))


def test_contract_lists_are_complete():
    """The suite covers every stream, output, flag and scalar the contract declares."""
    assert [s.name for s in In] == ["X", "M", "MC", "V", "Z", "H"]
    assert [o.name for o in Out] == ["Y", "X0"]
    assert {f.name for f in Flag} == {"CLIP", "VAR", "NOISE", "LAYOUT", "TERMS",
                                      "NOISE_STREAM"}
    assert {s.name for s in Scalar} == {"CLIP", "GUIDANCE"}
    covered = {Var(c.launch.flags[Flag.VAR]) for c in sample_inputs(
        type("B", (), {"name": "torch", "device": "cpu", "dtypes": (torch.float32,)})())}
    assert covered == set(Var)


def test_case_generator_covers_the_registry():
    """sample_inputs draws every method, prediction type and variance type of the registry."""
    from fused_ddpm.methods import METHODS, PREDICTIONS, VARIANCES
    cfgs = step_configs() + ADD_NOISE
    assert {c["method"] for c in cfgs} == set(METHODS)
    assert {c["prediction_type"] for c in cfgs} == set(PREDICTIONS)
    assert {c["variance_type"] for c in cfgs if "variance_type" in c} == set(VARIANCES)
    assert len({(SCHED.num_train_timesteps,) + s for s in SHAPES}) == len(SHAPES)
