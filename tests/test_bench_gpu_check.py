"""bench/gpu_check.sh without a GPU: its dry run builds every step's command, runs the
CPU-runnable stand-ins, and must show the plan the GPU run follows (order, time limits
within the 8-minute window, the build and sanitizer options, the contract test modules).
Static checks of the code the GPU check runs: fixed seeds (no ``hash(``), no host<->device
copy inside a CUDA-graph capture."""
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
ORDER = ["env", "build", "headline", "contract_cuda", "contract_triton", "memcheck", "record"]
WINDOW_S = 8 * 60


def script_text() -> str:
    with open(SCRIPT) as f:
        return f.read()


def step_limits() -> dict:
    """The STEPS array of the script: step -> its limit in seconds."""
    m = re.search(r"^STEPS=\(([^)]*)\)", script_text(), flags=re.M)
    assert m, "gpu_check.sh declares no STEPS=(name:limit ...) array"
    return {k: int(v) for k, v in (e.split(":") for e in m.group(1).split())}


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    res = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    plan = [line.split(" ", 3) for line in (out / "plan.txt").read_text().splitlines()]
    results = (out / "results.txt").read_text().splitlines()
    return res, {p[1]: (int(p[2]), p[3]) for p in plan}, [p[1] for p in plan], results, out


def test_dry_run_passes_and_reports_each_step_in_order(dry):
    res, _, order, results, _ = dry
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert order == ORDER
    assert [r.split()[0] for r in results] == ORDER
    assert all(r.split()[1] == "PASS" for r in results), results
    # the summary printed at the end repeats the result lines
    assert res.stdout.rstrip().endswith(f"(dry run: the plan is in {dry[4]}/plan.txt)")


def test_time_limits_fit_the_window(dry):
    limits = step_limits()
    assert list(limits) == ORDER
    assert sum(limits.values()) <= WINDOW_S
    assert re.search(rf"^BUDGET_S={sum(limits.values())}$", script_text(), flags=re.M)
    _, plan, _, _, _ = dry
    for name, (limit, _) in plan.items():
        if name != "record":
            assert limit == limits[name], name
    # the last step gets what is left of the window, never more
    assert limits["record"] <= plan["record"][0] <= WINDOW_S
    assert re.search(r"--time-limit \d+", plan["record"][1])


def test_build_command(dry):
    cmd = dry[1]["build"][1]
    assert "pip install --no-build-isolation --no-deps" in cmd and cmd.endswith("-e .")
    assert "FUSED_DDPM_CUDA=" in cmd
    text = script_text()
    # the arch list comes from the device, CUDA_HOME from setup.py's toolkit search
    assert "torch.cuda.get_device_capability()" in text
    assert "setup.find_toolkit(os.environ)" in text
    assert "include/cuda_runtime.h" in text and "export CUDA_HOME" in text


def test_env_step_resolves_cuda_home(dry):
    log = (dry[4] / "env.log").read_text()
    assert re.search(r"^(CUDA_HOME=\S+ \(nvcc \d+\.\d+|CUDA toolkit: )", log, flags=re.M), log
    assert "TORCH_CUDA_ARCH_LIST=" in log
    for mod in ("pytest", "numpy"):
        assert re.search(rf"^{mod}: ", log, flags=re.M)


def test_headline_first_then_tests_then_memcheck_then_record(dry):
    _, plan, order, _, out = dry
    assert order.index("headline") < order.index("contract_cuda") < order.index("memcheck") \
        < order.index("record")
    assert "--preset headline" in plan["headline"][1]
    assert "--preset gpu --record" in plan["record"][1]
    listed = [line.split() for line in (out / "headline.log").read_text().splitlines()
              if len(line.split()) == 4]
    cases = {(p, m, d) for p, m, _, d in listed}
    for prov in ("cuda", "triton"):
        for mode in ("fwd-seeds", "fwd-noise", "bwd"):
            for dtype in ("fp32", "fp16"):
                assert (prov, mode, dtype) in cases
        assert (prov, "loop", "fp32") in cases and (prov, "loop-graph", "fp32") in cases
    assert ("copy", "baseline", "fp32") in cases


