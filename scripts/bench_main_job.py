"""Images per second of the main job's sampling loop: fused vs the stock diffusers loop.

    python scripts/bench_main_job.py [--device cpu] [--num-samples 200] [--steps 50]

Both loops run the same model calls — the embedded digits UNet (or ``--model``) through the
same :class:`~fused_ddpm.models.unet.MicroBatchedUNet` wrapper, with the same micro-batch,
on the doubled batch when guided — from the same x_T, so the only difference is the sampler
step: ``fd.sample`` (fused step with guidance inside, in-kernel noise, multistep state and
timesteps on the device) against the stock diffusers scheduler of each sampler
(:data:`fused_ddpm.sample_cli.STOCK_SCHEDULERS`) with guidance formed outside, its
``scale_model_input`` and ``step`` in a Python loop. A third row times the model calls
alone. One intra-op thread on the CPU (what the CLI runs). Best of ``--repeats`` runs,
in wall time and in process CPU time (the steadier number on a shared machine). Prints a
Markdown table with the device, date, versions and load; ``--json PATH`` writes it too.
``--accuracy`` adds the quality test's classifier accuracy for every sampler, with and without
guidance.
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
from fused_ddpm.models.unet import MicroBatchedUNet, load_unet
from fused_ddpm.philox import philox_normal
from fused_ddpm.sample_cli import STOCK_SCHEDULERS, scheduler_coefficients
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
    p.add_argument("--samplers", default=None,
                   help="comma list (default: every sampler: " + ",".join(STOCK_SCHEDULERS) + ")")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--accuracy", action="store_true",
                   help="also measure the classifier accuracy of every sampler (digits model)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    unet, info = load_unet(args.model, device=device)
    C, (H, W) = info.channels, info.image_size
    T = info.scheduler_config["num_train_timesteps"]
    import diffusers

    rows = []
    samplers = args.samplers.split(",") if args.samplers else list(STOCK_SCHEDULERS)
    guided = args.guidance_scale != 1.0
    if guided and not info.conditional:
        raise SystemExit("--guidance-scale needs a class-conditional model")
    model = MicroBatchedUNet(unet, args.model_batch)
    null = info.num_class_embeds - 1 if info.conditional else None
    for sampler in samplers:
        spec = STOCK_SCHEDULERS[sampler]
        coeffs = scheduler_coefficients(info.scheduler_config, sampler, args.steps, 0.0, device)
        stock = getattr(diffusers, spec.cls).from_config(info.scheduler_config,
                                                         **spec.config_overrides)
        stock.set_timesteps(args.steps, device=device)

        def batches():
            for a in range(0, args.num_samples, args.batch_size):
                b = min(a + args.batch_size, args.num_samples)
                seeds = sample_seeds(0, range(a, b)).to(device)
                labels = ((torch.arange(a, b) % null).to(device) if info.conditional
                          else None)
                yield b - a, seeds, labels

        def fused():
            for n, seeds, labels in batches():
                guide = dict(cond=labels) if labels is not None else {}
                if guided:
                    guide.update(uncond=torch.full_like(labels, null),
                                 guidance_scale=args.guidance_scale)
                fd.sample(model, (n, C, H, W), coeffs, seeds=seeds, progress=False,
                          device=device, **guide)

        def stock_loop(model_only=False):
            for n, seeds, labels in batches():
                shape = (n, C, H, W)
                x = philox_normal(seeds.cpu(), torch.full((n,), T), shape).to(device)
                x = x * stock.init_noise_sigma
                g = torch.Generator(device=device).manual_seed(0)
                if guided:
                    labels = torch.cat([torch.full_like(labels, null), labels])
                for t in stock.timesteps:
                    x_in = stock.scale_model_input(x, t)
                    if guided:
                        x_in = torch.cat([x_in, x_in])
                    m = model(x_in, t.expand(x_in.shape[0]), labels)
                    if guided:
                        m_u, m_c = m.chunk(2)
                        m = m_u + args.guidance_scale * (m_c - m_u)
                    if not model_only:
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
    result = dict(meta=meta, rows=rows)
    if args.accuracy:
        result["accuracy"] = accuracy(args.model, samplers, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def accuracy(model: str, samplers, device: torch.device) -> dict:
    """The quality test's measurement for every sampler, with and without guidance: the
    share of 100 class-conditional samples (20 steps, seed 1, 10 per class, the CLI's
    defaults otherwise) that the held-out-digits classifier labels as the class asked for."""
    import tempfile

    import numpy as np

    from fused_ddpm.models.data import classifier_features, digit_classifier
    from fused_ddpm.sample_cli import main as cli
    clf, real = digit_classifier()
    out = dict(classifier_on_real_training_digits=round(real, 3), num_samples=100, steps=20,
               seed=1, samples={})
    print(f"\nclassifier accuracy on the real training digits: {real:.3f}\n\n"
          "| sampler | guidance | accuracy |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for sampler in samplers:
            for g in (1.0, 3.0):
                path = f"{tmp}/s.npz"
                assert cli(["--model", model, "--num-samples", "100", "--batch-size", "100",
                            "--steps", "20", "--sampler", sampler, "--guidance-scale", str(g),
                            "--seed", "1", "--device", str(device), "--out", path, "--grid",
                            "", "--no-progress"]) == 0
                with np.load(path) as f:
                    acc = float((clf.predict(classifier_features(f["arr_0"])) ==
                                 f["arr_1"]).mean())
                out["samples"][f"{sampler} g={g:g}"] = acc
                print(f"| {sampler} | {g:g} | {acc:.2f} |")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
