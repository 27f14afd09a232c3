"""setup.py's CUDA decision, with fake nvcc wrappers and toolkit roots in tmp dirs.

Nothing is compiled. Each test stands for one way a fresh machine fooled the old auto mode
(which built CUDA whenever torch had CUDA and some ``nvcc`` was on PATH, leaving torch to
guess the toolkit root as ``dirname(dirname(which nvcc))``) or left a stale extension behind.
"""
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fused_ddpm_setup", ROOT / "setup.py")
setup_py = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = setup_py          # dataclasses look their module up there
_spec.loader.exec_module(setup_py)

NOWHERE = Path("/nonexistent-cuda-root")
needs_sh = pytest.mark.skipif(shutil.which("sh") is None or os.name != "posix",
                              reason="fake nvcc scripts need a POSIX sh")
pytestmark = needs_sh


def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def fake_toolkit(tmp: Path, name: str = "cuda-13.0", version: str = "13.0",
                 runtime_header: bool = True, dryrun: bool = True) -> Path:
    """A toolkit root whose bin/nvcc answers ``--version`` (and ``-v --dryrun`` with its
    ``TOP=`` line, as NVIDIA's does, when ``dryrun``)."""
    root = tmp / name
    if runtime_header:
        (root / "include").mkdir(parents=True)
        (root / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    dry = (f'  *" --dryrun "*) echo "#\\$ _HERE_={root}/bin"; echo "#\\$ TOP={root}/bin/.."; '
           'exit 0;;\n') if dryrun else ""
    _script(root / "bin" / "nvcc",
            "#!/bin/sh\n"
            'case " $* " in\n'
            '  *" --version "*) echo "nvcc: NVIDIA (R) Cuda compiler driver"; '
            f'echo "Cuda compilation tools, release {version}, V{version}.88"; exit 0;;\n'
            f"{dry}"
            "esac\n"
            'echo "nvcc fatal   : fake" >&2; exit 1\n')
    return root


def wrapper(tmp: Path, target: Path, name: str = "wrapbin") -> Path:
    """A directory holding an ``nvcc`` wrapper script like /usr/local/bin/nvcc here."""
    _script(tmp / name / "nvcc", f'#!/bin/sh\nexec {target} "$@"\n')
    return tmp / name


def plan(env, torch_cuda="13.0", default_root=NOWHERE):
    return setup_py.plan_cuda(env, "2.14.1", torch_cuda, default_root=default_root)


# ------------------------------------------------------------------------------ the root
@pytest.mark.parametrize("dryrun", [True, False], ids=["nvcc-says-TOP", "exec-line"])
def test_wrapper_on_path_resolves_to_the_real_root(tmp_path, dryrun):
    """/usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc: the root is the real one,
    not /usr/local (torch's guess, which has no include/cuda_runtime.h)."""
    root = fake_toolkit(tmp_path, dryrun=dryrun)
    p = plan({"PATH": str(wrapper(tmp_path, root / "bin" / "nvcc"))})
    assert p.build, p.reason
    assert p.toolkit.root == root.resolve() and p.toolkit.version == "13.0"
    assert p.toolkit.found_by == "nvcc on PATH"


def test_symlinked_nvcc_resolves_to_the_real_root(tmp_path):
    root = fake_toolkit(tmp_path, dryrun=False)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "nvcc").symlink_to(root / "bin" / "nvcc")
    p = plan({"PATH": str(tmp_path / "links")})
    assert p.build and p.toolkit.root == root.resolve()


def test_root_without_runtime_header_builds_cpu_only(tmp_path):
    """The newcomer's failure: nvcc found, but its root lacks include/cuda_runtime.h."""
    root = fake_toolkit(tmp_path, runtime_header=False)
    env = {"PATH": str(wrapper(tmp_path, root / "bin" / "nvcc"))}
    p = plan(env)
    assert not p.build
    assert "include/cuda_runtime.h" in p.reason and str(root.resolve()) in p.reason
    assert "FUSED_DDPM_CUDA=1" in p.reason and "CUDA_HOME=" in p.reason   # how to force it
    assert "\n" not in p.reason
    with pytest.raises(setup_py.CudaBuildError, match="cuda_runtime.h"):
        plan(dict(env, FUSED_DDPM_CUDA="1"))


@pytest.mark.parametrize("nvcc_v,torch_v,ok", [("12.4", "13.0", False), ("13.0", "12.8", False),
                                               ("13.1", "13.0", True), ("12.8", "12.6", True)])
