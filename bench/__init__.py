"""The fused-ddpm benchmark harness (``python -m bench --help``).

Python API::

    from bench import PRESETS, run, override, resolve_device
    doc = run(PRESETS["quick"], resolve_device("cpu"), "quick")   # the JSON document
    from bench.report import table, write_json, plot, results_md

JSON document (one per run; ``bench/results/<preset>-<device>.json``), schema_version 1:

* ``schema_version`` (int), ``device`` (``torch.cuda.get_device_name`` or the CPU model from
  /proc/cpuinfo), ``device_type`` ("cuda" | "cpu"), ``date`` (UTC ISO 8601),
  ``commit`` (``git rev-parse HEAD``, "unknown" outside a git checkout), ``dirty`` (tracked
  files modified, or null), ``preset``, ``command``, ``time_limit_s`` (null when none),
  ``duration_s``.
* ``versions``: ``python``, ``torch``, ``cuda`` (null on CPU-only torch), ``triton``,
  ``diffusers``, ``fused_ddpm`` (null when not importable).
* ``settings``: ``repeats``, ``min_repeat_s``, ``warmup_s``, ``loop_repeats``, ``timer``,
  ``rotate``, ``torch_threads``, ``cache_bytes``.
* ``backends``: ``fused_ddpm.backends()`` at run time.
* ``rows``: one per (provider, mode, shape, dtype, method), each with
  ``provider``, ``mode`` (fwd-seeds | fwd-noise | bwd | loop | loop-graph | baseline),
  ``shape_name``, ``shape`` (list), ``dtype`` (fp32 | fp16 | bf16), ``numel``, ``passes``
  (tensor passes of the byte floor), ``steps`` (1, or 1000 for loops), ``bytes`` (minimal
  bytes moved = passes x numel x itemsize x steps), ``status`` ("ok" | "unavailable" |
  "unsupported" | "error" | "skipped": not started, the run's time limit had passed) and
  ``reason`` (null when ok; why it did not run otherwise).
  Measured rows (status "ok") also have ``median_us`` (median over repeats of the per-call
  time; for loops the whole 1000-step loop), ``min_us``, ``repeats``,
  ``calls_per_repeat``, ``buffers`` (input sets rotated among), ``timer`` (wall |
  cuda-events | do_bench), ``first_call_s`` (untimed first call, includes compilation),
  ``gbps`` (bytes / median), ``per_step_us`` (loops), ``copy_gbps`` (the copy bandwidth
  measured for this shape and dtype), ``floor_us`` (bytes / copy bandwidth),
  ``fraction_of_floor`` (floor_us / median_us = gbps / copy_gbps; 1.0 = at the floor),
  ``speedup_vs_diffusers`` and ``speedup_vs_compile`` (their median / this median, same
  mode, shape, dtype and method; null when that peer was not measured), ``x_add`` (mode
  overhead: the median over repeats of this call's time / a torch.add of the same tensor
  timed just before it). Every row has ``method`` (ddpm | dpmsolver++ | sde-dpmsolver++ |
  euler_ancestral; the baselines and torch.add: ddpm).
"""
from .config import MODES, PRESETS, PROVIDERS, SHAPES, Group, Preset, Settings, override
from .runner import SCHEMA_VERSION, enumerate_cases, resolve_device, run

__all__ = ["MODES", "PRESETS", "PROVIDERS", "SCHEMA_VERSION", "SHAPES", "Group", "Preset",
           "Settings", "enumerate_cases", "override", "resolve_device", "run"]
