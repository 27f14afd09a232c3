#!/usr/bin/env python
"""Ahead-of-time compile check of the Triton kernels for NVIDIA sm_80 and sm_90, no GPU needed.

The CPU tests run the Triton kernels only under TRITON_INTERPRET=1, which accepts code that the
real compiler rejects. This script runs Triton's own compiler pipeline (ttir → ttgir → llir →
ptx → cubin, with the ptxas bundled in the triton wheel) for explicit targets
``GPUTarget("cuda", 80|90, 32)``, so no driver or device is queried. It fails (exit 1) on any
compile error, naming the kernel and variant, and on any register spill or nonzero stack
frame reported by ``ptxas -v`` in an "aligned" variant (the path real tensors take); in an
"unaligned" variant (odd sizes, misaligned views, broadcast seeds and t) and with the accurate
sin/cos (libdevice: ptxas spilled one register in one such variant), spills up to
SMALL_SPILL_BYTES are reported as warnings, more fail. It prints a per-kernel, per-arch
summary last.

Each variant is a real launch: the launchers' own ``*_launch`` functions build the kernel
arguments from ``meta`` tensors (shapes and strides without storage, so a sample of 2³¹
elements costs nothing), and the signature, constexprs and alignment attributes come from
Triton's JIT specialisation of those arguments, exactly as a launch on a GPU would compile.

Kernels: every ``@triton.jit`` function named ``*_kernel`` in ``fused_ddpm.triton_kernels``;
a kernel without variants below is an error, so a new kernel cannot be skipped silently.

Variants: the step kernels' flags are many (clip × variance × noise and walk × TERMS × guidance
× X0 × alignment × dtype × sincos, and for the backward the gradient set and grad_x0), so
sm_90 compiles a *pairwise* covering set — every pair of values of any two factors occurs in
some variant (pairs that the contract rules out excepted) — and sm_80 a set in which every
value of every factor occurs; plus, on sm_90, int64 indexing (a sample of ≥ 2³¹ elements),
C = 1 (which Triton's JIT turns into a constexpr), more samples than a 2-D grid takes, the
accurate sin/cos, and the noise kernels
(~100 compiles, ~1.5–3 minutes on 2 busy cores).

Usage: python .ci/triton_compile_check.py [-j JOBS] [--arch 80 --arch 90] [-v]
"""
from __future__ import annotations

import os

# Must happen before triton (or the kernels' modules, which read it at import) is imported.
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional, Tuple  # noqa: E402

SMALL_SPILL_BYTES = 16
ROOT = Path(__file__).resolve().parent.parent
MODULES = ("philox", "tiles", "noise", "step")


# ----------------------------------------------------------------------------------------------
# Loading the kernels (also in each worker process)
# ----------------------------------------------------------------------------------------------
def load_modules() -> Dict[str, object]:
    """{name: module} of ``fused_ddpm.triton_kernels``.

    .ci/run calls this script before ``pip install -e .``; in a clean clone the package is then
    not importable yet, so its files are loaded from the source tree under the same package
    names (never as a top-level ``triton_kernels``)."""
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        sys.exit(f"triton_compile_check: FAIL: triton is not importable ({e}); it must be "
                 "installed before this check runs")
    import importlib
    try:
        importlib.import_module("fused_ddpm.triton_kernels")
    except ImportError as e:
        if "fused_ddpm" not in str(e):
            raise
        import importlib.util
        import types
        if "fused_ddpm" not in sys.modules:
            # A bare parent package: the Triton modules import only fused_ddpm.contract
            # (standard library only), torch and triton.
            parent = types.ModuleType("fused_ddpm")
            parent.__path__ = [str(ROOT / "fused_ddpm")]
            sys.modules["fused_ddpm"] = parent
        spec = importlib.util.spec_from_file_location(
            "fused_ddpm.triton_kernels", ROOT / "triton_kernels" / "__init__.py",
            submodule_search_locations=[str(ROOT / "triton_kernels")])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = pkg
        spec.loader.exec_module(pkg)
    return {m: importlib.import_module(f"fused_ddpm.triton_kernels.{m}") for m in MODULES}


