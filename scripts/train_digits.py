"""Train the embedded default model: a class-conditional UNet2DModel on 16×16 digits.

    python scripts/train_digits.py                       # writes fused_ddpm/models/digits/

Data: the training part of scikit-learn's bundled 8×8 digits, upsampled to 16×16
(:func:`fused_ddpm.models.data.load_digits16`; the held-out part is never seen). Model: a
small diffusers ``UNet2DModel`` with a class embedding of 11 entries, the last being "no
label": labels are dropped to it with probability ``--label-dropout`` so classifier-free
guidance works. Objective: ε-prediction MSE on x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, made by
``fd.add_noise`` (cosine schedule, T = 1000). The weights written are an exponential moving
average of the trained ones.

Deterministic: every random draw comes from ``--seed`` (batches, timesteps, label dropout,
per-sample noise seeds, initial weights) and the thread count is fixed (``--threads``, default
one: CPU convolution kernels' last bits depend on it), so the same command on the same CPU
type gives the same weights, bit for bit. The shipped weights are this script's output with
its defaults. Sized for a small CPU budget: 1000 steps of batch 128 took 503 s of CPU time
on one core of a 2.8 GHz Xeon (Ice Lake) — about 8½ minutes on an otherwise idle core (28
minutes of wall time on a 2-core machine shared with other jobs, load ≈ 6.5); ``--threads 2``
is faster on an idle 2-core machine (other bits). It prints its wall and CPU time.

Output: diffusers' pipeline layout (``DDPMPipeline.save_pretrained``): ``model_index.json``,
``unet/`` (config + safetensors weights), ``scheduler/`` (the ``DDPMScheduler`` config with
the schedule and prediction type the sampler reads).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_ddpm as fd
from fused_ddpm.models.data import MODEL_DIR, NULL_CLASS, NUM_CLASSES, load_digits16

SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
PREDICTION_TYPE = "epsilon"

UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8, num_class_embeds=NUM_CLASSES + 1,
)


def train(args) -> dict:
    """Train with ``args`` (see :func:`main`) and write the pipeline to ``args.out``; returns
    the run's numbers. Restores torch's thread count and determinism setting afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(args) -> dict:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_all, y_all = load_digits16("train")
    n = x_all.shape[0]
    schedule = fd.NoiseSchedule(**SCHEDULE)
    unet = UNet2DModel(**UNET_CONFIG)
    ema = UNet2DModel(**UNET_CONFIG)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    T = schedule.num_train_timesteps
    t0, c0 = time.perf_counter(), _cpu_seconds()
    losses = []
    perm, pos = torch.randperm(n, generator=gen), 0
    for step in range(args.steps):
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(y.shape, generator=gen) < args.label_dropout] = NULL_CLASS
        t = torch.randint(0, T, (x0.shape[0],), generator=gen)
        seeds = torch.randint(0, 2 ** 62, (x0.shape[0],), generator=gen)
        x_t, target = fd.add_noise(x0, t, schedule, seeds=seeds,
                                   prediction_type=PREDICTION_TYPE)
        loss = F.mse_loss(unet(x_t, t, class_labels=y).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            print(f"step {step + 1}/{args.steps}  loss {recent:.4f}  "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0

    scheduler = DDPMScheduler(**SCHEDULE, prediction_type=PREDICTION_TYPE, clip_sample=True,
                              clip_sample_range=1.0)
    out = Path(args.out)
    DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    info = dict(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                threads=args.threads, wall_s=round(wall, 1), cpu_s=round(cpu, 1),
                load_avg_1m=round(os.getloadavg()[0], 2), final_loss=round(
                    sum(losses[-100:]) / len(losses[-100:]), 4), bytes=size,
                params=sum(p.numel() for p in ema.parameters()))
    print(json.dumps(info))
    return info


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(MODEL_DIR), help="output directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights")
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=100)
    train(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
