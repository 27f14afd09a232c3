"""The Triton backend's own walks (``fused_ddpm.triton_kernels.tiles``), which the contract
suite (test_kernels.py) does not reach with its shapes: channels-last tiles (C a power of two:
a transpose; otherwise an in-row gather over rows of 4·K positions), the per-element
fallback, several programs per sample with partial blocks and rows, int64 in-sample offsets
(samples of >= 2**31 elements; forced here by lowering the limit) and the flat grid. Each
against the float64 reference and the Philox spec, under the interpreter on CPU (or on a GPU
when there is one).
"""
import math

import pytest
import torch

import fused_ddpm as fd
from fused_ddpm import philox
from fused_ddpm.contract import Layout, NoiseStream

from kernel_cases import Case, assert_close_scaled, relayout

if not fd.backends()["triton"].startswith("available"):
    pytest.skip(f"triton backend: {fd.backends()['triton']}", allow_module_level=True)

from fused_ddpm.triton_kernels import philox_normal, tiles  # noqa: E402

from test_kernels import _check_grads  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NOISE_TOL = 1e-5 if DEV == "cuda" else 1e-6
CFG = dict(method="ddpm", prediction_type="epsilon", variance_type="fixed_large",
           clip_sample_range=1.0)


@pytest.mark.parametrize("layout", list(Layout), ids=lambda v: v.name)
@pytest.mark.parametrize("noise", ["philox", "external"])
def test_multi_block_samples(monkeypatch, layout, noise):
    monkeypatch.setattr(tiles, "INTERPRET_BLOCK", 64)
    case = Case(CFG, (2, 3, 7, 11), torch.float32, layout, noise, "triton", DEV, seed=1)
    y, x0 = case.launch.forward("triton")
    y_ref, x0_ref, _ = case.reference()
    b0, by = case.scales()
    assert_close_scaled(y, y_ref, by, case.tol(), f"y {case}")
    assert_close_scaled(x0, x0_ref, b0, case.tol(), f"x0 {case}")


@pytest.mark.parametrize("layout", list(Layout), ids=lambda v: v.name)
def test_int64_offsets(monkeypatch, layout):
    monkeypatch.setattr(tiles, "IDX32_LIMIT", 0)
    case = Case(CFG, (2, 3, 5, 8), torch.float32, layout, "philox", "triton", DEV, seed=2)
    y, x0 = case.launch.forward("triton")
    y_ref, x0_ref, _ = case.reference()
    b0, by = case.scales()
    assert_close_scaled(y, y_ref, by, case.tol(), f"y {case}")
    seeds, t = torch.tensor([4, 5]), torch.tensor([6, 7])
    out = torch.empty(2, 3, 5, 8, device=DEV)
    if layout == Layout.CHANNELS_LAST:
        out = out.contiguous(memory_format=torch.channels_last)
    from fused_ddpm.backends import get
    get("triton").launchers.philox_normal(seeds.to(DEV), t.to(DEV), 0, int(layout), out)
    torch.testing.assert_close(out.cpu(), philox.philox_normal(seeds, t, out.shape),
                               atol=1e-5, rtol=0)


class _Backend:                      # what _check_grads reads of the conftest's BackendCase
    name, device = "triton", DEV