def discover_kernels(mods) -> Dict[str, object]:
    """{name: JITFunction} of the ``*_kernel`` entry points defined in those modules."""
    from triton.runtime.jit import JITFunction
    found = {}
    for mod in mods.values():
        for name, obj in vars(mod).items():
            if (isinstance(obj, JITFunction) and obj.__module__ == mod.__name__
                    and name.endswith("_kernel")):
                found[name] = obj
    return found


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------
DTYPES = ("fp32", "fp16", "bf16")
# walk/noise: no noise, external z, in-kernel noise walked flat, in channels-last tiles
# (C = 4: a power of two; C = 3: through the in-row gather), or per element.
WALKS = ("none", "ext", "flat", "cl4", "cl3", "clelem")
# TERMS profiles: the columns each uses (before the noise rule below)
TERM_PROFILES = {
    "eps": ("Q", "R", "S"),                          # an unclipped DDPM step, folded
    "clip": ("U", "W", "P", "Q", "S"),               # a clipped DDPM step
    "all": ("U", "W", "E", "P", "Q", "R", "H", "S"),
    "addnoise": ("U", "E", "Q", "S"),                # training-side: no M
    "ddim0": ("W", "P", "Q"),                        # η = 0: no noise term
}
WANTS = ("all", "x", "m", "vz", "hx")               # backward: which gradients are asked for


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: str                  # a *_kernel name
    dtype: str = "fp32"
    clip: int = 0
    var: int = 0
    walk: str = "flat"
    terms: str = "eps"
    guide: int = 0               # 0: not guided; 1: guided; 2: guided with gscale
    x0: bool = False             # forward: X0 written; backward: grad_x0 given
    even: bool = True            # sizes that fill every program (no masks)
    aligned: bool = True         # False: odd sizes, a misaligned view, broadcast seeds/t
    fast: bool = True            # sin.approx/cos.approx
    want: str = "all"
    idx64: bool = False
    c1: bool = False             # C = 1
    many: bool = False           # more samples than a 2-D grid takes (a flat grid)
    tag: str = ""

    def describe(self) -> str:
        if self.kernel == "_philox_uint32_kernel":
            body = ""
        elif self.kernel == "_philox_normal_kernel":
            body = f"{self.walk},"
        else:
            body = (f"clip={self.clip},var={self.var},{self.walk},terms={self.terms},"
                    f"guide={self.guide},{'g0' if self.kernel == '_step_bwd_kernel' else 'x0'}="
                    f"{int(self.x0)},")
            if self.kernel == "_step_bwd_kernel":
                body += f"want={self.want},"
        extra = "".join(s for s, on in ((",even", self.even), (",unaligned", not self.aligned),
                                         (",accurate", not self.fast), (",idx64", self.idx64),
                                         (",C=1", self.c1), (",B=70000", self.many)) if on)
        return f"{self.kernel}[{self.dtype},{body.rstrip(',')}{extra}]"


def normalize(v: Variant) -> Variant:
    """The variant the contract and the shapes allow closest to ``v``."""
    ch = {}
    if v.walk in ("cl3", "clelem") or not v.aligned:
        ch["even"] = False           # those shapes never fill every program
    if v.terms == "addnoise":
        ch["guide"] = 0              # no M, so nothing to guide
    return dataclasses.replace(v, **ch) if ch else v


def pairwise(kernel: str, factors: Dict[str, tuple], seed: int = 1, tries: int = 30
             ) -> List[Variant]:
    """A small set of normalized variants in which every pair of values of two factors that
    the rules allow occurs (greedy, deterministic)."""
    names = list(factors)
    order = {n: k for k, n in enumerate(names)}
    rng = random.Random(seed)

    def key(a, la, b, lb):
        return ((a, la), (b, lb)) if order[a] < order[b] else ((b, lb), (a, la))

    def norm(row):
        v = normalize(dataclasses.replace(Variant(kernel), **row))
        return {n: getattr(v, n) for n in names}

    def pairs(row):
        return {key(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2)}

    todo = {key(a, la, b, lb) for a, b in itertools.combinations(names, 2)
            for la in factors[a] for lb in factors[b]}
    todo = {p for p in todo if all(norm(dict(p))[n] == lv for n, lv in p)}  # rules allow
    rows = []
    while todo:
        best, gain = None, 0
        for first in rng.sample(sorted(todo), min(len(todo), tries)):
            row = dict(first)
            for n in rng.sample(names, len(names)):
                if n not in row:
                    row[n] = max(factors[n], key=lambda lv: (
                        sum(key(m, row[m], n, lv) in todo for m in row), rng.random()))
            row = norm(row)
            g = len(pairs(row) & todo)
            if g > gain:
                best, gain = row, g
        if best is None:     # fall back to the first pair with every other factor at default
            best = norm(dict(sorted(todo)[0]))
        todo -= pairs(best)
        rows.append(best)
    return [Variant(kernel, tag="pairwise", **r) for r in rows]


