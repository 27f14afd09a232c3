"""Timers: wall clock on the CPU, CUDA events (or ``triton.testing.do_bench``) on a GPU.

Every timer takes ``fn(i)`` - one call on input set ``i`` (the caller rotates its buffers
with ``i % nbuf``) - runs it once untimed (first call: lazy init, compilation), warms up,
picks how many calls one repeat makes so that a repeat lasts at least ``min_repeat_s``,
and returns the per-call time of every repeat in microseconds. The row's number is the
median of those.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch


@dataclass
class Timing:
    samples_us: List[float]     # per-call time of each repeat
    calls_per_repeat: int
    timer: str
    first_call_s: float         # the untimed first call (includes compilation, if any)

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)

    @property
    def min_us(self) -> float:
        return min(self.samples_us)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_and_warmup(fn: Callable[[int], object], device, warmup_s: float):
    """Run the first call and warm up; returns (first_call_s, per-call estimate s, next i)."""
    t0 = time.perf_counter()
    fn(0)
    _sync(device)
    first = time.perf_counter() - t0
    i, n = 1, 0
    t0 = time.perf_counter()
    while True:
        fn(i)
        i += 1
        n += 1
        if n >= 2 and (time.perf_counter() - t0) >= warmup_s:
            _sync(device)
            if time.perf_counter() - t0 >= warmup_s:
                break
        if n >= 10000:
            break
    _sync(device)
    est = (time.perf_counter() - t0) / n
    return first, est, i


def _calls_per_repeat(est_s: float, min_repeat_s: float) -> int:
    """How many back-to-back calls make one repeat last at least ``min_repeat_s``."""
    return max(1, int(math.ceil(min_repeat_s / max(est_s, 1e-9))))


def _wall_run(fn, i: int, k: int, device) -> Tuple[float, int]:
    """Seconds per call of ``fn(i) … fn(i + k − 1)``, the device synchronised around the
    run; and the next call index."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(k):
        fn(i)
        i += 1
    _sync(device)
    return (time.perf_counter() - t0) / k, i


def time_wall(fn, device, repeats: int, min_repeat_s: float, warmup_s: float) -> Timing:
    """Wall clock (``time.perf_counter``), synchronising the device around each repeat."""
    first, est, i = _first_and_warmup(fn, device, warmup_s)
    k = _calls_per_repeat(est, min_repeat_s)
    samples = []
    for _ in range(repeats):
        per_call, i = _wall_run(fn, i, k, device)
        samples.append(per_call * 1e6)
    return Timing(samples, k, "wall", first)


def time_events(fn, device, repeats: int, min_repeat_s: float, warmup_s: float) -> Timing:
    """CUDA events around each repeat of k back-to-back calls (per-call time = elapsed / k:
    launch-bound calls are measured at the rate Python can issue them)."""
    first, est, i = _first_and_warmup(fn, device, warmup_s)
    k = _calls_per_repeat(est, min_repeat_s)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for r in range(repeats):
        starts[r].record()
        for _ in range(k):
            fn(i)
            i += 1
        ends[r].record()
    torch.cuda.synchronize(device)
    samples = [s.elapsed_time(e) * 1e3 / k for s, e in zip(starts, ends)]
    return Timing(samples, k, "cuda-events", first)


def time_do_bench(fn, device, repeats: int, min_repeat_s: float, warmup_s: float) -> Timing:
    """``triton.testing.do_bench`` (flushes L2 before every call; median of its samples)."""
    from triton.testing import do_bench
    counter = [0]

    def call():
        counter[0] += 1
        fn(counter[0])

    t0 = time.perf_counter()
    fn(0)
    _sync(device)
    first = time.perf_counter() - t0
    rep_ms = max(1.0, repeats * min_repeat_s * 1e3)
    q = do_bench(call, warmup=max(1, int(warmup_s * 1e3)), rep=int(rep_ms),
                 quantiles=[0.2, 0.5, 0.8], return_mode="median")
    samples = [v * 1e3 for v in (q if isinstance(q, (list, tuple)) else [q])]
    return Timing(samples, 1, "do_bench", first)