# (shape, the walk a channels-last launch with in-kernel noise takes)
WALK_SHAPES = [
    ((2, 4, 8, 8), "tile C=4 (transpose)"),
    ((3, 3, 8, 10), "tile C=3 (gather, whole rows)"),
    ((2, 3, 4, 6), "tile C=3 (gather, a partial row)"),
    ((2, 6, 4, 4), "tile C=6"),
    ((1, 12, 2, 6), "tile C=12"),
    ((2, 2, 2, 2, 4), "tile 5-D"),
    ((2, 3, 5, 7), "per element (S % 4 != 0)"),
    ((2, 1, 4, 4), "flat (C = 1)"),
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("shape,walk", WALK_SHAPES, ids=[w for _, w in WALK_SHAPES])
def test_shapes_take_the_walk_named(shape, walk):
    """(So that the tests below cover the walks they name.)"""
    want = (tiles.Walk.CL_TILE if walk.startswith("tile") else
            tiles.Walk.CL_ELEM if walk.startswith("per element") else tiles.Walk.FLAT)
    for itemsize in (4, 2):
        p = tiles.plan(shape, int(Layout.CHANNELS_LAST), True, itemsize)
        assert p.constexprs["WALK"] == want, (walk, itemsize)


@pytest.fixture(params=[64, 256], ids=lambda b: f"block{b}")
def block(request, monkeypatch):
    """Elements per program under the interpreter (several programs and partial blocks)."""
    if DEV == "cpu":
        monkeypatch.setattr(tiles, "INTERPRET_BLOCK", request.param)
    return request.param


def _draw(seeds, t, shape, layout, dtype=torch.float32, stream=NoiseStream.STEP):
    out = relayout(torch.full(shape, math.nan, dtype=dtype), layout).to(DEV)
    philox_normal(seeds.to(DEV), t.to(DEV), int(stream), int(layout), out)
    return out.cpu()


@pytest.mark.parametrize("shape,walk", WALK_SHAPES, ids=[w for _, w in WALK_SHAPES])
def test_noise_every_walk(shape, walk, block):
    """The same normals in both layouts (bit for bit), whatever the batch, within the
    noise tolerance of the oracle."""
    B = shape[0]
    seeds = torch.tensor([7, -3, 1 << 40][:B])
    t = torch.tensor([0, 999, 1000][:B])
    want = philox.philox_normal(seeds, t, shape, stream=int(NoiseStream.STEP))
    for dtype in (DTYPES if block == 256 else DTYPES[:1]):
        a = _draw(seeds, t, shape, Layout.CONTIGUOUS, dtype)
        b = _draw(seeds, t, shape, Layout.CHANNELS_LAST, dtype)
        assert torch.equal(a, b), (walk, dtype)
        if dtype == torch.float32:
            assert (a.double() - want.double()).abs().max() <= NOISE_TOL, walk
        else:
            torch.testing.assert_close(a, want.to(dtype), rtol=0, atol=float(
                want.abs().max()) * (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10))
    alone = _draw(seeds[-1:], t[-1:], (1,) + shape[1:], Layout.CHANNELS_LAST)
    assert torch.equal(alone[0], _draw(seeds, t, shape, Layout.CHANNELS_LAST)[-1])


STEP_CFGS = [
    dict(method="ddpm", prediction_type="epsilon", variance_type="learned_range",
         clip_sample_range=1.0),
    dict(method="ddim", prediction_type="v_prediction", eta=0.5, thresholding=True,
         dynamic_thresholding_ratio=0.9, sample_max_value=2.5),
]


@pytest.mark.parametrize("shape,walk", WALK_SHAPES[:-1], ids=[w for _, w in WALK_SHAPES[:-1]])
def test_step_every_walk(shape, walk, monkeypatch):
    """Forward (the dtypes in turn) and backward (float32) with in-kernel noise in
    channels-last tiles, several programs per sample, against the reference; the backward
    recomputes z in the tile (learned_range's grad V needs it)."""
    if DEV == "cpu":
        monkeypatch.setattr(tiles, "INTERPRET_BLOCK", 64)
    for k, cfg in enumerate(STEP_CFGS):
        dtype = DTYPES[(k + len(shape) + shape[1]) % 3]
        case = Case(cfg, shape, dtype, Layout.CHANNELS_LAST, "philox", "triton", DEV,
                    seed=k + 3 * len(shape))
        y, x0 = case.launch.forward("triton")
        y_ref, x0_ref, _ = case.reference()
        b0, by = case.scales()
        assert_close_scaled(y, y_ref, by, case.tol(), f"y {case} {walk}")
        assert_close_scaled(x0, x0_ref, b0, case.tol(), f"x0 {case} {walk}")
        case = Case(cfg, shape, torch.float32, Layout.CHANNELS_LAST, "philox", "triton", DEV,
                    seed=k + 5)
        g = torch.Generator().manual_seed(k)
        gy = relayout(torch.randn(shape, generator=g), Layout.CHANNELS_LAST).to(DEV)
        _check_grads(case, _Backend, gy, None)


def _noise_and_step(shape, layout):
    seeds, t = torch.tensor([4, 5]), torch.tensor([6, 7])
    z = _draw(seeds, t, shape, layout)
    case = Case(STEP_CFGS[0], shape, torch.float32, layout, "philox", "triton", DEV, seed=9)
    return z, case.launch.forward("triton")[0].cpu()


@pytest.mark.parametrize("shape,walk", [WALK_SHAPES[0], WALK_SHAPES[2]],
                         ids=[WALK_SHAPES[0][1], WALK_SHAPES[2][1]])
def test_fallbacks_give_the_same_values(shape, walk, monkeypatch):
    """The per-element fallback, int64 offsets and the flat grid compute the very values of
    the tiled, 32-bit, 2-D-grid launch."""
    base = _noise_and_step(shape, Layout.CHANNELS_LAST)
    for knob, value in (("CL_TILE_MAX_C", 1), ("CL_GATHER_MAX_NP", 0), ("IDX32_LIMIT", 0),
                        ("GRID_MAX_Y", 1)):
        with monkeypatch.context() as m:
            m.setattr(tiles, knob, value)
            got = _noise_and_step(shape, Layout.CHANNELS_LAST)
        assert torch.equal(got[0], base[0]), knob
        torch.testing.assert_close(got[1], base[1], rtol=1e-6, atol=1e-6, msg=knob)


@pytest.mark.parametrize("C,itemsize,want", [(4, 4, (1, 4)), (2, 2, (1, 2)), (3, 4, (5, 16)),
                                             (3, 2, (10, 32)), (6, 4, (5, 32)),
                                             (5, 2, (6, 32))])
def test_tile_geometry(C, itemsize, want):
    """Rows of 4·K positions × C channels fill 4·NP lanes with little padding and start
    16-byte aligned."""
    K, NP = tiles.cl_tile_geometry(C, itemsize)
    assert (K, NP) == want
    assert K * C <= NP and NP & (NP - 1) == 0
    assert 4 * K * C * itemsize % 16 == 0
    assert tiles.cl_tile_geometry(1000, 4) is None          # too many channels: per element