def one_wise(rows: List[Variant], factors: Dict[str, tuple]) -> List[Variant]:
    """Rows of ``rows`` until every value of every factor has occurred."""
    todo = {(n, lv) for n, lvs in factors.items() for lv in lvs}
    out = []
    for r in rows:
        got = {(n, getattr(r, n)) for n in factors} & todo
        if got:
            out.append(r)
            todo -= got
    return out


def variants(arch: int) -> List[Variant]:
    common = dict(dtype=DTYPES, clip=(0, 1, 2), var=(0, 1, 2), walk=WALKS,
                  terms=tuple(TERM_PROFILES), guide=(0, 1, 2), x0=(False, True),
                  even=(True, False), aligned=(True, False))
    fwd = pairwise("_step_fwd_kernel", common)
    bwd = pairwise("_step_bwd_kernel", {**common, "want": WANTS}, seed=2)
    if arch != 90:
        return (one_wise(fwd, common) + one_wise(bwd, {**common, "want": WANTS})
                + [Variant("_philox_normal_kernel", "fp16", walk="flat", tag="noise"),
                   Variant("_philox_uint32_kernel", "i64", tag="noise")])
    extra = [
        Variant("_step_fwd_kernel", "fp16", walk="flat", idx64=True, tag="idx64"),
        Variant("_step_fwd_kernel", "bf16", clip=2, var=2, walk="cl4", terms="all", guide=2,
                x0=True, idx64=True, tag="idx64"),
        Variant("_step_fwd_kernel", "fp32", walk="clelem", terms="clip", even=False,
                idx64=True, tag="idx64"),
        Variant("_step_bwd_kernel", "fp32", clip=1, var=1, walk="flat", terms="all",
                idx64=True, tag="idx64"),
        Variant("_step_fwd_kernel", "fp32", clip=1, walk="flat", terms="clip", c1=True,
                tag="C=1"),
        Variant("_step_fwd_kernel", "fp16", walk="cl3", even=False, many=True,
                tag="B=70000"),
        Variant("_step_bwd_kernel", "fp32", clip=2, walk="ext", terms="clip", many=True,
                tag="B=70000"),
        Variant("_step_bwd_kernel", "fp16", clip=2, var=2, walk="ext", terms="all", c1=True,
                aligned=False, even=False, tag="C=1"),
        Variant("_step_fwd_kernel", "fp16", clip=1, var=2, walk="cl4", terms="clip", guide=1,
                x0=True, fast=False, tag="accurate"),
        Variant("_step_fwd_kernel", "bf16", walk="flat", terms="all", fast=False,
                tag="accurate"),
        Variant("_step_bwd_kernel", "fp32", clip=2, var=1, walk="cl3", terms="all",
                even=False, fast=False, tag="accurate"),
    ]
    noise = [Variant("_philox_normal_kernel", dt, walk=w, even=e, aligned=a, tag="noise")
             for dt, w, e, a in (("fp32", "flat", True, True), ("fp16", "flat", False, False),
                                 ("bf16", "cl4", True, True), ("fp32", "cl3", False, True),
                                 ("fp16", "clelem", False, False))]
    noise += [Variant("_philox_normal_kernel", "fp32", walk="cl4", idx64=True, tag="noise"),
              Variant("_philox_uint32_kernel", "i64", tag="noise"),
              Variant("_philox_uint32_kernel", "i64", aligned=False, even=False, tag="noise")]
    return fwd + bwd + extra + noise


# ----------------------------------------------------------------------------------------------
# A variant as a launch on meta tensors
# ----------------------------------------------------------------------------------------------
def _shape(v: Variant) -> Tuple[int, ...]:
    if v.many:
        return (70000,) + _shape(dataclasses.replace(v, many=False))[1:]
    if v.idx64:      # > 2**31 elements per sample
        return {"clelem": (2, 5, 32769, 16387), "cl3": (2, 3, 2 ** 15, 2 ** 15)}.get(
            v.walk, (2, 4, 2 ** 15, 2 ** 14))
    if v.c1:
        return (2, 1, 32, 64) if v.aligned else (3, 1, 5, 7)
    if v.walk == "cl4":
        return (2, 4, 32, 32) if v.even else (2, 4, 12, 12) if v.aligned else (3, 4, 3, 4)
    if v.walk == "cl3":
        return (2, 3, 16, 16) if v.aligned else (3, 3, 4, 5)
    if v.walk == "clelem":
        return (2, 16, 5, 5) if v.aligned else (3, 3, 5, 7)
    return (2, 4, 32, 64) if v.even else (2, 4, 24, 24) if v.aligned else (3, 3, 5, 7)


