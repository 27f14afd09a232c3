"""Build fused_ddpm: the C++ CPU extension always, the CUDA extension when it can.

Environment switches:
  FUSED_DDPM_CUDA=auto|1|0   build the CUDA extension: when it can (auto, default: torch has
                             CUDA, a toolkit is found whose include/cuda_runtime.h exists
                             and whose nvcc major version matches torch's CUDA), always
                             (1: fail at once, before compiling, if it cannot), never (0)
  CUDA_HOME (or CUDA_PATH)   the toolkit root; default: asked of the nvcc found on PATH
                             (wrapper scripts and symlinks are followed), else
                             /usr/local/cuda
  TORCH_CUDA_ARCH_LIST       archs for the CUDA build (default "8.0;9.0+PTX")
  MAX_JOBS                   parallel compile jobs (torch's build respects it)
  FUSED_DDPM_NO_EXT=1        skip every extension (pure-Python install: reference + Triton)

What the build decided (and why) is recorded in fused_ddpm/_build_info.json, which
``fused_ddpm.build_info()`` returns and ``fused_ddpm.backends()`` quotes.

Run by pip (``__name__ == "__main__"``); tests import it to check the CUDA decision.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Tuple

HERE = Path(__file__).parent.resolve()
# The Triton kernels and the benchmark harness live at the top of the repository (so
# `python -m bench` runs from a checkout) and install inside the package: never as top-level
# `triton_kernels` / `bench` modules, names that other distributions use.
PACKAGES = ["fused_ddpm", "fused_ddpm.models", "fused_ddpm.triton_kernels", "fused_ddpm.bench"]
PACKAGE_DIR = {"fused_ddpm": "fused_ddpm", "fused_ddpm.triton_kernels": "triton_kernels",
               "fused_ddpm.bench": "bench"}
BUILD_RECORD = "_build_info.json"
PACKAGE_DATA = {"fused_ddpm": [BUILD_RECORD, "py.typed"],
                # the embedded digits model (diffusers' save_pretrained layout)
                "fused_ddpm.models": ["digits/*.json", "digits/*/*.json",
                                      "digits/*/*.safetensors"]}
DEFAULT_ROOT = Path("/usr/local/cuda")
FORCE_HINT = "to force it: FUSED_DDPM_CUDA=1 CUDA_HOME=<toolkit root>"


class CudaBuildError(RuntimeError):
    """FUSED_DDPM_CUDA=1, but the CUDA extension cannot be built here."""


# ------------------------------------------------------------------------------ toolkit
@dataclass(frozen=True)
class Toolkit:
    """A CUDA toolkit as torch's build will use it: ``root/bin/nvcc``, ``root/include``."""

    root: Optional[Path]
    version: Optional[str]        # "13.0", from ``nvcc --version``
    problem: Optional[str]        # why it cannot build our extension; None when it can
    found_by: str                 # "CUDA_HOME", "CUDA_PATH", "nvcc on PATH", "/usr/local/cuda"


