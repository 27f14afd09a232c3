"""Run a benchmark: enumerate the cases, time them, derive GB/s and ratios, return the
result dictionary (the JSON document described in :mod:`bench`)."""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional

import torch

from . import providers as P
from . import timing
from .config import (BASELINE_PROVIDERS, DTYPES, LOOP_MODES, LOOP_STEPS, MODES, PASSES,
                     PROVIDERS, Preset, parse_shape)

#: providers measured only in mode "overhead" (and always there: "add" is its floor)
OVERHEAD_ONLY = ("add", "dropin", "dropin-philox")

SCHEMA_VERSION = 1
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except Exception:
        return "unknown"


def git_dirty() -> Optional[bool]:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except Exception:
        return None


def _version(mod: str) -> Optional[str]:
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "unknown"))
    except Exception:
        return None


def versions() -> Dict[str, Optional[str]]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,          # None on a CPU-only torch build
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "fused_ddpm": _version("fused_ddpm"),
    }


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ------------------------------------------------------------------------------ cases
def enumerate_cases(preset: Preset) -> List[dict]:
    """Every (provider, mode, shape, dtype) of the preset's groups, de-duplicated, with the
    baseline cases (randn when asked for; copy always) once per (shape, dtype)."""
    cases, seen = [], set()

    def add(provider, mode, shape_name, dtype):
        key = (provider, mode, shape_name, dtype)
        if key not in seen:
            seen.add(key)
            cases.append({"provider": provider, "mode": mode, "shape_name": shape_name,
                          "dtype": dtype})

    for g in preset.groups:
        for shape_name in g.shapes:
            for dtype in g.dtypes:
                add("copy", "baseline", shape_name, dtype)     # always: the floor
                if "randn" in g.providers:
                    add("randn", "baseline", shape_name, dtype)
                for mode in g.modes:
                    if mode == "overhead":
                        add("add", mode, shape_name, dtype)     # always: the ratio's floor
                    for prov in g.providers:
                        if prov in BASELINE_PROVIDERS:
                            continue
                        if prov == "sample" and mode not in LOOP_MODES:
                            continue       # a whole loop: nothing to time per step
                        if prov in OVERHEAD_ONLY and mode != "overhead":
                            continue
                        add(prov, mode, shape_name, dtype)
    order = {p: i for i, p in enumerate(PROVIDERS)}
    morder = {m: i for i, m in enumerate(["baseline"] + list(MODES))}
    shapes = []
    for c in cases:
        if c["shape_name"] not in shapes:
            shapes.append(c["shape_name"])
    # baselines first per (shape, dtype); expensive compile cases are fine anywhere
    # CUDA-graph captures last: a failed capture can spoil the CUDA context for what follows
    cases.sort(key=lambda c: (c["mode"] == "loop-graph", shapes.index(c["shape_name"]),
                              list(DTYPES).index(c["dtype"]), morder[c["mode"]],
                              order[c["provider"]]))
    return cases


def _classify(e: BaseException) -> str:
    msg = str(e).lower()
    if isinstance(e, (NotImplementedError, TypeError)) and any(
            w in msg for w in ("dtype", "half", "bfloat16", "float16", "not implemented")):
        return "unsupported"
    return "error"


def _short(e: BaseException) -> str:
    text = f"{e.__class__.__name__}: {e}".strip()
    text = " ".join(text.split())
    return text[:400]


def run_case(case: dict, device: torch.device, settings) -> dict:
    name, shape = parse_shape(case["shape_name"])
    dtype = DTYPES[case["dtype"]]
    numel = 1
    for s in shape:
        numel *= s
    esize = torch.tensor([], dtype=dtype).element_size()
    mode, prov = case["mode"], case["provider"]
    passes = PASSES[prov] if mode == "baseline" else PASSES[mode]
    steps = LOOP_STEPS if mode in LOOP_MODES else 1
    row = {"provider": prov, "mode": mode, "shape_name": name, "shape": list(shape),
           "dtype": case["dtype"], "numel": numel, "passes": passes, "steps": steps,
           "bytes": passes * numel * esize * steps, "status": None, "reason": None}
    try:
        fn, nbuf = P.build(prov, mode, shape, dtype, device, settings.rotate)
        row["buffers"] = nbuf
        if mode in LOOP_MODES:
            tm = timing.time_once_each(fn, device, settings.loop_repeats)
        else:
            tm = timing.measure(fn, device, settings.timer, settings.repeats,
                                settings.min_repeat_s, settings.warmup_s)
        row.update(status="ok", median_us=tm.median_us, min_us=tm.min_us,
                   repeats=len(tm.samples_us), calls_per_repeat=tm.calls_per_repeat,
                   timer=tm.timer, first_call_s=round(tm.first_call_s, 6))
        row["gbps"] = row["bytes"] / (tm.median_us * 1e-6) / 1e9
        if steps > 1:
            row["per_step_us"] = tm.median_us / steps
    except P.Skip as e:
        row.update(status=e.status, reason=e.reason)
    except Exception as e:  # noqa: BLE001 - any failure is a row, never a crash
        row.update(status=_classify(e), reason=_short(e))
        if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()
    finally:
        fn = None  # noqa: F841
        gc.collect()
        if device.type == "cuda":
            try:
                torch.cuda.synchronize(device)
            except Exception:
                pass
            torch.cuda.empty_cache()
    return row