def test_contract_tests_are_the_ci_modules_on_each_gpu_backend(dry):
    plan = dry[1]
    for b in ("cuda", "triton"):
        cmd = plan[f"contract_{b}"][1]
        assert f"FUSED_DDPM_TEST_BACKENDS={b} " in cmd and " -m gpu " in cmd
        mods = re.findall(r"tests/\S+\.py", cmd)
        assert "tests/test_kernels.py" in mods and "tests/test_gpu.py" in mods
        for m in mods:
            assert os.path.isfile(os.path.join(ROOT, m)), m
    # the stand-in collected them (every module imports on this machine)
    log = (dry[4] / "contract_cuda.log").read_text()
    assert re.search(r"\d+ tests? collected", log), log[-2000:]


def test_memcheck_without_caching_allocator_and_no_racecheck(dry):
    cmd = dry[1]["memcheck"][1]
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in cmd
    assert "--tool memcheck" in cmd and "--error-exitcode 1" in cmd
    assert "bench.small_run --device cuda --backends cuda,triton" in cmd
    assert all("racecheck" not in c for _, c in dry[1].values())
    log = (dry[4] / "memcheck.log").read_text()
    assert re.search(r"^small_run: \d+ checks on torch, 0 failed", log, flags=re.M), log


def _sources(*patterns):
    import glob
    for pat in patterns:
        yield from sorted(glob.glob(os.path.join(ROOT, pat)))


def test_fixed_seeds_no_hash():
    for path in _sources("bench/*.py", "bench/gpu_check.sh", "tests/test_gpu.py"):
        with open(path) as f:
            assert not re.search(r"\bhash\(", f.read()), path


def test_no_outside_design_doc_references():
    banned = ("DESIGN" + ".md", "../" + "shared")
    for path in _sources("bench/*", "tests/*.py"):
        if os.path.isfile(path) and not path.endswith((".png", ".json")):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            for b in banned:
                assert b not in text, (path, b)


# ----------------------------------------------------------------------------- capture
#: a transfer or host sync inside a capture: a pageable copy raises, a sync breaks it
_HOST_CALLS = {"cuda", "cpu", "item", "tolist", "numpy"}
_HOST_FUNCS = {"tensor", "as_tensor", "from_numpy"}


def _dtype_only(call: ast.Call) -> bool:
    """``a.to(dtype)`` / ``a.to(dtype=...)`` / ``a.to(torch.float16)``: no device change."""
    def dtype_like(node):
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
        return "dtype" in name or name in ("float16", "bfloat16", "float32", "float64",
                                            "int64", "int32")
    return all(dtype_like(a) for a in call.args) and \
        all(k.arg in ("dtype", "memory_format", "copy") for k in call.keywords)


def _host_transfers(nodes, functions, seen=()):
    """Calls in ``nodes`` that move data between host and device (following calls of the
    module's own functions by name)."""
    bad = []
    for node in nodes:
        for sub in ast.walk(node):
            if not isinstance(sub, ast.Call):
                continue
            f = sub.func
            if isinstance(f, ast.Attribute):
                if f.attr == "to" and not _dtype_only(sub):
                    bad.append(ast.unparse(sub))
                elif f.attr in _HOST_CALLS or (f.attr in _HOST_FUNCS and
                                               getattr(f.value, "id", "") == "torch"):
                    bad.append(ast.unparse(sub))
            elif isinstance(f, ast.Name) and f.id in functions and f.id not in seen:
                bad += _host_transfers(functions[f.id].body, functions, seen + (f.id,))
    return bad


def _captures(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
                isinstance(i.context_expr, ast.Call) and
                ast.unparse(i.context_expr.func).endswith("cuda.graph") for i in node.items):
            yield node


def test_capture_checker_catches_a_capture_time_copy():
    tree = ast.parse("def loop():\n    return table.to(DEV)\n"
                     "with torch.cuda.graph(g):\n    y = x.to(torch.float16)\n    loop()\n")
    fns = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    (cap,) = _captures(tree)
    assert _host_transfers(cap.body, fns) == ["table.to(DEV)"]


def test_no_host_transfer_during_cuda_graph_capture():
    found = 0
    for path in _sources("bench/*.py", "fused_ddpm/*.py", "tests/*.py"):
        with open(path) as f:
            tree = ast.parse(f.read())
        fns = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        for cap in _captures(tree):
            found += 1
            assert not _host_transfers(cap.body, fns), (path, cap.lineno)
    assert found >= 2      # the bench's graphed loop and the GPU tests' capture at least
