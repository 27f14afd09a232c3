#!/usr/bin/env bash
# Compile the pure CUDA kernels (csrc/step_kernels.cu, no torch headers) with nvcc alone for
# sm_80 and sm_90 with `-Xptxas -v`. Fails on a compile error, and on any register spill or
# nonzero stack frame in a kernel. Prints a short per-arch summary (kernel families, register
# range, spills). Env: NVCC (default $CUDA_HOME/bin/nvcc or nvcc on PATH), ARCHS (default
# "80 90"), KEEP=1 keeps the logs (path printed), SM90_OBJ=path copies the sm_90 object there
# (for .ci/sass_budget.py --obj).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${NVCC:-}" ]]; then
  if [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then NVCC="${CUDA_HOME}/bin/nvcc"; else NVCC=nvcc; fi
fi
ARCHS="${ARCHS:-80 90}"
WORK="$(mktemp -d)"
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$WORK"' EXIT
echo "nvcc_check: $("$NVCC" --version | tail -n 1)"

pids=()
for a in $ARCHS; do
  ( "$NVCC" -std=c++17 -O3 --use_fast_math -lineinfo -I"$ROOT/csrc" \
      -gencode "arch=compute_${a},code=sm_${a}" -Xptxas -v \
      -c "$ROOT/csrc/step_kernels.cu" -o "$WORK/step_kernels_sm${a}.o" \
      > "$WORK/ptxas_sm${a}.log" 2>&1; echo $? > "$WORK/rc_sm${a}" ) &
  pids+=($!)
done
wait "${pids[@]}"

fail=0
for a in $ARCHS; do
  if [[ "$(cat "$WORK/rc_sm${a}")" != 0 ]]; then
    echo "nvcc_check: sm_${a}: COMPILE ERROR"; grep -E "error|warning" "$WORK/ptxas_sm${a}.log" | head -n 20
    fail=1; continue
  fi
  python3 - "$WORK/ptxas_sm${a}.log" "sm_${a}" <<'PY' || fail=1
import re, sys
log, arch = sys.argv[1], sys.argv[2]
kern, rows = None, {}
for line in open(log):
    m = re.search(r"Compiling entry function '([^']+)'", line)
    if m:
        kern = m.group(1); rows[kern] = {"regs": 0, "stack": 0, "spill_st": 0, "spill_ld": 0}
        continue
    if kern is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        rows[kern].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
    m = re.search(r"Used (\d+) registers", line)
    if m:
        rows[kern]["regs"] = int(m.group(1))
KINDS = {0: "f32", 1: "f16", 2: "bf16"}
NOISE = {0: "none", 1: "external", 2: "philox", 3: "philox_cl"}
MODES = {0: "lean", 1: "general", 2: "normal"}
def short(name):
    """fd_step_forward<kind, noise, mode, idx> from the mangled name (no c++filt needed)."""
    m = re.search(r"(fd_[a-z_0-9]+?)(?:I((?:L[ib]\d+E)+)E)?(?:Ev|EPK|EvNS)", name)
    if not m:
        return name
    args = [int(a) for a in re.findall(r"L[ib](\d+)E", m.group(2) or "")]
    if len(args) == 4:
        return (f"{m.group(1)}<{KINDS.get(args[0], args[0])}, {NOISE.get(args[1], args[1])}, "
                f"{MODES.get(args[2], args[2])}, {'int64' if args[3] else 'int32'}>")
    return m.group(1)
def demangle(names):
    return [short(n) for n in names]
fams = {}
for k, r in rows.items():
    fam = next((f for f in ("fd_step_forward", "fd_step_backward", "fd_philox_uint32") if f in k), "other")
    fams.setdefault(fam, []).append((k, r))
bad = [(k, r) for k, r in rows.items() if r["stack"] or r["spill_st"] or r["spill_ld"]]
print(f"nvcc_check: {arch}: {len(rows)} kernels")
for fam, ks in sorted(fams.items()):
    regs = sorted(r["regs"] for _, r in ks)
    worst = max(ks, key=lambda kr: kr[1]["regs"])
    print(f"  {fam:<18} {len(ks):3d} kernels  registers {regs[0]}..{regs[-1]} (median {regs[len(regs)//2]})"
          f"  max: {short(worst[0])}")
tot_st = sum(r["spill_st"] for r in rows.values()); tot_stack = sum(r["stack"] for r in rows.values())
print(f"  spill stores {tot_st} B, stack frames {tot_stack} B in total")
if bad:
    for (k, r), name in zip(bad, demangle([k for k, _ in bad])):
        print(f"  SPILL/STACK: {name}: {r}")
    sys.exit(1)
if not rows:
    print("  no kernels found in the ptxas output"); sys.exit(1)
PY
done
if [[ "$fail" != 0 ]]; then echo "nvcc_check: FAILED"; exit 1; fi
[[ "${KEEP:-0}" == 1 ]] && echo "nvcc_check: logs in $WORK"
if [[ -n "${SM90_OBJ:-}" && -f "$WORK/step_kernels_sm90.o" ]]; then cp "$WORK/step_kernels_sm90.o" "$SM90_OBJ"; fi
echo "nvcc_check: OK"