def test_major_version_must_match_torch(tmp_path, nvcc_v, torch_v, ok):
    root = fake_toolkit(tmp_path, version=nvcc_v)
    env = {"PATH": str(root / "bin")}
    p = plan(env, torch_cuda=torch_v)
    assert p.build == ok, p.reason
    if not ok:
        assert nvcc_v in p.reason and torch_v in p.reason and "major" in p.reason
        with pytest.raises(setup_py.CudaBuildError, match="major"):
            plan(dict(env, FUSED_DDPM_CUDA="1"), torch_cuda=torch_v)


def test_nvcc_without_a_version(tmp_path):
    root = tmp_path / "odd"
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    _script(root / "bin" / "nvcc", "#!/bin/sh\necho hello\n")
    p = plan({"PATH": str(root / "bin")})
    assert not p.build and "did not print a CUDA release" in p.reason


def test_torch_without_cuda_never_asks_nvcc(tmp_path):
    root = fake_toolkit(tmp_path)
    env = {"PATH": str(root / "bin")}
    p = plan(env, torch_cuda=None)
    assert not p.build and p.toolkit is None
    assert "CPU-only build" in p.reason and "2.14.1" in p.reason
    with pytest.raises(setup_py.CudaBuildError, match="CPU-only"):
        plan(dict(env, FUSED_DDPM_CUDA="1"), torch_cuda=None)


def test_no_toolkit_anywhere(tmp_path):
    p = plan({"PATH": str(tmp_path)})
    assert not p.build and "nvcc is not on PATH" in p.reason
    with pytest.raises(setup_py.CudaBuildError, match="nvcc is not on PATH"):
        plan({"PATH": str(tmp_path), "FUSED_DDPM_CUDA": "1"})


def test_default_root_when_nvcc_is_not_on_path(tmp_path):
    root = fake_toolkit(tmp_path, name="cuda")
    p = plan({"PATH": str(tmp_path / "empty")}, default_root=root)
    assert p.build and p.toolkit.root == root.resolve() and p.toolkit.found_by == str(root)


def test_cuda_home_wins_and_is_checked(tmp_path):
    good = fake_toolkit(tmp_path, name="good")
    bad = fake_toolkit(tmp_path, name="bad", runtime_header=False)
    path = str(bad / "bin")                                  # PATH would find the bad one
    p = plan({"PATH": path, "CUDA_HOME": str(good)})
    assert p.build and p.toolkit.root == good and p.toolkit.found_by == "CUDA_HOME"
    p = plan({"PATH": str(good / "bin"), "CUDA_HOME": str(bad)})
    assert not p.build and "CUDA_HOME" in p.reason and "cuda_runtime.h" in p.reason
    p = plan({"PATH": path, "CUDA_PATH": str(good)})
    assert p.build and p.toolkit.found_by == "CUDA_PATH"
    p = plan({"CUDA_HOME": str(tmp_path / "nothing")})
    assert not p.build and "no bin/nvcc" in p.reason


def test_mode_switch():
    assert not plan({"FUSED_DDPM_CUDA": "0", "PATH": ""}).build
    assert "FUSED_DDPM_CUDA=0" in plan({"FUSED_DDPM_CUDA": "0"}).reason
    for v, mode in (("auto", "auto"), ("", "auto"), ("1", "on"), ("YES", "on"), ("off", "off")):
        assert setup_py.cuda_mode({"FUSED_DDPM_CUDA": v}) == mode
    assert setup_py.cuda_mode({}) == "auto"
    with pytest.raises(ValueError, match="FUSED_DDPM_CUDA='maybe'"):
        setup_py.cuda_mode({"FUSED_DDPM_CUDA": "maybe"})


# ------------------------------------------------------------------------------ stale builds
def test_remove_stale_takes_only_that_extension(tmp_path):
    names = ["_C.cpython-311-x86_64-linux-gnu.so", "_C_cuda.cpython-311-x86_64-linux-gnu.so",
             "_C_cuda.abi3.so", "_C_cuda.py", "ops.py"]
    for n in names:
        (tmp_path / n).write_text("")
    gone = setup_py.remove_stale(tmp_path, "_C_cuda")
    assert sorted(p.name for p in gone) == sorted(names[1:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[0], "_C_cuda.py", "ops.py"])


def test_extension_loader_refuses_what_the_record_says_was_not_built(monkeypatch):
    """A _C_cuda file on disk from an earlier build is not loaded when the latest build
    record says the CUDA extension was not built; backends() gets the recorded reason."""
    from fused_ddpm import _extension
    record = {"cpu_extension": True, "cuda_extension": False,
              "cuda_reason": "CUDA extension not built: a recorded reason"}
    monkeypatch.setattr(_extension, "build_info", lambda: record)
    stale = importlib.machinery.ModuleSpec("fused_ddpm._C_cuda", None,
                                           origin="/stale/_C_cuda.so")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: stale)
    loaded = []
    monkeypatch.setattr(_extension.torch.ops, "load_library", loaded.append)
    assert _extension._load("_C_cuda") == record["cuda_reason"]
    assert loaded == []
    record["cuda_extension"] = True                            # the record says built: load
    assert _extension._load("_C_cuda") is None and loaded == ["/stale/_C_cuda.so"]


