"""GPU-only tests (skipped without CUDA; `bench/gpu_check.sh` runs them on a GPU machine):
large sizes, CUDA graphs, streams, reduce-overhead compilation, > 2³¹ elements, and
CUDA-vs-Triton noise agreement."""
import pytest
import torch

import fused_ddpm as fd
from fused_ddpm.philox import philox_uint32

from helpers import random_inputs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def gpu_backend(backend):
    """The backend fixture's backends on a CUDA device (cuda, triton, torch)."""
    if not backend.gpu:
        pytest.skip("a test of backends on a CUDA device")
    return backend.name


@pytest.fixture(scope="module")
def coeffs():
    return fd.step_coefficients(fd.NoiseSchedule(), num_inference_steps=50,
                                variance_type="learned_range", clip_sample_range=1.0,
                                device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 4, 128, 128), (3, 3, 257, 255), (1, 4, 16, 64, 63)])
def test_large_vs_reference(gpu_backend, dtype, shape, coeffs):
    g = torch.Generator().manual_seed(sum(shape))
    x, m, z = (a.to("cuda", dtype) for a in random_inputs(coeffs, shape, dtype=torch.float32,
                                                           generator=g))
    t = coeffs.timesteps[torch.randint(50, (shape[0],), generator=g)].cuda()
    y, x0 = fd.ddpm_step(x, m, t, coeffs, noise=z, return_x0=True, backend=gpu_backend)
    want, want_x0 = fd.reference.ddpm_step(x.double(), m.double(), t, coeffs, noise=z.double(),
                                           return_x0=True)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    for got, ref in ((y, want), (x0, want_x0)):
        assert float((got.double() - ref).abs().max()) <= tol * float(ref.abs().max())


def test_cuda_and_triton_noise_agree(coeffs):
    if not (fd.backends()["cuda"].startswith("available") and
            fd.backends()["triton"].startswith("available")):
        pytest.skip("needs both the CUDA and the Triton backend")
    from fused_ddpm.triton_kernels import philox_uint32 as triton_u32
    seeds = torch.tensor([0, 1, -1, 2 ** 62 + 5], device="cuda")
    t = torch.tensor([999, 0, 17, 500], device="cuda")
    a = torch.ops.fused_ddpm.philox_uint32(seeds, t, 4099, 0)
    b = triton_u32(seeds, t, 4099, 0)
    assert torch.equal(a.cpu(), b.cpu())
    assert torch.equal(a.cpu(), philox_uint32(seeds.cpu(), t.cpu(), 4099))
    x = torch.randn(4, 3, 33, 31, device="cuda")
    m = torch.randn(4, 6, 33, 31, device="cuda")
    ya = fd.ddpm_step(x, m, t, coeffs, seeds=seeds, backend="cuda")
    yb = fd.ddpm_step(x, m, t, coeffs, seeds=seeds, backend="triton")
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)


def test_cuda_graph_capture_replay(gpu_backend):
    c = fd.step_coefficients(fd.NoiseSchedule(), num_inference_steps=10, device="cuda")
    B = 2
    x0 = torch.randn(B, 4, 32, 32, device="cuda")
    seeds = torch.tensor([1, 2], device="cuda")
    t_buf = torch.zeros(B, dtype=torch.int64, device="cuda")
    ts = c.timesteps.cuda()
    model = lambda x, t: 0.1 * x  # noqa: E731

    def loop(x):
        for i in range(len(ts)):
            t_buf.copy_(ts[i].expand(B))
            x = fd.ddpm_step(x, model(x, t_buf), t_buf, c, seeds=seeds, backend=gpu_backend)
        return x

    eager = loop(x0.clone())
    static_x = x0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loop(static_x)                      # warm-up: compile/autotune before capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = loop(static_x)
    graph.replay()
    torch.testing.assert_close(static_out, eager, rtol=0, atol=0)
    seeds.add_(10)                          # fresh noise: seeds are read from device memory
    graph.replay()
    assert not torch.equal(static_out, eager)
    torch.testing.assert_close(static_out, loop(x0.clone()), rtol=0, atol=0)


def test_two_streams_match_serial(gpu_backend, coeffs):
    xs = [torch.randn(4, 3, 128, 128, device="cuda") for _ in range(2)]
    ms = [torch.randn(4, 6, 128, 128, device="cuda") for _ in range(2)]
    serial = [fd.ddpm_step(x, m, 500, coeffs, seeds=7, backend=gpu_backend) for x, m in zip(xs, ms)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = [None, None]
    torch.cuda.synchronize()
    for i, s in enumerate(streams):
        with torch.cuda.stream(s):
            outs[i] = fd.ddpm_step(xs[i], ms[i], 500, coeffs, seeds=7, backend=gpu_backend)
    torch.cuda.synchronize()
    for a, b in zip(outs, serial):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_reduce_overhead(gpu_backend, coeffs):
    x = torch.randn(2, 3, 64, 64, device="cuda")
    m = torch.randn(2, 6, 64, 64, device="cuda")
    t = torch.tensor([500, 3], device="cuda")
    seeds = torch.tensor([5, 6], device="cuda")
    f = lambda x, m, t, s: fd.ddpm_step(x, m, t, coeffs, seeds=s, backend=gpu_backend)  # noqa: E731
    cf = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        got = cf(x, m, t, seeds)
    torch.testing.assert_close(got, f(x, m, t, seeds), rtol=0, atol=0)


@pytest.mark.slow
def test_more_than_2_31_elements(gpu_backend):
    """int64 indexing: the last elements of a > 2³¹-element tensor are written correctly."""
    free, _ = torch.cuda.mem_get_info()
    n = 2 ** 31 + 4099
    if free < 5 * n * 2:
        pytest.skip("not enough GPU memory for 3 fp16 tensors of 2^31 elements")
    c = fd.step_coefficients(fd.NoiseSchedule(), device="cuda")
    x = torch.ones(1, 1, n, dtype=torch.float16, device="cuda")
    m = torch.full_like(x, 0.5)
    z = torch.full_like(x, -1.0)
    y = fd.ddpm_step(x, m, 600, c, noise=z, backend=gpu_backend)
    tail = slice(n - 8200, n)
    want = fd.reference.ddpm_step(x[..., tail].double(), m[..., tail].double(), 600, c,
                                  noise=z[..., tail].double())
    torch.testing.assert_close(y[..., tail].double(), want, rtol=4e-3, atol=4e-3)
    torch.testing.assert_close(y[..., :8].double(), want[..., :8], rtol=4e-3, atol=4e-3)
