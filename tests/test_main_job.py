"""The main job, ``python -m fused_ddpm.sample``, in one process: its pieces, the CLI end to
end on the embedded digits model, bad input, the fused loop against stock diffusers, and the
quality of the shipped model. Many processes and resume: tests/test_main_job_dist.py."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
import numpy as np
import pytest
import torch

import fused_ddpm as fd
from fused_ddpm import npz
from fused_ddpm.models import DEFAULT_MODEL
from fused_ddpm.models.unet import MicroBatchedUNet, find_unet, load_unet
from fused_ddpm.sample_cli import STOCK_SCHEDULERS, UsageError, class_labels, main, samplers
from fused_ddpm.sample_job import sample_seeds, to_uint8_images

from helpers import tiny_unet

# Quality bounds for the shipped digits model (20 steps, 100 samples, 10 per class), judged
# by an SVM trained on the 360 held-out digits, which itself labels the real training
# digits ~95 % right. Chance is 10 %; an undertrained model (20 training steps) scores
# ~12 %. Measured on the shipped model (trained with fd.add_noise): DDPM 0.98 without
# guidance and 0.99 with g = 3; with g = 3 every sampler scores 0.99 (DDIM, DPM-Solver++
# 2M and SDE, Euler ancestral), without guidance 0.91-0.96. The bounds leave room for other
# CPUs' last bits (different samples) and for sampling error (binomial std ≈ 1.5 points at
# 0.97 with n = 100): a model that draws the requested digit less than 4 times in 5 (9 in
# 10 with guidance) fails.
BOUND_PLAIN = 0.80
BOUND_GUIDED = 0.90
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_unet():
    unet, info = load_unet(DEFAULT_MODEL)
    return unet, info


def _files(d: Path):
    return sorted(p.name for p in d.iterdir())


# ----------------------------------------------------------------------------- npz
def test_npz_same_bytes_and_loadable(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 7, 3, 2), dtype=np.uint8)
    labels = rng.integers(0, 10, 5).astype(np.int64)
    npz.save_npz(tmp_path / "one.npz", a, labels)
    with npz.atomic_npz(tmp_path / "two.npz") as w:
        with w.stream("arr_0", a.shape, a.dtype) as put:
            put(a[:2])
            put(a[2:])
        w.array("arr_1", labels)
    one, two = (tmp_path / "one.npz").read_bytes(), (tmp_path / "two.npz").read_bytes()
    assert one == two
    with np.load(tmp_path / "one.npz") as f:
        assert f.files == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(f["arr_0"], a)
        np.testing.assert_array_equal(f["arr_1"], labels)
    for info in zipfile.ZipFile(tmp_path / "one.npz").infolist():
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.external_attr >> 16 == 0o644
    # the entries hold exactly what np.save writes
    np.save(tmp_path / "ref.npy", a)
    assert zipfile.ZipFile(tmp_path / "one.npz").read("arr_0.npy") == \
        (tmp_path / "ref.npy").read_bytes()


def test_npz_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.npz"
    with pytest.raises(ValueError, match="3 rows written, 4 declared"):
        with npz.atomic_npz(target) as w:
            with w.stream("arr_0", (4, 2), np.uint8) as put:
                put(np.zeros((3, 2), np.uint8))
    with pytest.raises(RuntimeError, match="boom"):
        with npz.atomic_npz(target) as w:
            w.array("arr_0", np.zeros(3))
            raise RuntimeError("boom")
    assert _files(tmp_path) == []
    target.write_bytes(b"old")        # an existing file survives a failed rewrite
    with pytest.raises(ValueError, match="does not fit"):
        with npz.atomic_npz(target) as w:
            with w.stream("arr_0", (4, 2), np.uint8) as put:
                put(np.zeros((1, 3), np.uint8))
    assert target.read_bytes() == b"old" and _files(tmp_path) == ["out.npz"]


# ----------------------------------------------------------------------------- seeds, labels
def test_seeds_and_labels_depend_only_on_seed_and_index():
    full = sample_seeds(7, range(20))
    assert full.dtype == torch.int64 and full.unique().numel() == 20
    assert torch.equal(sample_seeds(7, range(5, 12)), full[5:12])
    assert not torch.equal(sample_seeds(8, range(20)), full)
    digits = range(10)
    r = class_labels("random", 300, digits, seed=3)
    assert np.array_equal(class_labels("random", 40, digits, seed=3), r[:40])
    assert set(r.tolist()) == set(digits)
    assert not np.array_equal(class_labels("random", 300, digits, seed=4), r)
    assert class_labels("cycle", 12, digits, 0).tolist() == [*digits, 0, 1]
    assert class_labels("cycle", 5, [0, 2, 3], 0).tolist() == [0, 2, 3, 0, 2]  # null class 1
    assert set(class_labels("random", 100, [0, 2, 3], 0).tolist()) == {0, 2, 3}
    assert class_labels("3,1", 5, digits, 0).tolist() == [3, 1, 3, 1, 3]
    assert class_labels("10", 2, digits, 0, num_embeds=11).tolist() == [10, 10]  # null class
    with pytest.raises(UsageError, match="--class-labels"):
        class_labels("1,x", 5, digits, 0)
    with pytest.raises(UsageError, match="outside"):
        class_labels("11", 5, digits, 0, num_embeds=11)


def test_uint8_images():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0, 1.7, -3.0]).reshape(1, 1, 1, 7)
    y = to_uint8_images(torch.cat([x, x * 0 + 0.5]))
    assert y.shape == (2, 1, 7, 1) and y.dtype == np.uint8
    assert y[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 255, 0]


def test_samplers_are_the_project_methods():
    """--sampler offers exactly the step methods step_coefficients builds."""
    assert {"ddpm", "ddim"} <= set(samplers())
    sched = fd.NoiseSchedule(num_train_timesteps=10)
    for name in samplers():
        assert fd.step_coefficients(sched, method=name, num_inference_steps=2).config.method \
            == name
    with pytest.raises(ValueError):
        fd.step_coefficients(sched, method="not-a-sampler")


# ----------------------------------------------------------------------------- the model
def test_embedded_model_is_a_small_pipeline_dir():
    assert (DEFAULT_MODEL / "model_index.json").is_file()
    assert find_unet(DEFAULT_MODEL) == DEFAULT_MODEL / "unet"
    size = sum(p.stat().st_size for p in DEFAULT_MODEL.rglob("*") if p.is_file())
    assert size <= 5 * 2 ** 20


def test_model_output_does_not_depend_on_the_batch(digits_unet, one_thread):
    """Sample k's model output is the same bits whatever batch (and position) it runs in,
    and it is the UNet's output."""
    unet, _ = digits_unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(21, 1, 16, 16, generator=g)
    t = torch.randint(0, 1000, (21,), generator=g)
    y = torch.randint(0, 11, (21,), generator=g)
    model = MicroBatchedUNet(unet, micro_batch=4)
    whole = model(x, t, y)
    for parts in ([1] * 21, [3, 7, 11], [5, 16], [20, 1]):
        outs, s = [], 0
        for n in parts:
            outs.append(model(x[s:s + n], t[s:s + n], y[s:s + n]))
            s += n
        assert torch.equal(torch.cat(outs), whole), parts
    with torch.no_grad():
        direct = unet(x[:4], t[:4], class_labels=y[:4]).sample
    torch.testing.assert_close(whole[:4], direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="micro_batch"):
        MicroBatchedUNet(unet, micro_batch=0)


