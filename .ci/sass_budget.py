#!/usr/bin/env python3
"""SASS instruction budgets of the hot GPU kernels, checked without a GPU.

Compiles csrc/step_kernels.cu for sm_90 with nvcc (or reads an object already compiled, e.g.
by .ci/nvcc_check.sh: --obj), disassembles it with cuobjdump, and for every budgeted variant
finds the main path -- the grid-stride loop over a sample's tiles -- and counts its SASS
instructions per element (loop body / elements per iteration). Checks, and fails on:

* instructions per element over the budget (in-kernel noise fp32/fp16/bf16 <= 45; external
  noise <= 25; backward <= 20; channels_last in-kernel noise <= 60);
* a contiguous main loop without 128-bit global loads and stores (LDG.E.128 / STG.E.128);
* any register spill or stack use (local-memory instructions, nonzero STACK / LOCAL).

It prints a table: variant, registers, instructions per element, predicted time of the
64x3x512x512 step (50.3 M elements) on an H200 from instruction issue alone at IPC 0.8, and
the memory floor of that step. Instruction issue on an H200 (132 SMs x 4 schedulers, each
issuing one warp instruction -- 32 threads -- per cycle at 1.98 GHz):
    1 instr/elem = 50.3e6 / (132 * 4 * 1.98e9 * 32) s = 1.50 us at IPC 1, 1.88 us at IPC 0.8.
Memory floor at 4.25 TB/s copy bandwidth (read + write): fp32 3 passes 142 us (4 passes with
an external noise tensor: 190 us), fp16/bf16 half of that.

Triton rows (.ci/triton_sass.py, the Triton kernels' counter): unless --no-triton, when that
module exists its ``measure(arch=90)`` rows are added to the table and its
``failures(rows)`` decide their pass/fail as well; ``--triton-json FILE`` reads rows written
by ``python .ci/triton_sass.py --json FILE`` instead of compiling. A row is a dict with at
least: backend, variant, kind ("noise" | "external" | "backward" | "cl_noise"; None:
information only), dtype, budget, regs, instr_per_elem, spill_st, spill_ld, stack, wide_ok
(every data access 128-bit), or "error".

Usage: python .ci/sass_budget.py [--obj step_kernels_sm90.o] [--triton-json rows.json |
                                 --no-triton] [--cuda-home DIR] [--keep DIR] [--verbose]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
ARCH = "sm_90"

BUDGETS = {"philox": 45.0, "external": 25.0, "backward": 20.0, "philox_cl": 60.0}

# The H200 numbers the predictions use (see the module docstring).
ELEMENTS = 64 * 3 * 512 * 512
SMS, SCHEDULERS, CLOCK_HZ, IPC, WARP = 132, 4, 1.98e9, 0.8, 32
COPY_BPS = 4.25e12
US_PER_INSTR_ELEM = ELEMENTS / (SMS * SCHEDULERS * CLOCK_HZ * IPC * WARP) * 1e6

KIND = {0: "fp32", 1: "fp16", 2: "bf16"}
ELEM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
PASSES = {"philox": 3, "external": 4, "backward": 3, "philox_cl": 3}
# channels_last rows: elements per inner (channel) iteration, and the channel count used to
# spread the per-tile work of the outer loop (4: Stable Diffusion latents).
CL_CHUNK, CL_CHANNELS = 4, 4

# Template arguments of the kernels (step_kernels.cu): <KIND, NoiseSrc, Mode, IDX64>.
NZ_NAMES = {0: "none", 1: "external", 2: "philox", 3: "philox_cl"}
MODE_LEAN = 0
LEAN_ELEMS = 16  # elements per thread per tile of the LEAN kernels


def find_tool(name: str, cuda_home: Optional[str]) -> str:
    """nvcc / cuobjdump from CUDA_HOME, PATH, or (cuobjdump) the copy bundled with Triton."""
    cands = []
    if cuda_home:
        cands.append(Path(cuda_home) / "bin" / name)
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(Path(os.environ[env]) / "bin" / name)
    cands.append(Path("/usr/local/cuda/bin") / name)
    for c in cands:
        if c.exists():
            return str(c)
    on_path = shutil.which(name)
    if on_path:
        return on_path
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    raise SystemExit(f"sass_budget: {name} not found (set CUDA_HOME or put it on PATH)")


def compile_object(nvcc: str, out: Path) -> None:
    cmd = [nvcc, "-std=c++17", "-O3", "--use_fast_math", "-lineinfo", f"-I{ROOT / 'csrc'}",
           "-gencode", f"arch=compute_90,code={ARCH}", "-c", str(ROOT / "csrc" / "step_kernels.cu"),
           "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit("sass_budget: nvcc failed")


# ------------------------------------------------------------------------------ SASS parsing
INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
FUNC = re.compile(r"^\s+Function : (\S+)")
RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_sass(text: str) -> Dict[str, List[Tuple[int, str]]]:
    funcs: Dict[str, List[Tuple[int, str]]] = {}
    cur: Optional[List[Tuple[int, str]]] = None
    for line in text.splitlines():
        m = FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = INSTR.match(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return funcs


def opcode(ins: str) -> str:
    ins = re.sub(r"^@!?U?P[T0-9]+\s+", "", ins)
    return ins.split()[0] if ins else ""


def loops(code: List[Tuple[int, str]]) -> List[Tuple[int, int]]:
    """(start, end) address ranges of the loops: a branch back to a lower address."""
    out = []
    for addr, ins in code:
        if opcode(ins) == "BRA":
            m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|)\s*(0x[0-9a-f]+)", ins)
            if m and int(m.group(1), 16) < addr:
                out.append((int(m.group(1), 16), addr))
    return out


def body(code, rng) -> List[str]:
    a, b = rng
    return [ins for addr, ins in code if a <= addr <= b and opcode(ins) != "NOP"]


def innermost(ls: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    return [r for r in ls if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ls)]


def has_global(ins_list: List[str]) -> bool:
    return any(opcode(i).startswith(("LDG", "STG")) for i in ins_list)


def depth(r: Tuple[int, int], ls: List[Tuple[int, int]]) -> int:
    return sum(o != r and o[0] <= r[0] and r[1] <= o[1] for o in ls)


def main_path(code, nz: int) -> Tuple[float, List[str], str]:
    """(instructions per element, main-loop instructions, description) of one kernel.

    The main loop is the innermost loop with global memory accesses nested deepest (the
    per-sample loop encloses the tile loop, which for channels_last encloses the channel
    loop; a sample's partial last tile is handled outside the tile loop).
    """
    ls = loops(code)
    inner = [r for r in innermost(ls) if has_global(body(code, r))]
    if not inner:
        raise ValueError("no loop with global memory accesses")
    r = max(inner, key=lambda r: (depth(r, ls), -len(body(code, r))))
    ins = body(code, r)
    if nz == 3:  # channels_last: inner loop over channels (4 elements), outer over tiles
        outer = [o for o in ls if o != r and o[0] <= r[0] and r[1] <= o[1]]
        extra = 0
        if outer:
            o = min(outer, key=lambda o: o[1] - o[0])
            extra = len(body(code, o)) - len(ins)
        per = len(ins) / CL_CHUNK + extra / (CL_CHUNK * CL_CHANNELS)
        return per, ins, (f"channel loop {hex(r[0])}-{hex(r[1])}: {len(ins)} / {CL_CHUNK} + "
                          f"tile loop rest {extra} / ({CL_CHUNK}x{CL_CHANNELS} channels)")
    where = f"tile loop {hex(r[0])}-{hex(r[1])}: {len(ins)} / {LEAN_ELEMS}"
    return len(ins) / LEAN_ELEMS, ins, where


def demangle(name: str) -> Optional[Tuple[str, List[int]]]:
    """('fd_step_forward', [KIND, NZ, MODE, IDX64]) from a mangled kernel name."""
    m = re.search(r"(fd_step_forward|fd_step_backward)I((?:L[ib]\d+E)+)E", name)
    if not m:
        return None
    return m.group(1), [int(a) for a in re.findall(r"L[ib](\d+)E", m.group(2))]


def cuda_rows(obj: Path, cuobjdump: str, verbose: bool) -> List[dict]:
    sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True,
                          check=True).stdout
    res = subprocess.run([cuobjdump, "-res-usage", str(obj)], capture_output=True, text=True,
                         check=True).stdout
    usage = {m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(5)))
             for m in RES.finditer(res)}
    funcs = parse_sass(sass)
    rows = []
    for name, code in funcs.items():
        d = demangle(name)
        if d is None:
            continue
        fam, (kind, nz, mode, idx64) = d
        if mode != MODE_LEAN or idx64:
            continue
        if fam == "fd_step_forward":
            if nz == 0:
                continue  # no noise: no budget of its own (a subset of the external-noise loop)
            category = {1: "external", 2: "philox", 3: "philox_cl"}[nz]
            variant = f"fwd {KIND[kind]} {NZ_NAMES[nz]}"
        else:
            category = "backward"
            variant = f"bwd {KIND[kind]}"
        per, ins, where = main_path(code, nz if fam == "fd_step_forward" else 0)
        regs, stack, local = usage.get(name, (-1, -1, -1))
        local_ops = sum(opcode(i).startswith(("LDL", "STL")) for _, i in code)
        ops = [opcode(i) for i in ins]
        row = {"backend": "cuda", "variant": variant, "category": category,
               "dtype": KIND[kind], "regs": regs,
               "spill_bytes": stack + local + local_ops,
               "instr_per_elem": per, "vec128": ("LDG.E.128" in ops and "STG.E.128" in ops),
               "where": where}
        if verbose:
            from collections import Counter
            row["ops"] = Counter(ops).most_common()
        rows.append(row)
    return rows


# triton_sass.py's kinds -> the budget categories here
TRITON_KIND = {"noise": "philox", "external": "external", "backward": "backward",
               "cl_noise": "philox_cl", None: None}


def triton_rows(json_path: Optional[str], skip: bool) -> Tuple[List[dict], List[str]]:
    """(rows in this script's form, failure messages) of the Triton kernels."""
    if skip:
        return [], []
    path = ROOT / ".ci" / "triton_sass.py"
    mod = None
    if path.exists():
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location("triton_sass", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    if json_path:
        raw = json.loads(Path(json_path).read_text())
    elif mod is not None:
        raw = mod.measure(arch=90)
    else:
        return [], []
    # triton_sass.py's own verdicts (errors, its reading of the budgets); the budgets are applied to
    # every row below as well
    fails = list(mod.failures(raw)) if mod is not None else [
        f"{r['variant']}: {r['error']}" for r in raw if "error" in r]
    rows = []
    for r in raw:
        if "error" in r:
            continue
        rows.append({"backend": "triton", "variant": r["variant"],
                     "category": TRITON_KIND.get(r.get("kind")), "dtype": r["dtype"],
                     "regs": r.get("regs", -1),
                     "spill_bytes": (r.get("spill_st") or 0) + (r.get("spill_ld") or 0) +
                     (r.get("stack") or 0),
                     "instr_per_elem": float(r["instr_per_elem"]),
                     "vec128": bool(r.get("wide_ok"))})
    return rows, fails


def check(row: dict) -> List[str]:
    errs = []
    if row["category"] is None:
        return errs  # information only
    budget = BUDGETS[row["category"]]
    if row["instr_per_elem"] > budget:
        errs.append(f"{row['instr_per_elem']:.1f} instr/elem > budget {budget:.0f}")
    if row["spill_bytes"]:
        errs.append(f"spills / stack / local memory: {row['spill_bytes']}")
    if row["category"] != "philox_cl" and not row["vec128"]:
        errs.append("main loop without 128-bit global loads and stores")
    return errs


def floor_us(row: dict) -> float:
    passes = PASSES[row["category"]] if row["category"] else 3
    return passes * ELEM_BYTES[row["dtype"]] * ELEMENTS / COPY_BPS * 1e6


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--obj", help="an sm_90 object of csrc/step_kernels.cu (else compiled here)")
    ap.add_argument("--triton-json", help="Triton rows as JSON (from triton_sass.py --json)")
    ap.add_argument("--no-triton", action="store_true", help="CUDA kernels only")
    ap.add_argument("--cuda-home")
    ap.add_argument("--keep", help="keep the object and SASS in this directory")
    ap.add_argument("--verbose", action="store_true", help="print the opcode mix of each loop")
    args = ap.parse_args(argv)

    cuobjdump = find_tool("cuobjdump", args.cuda_home)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sass_budget_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.obj:
            obj = Path(args.obj)
        else:
            obj = work / "step_kernels_sm90.o"
            compile_object(find_tool("nvcc", args.cuda_home), obj)
        rows = cuda_rows(obj, cuobjdump, args.verbose)
        trows, tfails = triton_rows(args.triton_json, args.no_triton)
        rows += trows
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if not rows:
        print("sass_budget: no budgeted kernels found")
        return 1

    print(f"sass_budget: {ARCH}, 64x3x512x512 step on an H200 (1 instr/elem = "
          f"{US_PER_INSTR_ELEM:.2f} us at IPC {IPC})")
    hdr = (f"{'backend':7} {'variant':40} {'regs':>4} {'instr/elem':>10} {'budget':>6} "
           f"{'issue us':>8} {'floor us':>8}  status")
    print(hdr)
    print("-" * len(hdr))
    failed = 0
    order = {"philox": 0, "external": 1, "philox_cl": 2, "backward": 3, None: 4}
    for row in sorted(rows, key=lambda r: (r["backend"], order[r["category"]], r["dtype"])):
        errs = check(row)
        failed += bool(errs)
        budget = f"{BUDGETS[row['category']]:.0f}" if row["category"] else "-"
        print(f"{row['backend']:7} {row['variant'][:40]:40} {row['regs']:>4} "
              f"{row['instr_per_elem']:>10.1f} {budget:>6} "
              f"{row['instr_per_elem'] * US_PER_INSTR_ELEM:>8.0f} {floor_us(row):>8.0f}  "
              f"{'FAIL: ' + '; '.join(errs) if errs else 'ok'}")
        if args.verbose and "where" in row:
            print(f"        {row['where']}")
            if "ops" in row:
                print("        " + ", ".join(f"{o} {n}" for o, n in row["ops"]))
    for f in tfails:
        print(f"triton  FAIL: {f}")
    failed += len(tfails)
    print(f"sass_budget: {'FAILED' if failed else 'OK'} ({len(rows)} kernels, {failed} failures)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
