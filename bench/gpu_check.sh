#!/usr/bin/env bash
# The one script to run on a lent GPU machine (no network), from the repository root:
#   bash bench/gpu_check.sh
# 1. builds the CUDA extension in place (pip install --no-build-isolation --no-deps -e .,
#    TORCH_CUDA_ARCH_LIST = this GPU's arch unless set);
# 2. CUDA kernels vs the C++ CPU kernels (checked against the reference by
#    tests/test_cpu_kernel.py): every clip/var/prediction variant, fp32/fp16/bf16, vector and
#    scalar (misaligned) paths, channels_last, 2C views, backward, Philox bit-identity, normals
#    within 1e-5, a > 2^31-element tensor, CUDA-graph capture on a side stream; then timings;
# 3. pytest -m gpu, and tests/test_cpu_kernel.py;
# 4. python -m bench (quick preset plus the headline shape) when bench/ is present;
# 5. compute-sanitizer --tool memcheck and racecheck on a small run of (2) (CUDA kernels) and
#    of a few Triton steps (fwd/bwd, fp32/fp16, in-kernel and external noise);
# and prints a summary table last. Logs go to $OUT (or /tmp/fused_ddpm_gpu_check).
# Budget: under 5 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOG="${OUT:-/tmp/fused_ddpm_gpu_check}"
mkdir -p "$LOG"
PY="${PYTHON:-python}"
T_START=$(date +%s)
SUMMARY=()

step() {  # step NAME TIMEOUT_S CMD...   (output to $LOG/NAME.log, tail shown on failure)
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s) rc
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [[ $rc == 0 ]]; then SUMMARY+=("$(printf '%-22s %-12s %5ss' "$name" PASS "$dt")")
  else
    [[ $rc == 124 ]] && rc="timeout"
    SUMMARY+=("$(printf '%-22s %-12s %5ss  (see %s)' "$name" "FAIL($rc)" "$dt" "$LOG/$name.log")")
    tail -n 30 "$LOG/$name.log"
  fi
  tail -n 3 "$LOG/$name.log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"
  nvcc --version | tail -n 1; date -u; } 2>&1 | tee "$LOG/env.log"

if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "8.0;9.0+PTX")"
  export TORCH_CUDA_ARCH_LIST
fi
step build 300 env FUSED_DDPM_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" \
  $PY -m pip install --no-build-isolation --no-deps -v -e .

# ---------------------------------------------------------------- the CUDA kernel check
cat > "$LOG/cuda_kernel_check.py" <<'PYEOF'
"""CUDA kernels (fused_ddpm._C_cuda) vs the C++ CPU kernels. --small: no big tensors, no timing."""
import importlib.util, sys, time
import torch
import fused_ddpm as fd
from fused_ddpm import philox

SMALL = "--small" in sys.argv
for name in ("fused_ddpm._C", "fused_ddpm._C_cuda"):
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"{name} is not built"
    torch.ops.load_library(spec.origin)
OPS = torch.ops.fused_ddpm
DEV = torch.device("cuda")
SCHED = fd.NoiseSchedule(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
FAIL = []
TOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + (f"  {detail}" if detail else ""), flush=True)
    if not ok:
        FAIL.append(name)


def layout(a, cl, misalign=False):
    if cl:
        perm = [0] + list(range(2, a.dim())) + [1]
        inv = [0, a.dim() - 1] + list(range(1, a.dim() - 1))
        a = a.permute(perm).contiguous().permute(inv)
    else:
        a = a.contiguous()
    if misalign:  # same values at an element offset of 1: no 16-byte alignment
        buf = torch.empty(a.numel() + 1, dtype=a.dtype, device=a.device)
        v = buf[1:].as_strided(a.shape, a.stride())
        v.copy_(a)
        a = v
    return a


