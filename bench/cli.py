"""Command line of the harness: ``python -m bench --help`` from the repository root, or
``python -m fused_ddpm.bench --help`` anywhere once fused-ddpm is installed."""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import List, Optional

from . import config as C
from . import report

EPILOG = """\
presets:
  quick   {quick}
  cpu     {cpu}
  gpu     {gpu}
  (default: gpu on a CUDA machine, cpu otherwise; --providers/--modes/--shapes/--dtypes
  replace that field of the preset)

providers:
{providers}

modes (plus 'baseline', where copy and randn are recorded once per shape and dtype):
{modes}

shapes: {shapes}  (or explicit, e.g. 2x4x32x32)
dtypes: fp32, fp16, bf16

output:
  the table goes to stdout. Files only when asked: --out DIR writes the JSON document and
  a PNG plot as DIR/<preset>-<device>.json and .png; --record writes them into the
  repository's bench/results/ and regenerates bench/RESULTS.md (source checkouts only).

examples:
  {prog} --preset cpu --threads 1 --record   # CPU run -> bench/results/, RESULTS.md
  {prog} --preset gpu --record          # GPU run (docs/design.md targets, ~3 min H200)
  {prog} --results-md bench/results/*.json   # regenerate bench/RESULTS.md
  {prog} --replot bench/results/*.json  # redraw the PNG beside each JSON file
  {prog} --quick --out /tmp/b           # tiny smoke run, files in /tmp/b
  {prog} --providers cuda,triton,copy --modes fwd-seeds --shapes img512-b64 \\
      --dtypes fp32,fp16 --repeats 50
"""


PROG = f"python -m {__package__ or 'bench'}"