def _ask(nvcc: Path, args: List[str]) -> str:
    """stdout + stderr of ``nvcc args`` ("" when it cannot run)."""
    try:
        res = subprocess.run([str(nvcc), *args], capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout + res.stderr


def nvcc_version(nvcc: Path) -> Optional[str]:
    """"13.0" from ``nvcc --version`` ("... release 13.0, V13.0.88"), or None."""
    m = re.search(r"release (\d+)\.(\d+)", _ask(nvcc, ["--version"]))
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _exec_target(script: Path) -> Optional[Path]:
    """The program a wrapper script execs (``exec /path/to/nvcc "$@"``), if it says so."""
    try:
        head = script.read_bytes()[:4096]
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for line in reversed(head.decode("utf-8", "replace").splitlines()):
        m = re.match(r"\s*exec\s+(?:-\S+\s+)*[\"']?([^\s\"']+)", line)
        if m:
            target = Path(os.path.expandvars(m.group(1)))
            return target if target.is_absolute() else None
    return None


def nvcc_root(nvcc: Path) -> Optional[Path]:
    """The toolkit root of an nvcc on disk. nvcc says where it lives itself (``TOP=`` in the
    ``-v --dryrun`` listing), which sees through symlinks and wrapper scripts; failing that,
    the target of symlinks and of a wrapper's ``exec`` line, then ``bin/..``."""
    out = _ask(nvcc, ["-v", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull])
    m = re.search(r"^#\$ TOP=(.+?)\s*$", out, flags=re.M)
    if m:
        return Path(m.group(1).strip().strip('"')).resolve()
    path = nvcc.resolve()
    for _ in range(8):  # wrapper of a wrapper ...
        target = _exec_target(path)
        if target is None:
            break
        path = target.resolve()
    return path.parent.parent if path.parent.name == "bin" else None


def find_toolkit(env: Mapping[str, str], default_root: Path = DEFAULT_ROOT) -> Toolkit:
    """The toolkit torch would build with, once CUDA_HOME is set to the root found here."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            root, found_by = Path(env[var]), var
            break
    else:
        which = shutil.which("nvcc", path=env.get("PATH", ""))
        if which is not None:
            nvcc, found_by = Path(which), "nvcc on PATH"
        elif (default_root / "bin" / "nvcc").exists():
            nvcc, found_by = default_root / "bin" / "nvcc", str(default_root)
        else:
            return Toolkit(None, None, "no CUDA toolkit: nvcc is not on PATH, CUDA_HOME is "
                           f"unset and {default_root}/bin/nvcc does not exist", "nothing")
        root = nvcc_root(nvcc)
        if root is None:
            return Toolkit(None, None, f"cannot tell which toolkit {nvcc} belongs to",
                           found_by)
    where = f"{root} ({found_by})"
    nvcc = root / "bin" / "nvcc"
    if not nvcc.exists():
        return Toolkit(root, None, f"toolkit root {where} has no bin/nvcc", found_by)
    if not (root / "include" / "cuda_runtime.h").exists():
        return Toolkit(root, None, f"toolkit root {where} has no include/cuda_runtime.h",
                       found_by)
    version = nvcc_version(nvcc)
    if version is None:
        return Toolkit(root, None, f"{nvcc} --version did not print a CUDA release",
                       found_by)
    return Toolkit(root, version, None, found_by)


# ------------------------------------------------------------------------------ decision
@dataclass(frozen=True)
class CudaPlan:
    build: bool
    reason: str                   # one line: what was decided and why
    toolkit: Optional[Toolkit]


def cuda_mode(env: Mapping[str, str]) -> str:
    """FUSED_DDPM_CUDA as "auto", "on" or "off"; any other value is an error."""
    raw = env.get("FUSED_DDPM_CUDA", "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("1", "true", "yes", "on"):
        return "on"
    if raw in ("0", "false", "no", "off"):
        return "off"
    raise ValueError(f"FUSED_DDPM_CUDA={env['FUSED_DDPM_CUDA']!r}: expected auto, 1 or 0")


def plan_cuda(env: Mapping[str, str], torch_version: str, torch_cuda: Optional[str],
              default_root: Path = DEFAULT_ROOT) -> CudaPlan:
    """Whether to build the CUDA extension. Forced (FUSED_DDPM_CUDA=1) and impossible:
    :class:`CudaBuildError` with the reason, before anything is compiled."""
    mode = cuda_mode(env)
    if mode == "off":
        return CudaPlan(False, "CUDA extension not built: FUSED_DDPM_CUDA=0", None)
    if torch_cuda is None:
        why = (f"torch {torch_version} is a CPU-only build (install a CUDA build of torch "
               "to get the CUDA extension)")
        if mode == "on":
            raise CudaBuildError(f"FUSED_DDPM_CUDA=1, but {why}")
        return CudaPlan(False, f"CUDA extension not built: {why}", None)
    tk = find_toolkit(env, default_root)
    problem = tk.problem
    if problem is None and tk.version.split(".")[0] != torch_cuda.split(".")[0]:
        problem = (f"nvcc {tk.version} in {tk.root} ({tk.found_by}) does not match torch's "
                   f"CUDA {torch_cuda} (the major versions must agree)")
    if problem is not None:
        if mode == "on":
            raise CudaBuildError(f"FUSED_DDPM_CUDA=1, but {problem}")
        return CudaPlan(False, f"CUDA extension not built: {problem}; {FORCE_HINT}", tk)
    return CudaPlan(True, f"CUDA extension built with nvcc {tk.version} in {tk.root} "
                          f"({tk.found_by})", tk)


def remove_stale(package_dir: Path, name: str) -> List[Path]:
    """Delete compiled ``<name>*.so`` / ``.pyd`` files left in the package by an earlier
    build, so an extension that is not rebuilt cannot be loaded from a previous one."""
    gone = []
    for p in sorted(package_dir.glob(f"{name}.*")):
        if p.suffix in (".so", ".pyd"):
            p.unlink()
            gone.append(p)
    return gone


# ------------------------------------------------------------------------------ build
def _say(line: str) -> None:
    print(f"fused_ddpm setup: {line}", file=sys.stderr, flush=True)


def _write_record(info: dict) -> None:
    (HERE / "fused_ddpm" / BUILD_RECORD).write_text(json.dumps(info, indent=2) + "\n")


def extensions(env: Mapping[str, str]) -> Tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(), after writing the build record."""
    pkg = HERE / "fused_ddpm"
    if env.get("FUSED_DDPM_NO_EXT", "0") == "1":
        remove_stale(pkg, "_C")
        remove_stale(pkg, "_C_cuda")
        why = "not built: FUSED_DDPM_NO_EXT=1 (pure-Python install)"
        _say(f"extensions {why}")
        _write_record({"cpu_extension": False, "cpu_reason": f"C++ extension {why}",
                       "cuda_extension": False, "cuda_reason": f"CUDA extension {why}"})
        return [], {}
    import torch

    try:
        plan = plan_cuda(env, torch.__version__, torch.version.cuda)
    except (CudaBuildError, ValueError) as e:
        raise SystemExit(f"fused_ddpm setup: error: {e}") from None
    _say(plan.reason)
    if plan.build:
        # torch's build reads CUDA_HOME when cpp_extension is first imported: point it at the
        # root found above (its own guess, dirname(dirname(which nvcc)), misses wrappers).
        os.environ["CUDA_HOME"] = str(plan.toolkit.root)
        import torch.utils.cpp_extension as cpp_ext
        cpp_ext.CUDA_HOME = str(plan.toolkit.root)
    else:
        for p in remove_stale(pkg, "_C_cuda"):
            _say(f"removed {p.relative_to(HERE)} from an earlier build")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 up to
    # torch 2.x, C++20 for the newest releases, whose ATen.h refuses anything older).
    cxx = ["-O3"]
    include = [str(HERE / "csrc")]
    cpu_sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp")
                         if not p.name.endswith("_cuda.cpp"))
    # at::parallel_for is OpenMP code inlined from ATen's headers: without -fopenmp the
    # CPU kernel would run on one thread (torch's own libgomp satisfies the link at runtime).
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # -fno-math-errno: lets the CPU kernel's Box–Muller loop (sqrt) vectorise.
    # -ffp-contract=off: no FMA contraction, so the AVX-512 / AVX2 / default clones of the
    # noise code give the same bits on every x86 CPU.
    fp_flags = ["-fno-math-errno", "-ffp-contract=off"]
    exts = [CppExtension("fused_ddpm._C", cpu_sources, include_dirs=include,
                         extra_compile_args={"cxx": cxx + omp + fp_flags},
                         extra_link_args=omp)]
    if plan.build:
        cuda_sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").iterdir()
                              if p.suffix == ".cu" or p.name.endswith("_cuda.cpp"))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo",
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        exts.append(CUDAExtension("fused_ddpm._C_cuda", cuda_sources, include_dirs=include,
                                  extra_compile_args={"cxx": cxx, "nvcc": nvcc}))
    _write_record({
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_extension": True,
        "cpu_reason": "C++ extension built",
        "cuda_extension": plan.build,
        "cuda_reason": plan.reason,
        "cuda_home": str(plan.toolkit.root) if plan.build else None,
        "nvcc": plan.toolkit.version if plan.build else None,
        "arch_list": os.environ["TORCH_CUDA_ARCH_LIST"] if plan.build else None,
    })
    use_ninja = shutil.which("ninja") is not None
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=use_ninja)}


def main(setup: Callable[..., object]) -> None:
    ext_modules, cmdclass = extensions(os.environ)
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR,
          package_data=PACKAGE_DATA,
          ext_modules=ext_modules, cmdclass=cmdclass)


if __name__ == "__main__":
    from setuptools import setup as _setup
    main(_setup)
