"""Output: the table (Markdown), the JSON file, the PNG plot and ``bench/RESULTS.md``."""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from .config import DTYPES, FUSED, METHODS, MODES, PRESETS, PROVIDERS

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
RESULTS_DIR = os.path.join(HERE, "results")
#: the SASS budget table (.ci/sass_budget.py's output) shown while no GPU run is recorded
SASS_ESTIMATE = os.path.join(RESULTS_DIR, "sass-estimate-sm90.txt")
#: providers drawn bold in tables and thick in plots: the fused step itself
FUSED_OR_SAMPLE = FUSED + ("sample",)
#: matplotlib's tab10, then the light half of tab20: one distinct colour per provider
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
           "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"]
assert len(PROVIDERS) <= len(PALETTE), "bench/report.py: add colours to PALETTE"
#: one colour per provider, the same in every panel and every run
COLORS = {p: PALETTE[i] for i, p in enumerate(PROVIDERS)}


def _us(v) -> str:
    if v is None:
        return "-"
    if v >= 1e5:
        return f"{v / 1e3:,.1f} ms"
    return f"{v:,.1f}" if v < 1e4 else f"{v:,.0f}"


def _shape(r) -> str:
    dims = "x".join(str(s) for s in r["shape"])
    return dims if r["shape_name"] == dims else f"{r['shape_name']} {dims}"


def _sort_key(r):
    return (list(MODES).index(r["mode"]) if r["mode"] in MODES else -1,
            r["numel"], r["shape_name"], list(DTYPES).index(r["dtype"]),
            list(PROVIDERS).index(r["provider"]))


def _pct(v) -> Optional[str]:
    return None if v is None else f"{100 * v:.0f}%"


def _columns(loop: bool) -> List[Tuple[str, Callable[[dict], Optional[str]]]]:
    """(header, cell) per column of a mode's table; a cell is None where there is nothing to
    show (rendered "-"; a column that is None in every row is left out)."""
    return [
        ("shape", _shape),
        ("dtype", lambda r: r["dtype"]),
        ("provider", lambda r: f"**{r['provider']}**" if r["provider"] in FUSED_OR_SAMPLE
         else r["provider"]),
        ("ms per 1000 steps (= µs/step)" if loop else "µs",
         (lambda r: format(r["median_us"] / 1e3, ",.2f")) if loop
         else (lambda r: _us(r["median_us"]))),
        ("GB/s", lambda r: _opt(r.get("gbps"), ",.1f")),
        ("of floor", lambda r: _pct(r.get("fraction_of_floor"))),
        ("× diffusers", lambda r: _opt(r.get("speedup_vs_diffusers"), ".2f")),
        ("× compile", lambda r: _opt(r.get("speedup_vs_compile"), ".2f")),
        ("× torch.add", lambda r: _opt(r.get("x_add"), ".2f")),
    ]


def _opt(v, fmt: str) -> Optional[str]:
    return None if v is None else format(v, fmt)


def table(doc: dict, markdown: bool = True) -> str:
    """Measured rows as a Markdown table, one block per mode (baselines first), followed by
    the list of cases that did not run and why. Columns with nothing in any row of a block
    (e.g. "× compile" when torch.compile was not measured) are left out."""
    rows = [r for r in doc["rows"] if r["status"] == "ok"]
    out: List[str] = []
    modes = ["baseline"] + list(MODES)
    for method, mode in [(me, mo) for me in METHODS for mo in modes]:
        mrows = sorted((r for r in rows if r["mode"] == mode and
                        r.get("method", "ddpm") == method), key=_sort_key)
        if not mrows:
            continue
        title = {"baseline": "baseline: copy (bandwidth ceiling) and torch.randn (noise floor)"
                 }.get(mode, f"{mode}: {MODES.get(mode, '')}")
        if method != "ddpm":
            title = f"{method}, {title}"
        out.append(f"### {title}\n")
        cols = _columns(mode.startswith("loop"))
        cells = [[cell(r) for _, cell in cols] for r in mrows]
        keep = [i for i in range(len(cols)) if i < 4 or any(c[i] is not None for c in cells)]
        out.append("| " + " | ".join(cols[i][0] for i in keep) + " |")
        out.append("|" + "|".join("---" if i < 3 else "---:" for i in keep) + "|")
        for c in cells:
            out.append("| " + " | ".join("-" if c[i] is None else c[i] for i in keep) + " |")
        out.append("")
    skipped = [r for r in doc["rows"] if r["status"] != "ok"]
    if skipped:
        out.append("### not measured\n")
        groups: Dict[tuple, List[dict]] = {}
        for r in skipped:
            method = r.get("method", "ddpm")
            prov = r["provider"] if method == "ddpm" else f"{r['provider']} [{method}]"
            groups.setdefault((prov, r["status"], r["reason"]), []).append(r)
        out.append("| provider | status | cases | reason |")
        out.append("|---|---|---:|---|")
        for (prov, status, reason), rs in sorted(
                groups.items(), key=lambda kv: (list(PROVIDERS).index(kv[0][0].split()[0]),
                                                kv[0][0], kv[0][1])):
            modes_ = sorted({r["mode"] for r in rs}, key=lambda m: modes.index(m)
                            if m in modes else 99)
            reason = (reason or "").replace("|", "\\|")
            out.append(f"| {prov} | {status} | {len(rs)} ({', '.join(modes_)}) | {reason} |")
        out.append("")
    return "\n".join(out)


