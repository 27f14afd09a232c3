"""``python -m fused_ddpm.demo``: it writes its pictures, says where, explains its columns
in words, ends with a verdict, and the verdict fails when the sampler is wrong."""
import pytest
import torch

import fused_ddpm as fd
from fused_ddpm import demo
from fused_ddpm.demo import GaussianMixture

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--device", "cpu", "--samples", "600", "--steps", "50", "--unet-batch", "2",
         "--unet-steps", "4", "--repeats", "1"]


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_demo_saves_pictures_explains_columns_and_ends_with_a_verdict(tmp_path, capsys,
                                                                      threads):
    pytest.importorskip("matplotlib")
    pytest.importorskip("diffusers")
    out = tmp_path / "pics"
    assert demo.main(SMALL + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("mixture.png", "unet_samples.png"):
        p = out / name
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000, name
        assert str(p) in text                                    # says where
    assert "standard errors" in text and "worst error" in text and "|mean err|" not in text
    assert "vs reference" in text and "plain-PyTorch reference sampler" in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("verdict: OK"), last


def test_exact_draws_are_within_chance():
    gm = GaussianMixture.default()
    exact = demo.standard_errors(gm, 2000)
    for seed in range(3):
        x = gm.draw(2000, torch.Generator().manual_seed(100 + seed))
        assert demo.worst_error(demo.sample_stats(x, gm), exact) < demo.MAX_SE


def _case(pred_model: str, pred_coeffs: str, n=2000, steps=40):
    gm = GaussianMixture.default()
    coeffs = fd.step_coefficients(fd.NoiseSchedule(1000, "linear"), prediction_type=pred_coeffs,
                                  num_inference_steps=steps)
    x = fd.sample(gm.model(coeffs, pred_model), (n, gm.D), coeffs,
                  seeds=torch.arange(n), progress=False)
    st = demo.sample_stats(x, gm)
    return demo.MixtureCase(f"{pred_model} into {pred_coeffs}", x.double(), st,
                            demo.worst_error(st, demo.standard_errors(gm, n)), 0.0, 0.0)


@pytest.mark.parametrize("pred_model,pred_coeffs", [("v_prediction", "epsilon"),
                                                    ("epsilon", "sample")])
def test_verdict_fails_a_wrong_sampler(pred_model, pred_coeffs):
    """A model output read as the wrong prediction type: the statistics are far off."""
    good = _case(pred_coeffs, pred_coeffs)
    bad = _case(pred_model, pred_coeffs)
    assert good.worst_se < demo.MAX_SE and demo.verdict([good], None) == []
    assert bad.worst_se > 3 * demo.MAX_SE
    problems = demo.verdict([good, bad], None)
    assert len(problems) == 1 and bad.label in problems[0] and "standard errors" in problems[0]


def test_verdict_checks_reference_and_stock_differences():
    c = demo.MixtureCase("c", torch.zeros(1, 2), {}, 0.5, 0.5, 0.0)
    assert "reference" in demo.verdict([c], None)[0]
    c.ref_diff = float("nan")
    assert demo.verdict([c], None)                            # NaN is not a pass
    c.ref_diff = 0.0
    unet = demo.UnetResult({}, 1e-2, {})
    assert "stock" in demo.verdict([c], unet)[0]
    unet.max_diff = 1e-7
    assert demo.verdict([c], unet) == []


def test_main_exits_1_with_a_failed_verdict(monkeypatch, capsys, threads, tmp_path):
    monkeypatch.chdir(tmp_path)
    real = GaussianMixture.model

    def wrong(self, coeffs, prediction_type=None):
        return real(self, coeffs, "sample" if coeffs.config.prediction_type != "sample"
                    else "epsilon")

    monkeypatch.setattr(GaussianMixture, "model", wrong)
    assert demo.main(SMALL + ["--no-pictures"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("verdict: FAILED")
    assert list(tmp_path.iterdir()) == []                     # --no-pictures wrote nothing
