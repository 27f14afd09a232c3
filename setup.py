"""Build fused_ddpm: the C++ CPU extension always, the CUDA extension when it can.

Environment switches:
  FUSED_DDPM_CUDA=auto|1|0   build the CUDA extension: when torch has CUDA and nvcc is found
                             (auto, default), always (1: fail if impossible), never (0)
  TORCH_CUDA_ARCH_LIST       archs for the CUDA build (default "8.0;9.0+PTX")
  MAX_JOBS                   parallel compile jobs (torch's build respects it)
  FUSED_DDPM_NO_EXT=1        skip every extension (pure-Python install: reference + Triton)
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent.resolve()
PACKAGES = ["fused_ddpm", "fused_ddpm.triton_kernels"]
PACKAGE_DIR = {"fused_ddpm": "fused_ddpm", "fused_ddpm.triton_kernels": "triton_kernels"}


def _nvcc_available() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return True
    return shutil.which("nvcc") is not None


def _extensions():
    if os.environ.get("FUSED_DDPM_NO_EXT", "0") == "1":
        return [], {}, {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    mode = os.environ.get("FUSED_DDPM_CUDA", "auto").lower()
    want_cuda = mode in ("1", "true", "yes") or (
        mode == "auto" and torch.version.cuda is not None and _nvcc_available())
    if mode in ("1", "true", "yes") and (torch.version.cuda is None or not _nvcc_available()):
        raise RuntimeError("FUSED_DDPM_CUDA=1 but torch has no CUDA or nvcc was not found "
                           "(set CUDA_HOME)")
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
    if want_cuda:
        cuda_sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").iterdir()
                              if p.suffix == ".cu" or p.name.endswith("_cuda.cpp"))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo",
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        exts.append(CUDAExtension("fused_ddpm._C_cuda", cuda_sources, include_dirs=include,
                                  extra_compile_args={"cxx": cxx, "nvcc": nvcc}))
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_extension": bool(want_cuda),
        "arch_list": os.environ["TORCH_CUDA_ARCH_LIST"] if want_cuda else None,
    }
    if want_cuda:
        try:
            out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
            info["nvcc"] = out.strip().splitlines()[-1]
        except OSError:
            info["nvcc"] = None
    (HERE / "fused_ddpm" / "_build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}, info


ext_modules, cmdclass, _ = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"fused_ddpm": ["_build_info.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