def coeffs(method, pred, var, clip, eta=0.0):
    kw = dict(method=method, prediction_type=pred, variance_type=var, num_inference_steps=50, eta=eta)
    if clip == 1:
        kw["clip_sample_range"] = 1.0
    if clip == 2:
        kw.update(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    return fd.step_coefficients(SCHED, **kw)


def run(dev, co, x, m, v, noise, seeds, t, thresh, gy, gx0):
    cfg = co.config
    to = lambda a: None if a is None else a.to(dev)  # noqa: E731
    table = co.table.to(dev)
    args = (to(x), to(m), to(v), to(noise), to(seeds), to(t), table, to(thresh))
    modes = (float(cfg.clip_sample_range or 0.0), cfg.clip_mode, cfg.variance_mode)
    y = torch.full_like(args[0], float("nan"))
    x0 = torch.full_like(args[0], float("nan"))
    OPS.step_forward_kernel(*args, y, x0, *modes)
    gx, gm = torch.full_like(y, float("nan")), torch.full_like(y, float("nan"))
    gv = torch.full_like(y, float("nan")) if v is not None else None
    gn = torch.full_like(y, float("nan")) if noise is not None else None
    OPS.step_backward_kernel(to(gy), to(gx0), *args, gx, gm, gv, gn, *modes)
    return [a.cpu() if a is not None else None for a in (y, x0, gx, gm, gv, gn)]


def compare(tag, co, shape, dtype, cl=False, ext=False, misalign=False, views=False):
    cfg = co.config
    g = torch.Generator().manual_seed(hash(tag) % 2 ** 31)
    B, C = shape[0], shape[1]
    x = (torch.randn(shape, generator=g) * 1.5).to(dtype)
    mo = torch.randn((B, 2 * C) + shape[2:], generator=g) * 1.5
    if cfg.variance_mode == 1:
        mo[:, C:] = mo[:, C:].abs() * 0.01 + 1e-3
    if cfg.variance_mode == 2:
        mo[:, C:] = mo[:, C:].clamp(-1, 1)
    mo = mo.to(dtype)
    t = torch.tensor([0, 999, 500, 20, 980, 1][:B])
    seeds = torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g)
    noise = torch.randn(shape, generator=g).to(dtype) if ext else None
    gy = torch.randn(shape, generator=g).to(dtype)
    gx0 = torch.randn(shape, generator=g).to(dtype)
    thresh = None
    if cfg.clip_mode == 2:
        r = co.table64[t]
        bs = (-1,) + (1,) * (len(shape) - 1)
        xr = r[:, 0].reshape(bs) * x.double() + r[:, 1].reshape(bs) * mo[:, :C].double()
        thresh = fd.reference.dynamic_threshold_scale(xr, 0.9, 2.5).float()
    m_cpu, v_cpu = mo[:, :C].contiguous(), (mo[:, C:].contiguous() if cfg.learned_variance else None)
    want = run("cpu", co, x, m_cpu, v_cpu, noise, None if ext else seeds, t, thresh, gy, gx0)
    # device inputs in the requested layout / alignment
    L = lambda a: None if a is None else layout(a.to(DEV), cl, misalign)  # noqa: E731
    if views and not cl and not misalign:
        mo_d = mo.to(DEV).contiguous()
        m_d, v_d = mo_d[:, :C], (mo_d[:, C:] if cfg.learned_variance else None)
    else:
        m_d, v_d = L(m_cpu), L(v_cpu)
    got = run(DEV, co, L(x), m_d, v_d, L(noise), None if ext else seeds, t, thresh, L(gy), L(gx0))
    worst = 0.0
    ok = True
    for name, a, b in zip(("y", "x0", "grad_x", "grad_m", "grad_v", "grad_noise"), got, want):
        if b is None:
            continue
        if torch.isnan(a).any():
            ok = False
            print("   NaN in", name)
            continue
        scale = max(float(b.double().abs().max()), 1.0)
        err = float((a.double() - b.double()).abs().max()) / scale
        worst = max(worst, err)
        ok &= err <= TOL[dtype] + (2e-3 if cfg.clip_mode == 2 and dtype != torch.float32 else 0.0)
    check(f"{tag}", ok, f"max err/scale {worst:.2e}")


# 1. raw stream and normals
seeds = torch.tensor([0, 1, -1, 2 ** 40 + 7, -(2 ** 63), 2 ** 63 - 1])
ts = torch.tensor([0, 999, 17, 2 ** 33 + 5, 1, 500])
for n in (0, 1, 37, 4099):
    check(f"philox_uint32 bit-identical numel={n}",
          torch.equal(OPS.philox_uint32(seeds.to(DEV), ts.to(DEV), n).cpu(), philox.philox_uint32(seeds, ts, n)))
noise_table = torch.zeros(1000, 8, device=DEV)
noise_table[:, 5] = 1.0
for shape in ((3, 3, 64, 65), (2, 4, 17, 9), (1, 3, 5)):
    for cl in (False, True):
        for dt in (torch.float32,):
            B = shape[0]
            s, tt = seeds[:B], torch.tensor([999, 3, 500][:B])
            x = layout(torch.zeros(shape, device=DEV, dtype=dt), cl)
            y = torch.empty_like(x)
            OPS.step_forward_kernel(x, x, None, None, s.to(DEV), tt.to(DEV), noise_table, None, y, None, 0.0, 0, 0)
            err = float((y.cpu().double() - philox.philox_normal(s, tt, shape).double()).abs().max())
            check(f"normals {shape} channels_last={cl}", err <= 1e-5, f"max err {err:.2e}")