def build_launch(mods, v: Variant):
    """The ``Launch`` the launchers make for variant ``v`` (arguments checked as a launch
    would be), on meta tensors."""
    import torch
    from fused_ddpm.contract import (NUM_COLS, NUM_FLAGS, NUM_IN, NUM_SCALARS, Col, Flag, In,
                                     Layout, Noise, Scalar, terms_mask)
    from fused_ddpm.triton_kernels import checks
    step, noise_mod = mods["step"], mods["noise"]
    dev = "meta"
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "i64": torch.int64}[v.dtype]
    shape = _shape(v)
    B, C = shape[0], shape[1]
    cl = v.walk in ("cl4", "cl3", "clelem")
    layout = Layout.CHANNELS_LAST if cl else Layout.CONTIGUOUS

    def per_sample(dtype):
        if v.aligned:
            return torch.empty(B, dtype=dtype, device=dev)
        return torch.empty((), dtype=dtype, device=dev).expand(B)

    def stream(offset_view=False):
        if cl:
            a = torch.empty((shape[0],) + shape[2:] + (C,), dtype=dt, device=dev)
            return a.movedim(-1, 1)
        if offset_view:      # a view into a larger output, as the first C of 2C channels
            big = torch.empty((B, 2 * C) + shape[2:], dtype=dt, device=dev)
            return big[:, 1:C + 1] if not v.aligned else big[:, :C]
        return torch.empty(shape, dtype=dt, device=dev)

    if v.kernel == "_philox_uint32_kernel":
        numel = 4096 if v.aligned else 1029
        out = torch.empty((B, numel), dtype=torch.int64, device=dev)
        seeds, t = per_sample(torch.int64), per_sample(torch.int64)
        checks.check_philox_uint32(seeds, t, numel, 0)
        return noise_mod.uint32_launch(seeds, t, 0, out)
    if v.kernel == "_philox_normal_kernel":
        out = stream()
        seeds, t = per_sample(torch.int64), per_sample(torch.int64)
        checks.check_philox_normal(seeds, t, 1, int(layout), out)
        launch = noise_mod.normal_launch(seeds, t, 1, int(layout), out)
        return launch._replace(kwargs={**launch.kwargs, "FAST": v.fast})

    noise = {"none": Noise.NONE, "ext": Noise.EXTERNAL}.get(v.walk, Noise.PHILOX)
    cols = [Col[c] for c in TERM_PROFILES[v.terms]]
    if noise == Noise.NONE:
        cols = [c for c in cols if c not in (Col.S, Col.E)]
    elif Col.S not in cols and Col.E not in cols:
        cols.append(Col.S)
    terms = terms_mask(cols)
    ins = [None] * NUM_IN
    ins[In.X] = stream()
    if v.terms != "addnoise":
        ins[In.M] = stream(offset_view=v.var != 0)
        if v.guide:
            ins[In.MC] = stream()
    if v.var:
        ins[In.V] = stream(offset_view=True)
    if noise == Noise.EXTERNAL:
        ins[In.Z] = stream()
    if Col.H in cols:
        ins[In.H] = stream()
    t = per_sample(torch.int64)
    seeds = per_sample(torch.int64) if noise == Noise.PHILOX else None
    table = torch.empty(1000, NUM_COLS, device=dev)
    thresh = per_sample(torch.float32) if v.clip == 2 else None
    gscale = per_sample(torch.float32) if v.guide == 2 else None
    flags = [0] * NUM_FLAGS
    flags[Flag.CLIP], flags[Flag.VAR], flags[Flag.NOISE] = v.clip, v.var, int(noise)
    flags[Flag.LAYOUT], flags[Flag.TERMS], flags[Flag.NOISE_STREAM] = int(layout), terms, 1
    scalars = [0.0] * NUM_SCALARS
    scalars[Scalar.CLIP], scalars[Scalar.GUIDANCE] = 1.0, 7.5
    if v.kernel == "_step_fwd_kernel":
        outs = [stream(), stream() if v.x0 else None]
        checks.check_forward(ins, t, seeds, table, thresh, gscale, outs, flags, scalars)
        launch = step.forward_launch(ins, t, seeds, table, thresh, gscale, outs, flags,
                                     scalars)
    else:
        present = [i for i in In if ins[i] is not None]
        want = {"all": present, "x": [In.X], "m": [In.M, In.MC], "vz": [In.V, In.Z],
                "hx": [In.H, In.X]}[v.want]
        want = [i for i in want if ins[i] is not None] or [In.X]
        grads = [stream() if i in want else None for i in In]
        gy, g0 = stream(), (stream() if v.x0 else None)
        checks.check_backward(ins, gy, g0, t, seeds, table, thresh, gscale, grads, flags,
                              scalars)
        launch = step.backward_launch(ins, gy, g0, t, seeds, table, thresh, gscale, grads,
                                      flags, scalars)
    return launch._replace(kwargs={**launch.kwargs, "FAST": v.fast})


