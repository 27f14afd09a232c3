#!/usr/bin/env python
"""Ahead-of-time compile check of the Triton kernels for NVIDIA sm_80 and sm_90, no GPU needed.

The CPU tests run the Triton kernels only under TRITON_INTERPRET=1, which accepts code that the
real compiler rejects. This script runs Triton's own compiler pipeline (ttir → ttgir → llir →
ptx → cubin, with the ptxas bundled in the triton wheel) for explicit targets
``GPUTarget("cuda", 80|90, 32)``, so no driver or device is queried. It fails (exit 1) on any
compile error, naming the kernel and variant, and on any register spill or nonzero stack
frame reported by ``ptxas -v`` in an "aligned" variant (the path real tensors take); in an
"unaligned" variant (odd sizes/strides, broadcast seeds: the fallback path) spills up to
UNALIGNED_SPILL_BYTES are reported as warnings (ptxas-blackwell spills a few bytes there
in a handful of sm_90 variants; Triton gives no register control to fix that), more fail.
It prints a per-kernel, per-arch summary last.

Kernels: every ``@triton.jit`` entry point of ``fused_ddpm.triton_kernels`` (``*_kernel``
functions and whatever a ``triton.autotune`` wrapper in those modules wraps, via ``.fn``); a
kernel without a variant list below is an error, so a new kernel cannot be skipped silently.

Variants (169 compiles per arch, 338 in all, ~50-80 s on 2 CPU cores):
  * step forward / backward, "core" matrix: CLIP_MODE 0..2 × VAR_MODE 0..2 × external/in-kernel
    noise × CHANNELS_LAST × {aligned, unaligned}, at the autotuner's largest config (most
    elements, hence registers, per thread). "aligned" is how Triton's JIT specialises typical
    tensors: sizes/strides divisible by 16, contiguous [B] seeds/t/thresh (stride 1 becomes the
    constexpr 1); "unaligned": no divisibility on sizes/strides, broadcast seeds/t (stride 0).
    Pointers are 16-byte aligned in both. The input dtype (element type of every data pointer)
    cycles fp32/fp16/bf16 over the matrix, shifted per arch and alignment, so every core
    variant meets all three dtypes over (arch × alignment) and, within one arch, each dtype
    meets every flag combination. WRITE_X0 / HAS_GX0 alternate with CLIP_MODE+VAR_MODE (both
    values occur with every noise/layout combination); backward otherwise requests every
    gradient the launcher can (HAS_GV iff VAR_MODE > 0, HAS_GZ iff external noise), as
    ``step_backward`` does.
  * every other autotuner config for the heaviest variants (in-kernel noise, CLIP_MODE 2,
    VAR_MODE 2, both layouts), forward and backward.
  * IDX64=True (N >= 2**31: int64 sizes/strides and index math) with channels-last in-kernel
    noise, aligned and unaligned; FAST=False (FUSED_DDPM_TRITON_ACCURATE_SINCOS=1); C == 1
    (the JIT's constexpr 1); backward with partial gradient sets.
  * _philox_uint32_kernel at the BLOCK that ``philox_uint32`` launches (1024, 4 warps).
Registers and spills come from the ``ptxas -v`` log of the very compile (Triton's
TRITON_DUMP_PTXAS_LOG knob, captured), with a private cache so nothing is a cache hit. sm_90
uses the ptxas Triton itself picks for it (``ptxas-blackwell``, CUDA 13.x, in triton 3.9).

Usage: python .ci/triton_compile_check.py [-j JOBS] [--arch 80 --arch 90] [-v]
"""
from __future__ import annotations

import os

# Must happen before triton (or the kernels' modules, which read it at import) is imported.
os.environ.pop("TRITON_INTERPRET", None)

UNALIGNED_SPILL_BYTES = 16

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("fp32", "fp16", "bf16")
PHILOX_BLOCK, PHILOX_WARPS = 1024, 4   # philox.philox_uint32's launch (BLOCK=1024, default warps)


# ----------------------------------------------------------------------------------------------
# Loading the kernels (also in each worker process)
# ----------------------------------------------------------------------------------------------
def load_modules():
    """(step, philox) modules of ``fused_ddpm.triton_kernels``.

    .ci/run calls this script before ``pip install -e .``; in a clean clone the package is then
    not importable yet, so the package's files are loaded from the source tree under the same
    package name (never as a top-level ``triton_kernels``)."""
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        sys.exit(f"triton_compile_check: FAIL: triton is not importable ({e}); it must be "
                 "installed before this check runs")
    try:
        import fused_ddpm.triton_kernels.philox as philox
        import fused_ddpm.triton_kernels.step as step
        return step, philox
    except ImportError as e:
        if "fused_ddpm" not in str(e):
            raise
    import importlib.util
    import types
    if "fused_ddpm" not in sys.modules:
        # A bare parent package: the Triton modules only import each other and torch/triton.
        parent = types.ModuleType("fused_ddpm")
        parent.__path__ = [str(ROOT / "fused_ddpm")]
        sys.modules["fused_ddpm"] = parent
    spec = importlib.util.spec_from_file_location(
        "fused_ddpm.triton_kernels", ROOT / "triton_kernels" / "__init__.py",
        submodule_search_locations=[str(ROOT / "triton_kernels")])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pkg
    spec.loader.exec_module(pkg)
    import fused_ddpm.triton_kernels.philox as philox
    import fused_ddpm.triton_kernels.step as step
    return step, philox