# 2. every variant, fp32, vector path
variants = [("ddpm", p, v, c, 0.0) for p in ("epsilon", "sample", "v_prediction")
            for v in ("fixed_small", "fixed_large", "learned", "learned_range") for c in (0, 1, 2)]
variants += [("ddim", p, "fixed_small", c, 0.7) for p in ("epsilon", "v_prediction") for c in (0, 1, 2)]
for vr in variants:
    co = coeffs(*vr)
    for ext in (False, True):
        compare(f"variant {vr} ext={ext}", co, (4, 4, 8, 8), torch.float32, ext=ext)
# 3. dtypes x layouts x alignment x odd shapes
for dt in (torch.float32, torch.float16, torch.bfloat16):
    for vr in (("ddpm", "epsilon", "learned_range", 1, 0.0), ("ddim", "v_prediction", "fixed_small", 2, 0.5)):
        co = coeffs(*vr)
        for shape in ((2, 4, 8, 9), (3, 3, 5, 7), (1, 3, 5, 7), (2, 3, 4, 5, 6), (1, 1, 1, 1)):
            for cl in (False, True):
                for mis in (False, True):
                    for ext in (False, True):
                        compare(f"{str(dt)[6:]} {vr[0]}/{vr[2]}/clip{vr[3]} {shape} cl={cl} misaligned={mis} ext={ext}",
                                co, shape, dt, cl=cl, ext=ext, misalign=mis)
        compare(f"{str(dt)[6:]} 2C views", coeffs("ddpm", "epsilon", "learned_range", 0), (2, 4, 8, 8), dt, views=True)

# 4. CUDA graph capture on a side stream; seeds updated in place between replays
co = coeffs("ddpm", "epsilon", "fixed_small", 0)
x = torch.randn(2, 4, 32, 32, device=DEV)
sd = torch.tensor([1, 2], device=DEV)
tt = torch.tensor([500, 500], device=DEV)
yg = torch.empty_like(x)
stream = torch.cuda.Stream()
stream.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(stream):
    OPS.step_forward_kernel(x, x, None, None, sd, tt, co.table.to(DEV), None, yg, None, 0.0, 0, 0)
torch.cuda.current_stream().wait_stream(stream)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    OPS.step_forward_kernel(x, x, None, None, sd, tt, co.table.to(DEV), None, yg, None, 0.0, 0, 0)
ok = True
for k in range(3):
    sd.copy_(torch.tensor([10 + k, 20 + k]))
    graph.replay()
    ye = torch.empty_like(x)
    OPS.step_forward_kernel(x, x, None, None, sd, tt, co.table.to(DEV), None, ye, None, 0.0, 0, 0)
    ok &= torch.equal(yg, ye)
check("cuda graph replay with in-place seeds", ok)

# 5. more than 2^31 elements (int64 indexing): y = z with the noise table, tail checked
if not SMALL:
    free = torch.cuda.mem_get_info()[0]
    N = 2 ** 31 + 20
    if free > 3 * N * 2 + (1 << 30):
        xb = torch.zeros(1, 1, N, device=DEV, dtype=torch.float16)
        yb = torch.empty_like(xb)
        OPS.step_forward_kernel(xb, xb, None, None, torch.tensor([9], device=DEV), torch.tensor([7], device=DEV),
                                noise_table, None, yb, None, 0.0, 0, 0)
        i = torch.arange(N - 64, N)
        gidx = i // 4
        M = 0xFFFFFFFF
        o = philox.philox4x32_10(gidx & M, gidx >> 32, torch.full_like(i, 7), torch.zeros_like(i), 9, 0)
        u = [philox.uint32_to_uniform(w) for w in o]
        z0, z1 = philox.box_muller(u[0], u[1])
        z2, z3 = philox.box_muller(u[2], u[3])
        z = torch.stack([z0, z1, z2, z3], -1).gather(-1, (i % 4).unsqueeze(-1))[:, 0]
        err = float((yb[0, 0, -64:].float().cpu() - z).abs().max())
        check("2^31+20 elements: tail noise", err < 2e-2, f"max err {err:.2e}")
        del xb, yb
    else:
        print("skip 2^31-element check: not enough GPU memory")

