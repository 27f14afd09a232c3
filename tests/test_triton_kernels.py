"""The Triton backend's launch functions (docs/kernels.md) against the float64 reference.

Runs under the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1) and on
a GPU when there is one. Launchers are called directly with contract-shaped arguments.
"""
from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

import fused_ddpm as fd  # noqa: E402
from fused_ddpm import reference  # noqa: E402
from fused_ddpm.coefficients import CLIP_DYNAMIC, CLIP_NONE  # noqa: E402
from fused_ddpm.philox import philox_normal  # noqa: E402
from fused_ddpm.philox import philox_uint32 as ref_philox_uint32  # noqa: E402
from fused_ddpm.triton_kernels import philox_uint32, step_backward, step_forward  # noqa: E402
from fused_ddpm.triton_kernels import step as tstep  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
T_TRAIN = 1000
SCHED = fd.NoiseSchedule(num_train_timesteps=T_TRAIN)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
NAN = float("nan")


# ----------------------------------------------------------------------------- helpers

def to_channels_last(a: torch.Tensor) -> torch.Tensor:
    """Same values, each sample stored channels-last (strides (1, ..., C)); any rank >= 3."""
    d = a.dim()
    perm = (0, *range(2, d), 1)
    inv = [0] * d
    for i, p in enumerate(perm):
        inv[p] = i
    return a.permute(perm).contiguous().permute(inv)


def poisoned(like: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(like)          # preserve_format keeps the layout
    out.fill_(NAN)
    return out


def coeffs_for(method="ddpm", pred="epsilon", var="fixed_small", clip="none", **kw):
    ckw = dict(method=method, prediction_type=pred, variance_type=var, device=DEV, **kw)
    if clip == "static":
        ckw["clip_sample_range"] = 1.0
    elif clip == "dynamic":
        ckw.update(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    return fd.step_coefficients(SCHED, **ckw)


class Case:
    """Random inputs for one launch, laid out per the contract, plus float64 views."""

    def __init__(self, coeffs, shape, dtype=torch.float32, layout="contiguous", t=None,
                 ext_noise=True, seeds=None, gen_seed=0):
        g = torch.Generator().manual_seed(gen_seed)
        cfg = coeffs.config
        self.coeffs, self.cfg = coeffs, cfg
        self.cm, self.vm = cfg.clip_mode, cfg.variance_mode
        self.clip = float(cfg.clip_sample_range or 0.0)
        B, C = shape[0], shape[1]
        self.shape = tuple(shape)
        cl = layout == "channels_last"
        lay = to_channels_last if cl else (lambda a: a.contiguous())

        x = torch.randn(shape, generator=g) * 1.5
        if self.vm:
            mo = torch.randn((B, 2 * C) + tuple(shape[2:]), generator=g)
            if self.vm == 1:      # learned: a positive variance
                mo[:, C:] = torch.rand((B, C) + tuple(shape[2:]), generator=g) * 0.5 + 0.05
            else:                 # learned_range: v in [-1, 1]
                mo[:, C:] = torch.rand((B, C) + tuple(shape[2:]), generator=g) * 2 - 1
            mo = mo.to(dtype)
            if cl:
                m, v = lay(mo[:, :C]), lay(mo[:, C:])
            else:                 # two views of the 2C-channel output: batch stride 2CS
                mo = mo.to(DEV)
                m, v = mo[:, :C], mo[:, C:]
            self.mo64 = mo.double().cpu()
        else:
            m = lay(torch.randn(shape, generator=g).to(dtype))
            v = None
            self.mo64 = m.double().cpu()
        self.x = lay(x.to(dtype)).to(DEV)
        self.m, self.v = m.to(DEV), (v.to(DEV) if v is not None else None)
        if t is None:
            t = torch.randint(0, T_TRAIN, (B,), generator=g)
            t[0] = 0 if B > 1 else t[0]
        self.t = torch.as_tensor(t, dtype=torch.int64).to(DEV)
        self.seeds = (torch.as_tensor(seeds, dtype=torch.int64) if seeds is not None
                      else torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g)).to(DEV)
        if ext_noise:
            self.noise = lay(torch.randn(shape, generator=g).to(dtype)).to(DEV)
            self.z64 = self.noise.double().cpu()
        else:
            self.noise = None
            self.z64 = philox_normal(self.seeds.cpu(), self.t.cpu(), shape).double()
        self.x64 = self.x.double().cpu()
        self.m64 = m.double().cpu()
        # per-sample coefficient rows (float64) for the error bounds and the threshold
        rows = coeffs.table64[self.t.cpu().clamp(0, T_TRAIN - 1)]
        self.row = rows.reshape(B, 8, *([1] * (len(shape) - 1)))
        u, w = self.row[:, 0], self.row[:, 1]
        self.xr64 = u * self.x64 + w * self.m64
        self.thresh = None
        if self.cm == CLIP_DYNAMIC:
            self.thresh = reference.dynamic_threshold_scale(
                self.xr64, cfg.dynamic_thresholding_ratio, cfg.sample_max_value).float().to(DEV)

    def ref(self, z64=None, requires_grad=False):
        x64, mo64 = self.x64.clone(), self.mo64.clone()
        z = (self.z64 if z64 is None else z64).clone()
        if requires_grad:
            for a in (x64, mo64, z):
                a.requires_grad_(True)
        y, x0 = reference.ddpm_step(x64, mo64, self.t.cpu(), self.coeffs, noise=z, return_x0=True)
        return y, x0, (x64, mo64, z)

    def bounds(self):
        """Element-wise scales of the terms that make x0 and y (the error scale of fp32 math)."""
        u, w, p, q, r = (self.row[:, k].abs() for k in range(5))
        b0 = u * self.x64.abs() + w * self.m64.abs()
        if self.thresh is not None:
            b0 = b0 / self.thresh.double().cpu().reshape(self.row[:, 0].shape)
        y_ref, _, _ = self.ref()
        y_nz, _, _ = self.ref(z64=torch.zeros_like(self.z64))
        sz = (y_ref - y_nz).abs()                                  # |σ z|
        by = p * b0 + q * self.x64.abs() + r * self.m64.abs() + sz
        return b0, by

    def forward(self, write_x0=True):
        y = poisoned(self.x)
        x0 = poisoned(self.x) if write_x0 else None
        step_forward(self.x, self.m, self.v, self.noise, self.seeds, self.t, self.coeffs.table,
                     self.thresh, y, x0, self.clip, self.cm, self.vm)
        return y, x0


def assert_close_scaled(got, want, scale, tol, what):
    got = got.double().cpu()
    err = (got - want).abs()
    lim = tol * (scale + want.abs() + 1e-3)
    bad = ~(err <= lim)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements off; first at {i}: "
                             f"got {got[tuple(i)].item()}, want {want[tuple(i)].item()}, "
                             f"max err/lim {(err / lim).max().item():.3g}")