# ------------------------------------------------------------------------------ setup.py runs
def _mini_checkout(tmp_path: Path) -> Path:
    """setup.py with an empty csrc/ and a stale CUDA build in the package dir."""
    co = tmp_path / "checkout"
    (co / "csrc").mkdir(parents=True)
    (co / "fused_ddpm").mkdir()
    shutil.copy(ROOT / "setup.py", co / "setup.py")
    (co / "fused_ddpm" / "_C_cuda.cpython-311-x86_64-linux-gnu.so").write_text("stale")
    return co


def _run_setup(co: Path, tmp_path: Path, env_extra: dict):
    """``python setup.py --name`` (decides, writes the record, compiles nothing) with torch
    made to look like a CUDA 13.0 build, and an nvcc wrapper on PATH whose toolkit root has
    no include/cuda_runtime.h - the fresh machine of the issue."""
    root = fake_toolkit(tmp_path, runtime_header=False)
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import torch\ntorch.version.cuda = '13.0'\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_HOME", "CUDA_PATH", "FUSED_DDPM_CUDA", "FUSED_DDPM_NO_EXT")}
    env.update(PATH=f"{wrapper(tmp_path, root / 'bin' / 'nvcc')}{os.pathsep}{env['PATH']}",
               PYTHONPATH=str(site), **env_extra)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=co, env=env,
                          capture_output=True, text=True, timeout=300)


def test_setup_on_a_machine_that_cannot_build_cuda(tmp_path):
    co = _mini_checkout(tmp_path)
    res = _run_setup(co, tmp_path, {})
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [s for s in res.stderr.splitlines() if "CUDA extension not built" in s]
    assert len(lines) == 1 and "cuda_runtime.h" in lines[0] and "FUSED_DDPM_CUDA=1" in lines[0]
    record = json.loads((co / "fused_ddpm" / "_build_info.json").read_text())
    assert record["cuda_extension"] is False and record["cpu_extension"] is True
    assert "cuda_runtime.h" in record["cuda_reason"]
    assert not list((co / "fused_ddpm").glob("_C_cuda*"))               # stale build gone


def test_forced_cuda_build_that_cannot_work_fails_before_compiling(tmp_path):
    co = _mini_checkout(tmp_path)
    res = _run_setup(co, tmp_path, {"FUSED_DDPM_CUDA": "1"})
    assert res.returncode != 0
    assert "FUSED_DDPM_CUDA=1, but" in res.stderr and "cuda_runtime.h" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (co / "build").exists()


def test_no_ext_records_both_extensions_as_not_built(tmp_path):
    co = _mini_checkout(tmp_path)
    (co / "fused_ddpm" / "_C.cpython-311-x86_64-linux-gnu.so").write_text("stale")
    res = _run_setup(co, tmp_path, {"FUSED_DDPM_NO_EXT": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((co / "fused_ddpm" / "_build_info.json").read_text())
    assert record["cpu_extension"] is False and record["cuda_extension"] is False
    assert "FUSED_DDPM_NO_EXT=1" in record["cpu_reason"]
    assert not list((co / "fused_ddpm").glob("_C*"))


# ------------------------------------------------------------------------------ sources
def test_cuda_sources_need_only_the_runtime_headers():
    """A runtime-only toolkit (nvcc, cuda_runtime.h, no cuBLAS/cuSPARSE/cuRAND headers) must
    be enough: ATen/cuda/CUDAContext.h pulls in those library headers, so the CUDA sources
    use only the CUDA runtime and c10/cuda."""
    csrc = ROOT / "csrc"
    sources = [p for p in csrc.iterdir() if p.suffix == ".cu" or p.name.endswith("_cuda.cpp")]
    assert sources
    seen, todo = set(), list(sources)
    while todo:
        p = todo.pop()
        if p in seen or not p.exists():
            continue
        seen.add(p)
        for line in p.read_text().splitlines():
            s = line.strip()
            if not s.startswith("#include"):
                continue
            assert "ATen/cuda/" not in s, f"{p.name}: {s}"
            for lib in ("cublas", "cusparse", "curand", "cusolver", "cufft", "cudnn"):
                assert lib not in s.lower(), f"{p.name}: {s}"
            if '"' in s:
                todo.append(csrc / s.split('"')[1])


def test_py_typed_is_packaged():
    assert (ROOT / "fused_ddpm" / "py.typed").exists()
    assert "py.typed" in setup_py.PACKAGE_DATA["fused_ddpm"]
