#!/usr/bin/env bash
# The check to run on a lent GPU machine (torch preinstalled, no network), from anywhere:
#
#   bash bench/gpu_check.sh            # the check, at most 8 minutes
#   bash bench/gpu_check.sh --dry-run  # no GPU needed: the plan, and the CPU-runnable parts
#
# Steps, in this order, each under its own time limit (the limits add up to BUDGET_S):
#   env              versions; which of pytest, numpy, hypothesis, diffusers, triton exist;
#                    CUDA_HOME resolved as setup.py resolves it (CUDA_HOME/CUDA_PATH, else the
#                    nvcc on PATH followed through symlinks and wrappers, else
#                    /usr/local/cuda) and checked (bin/nvcc, include/cuda_runtime.h);
#                    TORCH_CUDA_ARCH_LIST = this GPU's own arch (unless set)
#   build            pip install --no-build-isolation --no-deps -e . (FUSED_DDPM_CUDA=1 when
#                    a toolkit was found, so a failed CUDA build fails this step)
#   headline         python -m bench --preset headline --record: cuda and triton at
#                    64x3x512x512 fp32/fp16 (in-kernel and external noise, backward) vs copy
#                    and the floor, the 1000-step loop eager and CUDA-graphed; printed first
#   contract_cuda    the contract test modules of CPU CI on the cuda backend
#   contract_triton  the same on the triton backend (FUSED_DDPM_TEST_BACKENDS selects it,
#                    -m gpu keeps the CUDA-device cases; tests/conftest.py)
#   memcheck         compute-sanitizer --tool memcheck on python -m bench.small_run (every
#                    launch path once, small tensors), with PYTORCH_NO_CUDA_MEMORY_CACHING=1
#                    so small overruns leave their allocation. No racecheck: the kernels use
#                    no shared memory, so it has nothing to check.
#   record           python -m bench --preset gpu --record --time-limit (whatever time is
#                    left; cases not started in time are recorded as skipped)
#
# Each step's output goes to $LOG/<step>.log as it runs; one result line per step is
# appended to $LOG/results.txt when it ends, and everything printed here is also in
# $LOG/gpu_check.log. The recorded documents (bench/results/{headline,gpu}-*.json, .png and
# bench/RESULTS.md) are copied to $LOG/recorded/. LOG is $OUT when set (the lent machine's output folder), else
# /tmp/fused_ddpm_gpu_check. Exit status: 0 when every step that ran passed.
# Inputs everywhere come from fixed seeds. Expected duration on an H100/H200: ~5-6 minutes
# (build ~1.5 min, headline ~1 min, contract tests ~2-3 min, memcheck < 1 min).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

LOG="${OUT:-/tmp/fused_ddpm_gpu_check}"
mkdir -p "$LOG"
RESULTS="$LOG/results.txt"
: > "$RESULTS"
exec > >(tee "$LOG/gpu_check.log") 2>&1
PY="${PYTHON:-python}"

BUDGET_S=480
# step:limit_s, in run order; the limits add up to BUDGET_S (record also gets what earlier
# steps left unused)
STEPS=(env:20 build:140 headline:60 contract_cuda:50 contract_triton:90 memcheck:70 record:50)
T_START=$(date +%s)
FAILED=0

# The contract suite of CPU CI, most important first (modules that need a missing optional
# package skip themselves: test_properties without hypothesis, diffusers tests without it).
CONTRACT_TESTS=(tests/test_kernels.py tests/test_gpu.py tests/test_fused_step.py
                tests/test_edge_cases.py tests/test_validation.py tests/test_sampler.py
                tests/test_samplers.py tests/test_triton_tiles.py tests/test_properties.py
                tests/test_diffusers_schedulers.py tests/test_plain_step.py)

