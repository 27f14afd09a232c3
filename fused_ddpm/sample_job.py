"""The main job's engine: draw the samples of a :class:`Run` in shards, on one process or
many, and write the output file and the grid. The command line is :mod:`fused_ddpm.sample_cli`
(``python -m fused_ddpm.sample``); its module docstring says what a sample depends on and how
shards, resume and many processes work.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["GRID_MAX", "Run", "run_job", "sample_seeds", "label_hash", "to_uint8_images", "run_key",
           "shard_ranges"]

_NOISE_TAG = b"fd.sample.noise"
_LABEL_TAG = b"fd.sample.label"
_MASK64 = (1 << 64) - 1
_DIST_TIMEOUT = datetime.timedelta(hours=2)   # covers the slowest rank's last shard
GRID_MAX = 100
_FORMAT = 2                                    # bump when shard contents change meaning


# ----------------------------------------------------------------------------- seeds
def _hash64(tag: bytes, seed: int, i: int) -> int:
    digest = hashlib.blake2b(struct.pack("<QQ", seed & _MASK64, i), digest_size=8,
                             person=tag).digest()
    return int.from_bytes(digest, "little", signed=True)


def sample_seeds(seed: int, indices: Sequence[int]) -> torch.Tensor:
    """The per-sample Philox seeds (int64 ``[n]``) of samples ``indices`` of run ``seed``:
    a hash of (seed, i), so each depends on nothing else."""
    return torch.tensor([_hash64(_NOISE_TAG, seed, int(i)) for i in indices], dtype=torch.int64)


def label_hash(seed: int, i: int) -> int:
    """The hash of (seed, i) that ``--class-labels random`` reduces modulo the classes."""
    return _hash64(_LABEL_TAG, seed, i)


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Samples in [−1, 1], ``[B, C, H, W]`` → uint8 ``[B, H, W, C]`` (round to nearest)."""
    y = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()


@dataclass
class Run:
    """A validated run: everything :func:`run_job` needs, fixed before any work starts (the
    command line's options, resolved; see :mod:`fused_ddpm.sample_cli`). ``labels``: int64
    ``[N]`` for a class-conditional model, else None; ``num_labels``: how many classes
    ``cycle`` / ``random`` draw from; ``guidance_scale`` 1: no guidance (one model pass per
    sample); ``rank`` / ``world``: this process in torchrun's group."""

    model_dir: Path
    num_samples: int
    batch_size: int
    sampler: str
    steps: int
    eta: float
    seed: int
    labels_spec: Optional[str]
    guidance_scale: float
    guidance_rescale: float
    null_class: Optional[int]
    device: torch.device
    dtype: torch.dtype
    cuda_graph: bool
    model_batch: int
    out: Path
    grid: Optional[Path]
    shard_dir: Path
    progress: bool
    rank: int = 0
    world: int = 1
    labels: Optional[np.ndarray] = field(default=None, repr=False)
    num_labels: int = 0


# ----------------------------------------------------------------------------- shards
def _file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def run_key(run: Run, info) -> str:
    """A hash of everything a sample depends on (not of N, the batch size or the world)."""
    from . import __version__
    files = sorted(p for p in info.unet_dir.iterdir() if p.is_file())
    if info.scheduler_config_path is not None:
        files.append(info.scheduler_config_path)
    device = run.device.type
    if run.device.type == "cuda":
        device += ":" + torch.cuda.get_device_name(run.device)
    content = dict(format=_FORMAT, model=_file_digest(files), sampler=run.sampler,
                   steps=run.steps, eta=run.eta, seed=run.seed, labels=run.labels_spec,
                   guidance=run.guidance_scale, rescale=run.guidance_rescale,
                   null_class=run.null_class,
                   model_batch=run.model_batch, dtype=str(run.dtype), device=device,
                   fused_ddpm=__version__, torch=torch.__version__)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def shard_ranges(n: int, batch: int) -> List[Tuple[int, int]]:
    return [(a, min(a + batch, n)) for a in range(0, n, batch)]


def _shard_path(work: Path, a: int, b: int) -> Path:
    return work / f"{a:09d}-{b:09d}.npz"


