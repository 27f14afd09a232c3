"""The main job: draw N samples from a diffusers UNet with the fused sampler and write them out.

Run it as ``python -m fused_ddpm.sample`` (or ``torchrun --nproc_per_node=K -m
fused_ddpm.sample``); ``python -m fused_ddpm.sample --help`` lists the options. Output:
``--out samples.npz`` with ``arr_0`` uint8 ``[N, H, W, C]`` and, for class-conditional models,
``arr_1`` int64 ``[N]`` labels (improved-diffusion's format), and ``--grid`` a PNG grid.

What a sample depends on
    Sample i is a function of the run's content only — the model files, the sampler and its
    options, ``--seed``, i, ``--model-batch``, dtype and the kind of device — never of
    ``--batch-size``, of the number of processes, or of which process drew it:

    * its noise (x_T and every step's) is the fused kernel's Philox noise for a per-sample
      seed hashed from (``--seed``, i); ``--class-labels random`` hashes (``--seed``, i) too;
    * the UNet is always called on ``--model-batch`` samples (padded), because CPU
      convolution and matmul kernels change the last bits of a sample's result with the
      batch size (see :mod:`fused_ddpm.models.unet`);
    * on the CPU every process runs one intra-op thread: the convolution kernels' bits also
      depend on the thread count. Use processes for more cores (``torchrun``).

Shards, resume, many processes
    Samples are drawn in shards of ``--batch-size`` (shard j: samples [jB, (j+1)B)). Each
    finished shard is written at once, atomically, to ``<shard-dir>/<key>/`` (default
    ``<out>.shards/``), where key hashes everything a sample depends on. A rerun of the same
    command finds the finished shards and draws only the rest, with any number of processes.
    Under ``torchrun`` the unfinished shards are dealt out round-robin over the ranks (gloo
    on CPU, NCCL on GPUs; ``torch.distributed`` works the same across nodes); rank 0 then
    streams every shard, in order, into the output file — reading it from disk when it can
    see it, receiving it from a rank that holds it otherwise — so nodes need not share a
    filesystem. The output and the grid are written under a temporary name and renamed into
    place when complete; the shards are then deleted.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["main", "build_parser", "samplers", "sample_seeds", "class_labels",
           "to_uint8_images", "UsageError"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NOISE_TAG = b"fd.sample.noise"
_LABEL_TAG = b"fd.sample.label"
_MASK64 = (1 << 64) - 1
_DIST_TIMEOUT = datetime.timedelta(hours=2)   # covers the slowest rank's last shard
_GRID_MAX = 100
_FORMAT = 1                                    # bump when shard contents change meaning


class UsageError(ValueError):
    """A command-line argument is wrong; the message names it."""


def samplers() -> Tuple[str, ...]:
    """The step methods the project fuses (``--sampler`` choices)."""
    from .coefficients import METHODS
    return tuple(METHODS)


# ----------------------------------------------------------------------------- seeds, labels
def _hash64(tag: bytes, seed: int, i: int) -> int:
    digest = hashlib.blake2b(struct.pack("<QQ", seed & _MASK64, i), digest_size=8,
                             person=tag).digest()
    return int.from_bytes(digest, "little", signed=True)


def sample_seeds(seed: int, indices: Sequence[int]) -> torch.Tensor:
    """The per-sample Philox seeds (int64 ``[n]``) of samples ``indices`` of run ``seed``:
    a hash of (seed, i), so each depends on nothing else."""
    return torch.tensor([_hash64(_NOISE_TAG, seed, int(i)) for i in indices], dtype=torch.int64)


def class_labels(spec: str, n: int, num_labels: int, seed: int,
                 num_embeds: Optional[int] = None) -> np.ndarray:
    """Labels of samples 0..n−1 (int64 ``[n]``) for ``--class-labels spec``.

    ``cycle``: i mod ``num_labels``; ``random``: a hash of (seed, i) mod ``num_labels``; a comma
    list ``a,b,c``: sample i gets entry i mod (list length); entries may be any class index
    below ``num_embeds`` (the null class included: unconditional samples).
    """
    i = np.arange(n, dtype=np.int64)
    if spec == "cycle":
        return i % num_labels
    if spec == "random":
        return np.array([_hash64(_LABEL_TAG, seed, k) % num_labels for k in range(n)],
                        dtype=np.int64)
    top = num_labels if num_embeds is None else num_embeds
    try:
        values = [int(v) for v in spec.split(",")]
    except ValueError:
        raise UsageError(f"--class-labels: expected 'cycle', 'random' or a comma list of "
                         f"integers, got {spec!r}") from None
    bad = [v for v in values if not 0 <= v < top]
    if bad:
        raise UsageError(f"--class-labels: {bad} outside the model's classes 0..{top - 1}")
    return np.asarray(values, dtype=np.int64)[i % len(values)]


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Samples in [−1, 1], ``[B, C, H, W]`` → uint8 ``[B, H, W, C]`` (round to nearest)."""
    y = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_ddpm.sample",
        description="Draw samples from a diffusers UNet2DModel with the fused sampler and "
                    "write an .npz (arr_0 uint8 [N,H,W,C], arr_1 int64 labels) and a grid. "
                    "The same command under torchrun --nproc_per_node=K writes the same file.")
    p.add_argument("--model", default=None,
                   help="a diffusers UNet2DModel directory, or a pipeline directory with a "
                        "unet/ subfolder (default: the embedded 16x16 digits model)")
    p.add_argument("--num-samples", type=int, default=100, help="N (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="samples per sampling loop and per shard file (default: %(default)s)")
    p.add_argument("--sampler", default="ddpm",
                   help=f"step method, one of {', '.join(samplers())} (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50,
                   help="inference steps (default: %(default)s)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="run seed (default: %(default)s)")
    p.add_argument("--class-labels", default=None,
                   help="class-conditional models: 'cycle' (default), 'random' or a comma "
                        "list, e.g. 3 or 0,1,2")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance scale g (1: none; default: %(default)s)")
    p.add_argument("--null-class", default="last",
                   help="the class index meaning 'no label' for guidance: an integer, 'last' "
                        "(the last class embedding, default) or 'none'")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available; under torchrun "
                        "cuda means cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(_DTYPES)}")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each sampling loop in one CUDA graph (CUDA only)")
    p.add_argument("--model-batch", type=int, default=None,
                   help="samples per UNet call; part of a sample's identity (default: 16 on "
                        "CPU, 64 on CUDA)")
    p.add_argument("--out", default="samples.npz", help="output .npz (default: %(default)s)")
    p.add_argument("--grid", default="grid.png",
                   help=f"image grid of the first {_GRID_MAX} samples ('' for none; "
                        "default: %(default)s)")
    p.add_argument("--shard-dir", default=None,
                   help="where finished shards wait for the final file (default: "
                        "<out>.shards next to --out); '{rank}' in it gives every process its "
                        "own directory, e.g. on node-local disks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@dataclass
class Run:
    """A validated run: everything :func:`run` needs, fixed before any work starts."""

    model_dir: Path
    num_samples: int
    batch_size: int
    sampler: str
    steps: int
    eta: float
    seed: int
    labels_spec: Optional[str]
    guidance_scale: float
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


def _dist_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def _device(arg: Optional[str], local_rank: int, world: int) -> torch.device:
    if arg is None:
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(arg)
    except RuntimeError:
        raise UsageError(f"--device: {arg!r} is not a device (expected cpu, cuda or cuda:N)") \
            from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise UsageError(f"--device: {arg!r} is not supported (expected cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {arg}: CUDA is not available")
    if dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    elif world > 1:
        raise UsageError("--device: under torchrun pass plain 'cuda' (each rank takes "
                         "cuda:LOCAL_RANK), not a device index")
    if dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {dev}: only {torch.cuda.device_count()} CUDA devices")
    return dev


def _output_path(flag: str, value: str, suffix: str) -> Path:
    path = Path(value).expanduser().resolve()
    if path.suffix.lower() != suffix:
        raise UsageError(f"{flag}: {value!r} should end in {suffix}")
    if not path.parent.is_dir():
        raise UsageError(f"{flag}: directory {path.parent} does not exist")
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a directory")
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"{flag}: directory {path.parent} is not writable")
    return path


def parse_run(argv: Optional[Sequence[str]] = None):
    """Parse and validate ``argv``. Returns ``(run, unet, info, coeffs)``; raises
    :class:`UsageError` (or exits for ``--help``) before anything is written."""
    from .models import DEFAULT_MODEL
    from .models.unet import ModelError, load_unet

    args = build_parser().parse_args(argv)
    rank, world, local = _dist_env()
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.sampler not in samplers():
        raise UsageError(f"--sampler: unknown sampler {args.sampler!r}; expected one of "
                         f"{', '.join(samplers())}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not args.eta >= 0.0:
        raise UsageError(f"--eta must be >= 0, got {args.eta}")
    if args.eta != 0.0 and args.sampler != "ddim":
        raise UsageError(f"--eta applies to --sampler ddim only, not {args.sampler}")
    if not 0 <= args.seed < 2 ** 63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    if not math.isfinite(args.guidance_scale):
        raise UsageError(f"--guidance-scale must be finite, got {args.guidance_scale}")
    if args.dtype not in _DTYPES:
        raise UsageError(f"--dtype: unknown dtype {args.dtype!r}; expected one of "
                         f"{', '.join(_DTYPES)}")
    device = _device(args.device, local, world)
    if args.cuda_graph and device.type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA device, but --device is {device}")
    model_batch = args.model_batch if args.model_batch is not None else (
        64 if device.type == "cuda" else 16)
    if model_batch < 1:
        raise UsageError(f"--model-batch must be >= 1, got {model_batch}")
    out = _output_path("--out", args.out, ".npz")
    grid = _output_path("--grid", args.grid, ".png") if args.grid else None
    if grid is not None and grid == out:
        raise UsageError("--grid and --out name the same file")
    if args.shard_dir is None:
        shard_dir = out.with_name(out.name + ".shards")
    else:
        try:
            shard_dir = Path(args.shard_dir.format(rank=rank)).expanduser().resolve()
        except (KeyError, IndexError, ValueError):
            raise UsageError(f"--shard-dir: {args.shard_dir!r} may contain only the "
                             "placeholder {rank}") from None
    if not shard_dir.parent.is_dir():
        raise UsageError(f"--shard-dir: directory {shard_dir.parent} does not exist")

    model_dir = Path(args.model) if args.model is not None else DEFAULT_MODEL
    try:
        unet, info = load_unet(model_dir, device=device, dtype=_DTYPES[args.dtype])
    except ModelError as e:
        raise UsageError(f"--model: {e}") from None
    coeffs = _coefficients(info.scheduler_config, args.sampler, args.steps, args.eta, device,
                           learned=info.out_channels == 2 * info.channels)

    null_class: Optional[int] = None
    labels_spec = args.class_labels
    if info.conditional:
        n_embeds = info.num_class_embeds
        if args.null_class == "last":
            null_class = n_embeds - 1
        elif args.null_class == "none":
            null_class = None
        else:
            try:
                null_class = int(args.null_class)
            except ValueError:
                raise UsageError(f"--null-class: expected an integer, 'last' or 'none', got "
                                 f"{args.null_class!r}") from None
            if not 0 <= null_class < n_embeds:
                raise UsageError(f"--null-class {null_class} is outside the model's classes "
                                 f"0..{n_embeds - 1}")
        if null_class is not None and null_class != n_embeds - 1:
            raise UsageError("--null-class: only the last class embedding ('last') or 'none' "
                             "is supported")
        num_labels = n_embeds - 1 if null_class is not None else n_embeds
        if num_labels < 1:
            raise UsageError(f"--model has {n_embeds} class embedding(s), none besides the "
                             "null class")
        labels_spec = labels_spec or "cycle"
        labels = class_labels(labels_spec, args.num_samples, num_labels, args.seed, n_embeds)
        if args.guidance_scale != 1.0 and null_class is None:
            raise UsageError("--guidance-scale needs a null class (--null-class)")
    else:
        if labels_spec is not None:
            raise UsageError(f"--class-labels: the model in {info.unet_dir} is unconditional "
                             "(no class embedding)")
        if args.guidance_scale != 1.0:
            raise UsageError(f"--guidance-scale: the model in {info.unet_dir} is "
                             "unconditional; guidance needs class labels")
        labels = None
        num_labels = 0
    run = Run(model_dir=model_dir.resolve(), num_samples=args.num_samples,
              batch_size=args.batch_size, sampler=args.sampler, steps=args.steps,
              eta=args.eta, seed=args.seed, labels_spec=labels_spec,
              guidance_scale=args.guidance_scale, null_class=null_class, device=device,
              dtype=_DTYPES[args.dtype], cuda_graph=args.cuda_graph, model_batch=model_batch,
              out=out, grid=grid, shard_dir=shard_dir, progress=not args.no_progress, rank=rank, world=world,
              labels=labels, num_labels=num_labels)
    return run, unet, info, coeffs


def _coefficients(sc: Optional[dict], sampler: str, steps: int, eta: float,
                  device: torch.device, learned: bool):
    """Step coefficients from a diffusers scheduler config (diffusers' defaults for missing
    keys, DDPMScheduler's when there is no config at all)."""
    from .coefficients import step_coefficients
    from .schedule import NoiseSchedule

    sc = dict(sc or {})
    get = lambda k, d: d if sc.get(k) is None else sc[k]  # noqa: E731
    try:
        schedule = NoiseSchedule(num_train_timesteps=int(get("num_train_timesteps", 1000)),
                                 beta_schedule=get("beta_schedule", "linear"),
                                 beta_start=float(get("beta_start", 1e-4)),
                                 beta_end=float(get("beta_end", 0.02)),
                                 trained_betas=sc.get("trained_betas"),
                                 rescale_betas_zero_snr=bool(get("rescale_betas_zero_snr", False)))
        if steps > schedule.num_train_timesteps:
            raise UsageError(f"--steps {steps} exceeds the model's num_train_timesteps="
                             f"{schedule.num_train_timesteps}")
        variance = get("variance_type", "fixed_small")
        if sampler != "ddpm":
            variance = "fixed_small"
        return step_coefficients(
            schedule, method=sampler, prediction_type=get("prediction_type", "epsilon"),
            variance_type=variance,
            clip_sample_range=float(get("clip_sample_range", 1.0))
            if get("clip_sample", True) else None,
            num_inference_steps=steps, timestep_spacing=get("timestep_spacing", "leading"),
            device=device, steps_offset=int(get("steps_offset", 0)),
            thresholding=bool(get("thresholding", False)),
            dynamic_thresholding_ratio=float(get("dynamic_thresholding_ratio", 0.995)),
            sample_max_value=float(get("sample_max_value", 1.0)),
            eta=eta if sampler == "ddim" else 0.0,
            set_alpha_to_one=bool(get("set_alpha_to_one", True)))
    except UsageError:
        raise
    except (TypeError, ValueError) as e:
        raise UsageError(f"--model: its scheduler config does not give a {sampler} step: {e}") \
            from None


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
                   guidance=run.guidance_scale, null_class=run.null_class,
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
        if self.world > 1:
            import torch.distributed as dist
            self.dist = dist
            if not dist.is_initialized():
                backend = "nccl" if run.device.type == "cuda" else "gloo"
                kw = {"device_id": run.device} if run.device.type == "cuda" else {}
                dist.init_process_group(backend=backend, timeout=_DIST_TIMEOUT, **kw)
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
        if self.world > 1 and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _progress(run: Run, total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="img", desc=f"sampling ({run.sampler}, {run.steps} steps)",
                disable=(not run.progress or run.rank != 0) or None, dynamic_ncols=True)


def _draw(run: Run, model, coeffs, a: int, b: int, hwc) -> np.ndarray:
    from .sampler import sample
    H, W, C = hwc
    seeds = sample_seeds(run.seed, range(a, b)).to(run.device)
    if run.labels is not None:
        model.set_labels(torch.from_numpy(run.labels[a:b]).to(run.device))
    x = sample(model, (b - a, C, H, W), coeffs, seeds=seeds, cuda_graph=run.cuda_graph,
               progress=False, device=run.device, dtype=run.dtype)
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
    if C == 1:
        img = Image.fromarray(canvas[..., 0], mode="L")
    elif C in (3, 4):
        img = Image.fromarray(canvas, mode="RGB" if C == 3 else "RGBA")
    else:
        img = Image.fromarray(canvas[..., 0], mode="L")
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
    grid_n = min(run.num_samples, _GRID_MAX)
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
    from .models.unet import GuidedUNet
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
        model = GuidedUNet(unet, run.model_batch, run.guidance_scale, run.null_class,
                           keep_channels=info.out_channels if coeffs.config.learned_variance
                           else info.channels)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI. Returns the exit status (0 ok, 2 bad arguments)."""
    rank, world, _ = _dist_env()
    try:
        run, unet, info, coeffs = parse_run(argv)
    except UsageError as e:
        prefix = f"rank {rank}: " if world > 1 else ""
        print(f"{prefix}error: {e}", file=sys.stderr)
        return 2
    if run.rank == 0:
        where = "the embedded digits model" if run.model_dir == _default_model() else str(run.model_dir)
        g = f", guidance {run.guidance_scale:g}" if run.guidance_scale != 1.0 else ""
        print(f"fused_ddpm.sample: {run.num_samples} samples from {where} "
              f"({run.sampler}, {run.steps} steps{g}) on {run.world} x {run.device}",
              flush=True)
    stats = run_job(run, unet, info, coeffs)
    if run.rank == 0:
        H, W, C = stats["hwc"]
        shape = f"uint8 [{run.num_samples}, {H}, {W}, {C}]"
        labels = " + arr_1 int64 labels" if run.labels is not None else ""
        resumed = f", {stats['resumed']} resumed from shards" if stats["resumed"] else ""
        if stats["received"]:
            resumed += f", {stats['received']} shards received from other ranks"
        grid = f"; grid: {run.grid}" if run.grid is not None else ""
        print(f"{stats['new']} images in {stats['seconds']:.1f} s = "
              f"{stats['images_per_s']:.1f} images/s ({run.world} process(es) on "
              f"{run.device.type}{resumed}); samples: {run.out} ({shape}{labels}){grid}",
              flush=True)
    return 0


def _default_model() -> Path:
    from .models import DEFAULT_MODEL
    return DEFAULT_MODEL.resolve()