def header(doc: dict) -> str:
    v = doc.get("versions", {})
    ver = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "diffusers", "python", "cuda",
                                             "fused_ddpm") if v.get(k))
    commit = doc.get("commit", "unknown")
    if doc.get("dirty"):
        commit += " (with uncommitted changes)"
    lines = [f"- device: **{doc['device']}** ({doc.get('device_type')})",
             f"- date: {doc['date']}",
             f"- versions: {ver}",
             f"- commit: `{commit}`",
             f"- preset: `{doc.get('preset')}`; command: `{doc.get('command')}`",
             f"- timing: {doc['settings'].get('timer')} timer, median of "
             f"{doc['settings'].get('repeats')} repeats (loops: "
             f"{doc['settings'].get('loop_repeats')}), inputs rotated: "
             f"{doc['settings'].get('rotate')}, torch threads: "
             f"{doc['settings'].get('torch_threads')}; run took {doc.get('duration_s')} s",
             "- fused_ddpm backends: " + "; ".join(
                 f"{k}: {s}" for k, s in (doc.get("backends") or {}).items())]
    if doc.get("overhead"):
        lines.append("- Python overhead per call, × torch.add of the same tensor: " + "; ".join(
            f"{k}: {v:.2f}×" for k, v in doc["overhead"].items()))
    return "\n".join(lines)