def discover_kernels(mods):
    """{name: JITFunction} of the entry points: autotune targets (``.fn``) and ``*_kernel``."""
    from triton.runtime.jit import JITFunction
    found = {}
    for mod in mods:
        for name, obj in vars(mod).items():
            fn = obj
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
                fn = fn.fn           # triton.autotune / heuristics wrappers
            if not isinstance(fn, JITFunction) or getattr(fn, "__module__", None) != mod.__name__:
                continue
            if fn is not obj or fn.__name__.endswith("_kernel"):
                found[fn.__name__] = fn
    return found


def autotune_configs(step):
    """(BLOCK, num_warps, num_stages) of the configs the autotuner uses on a GPU."""
    tuned = [getattr(step, n, None) for n in ("_fwd_tuned", "_bwd_tuned")]
    cfgs = next((t.configs for t in tuned if t is not None and hasattr(t, "configs")), None)
    if cfgs is None:
        cfgs = step._configs()
    out = []
    for c in cfgs:
        out.append((int(c.kwargs["BLOCK"]), int(c.num_warps), int(c.num_stages or 3)))
    return out


# ----------------------------------------------------------------------------------------------
# Variant lists
# ----------------------------------------------------------------------------------------------
def _fwd(clip, var, ext, cl, dt, block, nw, ns, *, x0=True, idx64=False, fast=True,
         aligned=True, c1=False, tag=""):
    const = dict(CLIP_MODE=clip, VAR_MODE=var, EXT_NOISE=ext, WRITE_X0=x0, CHANNELS_LAST=cl,
                 IDX64=idx64, FAST=fast, BLOCK=block)
    return dict(kernel="_step_fwd_kernel", dtype=dt, const=const, num_warps=nw, num_stages=ns,
                aligned=aligned, idx64=idx64, c1=c1, tag=tag)


def _bwd(clip, var, ext, cl, dt, block, nw, ns, *, gx0=True, gx=True, gm=True, gv=None,
         gz=None, idx64=False, fast=True, aligned=True, c1=False, tag=""):
    gv = (var != 0) if gv is None else (gv and var != 0)   # as step_backward: has_gv
    gz = ext if gz is None else (gz and ext)                #                   has_gz
    const = dict(CLIP_MODE=clip, VAR_MODE=var, EXT_NOISE=ext, HAS_GX0=gx0, HAS_GX=gx,
                 HAS_GM=gm, HAS_GV=gv, HAS_GZ=gz, CHANNELS_LAST=cl, IDX64=idx64, FAST=fast,
                 BLOCK=block)
    return dict(kernel="_step_bwd_kernel", dtype=dt, const=const, num_warps=nw, num_stages=ns,
                aligned=aligned, idx64=idx64, c1=c1, tag=tag)


