#!/usr/bin/env bash
# The newcomer's first run, as CI. In a copy of this working tree and a fresh venv, runs the
# README's main-job command verbatim (the first ```bash block under "## Quick start", read
# from README.md itself) with whatever torch `pip install -r requirements.txt` resolves to
# (today the CUDA build of torch, ~3.4 GB of wheels) and an nvcc on PATH that cannot build
# the CUDA extension: a wrapper script exec'ing an nvcc whose toolkit root has no
# include/cuda_runtime.h, with CUDA_HOME unset. The install must succeed CPU-only, say why
# in its build record, and the main job must run.
#
# Expected duration on a 2-core CI machine with the wheels on local disk: ~9-12 min (pip ~5,
# C++ extension build ~3, main job ~1; measured 8m46s). Env: PYTHON (default python3),
# KEEP=1 keeps the work directory (a ~6 GB venv; path printed), BLOCKS=all runs every bash
# block of the Quick start section (the test command too: ~8 min more).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(cd "$(mktemp -d "${TMPDIR:-/tmp}/newcomer.XXXXXX")" && pwd -P)"
[[ "${KEEP:-0}" == 1 ]] && echo "newcomer: keeping $WORK" || trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS
say() { echo "newcomer [$(( (SECONDS - t0) / 60 ))m$(( (SECONDS - t0) % 60 ))s]: $*"; }

# 1. The README's commands, from the README.
"$PYTHON" - "$ROOT/README.md" "${BLOCKS:-first}" > "$WORK/blocks.sh" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
m = re.search(r"^## Quick start\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
if not m:
    sys.exit("newcomer: README.md has no '## Quick start' section")
blocks = re.findall(r"^```(?:bash|sh|shell)\s*\n(.*?)^```", m.group(1), flags=re.M | re.S)
if not blocks:
    sys.exit("newcomer: no ```bash block under '## Quick start' in README.md")
print("\n".join(b.rstrip() for b in (blocks if sys.argv[2] == "all" else blocks[:1])))
PY
say "the README's commands:"; sed 's/^/    /' "$WORK/blocks.sh"

# 2. A copy of the working tree (tracked and untracked, not ignored: no build outputs).
mkdir "$WORK/repo"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
   | xargs -0 -r tar --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$WORK/repo"

# 3. A toolkit that cannot build: nvcc answers like NVIDIA's (its version, its TOP= root in
#    `-v --dryrun`), but the root lacks include/cuda_runtime.h. On PATH through a wrapper.
TK="$WORK/cuda-13.0"
mkdir -p "$TK/bin" "$WORK/bin"
cat > "$TK/bin/nvcc" <<EOF
#!/bin/sh
case " \$* " in
  *" --version "*) echo "Cuda compilation tools, release 13.0, V13.0.88"; exit 0;;
  *" --dryrun "*) echo "#\\\$ TOP=$TK/bin/.."; exit 0;;
esac
echo "nvcc fatal   : this toolkit has no headers" >&2; exit 1
EOF
printf '#!/bin/sh\nexec %s "$@"\n' "$TK/bin/nvcc" > "$WORK/bin/nvcc"
chmod +x "$TK/bin/nvcc" "$WORK/bin/nvcc"

# 4. A fresh venv, activated as a newcomer would; then the commands, verbatim.
"$PYTHON" -m venv "$WORK/venv"
say "fresh venv with $("$WORK/venv/bin/python" --version); running the commands"
set +e
(
  cd "$WORK/repo"
  unset CUDA_HOME CUDA_PATH FUSED_DDPM_CUDA FUSED_DDPM_NO_EXT FUSED_DDPM_BACKEND VIRTUAL_ENV
  export PATH="$WORK/venv/bin:$WORK/bin:$PATH"
  { echo "PS4='+ [\$(date +%H:%M:%S)] '; set -x"; cat "$WORK/blocks.sh"; } > "$WORK/run.sh"
  bash -e -o pipefail "$WORK/run.sh"
)
rc=$?
set -e
[[ $rc == 0 ]] || { say "FAILED: the README's commands exited with $rc"; exit "$rc"; }
say "the README's commands succeeded"

# 5. What the install decided, and why (from the copy, as the newcomer would see it).
cd "$WORK/repo"
"$WORK/venv/bin/python" - "$TK" <<'PY'
import sys
import torch
import fused_ddpm as fd
info, status = fd.build_info(), fd.backends()
print(f"newcomer: torch {torch.__version__} (CUDA {torch.version.cuda}); build record: "
      f"cuda_extension={info.get('cuda_extension')}: {info.get('cuda_reason')}")
print("newcomer: backends: " + "; ".join(f"{k}: {v}" for k, v in status.items()))
assert status["cpu"].startswith("available"), status["cpu"]
assert info.get("cuda_extension") is False, info
if torch.version.cuda is not None:
    # the fake toolkit was seen and refused for the right reason
    assert "cuda_runtime.h" in info["cuda_reason"] and sys.argv[1] in info["cuda_reason"], info
else:
    print("newcomer: note: requirements.txt gave a CPU-only torch; the toolkit check did not run")
PY
say "OK"