def write_json(doc: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")


def slug(text: str) -> str:
    s = re.sub(r"\(r\)|\(tm\)|\bcpu\b|@.*$", "", text, flags=re.I)
    s = re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")
    return s[:40] or "device"


def stem(doc: dict) -> str:
    """File name stem: ``<preset>-<device slug>`` (a rerun replaces the previous file)."""
    return f"{doc.get('preset', 'custom')}-{slug(doc['device'])}"


# ------------------------------------------------------------------------------ plot
def plot(doc: dict, path: str) -> Optional[str]:
    """Time vs bytes moved per provider, one panel per (dtype, step mode), with the floor
    (bytes / copy bandwidth). Returns None on success, else why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"plot skipped: matplotlib is not available ({e.__class__.__name__})"
    # one method's rows: DDPM's, or (a run of other methods only) the first one's
    steps = [r for r in doc["rows"] if r["status"] == "ok" and r["mode"] != "baseline"]
    timed = {r.get("method", "ddpm") for r in steps if r["mode"] != "overhead"}
    method = next((m for m in METHODS if m in timed), "ddpm")
    rows = [r for r in steps if r.get("method", "ddpm") == method]
    panels = sorted({(r["dtype"], r["mode"]) for r in rows},
                    key=lambda p: (list(DTYPES).index(p[0]), list(MODES).index(p[1])))
    if not panels:
        return "plot skipped: no measured step rows"
    from matplotlib.ticker import NullFormatter
    ncols = min(4, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows + 0.8),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (d, m) in zip(axes.flat, panels):
        sel = [r for r in rows if r["dtype"] == d and r["mode"] == m]
        for prov in PROVIDERS:
            pts = sorted((r["bytes"] / 1e6, r["median_us"]) for r in sel
                         if r["provider"] == prov)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=prov, color=COLORS[prov],
                        lw=2 if prov in FUSED_OR_SAMPLE else 1)
        floor = sorted({(r["bytes"] / 1e6, r["floor_us"]) for r in sel if r.get("floor_us")})
        if floor:
            ax.plot(*zip(*floor), "k--", marker="_", ms=10, lw=1.2,
                    label="floor (bytes / copy bandwidth)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{m}, {d}", fontsize=9)
        ax.set_xlabel("minimal bytes moved (MB)", fontsize=8)
        ax.set_ylabel("µs per 1000-step loop" if m.startswith("loop") else "µs per call",
                      fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    # one legend entry per label; the colours are fixed per provider, so any panel's handle
    # stands for all of them
    seen: Dict[str, object] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    labels = sorted(seen, key=lambda k: list(PROVIDERS).index(k) if k in PROVIDERS else 99)
    handles = [seen[k] for k in labels]
    fig.suptitle(f"fused-ddpm bench - {doc['device']} - {doc['date']}"
                 + ("" if method == "ddpm" else f" - {method}"), fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 9), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------ RESULTS.md
def load(paths: Iterable[str]) -> List[dict]:
    docs = []
    for p in paths:
        with open(p) as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or "rows" not in doc or "device" not in doc:
            raise ValueError(f"{p} is not a bench result (no 'device'/'rows')")
        doc["_path"] = p
        docs.append(doc)
    return docs


def static_estimate(path: str = SASS_ESTIMATE) -> Optional[str]:
    """The GPU section's stand-in while no GPU run is recorded: the SASS budget table of
    ``.ci/sass_budget.py`` kept in ``path`` (its provenance in the file's first lines), as
    Markdown; None when there is no such file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        lines = f.read().rstrip().splitlines()
    notes = [ln[2:] for ln in lines if ln.startswith("# ")]
    table_lines = [ln for ln in lines if not ln.startswith("#")]
    return "\n".join([
        "### Static estimate (until a GPU run replaces it)",
        "",
        "Predicted time of the 64x3x512x512 step on an H200 from SASS instruction issue "
        "alone (instructions per element from the compiled kernels, at IPC 0.8; `issue us`), "
        "next to the memory floor of that step (`floor us`): a kernel is predicted to run at "
        "the larger of the two. Not a measurement.",
        "",
        *(f"- {n}" for n in notes),
        "",
        "```",
        *table_lines,
        "```",
        ""])


def results_md(paths: Iterable[str], out: str = RESULTS_MD,
               estimate: Optional[str] = SASS_ESTIMATE) -> str:
    """Regenerate ``out`` from result JSON files: per device kind (GPU, then CPU) the latest
    run (by date) of each preset; with no GPU run, the static estimate kept in ``estimate``
    (:func:`static_estimate`). Returns the text written."""
    docs = load(paths)
    if not docs:
        raise ValueError("no result files given")
    latest: Dict[str, Dict[str, dict]] = {"cuda": {}, "cpu": {}}
    for d in docs:
        kind = "cuda" if d.get("device_type") == "cuda" else "cpu"
        runs = latest[kind]
        preset = d.get("preset") or "custom"
        if preset not in runs or d["date"] > runs[preset]["date"]:
            runs[preset] = d
    outdir = os.path.dirname(os.path.abspath(out))
    parts = [
        "# Benchmark results",
        "",
        "<!-- Generated by `python -m bench --results-md bench/results/*.json` from the JSON",
        "     files in bench/results/. Do not edit by hand: rerun the harness instead. -->",
        "",
        "Regenerate: `python -m bench --results-md bench/results/*.json`. Record new runs: "
        "`python -m bench --preset gpu --record` (GPU), `python -m bench --preset cpu "
        "--threads 1 --record` (CPU). See bench/README.md for what every column means.",
        "",
        "Columns: **µs** median time per call; **GB/s** minimal bytes moved (3 passes over "
        "the tensor with in-kernel/own noise - read x, m, write y -, 4 with external noise, "
        "backward: read gy, write gx, gm) / time; **of floor** that bandwidth as a fraction "
        "of the `y.copy_(x)` bandwidth measured for the same shape and dtype in the same run "
        "(100% = at the memory floor); **× diffusers / × compile**: speed-up over diffusers' "
        "`DDPMScheduler.step` and over `torch.compile(reference)` in the same mode "
        "(diffusers cannot take external noise: its own-noise row is used for fwd-noise).",
        "",
    ]
    order = {p: i for i, p in enumerate(PRESETS)}
    for kind, title in (("cuda", "GPU"), ("cpu", "CPU")):
        runs = sorted(latest[kind].values(),
                      key=lambda d: (order.get(d.get("preset"), len(order)), d["date"]))
        if not runs:
            parts.append(f"## {title}: latest run\n")
            cmd = "--preset gpu" if kind == "cuda" else "--preset cpu --threads 1"
            parts.append(f"No {title} run recorded yet (`python -m bench {cmd} --record`).\n")
            est = static_estimate(estimate) if kind == "cuda" and estimate else None
            if est:
                parts.append(est)
            continue
        for d in runs:
            parts.append(f"## {title}: latest run (preset `{d.get('preset')}`)\n")
            section(parts, d, outdir)
    text = "\n".join(parts).rstrip() + "\n"
    with open(out, "w") as f:
        f.write(text)
    return text


def section(parts: List[str], d: dict, outdir: str) -> None:
    """Append one run's header, plot and tables to ``parts``."""
    parts.append(header(d))
    parts.append(f"- source: `{os.path.relpath(d['_path'], outdir)}`")
    png = os.path.splitext(d["_path"])[0] + ".png"
    parts.append("")
    if os.path.exists(png):
        parts.append(f"![time vs size]({os.path.relpath(png, outdir)})\n")
    parts.append(table(d))