def _epilog() -> str:
    return EPILOG.format(prog=PROG,
        quick=C.PRESETS["quick"].description, cpu=C.PRESETS["cpu"].description,
        gpu=C.PRESETS["gpu"].description,
        providers="\n".join(f"  {k:<10}{v}" for k, v in C.PROVIDERS.items()),
        modes="\n".join(f"  {k:<11}{v}" for k, v in C.MODES.items()),
        shapes=", ".join(f"{k} ({'x'.join(map(str, v))})" for k, v in C.SHAPES.items()))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Benchmark the fused DDPM step against its peers (diffusers, eager and "
                    "compiled PyTorch) and against the memory floor (a copy measured in the "
                    "same run). Prints a table; with --out DIR also writes the JSON document "
                    "and a PNG plot there.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(C.PRESETS), help="a predefined configuration")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--providers", help="comma list, or 'all'")
    p.add_argument("--modes", help="comma list, or 'all'")
    p.add_argument("--shapes", help="comma list of names or BxCxHxW specs, or 'all'")
    p.add_argument("--dtypes", help="comma list of fp32,fp16,bf16, or 'all'")
    p.add_argument("--repeats", type=int, help="timed repeats per case (median reported)")
    p.add_argument("--loop-repeats", type=int, help="timed repeats of a 1000-step loop")
    p.add_argument("--min-repeat-ms", type=float,
                   help="each repeat runs enough calls to last this long")
    p.add_argument("--warmup-ms", type=float, help="warm-up time per case")
    p.add_argument("--timer", choices=["auto", "wall", "events", "do_bench"],
                   help="auto: CUDA events on a GPU, wall clock on the CPU; do_bench: "
                        "triton.testing.do_bench (flushes L2 before each call)")
    p.add_argument("--no-rotate", action="store_true",
                   help="do not rotate inputs among buffers for cache-resident shapes")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    p.add_argument("--out", metavar="DIR", help="write <preset>-<device>.json and .png here")
    p.add_argument("--record", action="store_true",
                   help="--out bench/results, then regenerate bench/RESULTS.md from "
                        "bench/results/*.json")
    p.add_argument("--results-md", nargs="*", metavar="JSON",
                   help="regenerate bench/RESULTS.md from these JSON files (default: "
                        "bench/results/*.json) and exit")
    p.add_argument("--replot", nargs="+", metavar="JSON",
                   help="redraw the PNG plot beside each of these result files and exit")
    p.add_argument("--results-md-path", default=report.RESULTS_MD,
                   help="where --results-md/--record write (default: bench/RESULTS.md)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    return p


def build_preset(args, device) -> tuple:
    name = "quick" if args.quick else (args.preset or ("gpu" if device.type == "cuda"
                                                        else "cpu"))
    base = C.PRESETS[name]
    explicit = any(v is not None for v in (args.providers, args.modes, args.shapes,
                                           args.dtypes))
    sel = (C.parse_providers(args.providers), C.parse_modes(args.modes),
           C.parse_shapes(args.shapes), C.parse_dtypes(args.dtypes))
    if explicit and args.preset is None and not args.quick:
        # no preset named: one group; unspecified fields come from the default preset
        preset = C.union(base, *sel)
    else:
        preset = C.override(base, *sel)
    s = preset.settings
    s = type(s)(**vars(s))
    if args.repeats is not None:
        s.repeats = max(1, args.repeats)
    if args.loop_repeats is not None:
        s.loop_repeats = max(1, args.loop_repeats)
    if args.min_repeat_ms is not None:
        s.min_repeat_s = args.min_repeat_ms / 1e3
    if args.warmup_ms is not None:
        s.warmup_s = args.warmup_ms / 1e3
    if args.timer is not None:
        s.timer = args.timer
    if args.no_rotate:
        s.rotate = False
    preset.settings = s
    if explicit and args.preset is None and not args.quick:
        name = "custom"
    return preset, name


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)

    if args.replot:
        for path in args.replot:
            png = os.path.splitext(path)[0] + ".png"
            note = report.plot(report.load([path])[0], png)
            print(note or f"wrote {png}")
        return 0
    if args.record and not os.path.isdir(report.RESULTS_DIR):
        print(f"error: --record writes into the repository's bench/results/, and this harness "
              f"({report.HERE}) is not a source checkout; use --out DIR", file=sys.stderr)
        return 2

    if args.results_md is not None:
        paths = args.results_md or sorted(glob.glob(os.path.join(report.RESULTS_DIR,
                                                                 "*.json")))
        report.results_md(paths, args.results_md_path)
        print(f"wrote {args.results_md_path} from {len(paths)} file(s)")
        return 0

    import torch
    from . import runner
    if args.threads:
        torch.set_num_threads(args.threads)
    device = runner.resolve_device(args.device)
    try:
        preset, name = build_preset(args, device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for c in runner.enumerate_cases(preset):
            print(c["provider"], c["mode"], c["shape_name"], c["dtype"])
        return 0
    out = report.RESULTS_DIR if args.record else args.out
    print(f"bench: preset {name} on {runner.device_name(device)} ({device})", file=sys.stderr)
    doc = runner.run(preset, device, name, progress=not args.no_progress, argv=argv,
                     log=lambda s: print(s, file=sys.stderr))
    print(report.header(doc))
    print()
    print(report.table(doc))
    if not out:
        print("not saved: add --out DIR to write the JSON document and a PNG plot "
              f"(DIR/{report.stem(doc)}.json, .png)", file=sys.stderr)
    else:
        path = os.path.join(out, report.stem(doc) + ".json")
        report.write_json(doc, path)
        print(f"wrote {path} (the JSON document)", file=sys.stderr)
        if not args.no_plot:
            png = os.path.join(out, report.stem(doc) + ".png")
            note = report.plot(doc, png)
            print(note or f"wrote {png} (time vs bytes moved, one panel per dtype and mode)",
                  file=sys.stderr)
        if args.record:
            paths = sorted(glob.glob(os.path.join(out, "*.json")))
            report.results_md(paths, args.results_md_path)
            print(f"wrote {args.results_md_path} from {len(paths)} file(s)", file=sys.stderr)
    return 0
