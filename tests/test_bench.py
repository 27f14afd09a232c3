"""The benchmark harness runs on the CPU in a tiny configuration and writes what it says.

Timings are never asserted (DESIGN.md §5): only that the harness runs, records the
documented fields, reports unavailable providers instead of crashing, and regenerates
RESULTS.md from JSON.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench  # noqa: E402
from bench import report  # noqa: E402
from bench.config import Group, Preset, Settings  # noqa: E402

TINY = Settings(repeats=2, min_repeat_s=0.0005, warmup_s=0.001, loop_repeats=1)
TOP_FIELDS = ("schema_version", "device", "device_type", "versions", "date", "commit",
              "settings", "backends", "rows")
ROW_FIELDS = ("provider", "mode", "shape", "shape_name", "dtype", "numel", "bytes", "status",
              "reason")
OK_FIELDS = ("median_us", "min_us", "gbps", "fraction_of_floor", "floor_us", "timer",
             "speedup_vs_diffusers", "speedup_vs_compile")


@pytest.fixture(scope="module")
def doc():
    preset = Preset([Group(["cuda", "triton", "cpu", "reference", "diffusers", "randn",
                            "copy"], ["fwd-seeds", "fwd-noise", "bwd"], ["1x4x8x8"],
                           ["fp32"])], TINY)
    return bench.run(preset, torch.device("cpu"), "test", progress=False)


def test_document_fields(doc):
    for f in TOP_FIELDS:
        assert f in doc, f
    assert doc["device_type"] == "cpu" and doc["device"]
    for k in ("torch", "triton", "diffusers", "python", "cuda"):
        assert k in doc["versions"]
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["date"].endswith("+00:00") and "T" in doc["date"]
    assert doc["commit"] == "unknown" or len(doc["commit"]) == 40
    json.dumps(doc)  # serialisable


def test_rows(doc):
    rows = doc["rows"]
    assert rows
    for r in rows:
        for f in ROW_FIELDS:
            assert f in r, (f, r)
        assert r["status"] in ("ok", "unavailable", "unsupported", "error")
        if r["status"] == "ok":
            for f in OK_FIELDS:
                assert f in r, (f, r)
            assert r["median_us"] > 0 and r["gbps"] > 0 and r["reason"] is None
        else:
            assert r["reason"], r
    ok = {(r["provider"], r["mode"]) for r in rows if r["status"] == "ok"}
    assert ("copy", "baseline") in ok and ("randn", "baseline") in ok
    assert ("reference", "fwd-seeds") in ok and ("reference", "bwd") in ok
    copy = next(r for r in rows if r["provider"] == "copy")
    assert copy["fraction_of_floor"] == pytest.approx(1.0)
    ref = next(r for r in rows if r["provider"] == "reference" and r["mode"] == "fwd-noise")
    assert ref["passes"] == 4 and ref["bytes"] == 4 * 256 * 4
    assert ref["fraction_of_floor"] == pytest.approx(ref["gbps"] / copy["gbps"])
    assert not [r for r in rows if r["status"] == "error"], \
        [(r["provider"], r["mode"], r["reason"]) for r in rows if r["status"] == "error"]


def test_unavailable_providers_reported(doc):
    by = {(r["provider"], r["mode"]): r for r in doc["rows"]}
    if not torch.cuda.is_available():
        for prov in ("cuda", "triton"):
            r = by[(prov, "fwd-seeds")]
            assert r["status"] in ("unavailable", "unsupported") and r["reason"]
    r = by[("diffusers", "fwd-noise")]
    assert r["status"] in ("unavailable", "unsupported")


def test_cli_json_and_results_md(tmp_path):
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "bench", "--device", "cpu", "--providers",
           "cuda,reference,copy", "--modes", "fwd-seeds,loop-graph", "--shapes", "1x4x8x8",
           "--dtypes", "fp32", "--repeats", "2", "--min-repeat-ms", "0.5", "--warmup-ms", "1",
           "--no-progress", "--no-plot", "--out", str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| reference |" in res.stdout or "| reference" in res.stdout
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    d = json.loads(files[0].read_text())
    assert d["preset"] == "custom" and d["rows"]
    by = {(r["provider"], r["mode"]): r for r in d["rows"]}
    assert by[("reference", "fwd-seeds")]["status"] == "ok"
    assert by[("reference", "loop-graph")]["status"] == "unsupported"
    assert by[("cuda", "fwd-seeds")]["status"] != "ok" or torch.cuda.is_available()

    md = tmp_path / "RESULTS.md"
    res = subprocess.run([sys.executable, "-m", "bench", "--results-md", str(files[0]),
                          "--results-md-path", str(md)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    text = md.read_text()
    assert "## CPU: latest run" in text and "No GPU run recorded yet" in text
    assert d["device"] in text and d["date"] in text and d["commit"][:12] in text
    assert "| reference |" in text


def test_results_md_picks_latest_gpu_and_cpu(tmp_path, doc):
    old = dict(doc, date="2000-01-01T00:00:00+00:00", device="Old CPU")
    gpu = dict(doc, device_type="cuda", device="NVIDIA Test GPU", preset="gpu")
    paths = []
    for i, d in enumerate((doc, old, gpu)):
        p = tmp_path / f"r{i}.json"
        report.write_json(d, str(p))
        paths.append(str(p))
    out = tmp_path / "R.md"
    text = report.results_md(paths, str(out))
    assert "NVIDIA Test GPU" in text and "Old CPU" not in text
    assert text.index("## GPU") < text.index("## CPU")


def test_plot(tmp_path, doc):
    pytest.importorskip("matplotlib")
    p = tmp_path / "x.png"
    assert report.plot(doc, str(p)) is None
    assert p.stat().st_size > 1000


def test_presets_and_parsing():
    assert set(bench.PRESETS) >= {"quick", "cpu", "gpu"}
    gpu = bench.PRESETS["gpu"]
    shapes = {s for g in gpu.groups for s in g.shapes}
    modes = {m for g in gpu.groups for m in g.modes}
    provs = {p for g in gpu.groups for p in g.providers}
    assert shapes == set(bench.SHAPES)
    assert modes == set(bench.MODES)
    assert provs == set(bench.PROVIDERS)
    only_loop = bench.override(gpu, modes=["loop"])
    assert [g.modes for g in only_loop.groups] == [["loop"]]
    cases = bench.enumerate_cases(bench.override(bench.PRESETS["quick"],
                                                 providers=["reference"]))
    assert {c["provider"] for c in cases} == {"reference", "copy"}
    from bench.config import parse_shape
    assert parse_shape("2x4x8x8") == ("2x4x8x8", (2, 4, 8, 8))
    with pytest.raises(ValueError):
        parse_shape("nope")


def test_overhead_mode_reports_ratios_to_add():
    preset = Preset([Group(["torch", "dropin", "add"], ["overhead"], ["tiny"], ["fp32"])], TINY)
    d = bench.run(preset, torch.device("cpu"), "test", progress=False)
    by = {r["provider"]: r for r in d["rows"] if r["mode"] == "overhead"}
    assert by["add"]["status"] == "ok" and by["add"]["x_add"] == pytest.approx(1.0)
    for prov in ("torch", "dropin"):
        r = by[prov]
        assert r["status"] == "ok", r
        assert r["x_add"] == pytest.approx(r["median_us"] / by["add"]["median_us"])
        assert f"{prov} tiny fp32" in d["overhead"]
    assert "× torch.add" in report.header(d)
