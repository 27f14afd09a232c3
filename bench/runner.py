"""Run a benchmark: enumerate the cases, time them, derive GB/s and ratios, return the
result dictionary (the JSON document described in :mod:`bench`)."""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional

import torch

from . import providers as P
from . import timing
from .config import (BASELINE_PROVIDERS, DROPIN_MODES, DTYPES, LOOP_MODES, LOOP_STEPS, METHODS,
                     MODES, PASSES, PROVIDERS, Preset, parse_shape, passes)

#: the drop-in providers (measured in DROPIN_MODES only)
DROPINS = ("dropin", "dropin-philox")

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
    """Every (provider, mode, shape, dtype, method) of the preset's groups, de-duplicated,
    with the method-independent cases (the baselines: randn when asked for, copy always;
    mode overhead's torch.add) once per (shape, dtype), under method "ddpm"."""
    cases, seen = [], set()

    def add(provider, mode, shape_name, dtype, method="ddpm"):
        key = (provider, mode, shape_name, dtype, method)
        if key not in seen:
            seen.add(key)
            cases.append({"provider": provider, "mode": mode, "shape_name": shape_name,
                          "dtype": dtype, "method": method})

    for g in preset.groups:
        for shape_name in g.shapes:
            for dtype in g.dtypes:
                add("copy", "baseline", shape_name, dtype)     # always: the floor
                if "randn" in g.providers:
                    add("randn", "baseline", shape_name, dtype)
                for method in g.methods:
                    for mode in g.modes:
                        if mode == "overhead":
                            add("add", mode, shape_name, dtype)  # always: the ratio's floor
                        for prov in g.providers:
                            if prov in BASELINE_PROVIDERS or prov == "add":
                                continue
                            if prov == "sample" and mode not in LOOP_MODES:
                                continue   # a whole loop: nothing to time per step
                            if prov in DROPINS and mode not in DROPIN_MODES:
                                continue
                            add(prov, mode, shape_name, dtype, method)
    order = {p: i for i, p in enumerate(PROVIDERS)}
    morder = {m: i for i, m in enumerate(["baseline"] + list(MODES))}
    shapes = []
    for c in cases:
        if c["shape_name"] not in shapes:
            shapes.append(c["shape_name"])
    # baselines first per (shape, dtype); torch.compile cases (seconds of compilation
    # each) last, so that a run with a time limit measures everything else first; CUDA-graph
    # captures after the other cases of the fused steps: a failed capture can spoil the CUDA
    # context for what follows (torch.compile has no loop-graph case to capture)
    # DDPM before the other methods
    methods = list(METHODS)
    cases.sort(key=lambda c: (c["provider"] == "compile", c["mode"] == "loop-graph",
                              methods.index(c["method"]), shapes.index(c["shape_name"]),
                              list(DTYPES).index(c["dtype"]), morder[c["mode"]],
                              order[c["provider"]]))
    return cases


def new_row(case: dict) -> dict:
    """A case's row before it is measured: what it is and its byte floor (status None)."""
    name, shape = parse_shape(case["shape_name"])
    dtype = DTYPES[case["dtype"]]
    numel = 1
    for s in shape:
        numel *= s
    esize = torch.tensor([], dtype=dtype).element_size()
    mode, prov, method = case["mode"], case["provider"], case.get("method", "ddpm")
    npass = PASSES[prov] if mode == "baseline" else passes(method, mode)
    steps = LOOP_STEPS if mode in LOOP_MODES else 1
    return {"provider": prov, "mode": mode, "method": method, "shape_name": name,
            "shape": list(shape), "dtype": case["dtype"], "numel": numel, "passes": npass,
            "steps": steps, "bytes": npass * numel * esize * steps, "status": None,
            "reason": None}


