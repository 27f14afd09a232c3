"""Images per second of the main job's sampling loop: fused vs the stock diffusers loop.

    python scripts/bench_main_job.py [--device cpu] [--num-samples 200] [--steps 50]

Both loops run the same model calls — the embedded digits UNet (or ``--model``) through the
same :class:`~fused_ddpm.models.unet.GuidedUNet` wrapper, with the same micro-batch and
guidance — from the same x_T, so the only difference is the sampler step: ``fd.sample``
(fused step, in-kernel noise, timesteps on the device) against diffusers'
``DDIMScheduler`` / ``DDPMScheduler`` ``step`` in a Python loop. A third row times the model
calls alone. One intra-op thread on the CPU (what the CLI runs). Best of ``--repeats`` runs,
in wall time and in process CPU time (the steadier number on a shared machine). Prints a
Markdown table with the device, date, versions and load; ``--json PATH`` writes it too.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

import fused_ddpm as fd
from fused_ddpm.models import DEFAULT_MODEL
from fused_ddpm.models.unet import GuidedUNet, load_unet
from fused_ddpm.philox import philox_normal
from fused_ddpm.sample_cli import scheduler_coefficients
from fused_ddpm.sample_job import sample_seeds


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--model-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    unet, info = load_unet(args.model, device=device)
    C, (H, W) = info.channels, info.image_size
    T = info.scheduler_config["num_train_timesteps"]
    from diffusers import DDIMScheduler, DDPMScheduler

    rows = []
    for sampler in ("ddim", "ddpm"):
        coeffs = scheduler_coefficients(info.scheduler_config, sampler, args.steps, 0.0, device)
        model = GuidedUNet(unet, args.model_batch, args.guidance_scale,
                           null_class=info.num_class_embeds - 1 if info.conditional else None)
        stock = (DDIMScheduler if sampler == "ddim" else DDPMScheduler).from_config(
            info.scheduler_config)
        stock.set_timesteps(args.steps)

        def batches():
            for a in range(0, args.num_samples, args.batch_size):
                b = min(a + args.batch_size, args.num_samples)
                seeds = sample_seeds(0, range(a, b)).to(device)
                if info.conditional:
                    model.set_labels((torch.arange(a, b) % (info.num_class_embeds - 1)).to(device))
                yield b - a, seeds

        def fused():
            for n, seeds in batches():
                fd.sample(model, (n, C, H, W), coeffs, seeds=seeds, progress=False,
                          device=device)

        def stock_loop(model_only=False):
            for n, seeds in batches():
                shape = (n, C, H, W)
                x = philox_normal(seeds.cpu(), torch.full((n,), T), shape).to(device)
                g = torch.Generator(device=device).manual_seed(0)
                for t in stock.timesteps:
                    m = model(x, t.to(device).expand(n))
                    if model_only:
                        continue
                    if sampler == "ddim":
                        x = stock.step(m, t, x, eta=0.0, generator=g).prev_sample
                    else:
                        x = stock.step(m, t, x, generator=g).prev_sample

        fns = {"fused fd.sample": fused, "stock diffusers loop": stock_loop,
               "model calls only": lambda: stock_loop(True)}
        for name, fn in fns.items():
            best, best_cpu = float("inf"), float("inf")
            for _ in range(args.repeats):
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                _sync(device)
                best = min(best, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
            rows.append(dict(sampler=sampler, loop=name, seconds=round(best, 3),
                             images_per_s=round(args.num_samples / best, 2),
                             cpu_seconds=round(best_cpu, 3),
                             images_per_cpu_s=round(args.num_samples / best_cpu, 2)))
    meta = dict(device=_device_name(device), date=datetime.date.today().isoformat(),
                torch=torch.__version__, fused_ddpm=fd.__version__,
                diffusers=__import__("diffusers").__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), num_samples=args.num_samples,
                batch_size=args.batch_size, model_batch=args.model_batch, steps=args.steps,
                guidance_scale=args.guidance_scale, model=args.model,
                load_avg_1m=round(os.getloadavg()[0], 2))
    print(f"{meta['device']}, {meta['date']}, torch {meta['torch']}, diffusers "
          f"{meta['diffusers']}, fused_ddpm {meta['fused_ddpm']}, {meta['threads']} thread(s), "
          f"load {meta['load_avg_1m']}")
    print(f"N={args.num_samples}, batch {args.batch_size}, model batch {args.model_batch}, "
          f"{args.steps} steps, guidance {args.guidance_scale:g}\n")
    print("| sampler | loop | wall s | images/s | process CPU s | images per CPU s |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['loop']} | {r['seconds']} | {r['images_per_s']} | "
              f"{r['cpu_seconds']} | {r['images_per_cpu_s']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