def compile_launch(launch, arch: int):
    """(CompiledKernel, ptxas -v log) of ``launch`` compiled for sm_``arch`` the way the JIT
    compiles it on a device of that arch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                           options=options.__dict__)
    return k, buf.getvalue()


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
}


def ptxas_resources(log: str) -> Optional[Dict[str, int]]:
    """Registers, stack frame and spill bytes from a ``ptxas -v`` log (None if absent)."""
    m_regs, m_stack, m_spill = (_PTXAS[k].search(log) for k in ("regs", "stack", "spill"))
    if not (m_regs and m_stack and m_spill):
        return None
    return dict(regs=int(m_regs.group(1)), stack=int(m_stack.group(1)),
                spill_st=int(m_spill.group(1)), spill_ld=int(m_spill.group(2)))


_MODS = None


def init_worker():
    global _MODS
    from triton import knobs
    _MODS = load_modules()
    knobs.nvidia.dump_ptxas_log = True        # ptxas -v output is printed; captured
    knobs.compilation.always_compile = True   # never a cache hit (which would skip ptxas)
    knobs.compilation.disable_line_info = True  # a third faster; the code is the same


def compile_one(job):
    arch, v = job
    res = dict(arch=arch, kernel=v.kernel, name=v.describe(), tag=v.tag,
               tolerant=not (v.aligned and v.fast))
    t0 = time.time()
    try:
        launch = build_launch(_MODS, v)
        _, log = compile_launch(launch, arch)
    except Exception as e:  # noqa: BLE001  (any failure is the finding)
        msg = f"{type(e).__name__}: {e}".strip()
        res["error"] = msg if len(msg) < 4000 else msg[:4000] + "\n... (truncated)"
        return res
    res["secs"] = time.time() - t0
    r = ptxas_resources(log)
    if r is None:
        res["error"] = ("compiled, but the ptxas -v resource report was not found in its log:\n"
                        + log[-2000:])
        return res
    res.update(r)
    return res


def run_jobs(jobs, nproc: int, worker=compile_one):
    """Results of ``worker`` (``compile_one``) for every job, in order, in ``nproc``
    processes (a private cache: no stale hits)."""
    cache = tempfile.mkdtemp(prefix="triton_compile_check_")
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        if nproc > 1:
            import multiprocessing as mp
            with ProcessPoolExecutor(nproc, mp_context=mp.get_context("spawn"),
                                     initializer=init_worker) as ex:
                return list(ex.map(worker, jobs, chunksize=1))
        init_worker()
        return [worker(j) for j in jobs]
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--arch", type=int, action="append", help="compute capability (default 80, 90)")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per variant")
    args = ap.parse_args()
    archs = args.arch or [80, 90]

    t_start = time.time()
    import triton
    kernels = discover_kernels(load_modules())
    jobs = [(arch, v) for arch in archs for v in variants(arch)]
    missing = sorted(set(kernels) - {v.kernel for _, v in jobs})
    print(f"triton_compile_check: triton {triton.__version__}, archs "
          f"{', '.join(f'sm_{a}' for a in archs)}, kernels {', '.join(sorted(kernels))}; "
          f"{len(jobs)} compiles, {args.jobs} processes", flush=True)
    if missing:
        print(f"triton_compile_check: FAIL: no variants for kernel(s) {missing}; add them to "
              ".ci/triton_compile_check.py", flush=True)
        return 1
    results = run_jobs(jobs, args.jobs)

    failures, warns, seen = [], [], {}
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
            small = max(r["spill_st"], r["spill_ld"]) <= SMALL_SPILL_BYTES
            (warns if r["tolerant"] and small else failures).append(msg)
        if args.verbose and "error" not in r:
            print(f"  sm_{r['arch']} {r['name']}: regs {r['regs']}, spills "
                  f"{r['spill_st']}/{r['spill_ld']} B, stack {r['stack']} B, {r['secs']:.1f} s")
    for w in warns:
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
          f"variants pass ({len(warns)} with small spills on the unaligned path) in "
          f"{time.time() - t_start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