# ----------------------------------------------------------------------------- the CLI
def test_cli_end_to_end(tmp_path, capsys):
    out, grid = tmp_path / "s.npz", tmp_path / "g.png"
    rc = main(["--num-samples", "5", "--batch-size", "2", "--steps", "4", "--seed", "11",
               "--guidance-scale", "2", "--out", str(out), "--grid", str(grid)])
    assert rc == 0
    text = capsys.readouterr().out
    last = text.strip().splitlines()[-1]
    assert "images/s" in last and str(out) in last and str(grid) in last
    with np.load(out) as f:
        assert f.files == ["arr_0", "arr_1"]
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (5, 16, 16, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3, 4]
    assert images.std() > 10                       # pictures, not a constant
    from PIL import Image
    im = Image.open(grid)
    assert im.mode == "L" and min(im.size) >= 64
    assert _files(tmp_path) == ["g.png", "s.npz"]   # no shards or temporary files left
    # the same run again, in one batch, from the pipeline's unet/ folder: the same bytes
    rc = main(["--num-samples", "5", "--batch-size", "5", "--steps", "4", "--seed", "11",
               "--guidance-scale", "2", "--out", str(tmp_path / "t.npz"), "--grid", "",
               "--model", str(DEFAULT_MODEL / "unet")])
    assert rc == 0 and (tmp_path / "t.npz").read_bytes() == out.read_bytes()
    rc = main(["--num-samples", "5", "--steps", "4", "--seed", "12", "--guidance-scale", "2",
               "--out", str(tmp_path / "u.npz"), "--grid", ""])
    assert rc == 0 and (tmp_path / "u.npz").read_bytes() != out.read_bytes()
    # a multistep sampler with guidance and its rescale
    rc = main(["--num-samples", "3", "--steps", "4", "--sampler", "dpmsolver++",
               "--guidance-scale", "2", "--guidance-rescale", "0.5", "--out",
               str(tmp_path / "v.npz"), "--grid", ""])
    assert rc == 0
    with np.load(tmp_path / "v.npz") as f:
        assert f["arr_0"].shape == (3, 16, 16, 1) and f["arr_0"].std() > 10


