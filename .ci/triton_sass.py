#!/usr/bin/env python
"""SASS instruction counts of the Triton kernels' hot variants (sm_90), no GPU needed.

Each hot variant is compiled as in ``.ci/triton_compile_check.py`` (a real launch's arguments,
Triton's JIT specialisation, Triton's own compiler and ptxas) and disassembled with the
``nvdisasm`` bundled in the triton wheel. A Triton program is straight-line code over its
block, so the count is the whole program (every instruction but NOPs) divided by the
elements each thread handles (padding lanes of channels-last tiles excluded). Also counted:
registers and spills (``ptxas -v``), and the 128-bit global accesses: every store of a data
stream must be 128-bit and each loaded stream must take its 128-bit loads (the remaining
narrow loads are the per-sample scalars: t, the seed, the table row).

For the budget gate (``.ci/sass_budget.py``) and anyone else::

    import triton_sass                       # with .ci/ on sys.path
    rows = triton_sass.measure(arch=90)      # one dict per variant, see ``measure``
    triton_sass.failures(rows)               # [] when every budgeted row is within budget

Usage: python .ci/triton_sass.py [--arch 90] [--json FILE] [--check] [-j JOBS]
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_compile_check as tcc  # noqa: E402

# instructions per element (issue #10: in-kernel noise fp32/fp16/bf16 ≤ 45, external noise
# ≤ 25, backward ≤ 20, channels-last in-kernel noise ≤ 60)
BUDGETS = {"noise": 45.0, "external": 25.0, "backward": 20.0, "cl_noise": 60.0}

V = tcc.Variant
# (name, budget kind or None for information only, variant, data streams loaded, stored)
HOT = []
for _dt in tcc.DTYPES:
    HOT += [
        (f"fwd philox {_dt}", "noise", V("_step_fwd_kernel", _dt, walk="flat"), 2, 1),
        (f"fwd external {_dt}", "external", V("_step_fwd_kernel", _dt, walk="ext"), 3, 1),
        (f"bwd external {_dt}", "backward", V("_step_bwd_kernel", _dt, walk="ext"), 1, 3),
        (f"fwd philox channels_last C=4 {_dt}", "cl_noise",
         V("_step_fwd_kernel", _dt, walk="cl4"), 2, 1),
        (f"fwd philox channels_last C=3 {_dt}", "cl_noise",
         V("_step_fwd_kernel", _dt, walk="cl3", even=False), 2, 1),
    ]
HOT += [
    ("fwd philox, clipped, x0 fp32", None,
     V("_step_fwd_kernel", "fp32", clip=1, walk="flat", terms="clip", x0=True), 2, 2),
    ("fwd philox, learned range fp16", None,
     V("_step_fwd_kernel", "fp16", var=2, walk="flat"), 3, 1),
    ("fwd philox, guided fp16", None, V("_step_fwd_kernel", "fp16", walk="flat", guide=1), 3, 1),
    ("fwd philox, odd size fp32", None,
     V("_step_fwd_kernel", "fp32", walk="flat", even=False), 2, 1),
    ("fwd philox channels_last per element fp32", None,
     V("_step_fwd_kernel", "fp32", walk="clelem", even=False), 2, 1),
    ("bwd philox, learned range fp32", None,
     V("_step_bwd_kernel", "fp32", var=2, walk="flat", want="vz"), 2, 1),
    ("philox_normal fp32", None, V("_philox_normal_kernel", "fp32", walk="flat"), 0, 1),
]

_INS = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", re.M)


def disassemble(cubin: bytes) -> str:
    """nvdisasm's text of a cubin (the nvdisasm bundled with triton)."""
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([knobs.nvidia.nvdisasm.path, "-c", path], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.remove(path)


def opcodes(sass: str) -> List[str]:
    """The opcodes (with modifiers) of every instruction but NOPs, in order."""
    return [op for op in _INS.findall(sass) if op != "NOP"]


def elements_per_thread(kwargs: Dict) -> float:
    """Elements (not padding lanes) one thread of the launch handles."""
    from fused_ddpm.triton_kernels.tiles import Walk
    block, threads = kwargs["BLOCK"], 32 * kwargs["num_warps"]
    if kwargs.get("WALK") == Walk.CL_TILE:    # 4·K·C elements in 4·NP lanes per row
        block = block * kwargs["CL_K"] * kwargs["CL_C"] // kwargs["CL_NP"]
    return block / threads


def measure_one(job) -> Dict:
    """The row of one hot variant (in a worker process; see :func:`measure`)."""
    arch, (name, kind, v, loads, stores) = job
    row = dict(backend="triton", variant=name, kind=kind, dtype=v.dtype, arch=arch,
               budget=BUDGETS.get(kind), detail=v.describe())
    try:
        launch = tcc.build_launch(tcc._MODS, v)
        k, log = tcc.compile_launch(launch, arch)
        ops = opcodes(disassemble(k.asm["cubin"]))
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:4000]
        return row
    res = tcc.ptxas_resources(log) or {}
    ept = elements_per_thread(launch.kwargs)
    c = Counter(ops)
    ldg = {op: n for op, n in c.items() if op.startswith("LDG")}
    stg = {op: n for op, n in c.items() if op.startswith("STG")}
    ldg128 = sum(n for op, n in ldg.items() if ".128" in op)
    stg128 = sum(n for op, n in stg.items() if ".128" in op)
    item = {"fp32": 4, "fp16": 2, "bf16": 2}[v.dtype]
    vectors = launch.kwargs["BLOCK"] / (32 * launch.kwargs["num_warps"]) * item / 16
    row.update(regs=res.get("regs"), spill_st=res.get("spill_st"), spill_ld=res.get("spill_ld"),
               stack=res.get("stack"), instrs=len(ops), elems_per_thread=ept,
               instr_per_elem=round(len(ops) / ept, 2), ldg128=ldg128, stg128=stg128,
               ldg_narrow=sum(ldg.values()) - ldg128, stg_narrow=sum(stg.values()) - stg128,
               ldg128_expected=int(loads * vectors), stg128_expected=int(stores * vectors),
               shared=sum(n for op, n in c.items() if op.startswith(("LDS", "STS", "BAR"))))
    row["wide_ok"] = (row["stg_narrow"] == 0 and row["stg128"] >= row["stg128_expected"]
                      and row["ldg128"] >= row["ldg128_expected"])
    return row