def variants(arch_index, configs):
    big = max(configs, key=lambda c: (c[0] // c[1], c[0], c[1]))   # most elements per thread
    out = []
    for aligned in (True, False):
        # dtype rotation: over (arch 0/1) × (aligned/unaligned) every core variant meets all
        # three dtypes, and within one arch each dtype meets every flag combination.
        shift = (arch_index + 2 * (not aligned)) % 3
        idx = 0
        for clip in (0, 1, 2):
            for var in (0, 1, 2):
                for ext in (True, False):
                    for cl in (False, True):
                        dt = DTYPES[(idx + shift) % 3]
                        flag = (clip + var + (not aligned)) % 2 == 0
                        out.append(_fwd(clip, var, ext, cl, dt, *big, x0=flag, aligned=aligned,
                                        tag="core"))
                        out.append(_bwd(clip, var, ext, cl, dt, *big, gx0=not flag,
                                        aligned=aligned, tag="core"))
                        idx += 1
    for cfg in configs:
        if cfg == big:
            continue
        for k, cl in enumerate((False, True)):
            out.append(_fwd(2, 2, False, cl, DTYPES[(k + arch_index) % 3], *cfg, tag="config"))
            out.append(_bwd(2, 2, False, cl, DTYPES[(k + arch_index + 1) % 3], *cfg,
                            tag="config"))
    for k, aligned in enumerate((True, False)):
        out.append(_fwd(2, 2, False, True, DTYPES[k], *big, idx64=True, aligned=aligned,
                        tag="idx64"))
        out.append(_bwd(2, 2, False, True, DTYPES[k + 1], *big, idx64=True, aligned=aligned,
                        tag="idx64"))
    for cl in (False, True):
        out.append(_fwd(1, 2, False, cl, "fp16", *big, fast=False, aligned=cl, tag="accurate"))
        out.append(_bwd(1, 2, False, cl, "fp32", *big, fast=False, aligned=cl, tag="accurate"))
    out.append(_fwd(2, 1, False, False, "bf16", *big, c1=True, tag="C=1"))
    out.append(_bwd(2, 1, False, False, "fp16", *big, c1=True, tag="C=1"))
    part = dict(gx=False, gm=False, gv=False, gx0=False)
    out.append(_bwd(2, 2, False, False, "fp32", *big, **{**part, "gx": True}, tag="grads"))
    out.append(_bwd(1, 1, False, False, "bf16", *big, **{**part, "gm": True, "gx0": True},
                    tag="grads"))
    out.append(_bwd(2, 2, False, True, "fp16", *big, **{**part, "gv": True}, tag="grads"))
    out.append(_bwd(0, 1, True, False, "fp32", *big, **{**part, "gz": True}, tag="grads"))
    out.append(_bwd(2, 1, False, False, "fp16", *big, gv=False, tag="grads"))
    for aligned in (True, False):
        out.append(dict(kernel="_philox_uint32_kernel", dtype="i64",
                        const=dict(BLOCK=PHILOX_BLOCK), num_warps=PHILOX_WARPS, num_stages=3,
                        aligned=aligned, idx64=False, tag="launch"))
    return out


def describe(v):
    flags = ",".join(f"{k}={int(x) if isinstance(x, bool) else x}" for k, x in v["const"].items())
    extra = ("" if v["aligned"] else ",unaligned") + (",C=1" if v.get("c1") else "")
    return f"{v['kernel']}[{v['dtype']},{flags},warps={v['num_warps']}{extra}]"


# ----------------------------------------------------------------------------------------------
# Compiling one variant (worker)
# ----------------------------------------------------------------------------------------------
_KERNELS = None
_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
}


def _init_worker():
    global _KERNELS
    from triton import knobs
    step, philox = load_modules()
    _KERNELS = discover_kernels((step, philox))
    knobs.nvidia.dump_ptxas_log = True        # ptxas -v output is printed; captured below
    knobs.compilation.always_compile = True   # never a cache hit (which would skip ptxas)


def _signature(fn, v):
    """Signature, constexprs and attrs as Triton's JIT specialises such a launch: pointers
    16-byte aligned; "aligned": sizes/strides divisible by 16 and contiguous [B] seeds/t/thresh
    (stride 1, which the JIT turns into the constexpr 1); otherwise sizes/strides with no
    divisibility and broadcast seeds/t (stride 0)."""
    data = "*" + v["dtype"]
    idx_t = "i64" if v["idx64"] else "i32"
    sig, attrs, const = {}, {}, dict(v["const"])
    for i, p in enumerate(fn.params):
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            if n in ("seed_ptr", "t_ptr"):
                sig[n] = "*i64"
            elif n in ("table_ptr", "thresh_ptr"):
                sig[n] = "*fp32"
            elif n == "out_ptr" and v["kernel"] == "_philox_uint32_kernel":
                sig[n] = "*i64"
            else:
                sig[n] = data
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n == "clip":
            sig[n] = "fp32"
        elif n in ("s_seed", "s_t", "s_thr"):
            if v["aligned"]:
                sig[n], const[n] = "constexpr", 1
            else:
                sig[n] = "i32"
                if n != "s_thr":
                    attrs[(i,)] = [["tt.divisibility", 16]]   # stride 0
        elif n in ("N_BUCKET", "T"):
            sig[n] = "i32"
        elif n == "C" and v.get("c1"):
            sig[n], const[n] = "constexpr", 1
        else:   # sizes and batch strides
            sig[n] = idx_t
            if v["aligned"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def compile_one(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    arch, v = job
    res = dict(arch=arch, kernel=v["kernel"], name=describe(v), tag=v["tag"])
    fn = _KERNELS.get(v["kernel"])
    if fn is None:
        res["error"] = f"kernel {v['kernel']} not found in fused_ddpm.triton_kernels"
        return res
    sig, const, attrs = _signature(fn, v)
    t0 = time.time()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=v["num_warps"],
                                            num_stages=v["num_stages"]))
    except Exception as e:  # noqa: BLE001  (any compiler failure is the finding)
        msg = f"{type(e).__name__}: {e}".strip()
        res["error"] = msg if len(msg) < 4000 else msg[:4000] + "\n... (truncated)"
        return res
    res["secs"] = time.time() - t0
    log = buf.getvalue()
    m_regs, m_stack = _PTXAS["regs"].search(log), _PTXAS["stack"].search(log)
    m_spill = _PTXAS["spill"].search(log)
    if not (m_regs and m_stack and m_spill):
        res["error"] = ("compiled, but the ptxas -v resource report was not found in its log:\n"
                        + log[-2000:])
        return res
    res.update(regs=int(m_regs.group(1)), stack=int(m_stack.group(1)),
               spill_st=int(m_spill.group(1)), spill_ld=int(m_spill.group(2)),
               shared=int(getattr(k.metadata, "shared", 0) or 0),
               cubin_bytes=len(k.kernel))
    return res


# ----------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--arch", type=int, action="append", help="compute capability (default 80, 90)")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per variant")
    args = ap.parse_args()
    archs = args.arch or [80, 90]

    t_start = time.time()
    cache = tempfile.mkdtemp(prefix="triton_compile_check_")
    os.environ["TRITON_CACHE_DIR"] = cache     # private cache: no stale hits, nothing left behind
    try:
        import triton
        step, philox = load_modules()
        kernels = discover_kernels((step, philox))
        configs = autotune_configs(step)
        jobs = []
        for ai, arch in enumerate(archs):
            # the dtype rotation depends on the arch, not on which archs were asked for
            jobs += [(arch, v) for v in variants({80: 0, 90: 1}.get(arch, ai), configs)]
        covered = {v["kernel"] for _, v in jobs}
        missing = sorted(set(kernels) - covered)
        print(f"triton_compile_check: triton {triton.__version__}, archs "
              f"{', '.join(f'sm_{a}' for a in archs)}, kernels {', '.join(sorted(kernels))}; "
              f"autotune configs (BLOCK, warps, stages) {configs}; {len(jobs)} compiles, "
              f"{args.jobs} processes", flush=True)
        if missing:
            print(f"triton_compile_check: FAIL: no variant list for kernel(s) {missing}; add "
                  "them to .ci/triton_compile_check.py", flush=True)
            return 1
        if args.jobs > 1:
            import multiprocessing as mp
            with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"),
                                     initializer=_init_worker) as ex:
                results = list(ex.map(compile_one, jobs, chunksize=1))
        else:
            _init_worker()
            results = [compile_one(j) for j in jobs]
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    failures, warnings, seen = [], [], {}
    for r in results:
        if "error" in r:
            # the same front-end error recurs in many variants: full text once, then names
            first = seen.setdefault(r["error"], r["name"])
            detail = r["error"] if first == r["name"] else f"same error as {first}"
            failures.append(f"sm_{r['arch']} {r['name']} ({r['tag']}): COMPILE ERROR\n{detail}")
        elif r["spill_st"] or r["spill_ld"] or r["stack"]:
            msg = (f"sm_{r['arch']} {r['name']} ({r['tag']}): {r['regs']} registers, "
                   f"{r['spill_st']} B spill stores, {r['spill_ld']} B spill loads, "
                   f"{r['stack']} B stack frame")
            small = max(r["spill_st"], r["spill_ld"]) <= UNALIGNED_SPILL_BYTES
            (warnings if r["name"].endswith(",unaligned]") and small else failures).append(msg)
        if args.verbose and "error" not in r:
            print(f"  sm_{r['arch']} {r['name']}: regs {r['regs']}, spills "
                  f"{r['spill_st']}/{r['spill_ld']} B, stack {r['stack']} B, {r['secs']:.1f} s")
    for w in warnings:
        print(f"triton_compile_check: warning: {w}")
    for f in failures:
        print(f"triton_compile_check: FAIL: {f}")

    print("triton_compile_check: summary (kernel, arch: variants compiled, max registers "
          "[variant], spill stores/loads B, max stack B)")
    for kname in sorted({r["kernel"] for r in results}):
        for arch in archs:
            rs = [r for r in results if r["kernel"] == kname and r["arch"] == arch]
            ok = [r for r in rs if "error" not in r]
            line = f"  {kname:<22} sm_{arch}: {len(ok)}/{len(rs)} compiled"
            if ok:
                top = max(ok, key=lambda r: r["regs"])
                line += (f", max regs {top['regs']} [{top['name']}], spills "
                         f"{sum(r['spill_st'] for r in ok)}/{sum(r['spill_ld'] for r in ok)}, "
                         f"stack {max(r['stack'] for r in ok)}")
            print(line)
    status = "FAIL" if failures else "OK"
    print(f"triton_compile_check: {status}: {len(results) - len(failures)}/{len(results)} "
          f"variants pass ({len(warnings)} with small spills on the unaligned path) in "
          f"{time.time() - t_start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