def _bad(tmp_path, capsys, args, match):
    out = tmp_path / "s.npz"
    rc = main(["--out", str(out), "--grid", str(tmp_path / "g.png"), "--steps", "2",
               "--num-samples", "2", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert match in err, err
    assert _files(tmp_path) == [], "nothing may be written for bad input"


def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys):
    wrong = tmp_path.parent / (tmp_path.name + "-wrong")
    (wrong / "unet").mkdir(parents=True)
    (wrong / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    sched_only = DEFAULT_MODEL / "scheduler"
    no_unet = tmp_path.parent / (tmp_path.name + "-pipe")
    no_unet.mkdir()
    (no_unet / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    cases = [
        (["--model", str(tmp_path.parent / "no-such-model")], "--model: "),
        (["--model", str(wrong / "unet")], "UNet2DConditionModel; expected a diffusers UNet2DModel"),
        (["--model", str(sched_only)], "not a diffusers model directory"),
        (["--model", str(no_unet)], "DDPMPipeline directory without a unet/ subfolder"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--sampler", "euler"], "--sampler: unknown sampler 'euler'"),
        (["--batch-size", "0"], "--batch-size"),
        (["--steps", "5000"], "--steps 5000 exceeds"),
        (["--class-labels", "12"], "--class-labels"),
        (["--class-labels", "two"], "--class-labels"),
        (["--eta", "0.5", "--sampler", "ddpm"], "--eta"),
        (["--cuda-graph", "--device", "cpu"], "--cuda-graph needs a CUDA device"),
        (["--device", "tpu"], "--device"),
        (["--dtype", "float8"], "--dtype"),
        (["--null-class", "11"], "--null-class 11 is outside"),
        (["--null-class", "none", "--guidance-scale", "2"], "needs a null class"),
        (["--guidance-rescale", "0.5"], "--guidance-rescale needs --guidance-scale"),
        (["--guidance-scale", "2", "--guidance-rescale", "1.5"], "--guidance-rescale must be"),
        (["--eta", "0.5", "--sampler", "dpmsolver++"], "--eta applies to --sampler ddim"),
    ]
    for args, match in cases:
        _bad(tmp_path, capsys, args, match)
    rc = main(["--out", str(tmp_path / "missing-dir" / "s.npz"), "--num-samples", "1"])
    assert rc == 2 and "--out: directory" in capsys.readouterr().err
    rc = main(["--out", str(tmp_path / "s.txt"), "--num-samples", "1"])
    assert rc == 2 and "should end in .npz" in capsys.readouterr().err
    assert _files(tmp_path) == []


def test_unconditional_model(tmp_path, capsys):
    """Any UNet2DModel directory works; class options are refused for an unconditional one."""
    unet = tiny_unet()
    model_dir = tmp_path / "uncond"
    unet.save_pretrained(model_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _bad(out_dir, capsys, ["--model", str(model_dir), "--class-labels", "1"], "unconditional")
    _bad(out_dir, capsys, ["--model", str(model_dir), "--guidance-scale", "3"], "unconditional")
    rc = main(["--model", str(model_dir), "--num-samples", "3", "--steps", "3", "--sampler",
               "ddpm", "--out", str(out_dir / "s.npz"), "--grid", str(out_dir / "g.png")])
    assert rc == 0
    with np.load(out_dir / "s.npz") as f:
        assert f.files == ["arr_0"] and f["arr_0"].shape == (3, 8, 8, 3)


def test_both_spellings_in_one_process(tmp_path):
    """``fd.sample`` stays the function when the CLI module is run (runpy, as ``-m`` does)
    and when it is imported, in the same process."""
    script = textwrap.dedent(f"""
        import runpy, sys, torch
        import fused_ddpm as fd
        from fused_ddpm.sampler import sample as loop
        sched = fd.NoiseSchedule(num_train_timesteps=50)
        coeffs = fd.step_coefficients(sched, num_inference_steps=5)
        model = lambda x, t: 0.1 * x
        ref = fd.sample(model, (2, 1, 4, 4), coeffs, seeds=3, progress=False)
        sys.argv = ["fused_ddpm.sample", "--num-samples", "2", "--steps", "2",
                    "--out", {str(tmp_path / "a.npz")!r}, "--grid", ""]
        try:
            runpy.run_module("fused_ddpm.sample", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            assert e.code == 0, e.code
        assert fd.sample is loop, fd.sample
        import fused_ddpm.sample
        import fused_ddpm.sample as s
        from fused_ddpm import sample
        assert fd.sample is loop and s is loop and sample is loop
        assert torch.equal(fd.sample(model, (2, 1, 4, 4), coeffs, seeds=3, progress=False), ref)
        from fused_ddpm.sample_cli import main
        assert main(["--num-samples", "2", "--steps", "2", "--out",
                     {str(tmp_path / "b.npz")!r}, "--grid", ""]) == 0
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_python_dash_m(tmp_path, capsys):
    r = subprocess.run([sys.executable, "-m", "fused_ddpm.sample", "--num-samples", "0",
                        "--out", str(tmp_path / "s.npz")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "--num-samples must be >= 1" in r.stderr
    assert _files(tmp_path) == []
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "python -m fused_ddpm.sample" in text
    flat = "".join(text.split())                       # argparse wraps at hyphens
    for name in samplers():
        assert name in flat


# ----------------------------------------------------------------------------- vs diffusers
#: sampler -> (guidance g, rescale φ) of its comparison with stock diffusers
GUIDANCE = {"ddpm": (1.0, 0.0), "ddim": (3.0, 0.0), "dpmsolver++": (3.0, 0.7),
            "sde-dpmsolver++": (1.0, 0.0), "euler_ancestral": (2.0, 0.0)}


def test_every_sampler_has_its_stock_scheduler():
    import diffusers
    assert set(STOCK_SCHEDULERS) == set(samplers()) == set(GUIDANCE)
    for stock in STOCK_SCHEDULERS.values():
        assert isinstance(getattr(diffusers, stock.cls), type)


@pytest.mark.parametrize("sampler", sorted(GUIDANCE))
def test_fused_loop_matches_stock_diffusers(digits_unet, sampler, monkeypatch, one_thread):
    """The CLI's loop (fd.sample on the coefficients it builds from the model's scheduler
    config, guidance inside the step) and diffusers' own scheduler of the same method
    (``from_config`` of that config, guidance and its rescale formed outside), from the same
    x_T and with the same noise at every step, give the same images."""
    import diffusers

    from fused_ddpm.philox import philox_normal
    from fused_ddpm.sample_cli import scheduler_coefficients
    unet, info = digits_unet
    g, phi = GUIDANCE[sampler]
    spec = STOCK_SCHEDULERS[sampler]
    N, steps, T = 10, 20, info.scheduler_config["num_train_timesteps"]
    shape = (N, 1, 16, 16)
    seeds = sample_seeds(0, range(N))
    labels = torch.arange(N) % 10
    null = torch.full_like(labels, 10)
    coeffs = scheduler_coefficients(info.scheduler_config, sampler, steps, 0.0,
                                    torch.device("cpu"))
    guide = dict(uncond=null, guidance_scale=g, guidance_rescale=phi) if g != 1.0 else {}
    fused = fd.sample(MicroBatchedUNet(unet, micro_batch=2 * N), shape, coeffs, seeds=seeds,
                      cond=labels, progress=False, **guide)

    stock = getattr(diffusers, spec.cls).from_config(info.scheduler_config,
                                                     **spec.config_overrides)
    stock.set_timesteps(steps)
    torch.testing.assert_close(stock.timesteps.double(), coeffs.timesteps.double(),
                               rtol=1e-6, atol=1e-4)
    x = philox_normal(seeds, torch.full((N,), T), shape).float() * stock.init_noise_sigma
    current = {}
    noise = lambda *a, **k: philox_normal(seeds, torch.full((N,), current["row"]), shape,  # noqa
                                          stream=int(coeffs.noise_stream)).float()
    module = sys.modules[type(stock).__module__]
    monkeypatch.setattr(module, "randn_tensor", noise)
    with torch.no_grad():
        for i, t in enumerate(stock.timesteps):
            x_in = stock.scale_model_input(x, t)
            m_c = unet(x_in, t, class_labels=labels).sample
            m = m_c
            if g != 1.0:
                m_u = unet(x_in, t, class_labels=null).sample
                m = m_u + g * (m_c - m_u)
                if phi:      # Lin et al. 2023, eq. 15-16: towards the conditional std
                    dims = list(range(1, m.dim()))
                    m = phi * m * (m_c.std(dim=dims, keepdim=True) /
                                   m.std(dim=dims, keepdim=True)) + (1 - phi) * m
            current["row"] = int(coeffs.rows[i])
            x = stock.step(m, t, x).prev_sample
    assert (fused - x).abs().max() < 1e-4, (fused - x).abs().max()
    diff = np.abs(to_uint8_images(fused).astype(int) - to_uint8_images(x).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005


# ----------------------------------------------------------------------------- quality
def test_samples_are_the_digits_asked_for(tmp_path, record_property):
    """A classifier trained here on the held-out digits (never seen by the model's training)
    labels the model's class-conditional samples as the class they were asked for."""
    from fused_ddpm.models.data import classifier_features, digit_classifier
    clf, real = digit_classifier()
    acc = {}
    runs = [("ddpm", 1.0), ("ddpm", 3.0), ("dpmsolver++", 3.0), ("euler_ancestral", 3.0)]
    for sampler, g in runs:
        out = tmp_path / f"{sampler}-{g}.npz"
        assert main(["--num-samples", "100", "--batch-size", "100", "--steps", "20",
                     "--sampler", sampler, "--guidance-scale", str(g), "--seed", "1",
                     "--out", str(out), "--grid", "", "--no-progress"]) == 0
        with np.load(out) as f:
            images, labels = f["arr_0"], f["arr_1"]
        assert labels.tolist() == [i % 10 for i in range(100)]
        acc[sampler, g] = float((clf.predict(classifier_features(images)) == labels).mean())
    record_property("classifier_accuracy_real_digits", real)
    record_property("classifier_accuracy_samples", {f"{s} g={g:g}": a for (s, g), a in
                                                    acc.items()})
    print(f"\nclassifier accuracy: real training digits {real:.3f}; samples: " +
          ", ".join(f"{s} g={g:g} {a:.3f}" for (s, g), a in acc.items()))
    assert real > 0.9                      # the judge itself is good on real digits
    for (sampler, g), a in acc.items():
        assert a >= (BOUND_PLAIN if g == 1.0 else BOUND_GUIDED), acc


def test_training_script_makes_the_shipped_kind_of_model(tmp_path):
    """scripts/train_digits.py (a few steps here) writes a pipeline directory the sampler
    loads, with the shipped model's architecture and noise schedule."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_digits",
                                                  REPO / "scripts" / "train_digits.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    rc = script.main(["--out", str(tmp_path / "m"), "--steps", "2", "--batch-size", "8",
                      "--log-every", "1"])
    assert rc == 0 and torch.get_num_threads() == threads
    unet, new = load_unet(tmp_path / "m")
    shipped, old = load_unet(DEFAULT_MODEL)
    keys = ("sample_size", "in_channels", "out_channels", "block_out_channels",
            "down_block_types", "up_block_types", "layers_per_block", "num_class_embeds",
            "norm_num_groups")
    assert {k: unet.config[k] for k in keys} == {k: shipped.config[k] for k in keys}
    same = ("num_train_timesteps", "beta_schedule", "prediction_type", "clip_sample")
    assert {k: new.scheduler_config[k] for k in same} == \
        {k: old.scheduler_config[k] for k in same}