def measure(arch: int = 90, hot=None, jobs: int = 1) -> List[Dict]:
    """Compile and count every hot variant for sm_``arch``. One dict per variant:

    backend ("triton"), variant (name), kind (budget key: "noise", "external", "backward",
    "cl_noise"; None: information only), dtype, arch, budget (instr/elem or None), detail
    (the compile check's variant name), regs, spill_st / spill_ld / stack (bytes), instrs
    (per thread), elems_per_thread, instr_per_elem, ldg128 / stg128 (128-bit global loads /
    stores per thread), ldg_narrow / stg_narrow (the other global loads / stores),
    ldg128_expected / stg128_expected, wide_ok (every data access 128-bit), shared (shared-
    memory and barrier instructions: layout conversions); "error" instead when it failed.
    """
    work = [(arch, h) for h in (HOT if hot is None else hot)]
    return tcc.run_jobs(work, jobs, worker=measure_one)


def failures(rows: List[Dict]) -> List[str]:
    """Why rows fail: errors anywhere; over budget, spills or narrow data accesses in
    budgeted rows."""
    out = []
    for r in rows:
        name = f"{r['variant']} (sm_{r['arch']})"
        if "error" in r:
            out.append(f"{name}: {r['error']}")
            continue
        if r["budget"] is None:
            continue
        if r["instr_per_elem"] > r["budget"]:
            out.append(f"{name}: {r['instr_per_elem']} instr/elem > budget {r['budget']}")
        if r["spill_st"] or r["spill_ld"] or r["stack"]:
            out.append(f"{name}: spills {r['spill_st']}/{r['spill_ld']} B, stack {r['stack']} B")
        if not r["wide_ok"]:
            out.append(f"{name}: data accesses not all 128-bit (LDG.128 {r['ldg128']}/"
                       f"{r['ldg128_expected']}, STG.128 {r['stg128']}/{r['stg128_expected']},"
                       f" narrow STG {r['stg_narrow']})")
    return out


def table(rows: List[Dict]) -> str:
    lines = [f"{'variant':<44} {'regs':>4} {'instr/elem':>10} {'budget':>6} {'spills':>6} "
             f"{'LDG.128':>8} {'STG.128':>8} {'smem':>4}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<44} ERROR")
            continue
        b = f"{r['budget']:.0f}" if r["budget"] is not None else "-"
        lines.append(f"{r['variant']:<44} {r['regs']:>4} {r['instr_per_elem']:>10.1f} {b:>6} "
                     f"{r['spill_st'] + r['spill_ld']:>6} "
                     f"{r['ldg128']:>3}/{r['ldg128_expected']:<4} "
                     f"{r['stg128']:>3}/{r['stg128_expected']:<4} {r['shared']:>4}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--check", action="store_true", help="exit 1 on a failure")
    ap.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    rows = measure(args.arch, jobs=args.jobs)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = failures(rows)
    for f in bad:
        print(f"triton_sass: {'FAIL' if args.check else 'over budget'}: {f}")
    return 1 if (bad and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