# 6. timings (CUDA events), headline shape of DESIGN.md section 5
if not SMALL:
    def timeit(fn, reps=30):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / reps * 1e3
    print(f"\ntimings on {torch.cuda.get_device_name()}, 64x3x512x512 (us per call):")
    co = coeffs("ddpm", "epsilon", "fixed_small", 0)
    tab = co.table.to(DEV)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        shape = (64, 3, 512, 512)
        x, m, n, y = (torch.randn(shape, device=DEV, dtype=dt) for _ in range(4))
        gx, gm = torch.empty_like(x), torch.empty_like(x)
        sd = torch.arange(64, device=DEV)
        tt = torch.full((64,), 500, device=DEV)
        copy = timeit(lambda: y.copy_(x))
        fs = timeit(lambda: OPS.step_forward_kernel(x, m, None, None, sd, tt, tab, None, y, None, 0.0, 0, 0))
        fn = timeit(lambda: OPS.step_forward_kernel(x, m, None, n, None, tt, tab, None, y, None, 0.0, 0, 0))
        bw = timeit(lambda: OPS.step_backward_kernel(y, None, x, m, None, None, sd, tt, tab, None, gx, gm, None, None, 0.0, 0, 0))
        print(f"  {str(dt)[6:]:<9} copy {copy:7.1f}  fwd-seeds {fs:7.1f} ({fs / (1.5 * copy):.2f}x 3-pass floor)"
              f"  fwd-noise {fn:7.1f} ({fn / (2 * copy):.2f}x 4-pass floor)  bwd {bw:7.1f} ({bw / (1.5 * copy):.2f}x 3-pass floor)")
        del x, m, n, y, gx, gm
    s = torch.zeros(1, 4, 64, 64, device=DEV)
    ys = torch.empty_like(s)
    sd1, tt1 = torch.tensor([1], device=DEV), torch.tensor([500], device=DEV)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(2000):
        OPS.step_forward_kernel(s, s, None, None, sd1, tt1, tab, None, ys, None, 0.0, 0, 0)
    torch.cuda.synchronize()
    print(f"  1x4x64x64 raw op from Python: {(time.perf_counter() - t0) / 2000 * 1e6:.1f} us per call")

print(f"\n{len(FAIL)} failures" + (": " + "; ".join(FAIL[:10]) if FAIL else ""))
sys.exit(1 if FAIL else 0)
PYEOF

step cuda_kernel_check 240 $PY "$LOG/cuda_kernel_check.py"
step pytest_gpu 240 $PY -m pytest -m gpu -q -p no:cacheprovider -x
step pytest_cpu_kernel 240 $PY -m pytest tests/test_cpu_kernel.py -q -p no:cacheprovider
if [[ -f bench/__main__.py ]]; then
  step bench_quick 150 $PY -m bench --quick --out "$LOG/bench"
  step bench_headline 150 $PY -m bench --providers cuda,triton,copy --modes fwd-seeds,fwd-noise,bwd \
    --shapes img512-b64 --dtypes fp32,fp16 --out "$LOG/bench"
else
  SUMMARY+=("$(printf '%-22s %-12s' bench "SKIP (no bench/__main__.py)")")
fi
cat > "$LOG/triton_small.py" <<'PYEOF'
import torch, fused_ddpm as fd
dev = "cuda"
for cfg in (dict(), dict(clip_sample_range=1.0, variance_type="learned_range"),
            dict(method="ddim", eta=0.5, thresholding=True)):
    c = fd.step_coefficients(fd.NoiseSchedule(), num_inference_steps=10, device=dev, **cfg)
    C2 = 6 if c.config.learned_variance else 3
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(2, 3, 17, 9, device=dev, dtype=dtype, requires_grad=True)
        m = torch.randn(2, C2, 17, 9, device=dev, dtype=dtype).clamp(-1, 1).requires_grad_()
        for kw in (dict(seeds=torch.tensor([1, 2], device=dev)),
                   dict(noise=torch.randn(2, 3, 17, 9, device=dev, dtype=dtype))):
            y = fd.ddpm_step(x, m, torch.tensor([901, 1], device=dev), c, backend="triton", **kw)
            y.float().sum().backward()
torch.cuda.synchronize()
print("triton small run ok")
PYEOF
if command -v compute-sanitizer > /dev/null; then
  step memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
    $PY "$LOG/cuda_kernel_check.py" --small
  step racecheck 180 compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 \
    $PY "$LOG/cuda_kernel_check.py" --small
  step memcheck_triton 180 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
    $PY "$LOG/triton_small.py"
  step racecheck_triton 180 compute-sanitizer --tool racecheck --error-exitcode 1 \
    --print-limit 20 $PY "$LOG/triton_small.py"
else
  SUMMARY+=("$(printf '%-22s %-12s' memcheck "SKIP (no compute-sanitizer)")")
fi

echo
echo "================ fused_ddpm gpu_check summary ($(( $(date +%s) - T_START ))s, logs: $LOG)"
head -n 1 "$LOG/env.log"
grep -E "^  (float|bfloat|1x4)" "$LOG/cuda_kernel_check.log" 2>/dev/null
for line in "${SUMMARY[@]}"; do echo "$line"; done
grep -q "FAIL" <(printf '%s\n' "${SUMMARY[@]}") && exit 1
exit 0