limit_of() {  # limit_of STEP -> its limit in seconds (record: all the time that is left)
  local entry
  for entry in "${STEPS[@]}"; do
    if [[ ${entry%%:*} == "$1" ]]; then
      if [[ $1 == record ]]; then
        local left=$(( T_START + BUDGET_S - $(date +%s) ))
        (( left > ${entry##*:} )) && { echo "$left"; return; }
      fi
      echo "${entry##*:}"; return
    fi
  done
  echo "gpu_check: unknown step $1" >&2; exit 2
}

result() {  # result STEP STATUS SECONDS DETAIL: one line to the results file, as it happens
  local line
  line="$(printf '%-16s %-8s %4ss  %s' "$1" "$2" "$3" "$4")"
  echo "$line" >> "$RESULTS"
  echo "RESULT $line"
}

# step NAME DETAIL_FN CMD... : run CMD under NAME's limit (SIGINT first, so pytest still
# prints its summary, SIGKILL 10 s later), output to $LOG/NAME.log and to the console.
# DETAIL_FN (or "-") prints a one-line detail from the log for the result line.
# With --dry-run: prints the plan line instead; the DRY_CMD array, when set, runs in its
# place (a CPU-runnable stand-in).
step() {
  local name=$1 detail_fn=$2; shift 2
  local limit t0 rc dt status detail=""
  limit=$(limit_of "$name")
  echo "PLAN $name $limit $*" >> "$LOG/plan.txt"
  echo
  echo "=== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  if (( DRY )); then
    if (( ${#DRY_CMD[@]} )); then
      # a stand-in's time says nothing about the GPU run's: a limit of its own
      echo "--- dry run stand-in: ${DRY_CMD[*]}"
      timeout -s INT -k 10 300 "${DRY_CMD[@]}" 2>&1 | tee "$LOG/$name.log"
      rc=${PIPESTATUS[0]}
    else
      echo "--- dry run: not run (needs a GPU)"
      rc=0
      detail="not run (dry run)"
    fi
  else
    timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee "$LOG/$name.log"
    rc=${PIPESTATUS[0]}
  fi
  DRY_CMD=()
  dt=$(( $(date +%s) - t0 ))
  [[ $detail_fn != - && -z $detail ]] && detail="$($detail_fn "$LOG/$name.log")"
  if [[ $rc == 0 ]]; then status=PASS
  elif [[ $rc == 124 || $rc == 137 ]]; then status=TIMEOUT; FAILED=1
  else status="FAIL($rc)"; FAILED=1
  fi
  result "$name" "$status" "$dt" "$detail"
}

skip() {  # skip NAME WHY
  echo "PLAN $1 0 skipped: $2" >> "$LOG/plan.txt"
  echo
  echo "=== $1: SKIP ($2)"
  result "$1" SKIP 0 "$2"
}

pytest_counts() {  # the pytest summary line, or the counts so far when it was killed
  local last
  last="$(grep -E "(passed|failed|error|skipped|deselected|collected|no tests ran)" "$1" |
          grep -vE "(PASSED|FAILED|ERROR|SKIPPED)" | tail -n 1)"
  if [[ -n $last ]]; then echo "$last" | tr -d '='; return; fi
  echo "killed: $(grep -c " PASSED" "$1") passed, $(grep -cE " (FAILED|ERROR)" "$1") failed so far"
}
bench_counts() {  # rows per status in a bench run's log
  echo "$(grep -cE "^ +[a-z-]+ +[a-z-]+ .* ok " "$1") ok," \
       "$(grep -cE "^ +[a-z-]+ +[a-z-]+ .* error" "$1") error," \
       "$(grep -cE "^ +[a-z-]+ +[a-z-]+ .* skipped" "$1") skipped"
}
small_run_counts() { grep -E "^small_run:|ERROR SUMMARY" "$1" | tr '\n' ' '; }
last_line() { tail -n 1 "$1"; }

# ------------------------------------------------------------------------------ env
DRY_CMD=()
env_report() {
  timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
    --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
  timeout 30 "$PY" - <<'PYEOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, torch CUDA "
      f"{torch.version.cuda}, CUDA device: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability %d.%d"
          % torch.cuda.get_device_capability())
for mod in ("pytest", "numpy", "hypothesis", "diffusers", "triton", "tqdm", "matplotlib"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod}: {getattr(m, '__version__', 'present')}")
    except Exception as e:
        print(f"{mod}: MISSING ({e.__class__.__name__}); no network here to install it")
PYEOF
  date -u
}

# CUDA_HOME: the toolkit setup.py's own search finds, and its decision whether that toolkit
# can build the extension (bin/nvcc, include/cuda_runtime.h, nvcc's major version = torch's)
resolve_cuda_home() {
  timeout 30 "$PY" - <<'PYEOF'
import os, sys
import torch
sys.path.insert(0, os.getcwd())
import setup
plan = setup.plan_cuda(dict(os.environ, FUSED_DDPM_CUDA="auto"), torch.__version__,
                       torch.version.cuda)
tk = plan.toolkit or setup.find_toolkit(os.environ)     # the toolkit found, even if unused
print("|".join([str(tk.root or ""), tk.version or "", "1" if plan.build else "0",
                plan.reason.replace("|", "/")]))
PYEOF
}

env_step() {
  env_report
  IFS='|' read -r TK_ROOT TK_VERSION TK_OK TK_REASON <<< "$(resolve_cuda_home)"
  if [[ $TK_OK == 1 && -x $TK_ROOT/bin/nvcc && -f $TK_ROOT/include/cuda_runtime.h ]]; then
    export CUDA_HOME="$TK_ROOT"
    export PATH="$CUDA_HOME/bin:$PATH"
    echo "CUDA_HOME=$CUDA_HOME (nvcc $TK_VERSION; include/cuda_runtime.h present): $TK_REASON"
    BUILD_CUDA=1
  else
    echo "CUDA toolkit: ${TK_REASON:-not found}"
    [[ -n $TK_ROOT ]] && echo "  (toolkit found: $TK_ROOT, nvcc ${TK_VERSION:-?})"
    echo "  the cuda backend is not built or tested; set CUDA_HOME to a toolkit root with"
    echo "  bin/nvcc and include/cuda_runtime.h whose major version matches torch's CUDA"
    BUILD_CUDA=0
  fi
  if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)"
  fi
  export TORCH_CUDA_ARCH_LIST
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<none: no GPU visible>}"
  HAVE_PYTEST=0
  "$PY" -c "import pytest" 2>/dev/null && HAVE_PYTEST=1
  HAVE_SANITIZER=""
  for s in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
           "${CUDA_HOME:-/nonexistent}/compute-sanitizer/compute-sanitizer" \
           "$(command -v compute-sanitizer)"; do
    [[ -x $s ]] && { HAVE_SANITIZER=$s; break; }
  done
  echo "compute-sanitizer: ${HAVE_SANITIZER:-not found}"
}
# env runs in this shell (it exports CUDA_HOME, TORCH_CUDA_ARCH_LIST), with its own timing
t0=$(date +%s)
echo "PLAN env $(limit_of env) (in-shell: versions, CUDA_HOME, TORCH_CUDA_ARCH_LIST)" >> "$LOG/plan.txt"
echo "=== env"
env_step > "$LOG/env.log" 2>&1
cat "$LOG/env.log"
result env PASS $(( $(date +%s) - t0 )) "$(head -n 1 "$LOG/env.log")"

# ------------------------------------------------------------------------------ build
if (( DRY )) || [[ -n ${TORCH_CUDA_ARCH_LIST:-} ]]; then
  step build last_line env FUSED_DDPM_CUDA="$BUILD_CUDA" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-input -v -e .
  "$PY" -c "import fused_ddpm as fd; print('backends:', fd.backends())" 2>&1 | tee -a "$LOG/build.log"
else
  skip build "no CUDA device visible (TORCH_CUDA_ARCH_LIST unknown)"
fi

# ------------------------------------------------------------------------------ timings first
DRY_CMD=("$PY" -m bench --preset headline --device cpu --list)
step headline bench_counts "$PY" -m bench --preset headline --record --no-progress

# ------------------------------------------------------------------------------ contract tests
backend_status() {  # fused_ddpm.backends()[NAME]: "available ..." or "unavailable: why"
  timeout 60 "$PY" -c "import sys, fused_ddpm as fd; print(fd.backends()[sys.argv[1]])" "$1" \
    2>&1 | tail -n 1
}
for b in cuda triton; do
  if (( ! HAVE_PYTEST )); then
    skip "contract_$b" "pytest is not installed here (no network to install it)"
    continue
  fi
  status="$(backend_status "$b")"
  if (( ! DRY )) && [[ $status != available* ]]; then
    skip "contract_$b" "the $b backend is $status"
    FAILED=1
    continue
  fi
  # dry run: collect the modules once (they import here)
  [[ $b == cuda ]] && DRY_CMD=(env FUSED_DDPM_TEST_BACKENDS=torch "$PY" -m pytest
                               --collect-only -q -p no:cacheprovider "${CONTRACT_TESTS[@]}")
  step "contract_$b" pytest_counts env FUSED_DDPM_TEST_BACKENDS="$b" "$PY" -m pytest -m gpu \
    -v -p no:cacheprovider -o console_output_style=count --maxfail=25 "${CONTRACT_TESTS[@]}"
done

# ------------------------------------------------------------------------------ memcheck
if (( DRY )) || [[ -n $HAVE_SANITIZER ]]; then
  DRY_CMD=("$PY" -m bench.small_run --device cpu --backends torch)
  step memcheck small_run_counts env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "${HAVE_SANITIZER:-compute-sanitizer}" --tool memcheck --error-exitcode 1 \
    --print-limit 20 "$PY" -m bench.small_run --device cuda --backends cuda,triton
else
  skip memcheck "compute-sanitizer not found (in \$CUDA_HOME/bin or on PATH)"
fi

# ------------------------------------------------------------------------------ full record
LIMIT=$(limit_of record)
DRY_CMD=("$PY" -m bench --preset gpu --device cpu --list)
# the harness stops starting cases 40 s before the limit: the case in flight (a
# torch.compile case takes the longest) finishes and the document is written
step record bench_counts "$PY" -m bench --preset gpu --record --no-progress \
  --time-limit $(( LIMIT > 60 ? LIMIT - 40 : 20 ))

# the recorded documents, for a machine whose repository copy does not come back
if (( ! DRY )); then
  mkdir -p "$LOG/recorded"
  cp bench/RESULTS.md bench/results/headline-* bench/results/gpu-* "$LOG/recorded/" 2>/dev/null
fi

echo
echo "================ fused_ddpm gpu_check: $(( $(date +%s) - T_START ))s of ${BUDGET_S}s" \
     "(logs: $LOG)"
cat "$RESULTS"
(( DRY )) && echo "(dry run: the plan is in $LOG/plan.txt)"
exit $FAILED