def skipped_row(case: dict, reason: str) -> dict:
    """The row of a case that was not started (status "skipped")."""
    return dict(new_row(case), status="skipped", reason=reason)


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
    row = new_row(case)
    mode, prov, steps = row["mode"], row["provider"], row["steps"]
    shape, dtype = tuple(row["shape"]), DTYPES[row["dtype"]]
    try:
        fn, nbuf = P.build(prov, mode, shape, dtype, device, settings.rotate, row["method"])
        row["buffers"] = nbuf
        if mode in LOOP_MODES:
            tm = timing.time_once_each(fn, device, settings.loop_repeats)
        elif mode == "overhead" and prov != "add":
            # torch.add timed just before each repeat: x_add from ratios under equal load
            add, _ = P.build("add", mode, shape, dtype, device, settings.rotate)
            tm, ratios = timing.time_paired(fn, add, device, settings.repeats,
                                            settings.min_repeat_s, settings.warmup_s)
            row["x_add"] = statistics.median(ratios)
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
    by = {(r["provider"], r["mode"], r["shape_name"], r["dtype"], r.get("method", "ddpm")): r
          for r in rows if r["status"] == "ok"}
    for r in rows:
        for f in ("floor_us", "fraction_of_floor", "copy_gbps", "speedup_vs_diffusers",
                  "speedup_vs_compile", "x_add"):
            r.setdefault(f, None)
        if r["status"] != "ok":
            continue
        method = r.get("method", "ddpm")
        add = by.get(("add", "overhead", r["shape_name"], r["dtype"], "ddpm"))
        if r["mode"] == "overhead" and add is not None and r["x_add"] is None:
            r["x_add"] = r["median_us"] / add["median_us"]
        c = copy.get(key(r))
        if c is not None:
            r["copy_gbps"] = c["gbps"]
            r["floor_us"] = r["bytes"] / (c["gbps"] * 1e9) * 1e6
            r["fraction_of_floor"] = r["floor_us"] / r["median_us"]
        if r["mode"] == "baseline":
            continue
        d = by.get(("diffusers", r["mode"], r["shape_name"], r["dtype"], method))
        if d is None and r["mode"] == "fwd-noise":
            # the stock step cannot take external noise: compare with its own-noise row
            d = by.get(("diffusers", "fwd-seeds", r["shape_name"], r["dtype"], method))
        if d is not None and r["provider"] != "diffusers":
            r["speedup_vs_diffusers"] = d["median_us"] / r["median_us"]
        cm = by.get(("compile", r["mode"], r["shape_name"], r["dtype"], method))
        if cm is not None and r["provider"] != "compile":
            r["speedup_vs_compile"] = cm["median_us"] / r["median_us"]


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return dev


def progress_line(r: dict) -> str:
    """One line for a finished row: the case, its status, and its time when measured."""
    method = r.get("method", "ddpm")
    line = (f"  {r['provider']:>9} {r['mode']:<10} {r['shape_name']:<16} {r['dtype']:<5}"
            f"{'' if method == 'ddpm' else ' [' + method + ']'} {r['status']}")
    if r["status"] == "ok":
        line += f" {r['median_us']:.1f} us"
        if r.get("per_step_us") is not None:
            line += f" ({r['per_step_us']:.2f} us/step)"
    elif r["reason"]:
        line += f" ({r['reason'][:120]})"
    return line


def run(preset: Preset, device: torch.device, preset_name: str = "custom",
        progress: bool = True, argv: Optional[List[str]] = None, log=None,
        time_limit_s: Optional[float] = None) -> dict:
    """Run every case of ``preset`` on ``device``; returns the result document.

    ``log(line)`` gets one line per finished case (when there is no progress bar).
    ``time_limit_s``: cases not started within this many seconds of the start become rows
    with status "skipped" (so a run inside a fixed window still returns its document)."""
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
        if time_limit_s is not None and time.perf_counter() - t_start > time_limit_s:
            rows.append(skipped_row(c, f"not run: the run's time limit ({time_limit_s:g} s) "
                                       f"was reached"))
        else:
            rows.append(run_case(c, device, settings))
        if bar is not None:
            bar.update(1)
        elif log is not None:
            log(progress_line(rows[-1]))
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
        "command": (f"python -m {__package__ or 'bench'} " + " ".join(argv)
                    if argv is not None else None),
        "time_limit_s": time_limit_s,
        "settings": {"repeats": settings.repeats, "min_repeat_s": settings.min_repeat_s,
                     "warmup_s": settings.warmup_s, "loop_repeats": settings.loop_repeats,
                     "timer": settings.timer, "rotate": settings.rotate,
                     "torch_threads": torch.get_num_threads(),
                     "cache_bytes": timing.cache_bytes(device)},
        "backends": dict(P.backend_status()),
        "duration_s": round(time.perf_counter() - t_start, 2),
        "overhead": {f"{r['provider']} {r['shape_name']} {r['dtype']}"
                     f"{'' if r['method'] == 'ddpm' else ' ' + r['method']}": round(r["x_add"], 2)
                     for r in rows if r.get("x_add") is not None},
        "rows": rows,
    }
    return doc