def time_paired(fn, base, device, repeats: int, min_repeat_s: float, warmup_s: float
                ) -> Tuple[Timing, List[float]]:
    """Wall-clock timing of ``fn`` with ``base`` timed just before it in every repeat:
    (fn's Timing, fn's per-call time / base's per repeat). Both see the same machine load,
    so the ratios hold on a busy machine where separately timed rows drift apart."""
    first, est, i = _first_and_warmup(fn, device, warmup_s)
    _, best, j = _first_and_warmup(base, device, warmup_s)
    k = _calls_per_repeat(est, min_repeat_s)
    kb = _calls_per_repeat(best, min_repeat_s)
    samples, ratios = [], []
    for _ in range(repeats):
        base_call, j = _wall_run(base, j, kb, device)
        per_call, i = _wall_run(fn, i, k, device)
        samples.append(per_call * 1e6)
        ratios.append(per_call / base_call)
    return Timing(samples, k, "wall", first), ratios


def measure(fn, device: torch.device, timer: str, repeats: int, min_repeat_s: float,
            warmup_s: float) -> Timing:
    if timer == "auto":
        timer = "events" if device.type == "cuda" else "wall"
    if timer in ("events", "do_bench") and device.type != "cuda":
        timer = "wall"
    impl = {"wall": time_wall, "events": time_events, "do_bench": time_do_bench}[timer]
    return impl(fn, device, repeats, min_repeat_s, warmup_s)


def time_once_each(fn, device, repeats: int) -> Timing:
    """For long runs (a whole 1000-step loop): one untimed call, then ``repeats`` timed
    calls (events on CUDA, wall clock on the CPU)."""
    t0 = time.perf_counter()
    fn(0)
    _sync(device)
    first = time.perf_counter() - t0
    if first < 0.02:
        repeats *= 4          # short loops (graph replays): more repeats cost little
    samples = []
    for r in range(repeats):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(r + 1)
            e.record()
            torch.cuda.synchronize(device)
            samples.append(s.elapsed_time(e) * 1e3)
        else:
            t0 = time.perf_counter()
            fn(r + 1)
            samples.append((time.perf_counter() - t0) * 1e6)
    return Timing(samples, 1, "cuda-events" if device.type == "cuda" else "wall", first)


# ------------------------------------------------------------------------------ caches
def cache_bytes(device: torch.device) -> int:
    """The cache a small working set could stay in between calls: the GPU's L2, or on the
    CPU the private L2 of every thread torch uses (the shared LLC of a VM host is neither
    ours nor predictable)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2 ** 20)
    l2 = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in sorted(os.listdir(base)):
            p = os.path.join(base, d)
            if not d.startswith("index"):
                continue
            with open(os.path.join(p, "level")) as f:
                level = int(f.read())
            with open(os.path.join(p, "size")) as f:
                size = f.read().strip()
            mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(size[-1:], 1)
            val = int(size.rstrip("KMG")) * mult
            if level == 2:
                l2 = max(l2, val)
    except (OSError, ValueError):
        pass
    return (l2 or 2 * 2 ** 20) * max(1, torch.get_num_threads())


def num_buffers(working_set: int, device: torch.device, rotate: bool) -> int:
    """How many input sets to rotate among so that a call never finds its inputs in cache:
    enough to cover twice the cache, capped (256 on a GPU, 64 on the CPU) and at 1 GiB."""
    if not rotate or working_set <= 0:
        return 1
    cache = cache_bytes(device)
    if working_set >= 2 * cache:
        return 1
    cap = 256 if device.type == "cuda" else 64
    n = int(math.ceil(2 * cache / working_set)) + 1
    return max(1, min(n, cap, (2 ** 30) // working_set))
