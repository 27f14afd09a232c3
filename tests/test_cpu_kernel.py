"""The C++ CPU kernels (fused_ddpm._C) against the float64 PyTorch reference.

Calls the raw ops `torch.ops.fused_ddpm.step_forward_kernel` / `step_backward_kernel` /
`philox_uint32` with arguments built as docs/kernels.md promises them.
"""
from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

import fused_ddpm as fd
from fused_ddpm import philox
from fused_ddpm.coefficients import CLIP_DYNAMIC
from fused_ddpm.reference import ddpm_step as ref_step
from fused_ddpm.reference import dynamic_threshold_scale

_spec = importlib.util.find_spec("fused_ddpm._C")
if _spec is None:  # pragma: no cover - pure-Python install
    pytest.skip("fused_ddpm._C is not built", allow_module_level=True)
torch.ops.load_library(_spec.origin)
OPS = torch.ops.fused_ddpm

SCHED = fd.NoiseSchedule(num_train_timesteps=1000, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02)
THRESH_RATIO, THRESH_MAX = 0.9, 2.5

# (atol as a fraction of max|ref|, rtol) per dtype
TOL = {torch.float64: (1e-6, 1e-6), torch.float32: (2e-5, 2e-5),
       torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _coeffs(method="ddpm", pred="epsilon", var="fixed_small", clip="none", eta=0.0,
            clipped_eps=False, steps=50):
    kw = dict(method=method, prediction_type=pred, variance_type=var,
              num_inference_steps=steps, eta=eta, use_clipped_model_output=clipped_eps)
    if clip == "static":
        kw["clip_sample_range"] = 1.0
    elif clip == "dynamic":
        kw.update(thresholding=True, dynamic_thresholding_ratio=THRESH_RATIO,
                  sample_max_value=THRESH_MAX)
    return fd.step_coefficients(SCHED, **kw)


def _to_layout(a: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Same values; each sample contiguous, or contiguous in channels-last order (any rank)."""
    if not channels_last:
        return a.contiguous()
    perm = [0] + list(range(2, a.dim())) + [1]
    inv = [0, a.dim() - 1] + list(range(1, a.dim() - 1))
    return a.permute(perm).contiguous().permute(inv)


class Case:
    """Random inputs of one step and the kernel arguments built from them."""

    def __init__(self, coeffs, shape, dtype, *, channels_last=False, external_noise=False,
                 t=None, seeds=None, views=True, gen=None):
        cfg = coeffs.config
        self.coeffs, self.cfg, self.dtype = coeffs, cfg, dtype
        B, C = shape[0], shape[1]
        g = gen or torch.Generator().manual_seed(1234)
        self.x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5).to(dtype)
        mshape = (B, 2 * C) + tuple(shape[2:]) if cfg.learned_variance else tuple(shape)
        mo = torch.randn(mshape, generator=g, dtype=torch.float64) * 1.5
        if cfg.variance_mode == 1:        # learned: v is a variance (> 0)
            mo[:, C:] = torch.rand((B, C) + tuple(shape[2:]), generator=g,
                                   dtype=torch.float64) * 0.02 + 1e-3
        elif cfg.variance_mode == 2:      # learned_range: v in [-1, 1]
            mo[:, C:] = torch.rand((B, C) + tuple(shape[2:]), generator=g,
                                   dtype=torch.float64) * 2 - 1
        self.mo = mo.to(dtype)
        self.x = _to_layout(self.x, channels_last)
        if channels_last or not views:
            self.mo = _to_layout(self.mo, channels_last)
            self.m = _to_layout(self.mo[:, :C], channels_last)
            self.v = _to_layout(self.mo[:, C:], channels_last) if cfg.learned_variance else None
        else:                             # the two halves of a 2C-channel output, as views
            self.m = self.mo[:, :C]
            self.v = self.mo[:, C:] if cfg.learned_variance else None
        if t is None:
            ts = coeffs.timesteps
            t = torch.tensor([0, int(ts[0])] + [int(ts[i % len(ts)]) for i in
                                                torch.randint(0, len(ts), (max(B - 2, 0),),
                                                              generator=g)])[:B]
            t = t[torch.randperm(B, generator=g)] if B else t
        self.t = t
        if external_noise:
            self.noise = _to_layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype),
                                    channels_last)
            self.seeds = None
        else:
            self.noise = None
            if seeds is None:
                seeds = torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g, dtype=torch.int64)
            self.seeds = seeds
        self.table = coeffs.table64 if dtype == torch.float64 else coeffs.table
        self.clip = float(cfg.clip_sample_range or 0.0)
        self.thresh = None
        if cfg.clip_mode == CLIP_DYNAMIC:
            rows = coeffs.table64[t.clamp(0, SCHED.num_train_timesteps - 1)]
            bshape = (-1,) + (1,) * (len(shape) - 1)
            xr = rows[:, 0].reshape(bshape) * self.x.double() + rows[:, 1].reshape(bshape) * self.m.double()
            self.thresh = dynamic_threshold_scale(xr, THRESH_RATIO, THRESH_MAX).float()

    def args(self):
        return (self.x, self.m, self.v, self.noise, self.seeds, self.t, self.table, self.thresh)

    def modes(self):
        return (self.clip, self.cfg.clip_mode, self.cfg.variance_mode)

    def forward(self, return_x0=True):
        y = torch.full_like(self.x, float("nan"))
        x0 = torch.full_like(self.x, float("nan")) if return_x0 else None
        OPS.step_forward_kernel(*self.args(), y, x0, *self.modes())
        return y, x0

    def reference(self):
        """float64 reference outputs (y, x0) and a function giving float64 gradients."""
        x = self.x.double()
        mo = self.mo.double()
        noise = self.noise.double() if self.noise is not None else None
        return ref_step(x, mo, self.t, self.coeffs, noise=noise, seeds=self.seeds,
                        return_x0=True)


def _close(out, ref, dtype, what, scale=None, extra=0.0):
    atol_f, rtol = TOL[dtype]
    scale = float(ref.abs().max()) if scale is None and ref.numel() else (scale or 1.0)
    atol = atol_f * max(scale, 1.0) + extra
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (not written?)"
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


VARIANTS = (
    [("ddpm", pred, var, clip, 0.0, False)
     for pred in ("epsilon", "sample", "v_prediction")
     for var in ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
     for clip in ("none", "static", "dynamic")]
    + [("ddim", pred, "fixed_small", clip, eta, ce)
       for pred in ("epsilon", "sample", "v_prediction")
       for clip in ("none", "static", "dynamic")
       for eta, ce in ((0.0, False), (0.7, True))]
)


def _vid(v):
    return "-".join(str(p) for p in v)


@pytest.mark.parametrize("variant", VARIANTS, ids=_vid)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_variants(variant, dtype):
    method, pred, var, clip, eta, ce = variant
    co = _coeffs(method, pred, var, clip, eta, ce)
    for external in (False, True):
        case = Case(co, (4, 3, 5, 7), dtype, external_noise=external)
        y, x0 = case.forward()
        yr, x0r = case.reference()
        extra = 0.0
        if dtype == torch.float64 and clip == "dynamic":
            extra = 1e-5   # thresh is float32 (the reference computes s in float64)
        _close(y, yr, dtype, f"y (external={external})", extra=extra)
        _close(x0, x0r, dtype, f"x0 (external={external})", extra=extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 5), (2, 5, 3, 7, 3), (1, 1, 1, 1), (3, 4, 17, 9),
                                   (2, 3, 2, 2), (5, 2, 33)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_shapes_dtypes_layouts(dtype, shape, channels_last):
    for variant in (("ddpm", "epsilon", "learned_range", "static", 0.0, False),
                    ("ddim", "v_prediction", "fixed_small", "dynamic", 0.5, False)):
        co = _coeffs(*variant)
        for external in (False, True):
            case = Case(co, shape, dtype, channels_last=channels_last, external_noise=external)
            y, x0 = case.forward()
            yr, x0r = case.reference()
            extra = 1e-5 if dtype == torch.float64 else 0.0
            if dtype in (torch.float16, torch.bfloat16) and variant[3] == "dynamic":
                extra = 0.05   # thresh from rounded inputs vs the reference's own quantile
            _close(y, yr, dtype, f"y {variant}", extra=extra)
            _close(x0, x0r, dtype, f"x0 {variant}", extra=extra)
            if channels_last and len(shape) >= 3 and shape[1] > 1 and torch.Size(shape[2:]).numel() > 1:
                assert not case.x[0].is_contiguous()


def test_views_of_2c_output_and_no_x0():
    co = _coeffs("ddpm", "epsilon", "learned", "none")
    case = Case(co, (3, 4, 6, 5), torch.float32, views=True)
    assert case.m.stride(0) == 2 * 4 * 30 and not case.m.is_contiguous()
    y, x0 = case.forward(return_x0=False)
    assert x0 is None
    yr, _ = case.reference()
    _close(y, yr, torch.float32, "y")
    # same result from compact copies
    y2 = torch.full_like(y, float("nan"))
    OPS.step_forward_kernel(case.x, case.m.contiguous(), case.v.contiguous(), None, case.seeds,
                            case.t, case.table, None, y2, None, *case.modes())
    assert torch.equal(y, y2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_outputs_may_alias_inputs(dtype):
    """y written over x (an in-place sampling loop), grad_x over grad_y: same results."""
    co = _coeffs("ddpm", "epsilon", "learned_range", "static")
    case = Case(co, (2, 3, 9, 11), dtype, views=False)
    y, x0 = case.forward()
    xy = case.x.clone()
    OPS.step_forward_kernel(xy, case.m, case.v, None, case.seeds, case.t, case.table, None, xy,
                            None, *case.modes())
    assert torch.equal(xy, y)
    gy = torch.randn(case.x.shape).to(dtype)
    want = _kernel_grads(case, gy, None)
    g = gy.clone()
    gm, gv = torch.empty_like(g), torch.empty_like(g)
    OPS.step_backward_kernel(g, None, *case.args(), g, gm, gv, None, *case.modes())
    assert torch.equal(g, want[0]) and torch.equal(gm, want[1]) and torch.equal(gv, want[2])


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4), (3, 2, 0)], ids=str)
def test_numel_zero(shape):
    co = _coeffs()
    x = torch.zeros(shape)
    y = torch.empty(shape)
    B = shape[0]
    seeds = torch.zeros(B, dtype=torch.int64)
    t = torch.zeros(B, dtype=torch.int64)
    OPS.step_forward_kernel(x, x, None, None, seeds, t, co.table, None, y, None, 0.0, 0, 0)
    OPS.step_backward_kernel(x, None, x, x, None, None, seeds, t, co.table, None, y,
                             torch.empty(shape), None, None, 0.0, 0, 0)
    assert OPS.philox_uint32(seeds, t, 0).shape == (B, 0)


def test_scalar_t_and_seeds_expanded():
    co = _coeffs()
    case = Case(co, (3, 3, 8, 8), torch.float32)
    t = co.timesteps[5].clone().expand(3)
    seeds = torch.tensor(42).expand(3)
    y = torch.empty_like(case.x)
    OPS.step_forward_kernel(case.x, case.m, None, None, seeds, t, case.table, None, y, None, 0.0, 0, 0)
    yr = ref_step(case.x.double(), case.mo.double(), t.contiguous(), co, seeds=seeds.contiguous())
    _close(y, yr, torch.float32, "y")
    # one seed for all samples: same noise in every sample (same t) → differences come from x, m
    OPS.step_forward_kernel(torch.zeros_like(case.x), torch.zeros_like(case.x), None, None, seeds,
                            t, case.table, None, y, None, 0.0, 0, 0)
    assert torch.equal(y[0], y[1]) and torch.equal(y[1], y[2])


def test_t_out_of_range_is_clamped():
    co = _coeffs(steps=None)
    x = torch.randn(2, 3, 4, 4)
    n = torch.randn(2, 3, 4, 4)
    y1, y2 = torch.empty_like(x), torch.empty_like(x)
    OPS.step_forward_kernel(x, x, None, n, None, torch.tensor([-5, 5000]), co.table, None, y1, None, 0.0, 0, 0)
    OPS.step_forward_kernel(x, x, None, n, None, torch.tensor([0, 999]), co.table, None, y2, None, 0.0, 0, 0)
    assert torch.equal(y1, y2)


# ------------------------------------------------------------------------------ backward

def _ref_grads(case, gy, gx0):
    x = case.x.double().requires_grad_(True)
    mo = case.mo.double().requires_grad_(True)
    noise = case.noise.double().requires_grad_(True) if case.noise is not None else None
    y, x0 = ref_step(x, mo, case.t, case.coeffs, noise=noise, seeds=case.seeds, return_x0=True)
    loss = (y * gy.double()).sum()
    if gx0 is not None:
        loss = loss + (x0 * gx0.double()).sum()
    loss.backward()
    C = case.x.shape[1]
    gv = mo.grad[:, C:] if case.cfg.learned_variance else None
    gn = noise.grad if noise is not None else None
    return x.grad, mo.grad[:, :C], gv, gn


def _kernel_grads(case, gy, gx0):
    nan = lambda: torch.full_like(case.x, float("nan"))  # noqa: E731
    gx, gm = nan(), nan()
    gv = nan() if case.v is not None else None
    gn = nan() if case.noise is not None else None
    OPS.step_backward_kernel(gy, gx0, *case.args(), gx, gm, gv, gn, *case.modes())
    return gx, gm, gv, gn


@pytest.mark.parametrize("variant", VARIANTS, ids=_vid)
def test_backward_variants(variant):
    method, pred, var, clip, eta, ce = variant
    co = _coeffs(method, pred, var, clip, eta, ce)
    dtype = torch.float64
    for external, with_gx0 in itertools.product((False, True), (False, True)):
        case = Case(co, (3, 2, 5, 3), dtype, external_noise=external)
        g = torch.Generator().manual_seed(7)
        gy = _to_layout(torch.randn(case.x.shape, generator=g, dtype=dtype), False)
        gx0 = torch.randn(case.x.shape, generator=g, dtype=dtype) if with_gx0 else None
        got = _kernel_grads(case, gy, gx0)
        want = _ref_grads(case, gy, gx0)
        extra = 1e-5 if clip == "dynamic" else 1e-9
        for name, a, b in zip(("grad_x", "grad_m", "grad_v", "grad_noise"), got, want):
            if b is None:
                assert a is None
                continue
            _close(a, b, dtype, f"{name} (external={external}, gx0={with_gx0})", extra=extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_dtypes_layouts(dtype, channels_last):
    for variant in (("ddpm", "v_prediction", "learned_range", "static", 0.0, False),
                    ("ddpm", "epsilon", "learned", "none", 0.0, False)):
        co = _coeffs(*variant)
        for external in (False, True):
            case = Case(co, (2, 3, 7, 5), dtype, channels_last=channels_last,
                        external_noise=external)
            gy = _to_layout(torch.randn(case.x.shape).to(dtype), channels_last)
            gx0 = _to_layout(torch.randn(case.x.shape).to(dtype), channels_last)
            got = _kernel_grads(case, gy, gx0)
            want = _ref_grads(case, gy, gx0)
            for name, a, b in zip(("grad_x", "grad_m", "grad_v", "grad_noise"), got, want):
                if b is not None:
                    _close(a, b, dtype, f"{name} {variant} external={external}")


def test_backward_optional_outputs():
    co = _coeffs("ddpm", "epsilon", "learned_range", "none")
    case = Case(co, (2, 3, 4, 4), torch.float32, external_noise=True)
    gy = torch.randn(case.x.shape)
    gx, gm = torch.empty_like(gy), torch.empty_like(gy)
    OPS.step_backward_kernel(gy, None, *case.args(), gx, gm, None, None, *case.modes())
    want = _ref_grads(case, gy, None)
    _close(gx, want[0], torch.float32, "grad_x")
    _close(gm, want[1], torch.float32, "grad_m")


# ------------------------------------------------------------------------------ noise

@pytest.mark.parametrize("numel", [0, 1, 3, 4, 37, 1000, 4099])
def test_philox_uint32_bit_identical(numel):
    seeds = torch.tensor([0, 1, -1, 2 ** 40 + 7, -(2 ** 63), 2 ** 63 - 1, 123456789])
    t = torch.tensor([0, 999, 17, 2 ** 33 + 5, 1, 500, -3])
    got = OPS.philox_uint32(seeds, t, numel)
    want = philox.philox_uint32(seeds, t, numel)
    assert got.dtype == torch.int64 and got.shape == (7, numel)
    assert torch.equal(got, want)
    # stride-0 (expanded) inputs
    got = OPS.philox_uint32(torch.tensor(5).expand(3), torch.tensor(9).expand(3), numel)
    assert torch.equal(got, philox.philox_uint32(torch.full((3,), 5), torch.full((3,), 9), numel))


def _noise_table(dtype):
    """A table whose every row gives y = z exactly (u = w = p = q = r = 0, s = 1)."""
    table = torch.zeros(1000, 8, dtype=dtype)
    table[:, 5] = 1.0
    return table


@pytest.mark.parametrize("shape", [(3, 3, 17, 9), (2, 1, 5), (1, 4, 3, 2, 5), (2, 3, 128, 130)],
                         ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_kernel_normals(shape, channels_last, dtype):
    B = shape[0]
    seeds = torch.tensor([3, -2 ** 50, 77, 1][:B])
    t = torch.tensor([0, 999, 321, 5][:B])
    x = _to_layout(torch.zeros(shape, dtype=dtype), channels_last)
    y = torch.full_like(x, float("nan"))
    OPS.step_forward_kernel(x, x, None, None, seeds, t, _noise_table(dtype), None, y, None, 0.0, 0, 0)
    want = philox.philox_normal(seeds, t, shape)
    assert (y.double() - want.double()).abs().max() <= 1e-6
    if dtype == torch.float64:   # the normals are float32 values, carried exactly
        x32 = _to_layout(torch.zeros(shape), channels_last)
        y32 = torch.empty_like(x32)
        OPS.step_forward_kernel(x32, x32, None, None, seeds, t,
                                _noise_table(torch.float32), None, y32, None, 0.0, 0, 0)
        assert torch.equal(y.float(), y32)


def test_batch_invariance():
    co = _coeffs()
    case = Case(co, (5, 3, 9, 7), torch.float32)
    y, x0 = case.forward()
    for b in range(5):
        yb = torch.empty_like(case.x[b:b + 1])
        OPS.step_forward_kernel(case.x[b:b + 1], case.m[b:b + 1], None, None, case.seeds[b:b + 1],
                                case.t[b:b + 1], case.table, None, yb, None, *case.modes())
        assert torch.equal(yb[0], y[b])


@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (2, 4, 3, 5, 2), (3, 5, 11)], ids=str)
def test_channels_last_equals_contiguous(shape):
    co = _coeffs("ddpm", "epsilon", "learned_range", "static")
    a = Case(co, shape, torch.float32, channels_last=False, views=False)
    b = Case(co, shape, torch.float32, channels_last=True)
    assert torch.equal(a.x, b.x) and torch.equal(a.m, b.m) and torch.equal(a.v, b.v)
    ya, x0a = a.forward()
    yb, x0b = b.forward()
    assert torch.equal(ya, yb) and torch.equal(x0a, x0b)
    gy = torch.randn(shape)
    ga = _kernel_grads(a, gy, None)
    gb = _kernel_grads(b, _to_layout(gy, True), None)
    for u, v in zip(ga, gb):
        if u is not None:
            assert torch.equal(u, v)


# ------------------------------------------------------------------------------ checks

def test_argument_errors():
    co = _coeffs()
    x = torch.randn(2, 3, 4, 4)
    y = torch.empty_like(x)
    s = torch.zeros(2, dtype=torch.int64)
    t = torch.zeros(2, dtype=torch.int64)
    f = OPS.step_forward_kernel
    with pytest.raises(RuntimeError, match="dtype"):
        f(x, x.double(), None, None, s, t, co.table, None, y, None, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="sample-dense"):
        f(x, x.transpose(2, 3), None, None, s, t, co.table, None, y, None, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="sample-dense"):
        f(x[:, :, ::2], x[:, :, ::2], None, None, s, t, co.table, None, y[:, :, ::2], None, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="same layout"):
        f(x, x.contiguous(memory_format=torch.channels_last), None, None, s, t, co.table, None, y,
          None, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="seeds"):
        f(x, x, None, None, None, t, co.table, None, y, None, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="table"):
        f(x, x, None, None, s, t, co.table64, None, y, None, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="table"):
        f(x, x, None, None, s, t, co.table[:, :7].contiguous(), None, y, None, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="thresh"):
        f(x, x, None, None, s, t, co.table, None, y, None, 0.0, 2, 0)
    with pytest.raises(RuntimeError, match="needs v"):
        f(x, x, None, None, s, t, co.table, None, y, None, 0.0, 0, 1)
    with pytest.raises(RuntimeError, match=r"shape \[B\]"):
        f(x, x, None, None, s[:1], t, co.table, None, y, None, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="int64|Long"):
        f(x, x, None, None, s.int(), t, co.table, None, y, None, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="shape"):
        f(x, x[:, :2], None, None, s, t, co.table, None, y, None, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="clip_mode"):
        f(x, x, None, None, s, t, co.table, None, y, None, 0.0, 3, 0)


# ------------------------------------------------------------------------------ opcheck

def test_opcheck():
    import fused_ddpm.ops  # noqa: F401  (registers the fake impls of the kernel ops)
    co = _coeffs("ddpm", "v_prediction", "learned_range", "static")
    case = Case(co, (2, 3, 4, 5), torch.float32, views=False)
    y = torch.empty_like(case.x)
    x0 = torch.empty_like(case.x)
    torch.library.opcheck(OPS.step_forward_kernel.default,
                          (*case.args(), y, x0, *case.modes()))
    gy = torch.randn(case.x.shape)
    outs = [torch.empty_like(case.x) for _ in range(3)]
    torch.library.opcheck(OPS.step_backward_kernel.default,
                          (gy, gy.clone(), *case.args(), *outs, None, *case.modes()))
    torch.library.opcheck(OPS.philox_uint32.default,
                          (torch.tensor([1, 2]), torch.tensor([3, 4]), 10))
