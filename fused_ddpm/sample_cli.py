"""The main job: draw N samples from a diffusers UNet with the fused sampler and write them out.

Run it as ``python -m fused_ddpm.sample`` (or ``torchrun --nproc_per_node=K -m
fused_ddpm.sample``); ``python -m fused_ddpm.sample --help`` lists the options. Output:
``--out samples.npz`` with ``arr_0`` uint8 ``[N, H, W, C]`` and, for class-conditional models,
``arr_1`` int64 ``[N]`` labels (improved-diffusion's format), and ``--grid`` a PNG grid.

Samplers and guidance
    ``--sampler`` takes every sampler step the project fuses (:func:`samplers`), and reads the
    model's scheduler config as that method's diffusers scheduler would
    (:data:`STOCK_SCHEDULERS`: the schedule, prediction type, spacing and the options it
    knows). With ``--guidance-scale`` g ≠ 1 the UNet runs once per step on the doubled batch
    (the null class, then the requested classes) and the fused step forms the guided
    prediction, rescaled with ``--guidance-rescale``.

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
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .methods import METHODS, lookup
from .sample_job import GRID_MAX, Run, label_hash, run_job

__all__ = ["main", "build_parser", "parse_run", "samplers", "class_labels",
           "scheduler_coefficients", "StockScheduler", "STOCK_SCHEDULERS", "UsageError"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UsageError(ValueError):
    """A command-line argument is wrong; the message names it."""


def samplers() -> Tuple[str, ...]:
    """The sampler step methods the project fuses (``--sampler`` choices), from its registry
    of methods (``STEP_METHODS``: the registry's entries that sample)."""
    from .coefficients import STEP_METHODS
    return STEP_METHODS


# ----------------------------------------------------------------------------- labels
def class_labels(spec: str, n: int, classes: Sequence[int], seed: int,
                 num_embeds: Optional[int] = None) -> np.ndarray:
    """Labels of samples 0..n−1 (int64 ``[n]``) for ``--class-labels spec``.

    ``classes``: the labels ``cycle`` and ``random`` draw from (the model's classes but the
    null class). ``cycle``: sample i gets classes[i mod K]; ``random``: classes[h mod K] with
    h a hash of (seed, i); a comma list ``a,b,c``: sample i gets entry i mod (list length),
    where entries may be any class index below ``num_embeds`` (the null class included:
    unconditional samples).
    """
    i = np.arange(n, dtype=np.int64)
    pool = np.asarray(classes, dtype=np.int64)
    if spec == "cycle":
        return pool[i % len(pool)]
    if spec == "random":
        return pool[np.array([label_hash(seed, k) % len(pool) for k in range(n)], np.int64)]
    top = int(pool.max()) + 1 if num_embeds is None else num_embeds
    try:
        values = [int(v) for v in spec.split(",")]
    except ValueError:
        raise UsageError(f"--class-labels: expected 'cycle', 'random' or a comma list of "
                         f"integers, got {spec!r}") from None
    bad = [v for v in values if not 0 <= v < top]
    if bad:
        raise UsageError(f"--class-labels: {bad} outside the model's classes 0..{top - 1}")
    return np.asarray(values, dtype=np.int64)[i % len(values)]


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
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="guidance rescale phi in [0, 1] (Lin et al. 2023; needs a guidance "
                        "scale other than 1; default: %(default)s)")
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
                   help=f"image grid of the first {GRID_MAX} samples ('' for none; "
                        "default: %(default)s)")
    p.add_argument("--shard-dir", default=None,
                   help="where finished shards wait for the final file (default: "
                        "<out>.shards next to --out); '{rank}' in it gives every process its "
                        "own directory, e.g. on node-local disks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


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
    readers = [m for m in samplers() if "eta" in METHODS[m].options]
    if args.eta != 0.0 and args.sampler not in readers:
        raise UsageError(f"--eta applies to --sampler {' or '.join(readers)} only, not "
                         f"{args.sampler}")
    if not 0 <= args.seed < 2 ** 63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    if not math.isfinite(args.guidance_scale):
        raise UsageError(f"--guidance-scale must be finite, got {args.guidance_scale}")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        raise UsageError(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    if args.guidance_rescale != 0.0 and args.guidance_scale == 1.0:
        raise UsageError("--guidance-rescale needs --guidance-scale other than 1")
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
    coeffs = scheduler_coefficients(info.scheduler_config, args.sampler, args.steps, args.eta,
                                    device, learned=info.out_channels == 2 * info.channels)

    null_class: Optional[int] = None
    labels_spec = args.class_labels
    labels = None
    classes: Tuple[int, ...] = ()
    if info.conditional:
        n_embeds = info.num_class_embeds
        if args.null_class == "last":
            null_class = n_embeds - 1
        elif args.null_class != "none":
            try:
                null_class = int(args.null_class)
            except ValueError:
                raise UsageError(f"--null-class: expected an integer, 'last' or 'none', got "
                                 f"{args.null_class!r}") from None
            if not 0 <= null_class < n_embeds:
                raise UsageError(f"--null-class {null_class} is outside the model's classes "
                                 f"0..{n_embeds - 1}")
        classes = tuple(c for c in range(n_embeds) if c != null_class)
        if not classes:
            raise UsageError(f"--model has {n_embeds} class embedding(s), none besides the "
                             "null class")
        if args.guidance_scale != 1.0 and null_class is None:
            raise UsageError("--guidance-scale needs a null class (--null-class)")
        labels_spec = labels_spec or "cycle"
        labels = class_labels(labels_spec, args.num_samples, classes, args.seed, n_embeds)
    elif labels_spec is not None:
        raise UsageError(f"--class-labels: the model in {info.unet_dir} is unconditional "
                         "(no class embedding)")
    elif args.guidance_scale != 1.0:
        raise UsageError(f"--guidance-scale: the model in {info.unet_dir} is unconditional; "
                         "guidance needs class labels")
    run = Run(model_dir=model_dir.resolve(), num_samples=args.num_samples,
              batch_size=args.batch_size, sampler=args.sampler, steps=args.steps,
              eta=args.eta, seed=args.seed, labels_spec=labels_spec,
              guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
              null_class=null_class, device=device,
              dtype=_DTYPES[args.dtype], cuda_graph=args.cuda_graph, model_batch=model_batch,
              out=out, grid=grid, shard_dir=shard_dir, progress=not args.no_progress,
              rank=rank, world=world, labels=labels, num_labels=len(classes))
    return run, unet, info, coeffs


@dataclass(frozen=True)
class StockScheduler:
    """The diffusers scheduler of a sampler: the class whose ``from_config(config,
    **config_overrides)`` is the same sampler, and the x̂0 options of a scheduler config that
    class reads (the CLI reads a model's config the same way)."""

    cls: str
    config_overrides: Dict[str, object]
    x0_options: Tuple[str, ...]


STOCK_SCHEDULERS: Dict[str, StockScheduler] = {
    "ddpm": StockScheduler("DDPMScheduler", {}, ("clip_sample", "thresholding")),
    "ddim": StockScheduler("DDIMScheduler", {}, ("clip_sample", "thresholding")),
    "dpmsolver++": StockScheduler("DPMSolverMultistepScheduler",
                                  {"algorithm_type": "dpmsolver++"}, ("thresholding",)),
    "sde-dpmsolver++": StockScheduler("DPMSolverMultistepScheduler",
                                      {"algorithm_type": "sde-dpmsolver++"}, ("thresholding",)),
    "euler_ancestral": StockScheduler("EulerAncestralDiscreteScheduler", {}, ()),
}
#: sigma-spacing switches of diffusers' configs the fused tables do not build
_UNSUPPORTED_SIGMAS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                       "use_lu_lambdas")


def scheduler_coefficients(sc: Optional[dict], sampler: str, steps: int, eta: float,
                           device: torch.device, learned: bool = False):
    """The ``sampler`` step's coefficients from a diffusers scheduler config ``sc``, read as
    the diffusers scheduler of that method would read it (its defaults for missing keys,
    ``DDPMScheduler``'s schedule when there is no config at all): the schedule, prediction
    type, timestep spacing, the method's own options (e.g. ``solver_order``) and the x̂0
    options its diffusers scheduler reads (:data:`STOCK_SCHEDULERS`). ``eta``: DDIM's η.
    ``learned``: the UNet outputs 2C channels, a learned variance (the config must then name
    a learned ``variance_type``; the methods with their own σ ignore the variance half)."""
    from .coefficients import step_coefficients
    from .schedule import NoiseSchedule

    sc = dict(sc or {})
    get = lambda k, d: d if sc.get(k) is None else sc[k]  # noqa: E731
    method = lookup(METHODS, "sampler", sampler)
    x0_options = lookup(STOCK_SCHEDULERS, "sampler", sampler).x0_options
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
        unsupported = [k for k in _UNSUPPORTED_SIGMAS if sc.get(k)]
        if unsupported:
            raise UsageError(f"--model: its scheduler config sets {unsupported}, which the "
                             f"fused samplers do not build")
        variance = get("variance_type", "fixed_small")
        if learned != variance.startswith("learned"):
            raise UsageError(f"--model: the UNet's output has {'2C' if learned else 'C'} "
                             f"channels but its scheduler config says variance_type="
                             f"{variance!r}")
        if variance not in method.variance_types:
            if learned:
                raise UsageError(f"--sampler {sampler} does not take the model's "
                                 f"variance_type={variance!r}")
            variance = "fixed_small"      # a DDPM σ rule: the other methods have their own σ
        options = {k: sc[k] for k in method.options if sc.get(k) is not None}
        if "eta" in method.options:
            options["eta"] = eta
        clip = "clip_sample" in x0_options and bool(get("clip_sample", True))
        threshold = "thresholding" in x0_options and bool(get("thresholding", False))
        return step_coefficients(
            schedule, method=sampler, prediction_type=get("prediction_type", "epsilon"),
            variance_type=variance,
            clip_sample_range=float(get("clip_sample_range", 1.0)) if clip else None,
            num_inference_steps=steps, timestep_spacing=sc.get("timestep_spacing"),
            device=device, steps_offset=int(get("steps_offset", 0)),
            thresholding=threshold,
            dynamic_thresholding_ratio=float(get("dynamic_thresholding_ratio", 0.995)),
            sample_max_value=float(get("sample_max_value", 1.0)), **options)
    except UsageError:
        raise
    except (TypeError, ValueError) as e:
        raise UsageError(f"--model: its scheduler config does not give a {sampler} step: {e}") \
            from None


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
        where = ("the embedded digits model" if run.model_dir == _default_model()
                 else str(run.model_dir))
        g = f", guidance {run.guidance_scale:g}" if run.guidance_scale != 1.0 else ""
        if run.guidance_rescale:
            g += f" rescaled by {run.guidance_rescale:g}"
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