def derive(rows: List[dict]) -> None:
    """Add floor_us, fraction_of_floor, speedup_vs_diffusers, speedup_vs_compile, and for
    mode "overhead" x_add (the per-call time as a multiple of torch.add's)."""
    def key(r):
        return (r["shape_name"], r["dtype"])
    copy = {key(r): r for r in rows if r["provider"] == "copy" and r["status"] == "ok"}
    by = {(r["provider"], r["mode"], r["shape_name"], r["dtype"]): r for r in rows
          if r["status"] == "ok"}
    for r in rows:
        for f in ("floor_us", "fraction_of_floor", "copy_gbps", "speedup_vs_diffusers",
                  "speedup_vs_compile", "x_add"):
            r.setdefault(f, None)
        if r["status"] != "ok":
            continue
        add = by.get(("add", "overhead", r["shape_name"], r["dtype"]))
        if r["mode"] == "overhead" and add is not None:
            r["x_add"] = r["median_us"] / add["median_us"]
        c = copy.get(key(r))
        if c is not None:
            r["copy_gbps"] = c["gbps"]
            r["floor_us"] = r["bytes"] / (c["gbps"] * 1e9) * 1e6
            r["fraction_of_floor"] = r["floor_us"] / r["median_us"]
        if r["mode"] == "baseline":
            continue
        d = by.get(("diffusers", r["mode"], r["shape_name"], r["dtype"]))
        if d is None and r["mode"] == "fwd-noise":
            # DDPMScheduler.step cannot take external noise: compare with its own-noise row
            d = by.get(("diffusers", "fwd-seeds", r["shape_name"], r["dtype"]))
        if d is not None and r["provider"] != "diffusers":
            r["speedup_vs_diffusers"] = d["median_us"] / r["median_us"]
        cm = by.get(("compile", r["mode"], r["shape_name"], r["dtype"]))
        if cm is not None and r["provider"] != "compile":
            r["speedup_vs_compile"] = cm["median_us"] / r["median_us"]


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return dev


def run(preset: Preset, device: torch.device, preset_name: str = "custom",
        progress: bool = True, argv: Optional[List[str]] = None, log=None) -> dict:
    """Run every case of ``preset`` on ``device``; returns the result document."""
    settings = preset.settings
    cases = enumerate_cases(preset)
    t_start = time.perf_counter()
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(cases), file=sys.stderr, unit="case", dynamic_ncols=True,
                       desc="bench")
        except ImportError:
            bar = None
    rows = []
    for c in cases:
        if bar is not None:
            bar.set_postfix_str(f"{c['provider']} {c['mode']} {c['shape_name']} {c['dtype']}",
                                refresh=False)
        rows.append(run_case(c, device, settings))
        if bar is not None:
            bar.update(1)
        elif log is not None:
            r = rows[-1]
            log(f"  {r['provider']:>9} {r['mode']:<10} {r['shape_name']:<16} {r['dtype']:<5}"
                f" {r['status']}")
    if bar is not None:
        bar.close()
    derive(rows)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "device": device_name(device),
        "device_type": device.type,
        "versions": versions(),
        "date": utc_now(),
        "commit": git_commit(),
        "dirty": git_dirty(),
        "preset": preset_name,
        "command": "python -m bench " + " ".join(argv) if argv is not None else None,
        "settings": {"repeats": settings.repeats, "min_repeat_s": settings.min_repeat_s,
                     "warmup_s": settings.warmup_s, "loop_repeats": settings.loop_repeats,
                     "timer": settings.timer, "rotate": settings.rotate,
                     "torch_threads": torch.get_num_threads(),
                     "cache_bytes": timing.cache_bytes(device)},
        "backends": dict(P.backend_status()),
        "duration_s": round(time.perf_counter() - t_start, 2),
        "overhead": {f"{r['provider']} {r['shape_name']} {r['dtype']}": round(r["x_add"], 2)
                     for r in rows if r.get("x_add") is not None},
        "rows": rows,
    }
    return doc