def _load_shard(path: Path, n: int, hwc: Tuple[int, int, int]) -> np.ndarray:
    """The images of a finished shard file (written atomically, so complete)."""
    try:
        with np.load(path) as f:
            x = f["arr_0"]
    except (OSError, ValueError, KeyError) as e:
        raise RuntimeError(f"shard file {path} is unreadable ({e}); delete it and rerun") \
            from None
    if x.dtype != np.uint8 or x.shape != (n,) + hwc:
        raise RuntimeError(f"shard file {path} holds {x.dtype} {list(x.shape)}, expected "
                           f"uint8 {[n, *hwc]}; delete it and rerun")
    return x


# ----------------------------------------------------------------------------- the job
class _Comm:
    """torch.distributed for the few exchanges the job needs (no-ops for one process)."""

    def __init__(self, run: Run):
        self.rank, self.world = run.rank, run.world
        self.device = torch.device("cpu")
        self.owned = False               # True: this job made the process group, and ends it
        if self.world > 1:
            import torch.distributed as dist
            self.dist = dist
            if not dist.is_initialized():
                self.owned = True
                if run.device.type == "cuda":
                    torch.cuda.set_device(run.device)
                    dist.init_process_group(backend="nccl", timeout=_DIST_TIMEOUT,
                                            device_id=run.device)
                else:
                    dist.init_process_group(backend="gloo", timeout=_DIST_TIMEOUT)
            if dist.get_backend() == "nccl":
                self.device = run.device

    def all_gather_u8(self, row: np.ndarray) -> np.ndarray:
        """[world, len(row)] from each rank's uint8 ``row``."""
        if self.world == 1:
            return row[None]
        t = torch.from_numpy(row).to(self.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(out, t)
        return torch.stack(out).cpu().numpy()

    def broadcast_str(self, s: str) -> str:
        if self.world == 1:
            return s
        box = [s]
        self.dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def send(self, x: np.ndarray, dst: int) -> None:
        self.dist.send(torch.from_numpy(x).to(self.device), dst=dst)

    def recv(self, shape, src: int) -> np.ndarray:
        t = torch.empty(shape, dtype=torch.uint8, device=self.device)
        self.dist.recv(t, src=src)
        return t.cpu().numpy()

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _progress(run: Run, total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="img", desc=f"sampling ({run.sampler}, {run.steps} steps)",
                disable=(not run.progress or run.rank != 0) or None, dynamic_ncols=True)


def _draw(run: Run, model, coeffs, a: int, b: int, hwc) -> np.ndarray:
    from .sampler import sample
    H, W, C = hwc
    seeds = sample_seeds(run.seed, range(a, b)).to(run.device)
    guide = {}
    if run.labels is not None:
        guide["cond"] = torch.from_numpy(run.labels[a:b]).to(run.device)
        if run.guidance_scale != 1.0:
            guide.update(uncond=torch.full_like(guide["cond"], run.null_class),
                         guidance_scale=run.guidance_scale,
                         guidance_rescale=run.guidance_rescale)
    x = sample(model, (b - a, C, H, W), coeffs, seeds=seeds, cuda_graph=run.cuda_graph,
               progress=False, device=run.device, dtype=run.dtype, **guide)
    return to_uint8_images(x)


def _grid_png(path: Path, images: np.ndarray, ncols: int) -> None:
    from PIL import Image

    from .npz import atomic_file
    n, H, W, C = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    scale = max(1, 64 // max(1, min(H, W)))
    gap = 2
    canvas = np.full((nrows * (H * scale + gap) + gap, ncols * (W * scale + gap) + gap, C), 96,
                     dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, ncols)
        tile = images[k].repeat(scale, axis=0).repeat(scale, axis=1)
        y0, x0 = gap + r * (H * scale + gap), gap + c * (W * scale + gap)
        canvas[y0:y0 + H * scale, x0:x0 + W * scale] = tile
    # RGB / RGBA as they are; any other channel count: the first channel, in grey
    img = Image.fromarray(canvas if C in (3, 4) else canvas[..., 0])
    with atomic_file(path) as f:
        img.save(f, format="PNG")


def _grid_columns(run: Run, n: int) -> int:
    """One column per label when the labels repeat with a short period, else a square."""
    if run.labels_spec == "cycle":
        period = run.num_labels
    elif run.labels_spec is not None and run.labels_spec != "random":
        period = len(run.labels_spec.split(","))
    else:
        period = 0
    return period if 2 <= period <= 20 else math.ceil(math.sqrt(n))


def _assemble(run: Run, comm: _Comm, work: Path, shards, holders: np.ndarray, hwc) -> tuple:
    """Rank 0: stream every shard, in order, into ``run.out``; the others: send rank 0 the
    shards only they hold. Returns (the first grid images, shards received)."""
    from .npz import atomic_npz
    first, received = [], 0
    grid_n = min(run.num_samples, GRID_MAX)
    if run.rank != 0:
        for j, (a, b) in enumerate(shards):
            if not holders[0, j] and int(np.argmax(holders[:, j])) == run.rank:
                comm.send(_load_shard(_shard_path(work, a, b), b - a, hwc), dst=0)
        return first, received
    with atomic_npz(run.out) as w:
        with w.stream("arr_0", (run.num_samples,) + hwc, np.uint8) as put:
            for j, (a, b) in enumerate(shards):
                if holders[0, j]:
                    x = _load_shard(_shard_path(work, a, b), b - a, hwc)
                else:
                    x = comm.recv((b - a,) + hwc, src=int(np.argmax(holders[:, j])))
                    received += 1
                put(x)
                if a < grid_n:
                    first.append(x[: grid_n - a])
        if run.labels is not None:
            w.array("arr_1", run.labels)
    return first, received


def run_job(run: Run, unet, info, coeffs) -> dict:
    """Draw this rank's share of the unfinished shards, then write ``run.out`` and
    ``run.grid`` (rank 0) and delete the shards. Returns counts and timings."""
    from .models.unet import MicroBatchedUNet
    from .npz import save_npz

    threads = torch.get_num_threads()
    if run.device.type == "cpu":
        torch.set_num_threads(1)
    else:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    comm = _Comm(run)
    try:
        key = comm.broadcast_str(run_key(run, info) if run.rank == 0 else "")
        work = run.shard_dir / key
        work.mkdir(parents=True, exist_ok=True)
        hwc = (*info.image_size, info.channels)
        shards = shard_ranges(run.num_samples, run.batch_size)

        def held() -> np.ndarray:   # [world, shards]: which rank can read which shard file
            mine = np.array([_shard_path(work, a, b).is_file() for a, b in shards], np.uint8)
            return comm.all_gather_u8(mine)

        todo = [j for j, done in enumerate(held().max(axis=0)) if not done]
        model = MicroBatchedUNet(unet, run.model_batch)
        comm.barrier()
        t0 = time.perf_counter()
        mine = todo[run.rank::run.world]
        bar = _progress(run, sum(shards[j][1] - shards[j][0] for j in mine))
        for j in mine:
            a, b = shards[j]
            x = _draw(run, model, coeffs, a, b, hwc)
            save_npz(_shard_path(work, a, b), x,
                     *([run.labels[a:b]] if run.labels is not None else []))
            bar.update(b - a)
        bar.close()
        first, received = _assemble(run, comm, work, shards, held(), hwc)
        elapsed = time.perf_counter() - t0
        if run.rank == 0 and run.grid is not None:
            images = np.concatenate(first)
            _grid_png(run.grid, images, _grid_columns(run, len(images)))
        comm.barrier()
        shutil.rmtree(work, ignore_errors=True)     # shards, and temporary files of killed runs
        with contextlib.suppress(OSError):
            run.shard_dir.rmdir()                    # only if no other run's shards are there
        comm.barrier()
        new = sum(shards[j][1] - shards[j][0] for j in todo)
        return dict(new=new, resumed=run.num_samples - new, seconds=elapsed,
                    images_per_s=new / elapsed if elapsed > 0 else float("nan"),
                    received=received, hwc=hwc, key=key)
    finally:
        comm.close()
        torch.set_num_threads(threads)