# ----------------------------------------------------------------------------- the matrix

CONFIGS = []
for _pred in ("epsilon", "sample", "v_prediction"):
    for _clip in ("none", "static", "dynamic"):
        for _var in ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"):
            CONFIGS.append(dict(method="ddpm", pred=_pred, var=_var, clip=_clip))
        CONFIGS.append(dict(method="ddim", pred=_pred, clip=_clip, eta=0.7))
        if _clip != "none":
            CONFIGS.append(dict(method="ddim", pred=_pred, clip=_clip, eta=0.5,
                                use_clipped_model_output=True))
# shape / dtype / layout cycle through the configs so every config runs once
SHAPES = [(3, 3, 7, 13), (1, 4, 9), (2, 3, 5, 6, 7), (4, 2, 17, 5), (2, 5, 3, 3), (3, 1, 150)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last"]


def _case_params():
    out = []
    for k, cfg in enumerate(CONFIGS):
        shape = SHAPES[k % len(SHAPES)]
        dtype = DTYPES[(k // 2) % len(DTYPES)] if k % 4 else torch.float32
        layout = LAYOUTS[(k // 6) % 2] if len(shape) >= 3 and shape[1] > 1 else "contiguous"
        name = "-".join(str(v) for v in cfg.values())
        out.append(pytest.param(cfg, shape, dtype, layout,
                                id=f"{name}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}-"
                                   f"{layout[:2]}"))
    return out


@pytest.mark.parametrize("ext_noise", [True, False], ids=["extnoise", "philox"])
@pytest.mark.parametrize("cfg,shape,dtype,layout", _case_params())
def test_forward_matches_reference(cfg, shape, dtype, layout, ext_noise):
    co = coeffs_for(**cfg)
    case = Case(co, shape, dtype, layout, ext_noise=ext_noise, gen_seed=len(shape) * 7 + shape[1])
    y, x0 = case.forward()
    y_ref, x0_ref, _ = case.ref()
    b0, by = case.bounds()
    # the kernel's input is already rounded to dtype; only its output rounding remains
    assert_close_scaled(y, y_ref, by, TOL[dtype], "y")
    assert_close_scaled(x0, x0_ref, b0, TOL[dtype], "x0")
    assert y.stride() == case.x.stride()


@pytest.mark.parametrize("ext_noise", [True, False], ids=["extnoise", "philox"])
@pytest.mark.parametrize("cfg,shape,dtype,layout", _case_params())
def test_backward_matches_autograd(cfg, shape, dtype, layout, ext_noise):
    if dtype != torch.float32:      # grads in low precision: covered by the forward matrix
        dtype = torch.float32
    co = coeffs_for(**cfg)
    case = Case(co, shape, dtype, layout, ext_noise=ext_noise, gen_seed=len(shape) * 5 + shape[0])
    g = torch.Generator().manual_seed(123)
    gy = torch.randn(shape, generator=g)
    with_gx0 = hash(str(cfg)) % 3 != 0
    gx0 = torch.randn(shape, generator=g) if with_gx0 else None
    lay = to_channels_last if layout == "channels_last" else (lambda a: a.contiguous())
    gy_d = lay(gy).to(DEV)
    gx0_d = lay(gx0).to(DEV) if gx0 is not None else None

    gx, gm = poisoned(case.x), poisoned(case.x)
    gv = poisoned(case.x) if case.vm else None
    gz = poisoned(case.x) if ext_noise else None
    step_backward(gy_d, gx0_d, case.x, case.m, case.v, case.noise, case.seeds, case.t,
                  co.table, case.thresh, gx, gm, gv, gz, case.clip, case.cm, case.vm)

    y, x0, (x64, mo64, z64) = case.ref(requires_grad=True)
    loss = (y * gy.double()).sum()
    if gx0 is not None:
        loss = loss + (x0 * gx0.double()).sum()
    loss.backward()
    C = shape[1]
    # elements whose x̂0 sits on a clip bound have a kink there: leave them out
    keep = torch.ones(shape, dtype=torch.bool)
    if case.cm != CLIP_NONE:
        bound = (case.clip if case.cm == 1
                 else case.thresh.double().cpu().reshape(case.row[:, 0].shape))
        keep = (case.xr64.abs() - bound).abs() > 1e-4 * (1 + case.xr64.abs())
    u, w, p, q, r = (case.row[:, k].abs() for k in range(5))
    dhmax = 1.0 if case.cm != CLIP_DYNAMIC else 1.0 / case.thresh.double().cpu().reshape(u.shape)
    a = gy.abs().double() * p * dhmax + (gx0.abs().double() * dhmax if gx0 is not None else 0)
    sx = gy.abs().double() * q + a * u
    sm = gy.abs().double() * r + a * w
    want_m = mo64.grad[:, :C] if case.vm else mo64.grad
    assert_close_scaled(torch.where(keep, gx.cpu().double(), 0), torch.where(keep, x64.grad, 0),
                        sx, 1e-5, "grad_x")
    assert_close_scaled(torch.where(keep, gm.cpu().double(), 0), torch.where(keep, want_m, 0),
                        sm, 1e-5, "grad_m")
    if case.vm:
        want_v = mo64.grad[:, C:]
        scale = want_v.abs()
        if case.vm == 2:  # (lb − lt) cancels for large t: the error scale is |lb| + |lt|
            cs, lb, lt = case.row[:, 5], case.row[:, 6], case.row[:, 7]
            f = (case.mo64[:, C:] + 1) / 2
            sigma = cs * torch.exp(0.5 * (f * lb + (1 - f) * lt))
            scale = (gy.double() * case.z64).abs() * sigma * (lb.abs() + lt.abs()) / 4
        assert_close_scaled(gv, want_v, scale, 1e-5, "grad_v")
    if ext_noise:
        assert_close_scaled(gz, z64.grad, z64.grad.abs(), 1e-5, "grad_noise")


# ----------------------------------------------------------------------------- noise

def test_philox_kat_and_bit_identity():
    z = philox_uint32(torch.zeros(1, dtype=torch.int64, device=DEV),
                      torch.zeros(1, dtype=torch.int64, device=DEV), 4)
    assert [hex(v) for v in z[0].tolist()] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c",
                                               "0x9b00dbd8"]
    seeds = torch.tensor([0, 1, -1, 2 ** 63 - 1, -(2 ** 63), 0x123456789ABCDEF], dtype=torch.int64)
    ts = torch.tensor([0, 999, 3, 2 ** 32 + 5, 7, 500], dtype=torch.int64)
    for numel in (1, 7, 1029):
        got = philox_uint32(seeds.to(DEV), ts.to(DEV), numel).cpu()
        assert got.dtype == torch.int64 and got.shape == (6, numel)
        assert torch.equal(got, ref_philox_uint32(seeds, ts, numel))
    # stride-0 (expanded scalar) seeds and t
    got = philox_uint32(torch.tensor(5, device=DEV).expand(3),
                        torch.tensor(9, device=DEV).expand(3), 9)
    assert torch.equal(got.cpu(), ref_philox_uint32(torch.full((3,), 5), torch.full((3,), 9), 9))
    assert philox_uint32(seeds[:0].to(DEV), ts[:0].to(DEV), 5).shape == (0, 5)
    assert philox_uint32(seeds.to(DEV), ts.to(DEV), 0).shape == (6, 0)


def _noise_only_table(T=8):
    """A table whose rows make y = z exactly (only σ = 1), to read the noise back."""
    tab = torch.zeros(T, 8)
    tab[:, 5] = 1.0
    return tab.to(DEV)


def _draw(seeds, t, shape, layout="contiguous", dtype=torch.float32):
    x = torch.zeros(shape, dtype=dtype)
    if layout == "channels_last":
        x = to_channels_last(x)
    x = x.to(DEV)
    y = poisoned(x)
    step_forward(x, x, None, None, seeds.to(DEV), t.to(DEV), _noise_only_table(), None, y, None,
                 0.0, 0, 0)
    return y


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1), (3, 4, 130), (2, 3, 2, 3, 5)])
def test_in_kernel_noise_is_the_spec(shape):
    seeds = torch.tensor([11, -7, 2 ** 40][: shape[0]])
    t = torch.tensor([0, 3, 7][: shape[0]])
    want = philox_normal(seeds, t, shape)
    for layout in ("contiguous", "channels_last") if len(shape) >= 3 else ("contiguous",):
        y = _draw(seeds, t, shape, layout)
        torch.testing.assert_close(y.cpu(), want, atol=1e-5, rtol=0)
    y1, y2 = _draw(seeds, t, shape), _draw(seeds, t, shape)
    assert torch.equal(y1, y2)                                    # same seed: bit-identical


def test_channels_last_noise_equals_contiguous_and_batch_invariance():
    shape = (5, 3, 6, 11)
    seeds = torch.tensor([3, 1 << 35, -9, 77, 0])
    t = torch.tensor([999, 0, 5, 5, 123])
    a = _draw(seeds, t, shape).cpu()
    b = _draw(seeds, t, shape, "channels_last").cpu()
    assert torch.equal(a, b)  # the same per-element math → identical values
    for k in range(5):
        alone = _draw(seeds[k:k + 1], t[k:k + 1], (1,) + shape[1:]).cpu()
        assert torch.equal(alone[0], a[k])


def test_channels_last_int64_index_path(monkeypatch):
    """The int64 storage→logical index path (taken for samples of ≥ 2³¹ elements)."""
    monkeypatch.setattr(tstep, "_IDX32_LIMIT", 0)
    shape = (2, 3, 5, 7)
    seeds, t = torch.tensor([4, 5]), torch.tensor([6, 7])
    y = _draw(seeds, t, shape, "channels_last")
    torch.testing.assert_close(y.cpu(), philox_normal(seeds, t, shape), atol=1e-5, rtol=0)


def test_noise_statistics(monkeypatch):
    from scipy import stats
    monkeypatch.setattr(tstep, "INTERPRET_BLOCK", 8192)
    shape = (2, 1, 65536)                      # 131072 draws
    z = _draw(torch.tensor([2024, -5]), torch.tensor([17, 999]), shape).cpu().double()
    flat = z.flatten()
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / math.sqrt(n)
    assert abs(flat.std().item() - 1) < 5 * math.sqrt(0.5 / n)
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    for lane in range(4):                      # each Box–Muller output on its own
        zl = z[..., lane::4].flatten()
        assert abs(zl.mean().item()) < 5 / math.sqrt(zl.numel())
        assert abs(zl.std().item() - 1) < 5 * math.sqrt(0.5 / zl.numel())
    # neighbours are uncorrelated
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 5 / math.sqrt(n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_kernel_noise_low_precision(dtype):
    shape = (2, 2, 9, 5)
    seeds, t = torch.tensor([1, 2]), torch.tensor([3, 4])
    y = _draw(seeds, t, shape, dtype=dtype)
    assert y.dtype == dtype
    torch.testing.assert_close(y.cpu(), philox_normal(seeds, t, shape).to(dtype))


# ----------------------------------------------------------------------------- contract edges

def test_empty_and_stride0_and_out_of_range_t():
    co = coeffs_for(clip="static")
    x = torch.zeros(0, 3, 4, 4, device=DEV)
    step_forward(x, x, None, x, None, torch.zeros(0, dtype=torch.int64, device=DEV), co.table,
                 None, x, x, 1.0, co.config.clip_mode, 0)
    x = torch.zeros(2, 0, 4, device=DEV)
    step_forward(x, x, None, None, torch.zeros(2, dtype=torch.int64, device=DEV),
                 torch.zeros(2, dtype=torch.int64, device=DEV), co.table, None, x, None, 1.0, 1, 0)
    step_backward(x, None, x, x, None, None, torch.zeros(2, dtype=torch.int64, device=DEV),
                  torch.zeros(2, dtype=torch.int64, device=DEV), co.table, None, x, x, None, None,
                  1.0, 1, 0)
    # stride-0 t and seeds (an expanded scalar), in-kernel noise
    case = Case(co, (3, 2, 5, 5), t=torch.tensor(400).expand(3), ext_noise=False,
                seeds=torch.tensor(-12345).expand(3))
    assert case.t.stride(0) == 0 and case.seeds.stride(0) == 0
    y, x0 = case.forward()
    y_ref, x0_ref, _ = case.ref()
    b0, by = case.bounds()
    assert_close_scaled(y, y_ref, by, 1e-5, "y")
    # the row index is clamped into [0, T-1]; external noise so only the row matters
    lo = Case(co, (2, 2, 3, 3), t=torch.tensor([-5, 10 ** 6]))
    y_lo, _ = lo.forward()
    lo.t = torch.tensor([0, T_TRAIN - 1], device=DEV)
    y_in, _ = lo.forward()
    assert torch.equal(y_lo, y_in)


def test_forward_without_x0_and_backward_subsets():
    co = coeffs_for(var="learned_range", clip="dynamic")
    case = Case(co, (2, 3, 6, 5), ext_noise=True)
    y, x0 = case.forward(write_x0=False)
    assert x0 is None
    y_full, _ = case.forward()
    assert torch.equal(y, y_full)
    gy = torch.randn(case.shape, device=DEV)
    full = [poisoned(case.x) for _ in range(4)]
    step_backward(gy, None, case.x, case.m, case.v, case.noise, case.seeds, case.t, co.table,
                  case.thresh, *full, 0.0, case.cm, case.vm)
    # only grad_v requested: the others are untouched
    gv = poisoned(case.x)
    step_backward(gy, None, case.x, case.m, case.v, case.noise, case.seeds, case.t, co.table,
                  case.thresh, None, None, gv, None, 0.0, case.cm, case.vm)
    assert torch.equal(gv, full[2])
    gx = poisoned(case.x)
    step_backward(gy, None, case.x, case.m, case.v, case.noise, case.seeds, case.t, co.table,
                  case.thresh, gx, None, None, None, 0.0, case.cm, case.vm)
    assert torch.equal(gx, full[0])


def test_in_place_output_over_x():
    """y may be written over x (each element is read before it is written)."""
    co = coeffs_for(pred="v_prediction", clip="static")
    case = Case(co, (2, 3, 7, 7), ext_noise=False)
    y_ref, _ = case.forward()
    xin = case.x.clone()
    step_forward(xin, case.m, None, None, case.seeds, case.t, co.table, None, xin, None,
                 case.clip, case.cm, case.vm)
    assert torch.equal(xin, y_ref)


def test_multi_block_samples(monkeypatch):
    """Several programs per sample, a partial last block, and in-kernel noise across blocks."""
    monkeypatch.setattr(tstep, "INTERPRET_BLOCK", 64)
    co = coeffs_for(var="fixed_large", clip="static")
    for layout in LAYOUTS:
        case = Case(co, (2, 3, 7, 11), layout=layout, ext_noise=False)
        y, x0 = case.forward()
        y_ref, x0_ref, _ = case.ref()
        b0, by = case.bounds()
        assert_close_scaled(y, y_ref, by, 1e-5, f"y {layout}")
        assert_close_scaled(x0, x0_ref, b0, 1e-5, f"x0 {layout}")
