"""bench's output: one colour per provider in every panel, no empty columns, and it says
where its files go. Uses the committed result file; nothing is timed."""
import copy
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import cli, report  # noqa: E402
from bench.config import PROVIDERS  # noqa: E402

RESULT = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "*.json")))[0]


@pytest.fixture
def doc():
    return report.load([RESULT])[0]


def _drawn(doc, monkeypatch, tmp_path):
    """Plot doc; return the figure instead of closing it."""
    plt = pytest.importorskip("matplotlib.pyplot")
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    assert report.plot(doc, str(tmp_path / "p.png")) is None
    return figs[0]


def test_each_provider_has_one_colour_in_every_panel_and_the_legend(doc, monkeypatch,
                                                                     tmp_path):
    from matplotlib.colors import to_hex
    fig = _drawn(doc, monkeypatch, tmp_path)
    colours = {}
    panels = 0
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        panels += 1
        for line in ax.get_lines():
            if line.get_label() in PROVIDERS:
                colours.setdefault(line.get_label(), set()).add(to_hex(line.get_color()))
    assert panels >= 2 and len(colours) >= 3
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({next(iter(c)) for c in colours.values()}) == len(colours)  # distinct
    legend = fig.legends[0]
    for text, handle in zip(legend.get_texts(), legend.legend_handles):
        if text.get_text() in colours:
            assert {to_hex(handle.get_color())} == colours[text.get_text()]


def test_loop_panel_with_fewer_providers_keeps_the_colours(doc, monkeypatch, tmp_path):
    """The panel that lacks some providers (here: the loop, without cpu) must not shift
    the others' colours."""
    from matplotlib.colors import to_hex
    d = copy.deepcopy(doc)
    d["rows"] = [r for r in d["rows"] if not (r["mode"] == "loop" and r["provider"] == "cpu")]
    fig = _drawn(d, monkeypatch, tmp_path)
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_label() in PROVIDERS:
                assert to_hex(line.get_color()) == to_hex(report.COLORS[line.get_label()])


def _blocks(text):
    """{block title: [rows of cells]} for the Markdown tables of report.table()."""
    out, title = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:]
            out[title] = []
        elif line.startswith("|") and not line.startswith("|---") and title:
            out[title].append([c.strip() for c in line.strip("|").split("|")])
    return out


@pytest.mark.parametrize("drop", [(), ("compile",), ("compile", "diffusers")])
def test_no_column_is_all_dashes(doc, drop):
    rows = [dict(r) for r in doc["rows"] if r["provider"] not in drop]
    for r in rows:                              # as if the dropped peers never ran
        for peer in drop:
            r[f"speedup_vs_{peer}"] = None
    d = dict(doc, rows=rows)
    blocks = _blocks(report.table(d))
    assert blocks
    for title, rows in blocks.items():
        head, body = rows[0], rows[1:]
        assert body, title
        for i, name in enumerate(head):
            assert any(r[i] != "-" for r in body), (title, name)
    if "compile" in drop:
        assert all("× compile" not in rows[0] for rows in blocks.values())
    else:
        assert any("× compile" in rows[0] for rows in blocks.values())


def test_says_where_files_go(tmp_path):
    args = ["--device", "cpu", "--providers", "copy", "--modes", "fwd-seeds", "--shapes",
            "1x4x8x8", "--dtypes", "fp32", "--repeats", "1", "--min-repeat-ms", "0.1",
            "--warmup-ms", "0", "--no-progress"]
    res = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "not saved: add --out DIR" in res.stderr
    res = subprocess.run([sys.executable, "-m", "bench", *args, "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    for f in tmp_path.iterdir():
        assert f"wrote {f}" in res.stderr
    assert {f.suffix for f in tmp_path.iterdir()} >= {".json"}


def test_replot_and_record_outside_a_checkout(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    j = tmp_path / "r.json"
    j.write_text(open(RESULT).read())
    assert cli.main(["--replot", str(j)]) == 0
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(report, "RESULTS_DIR", str(tmp_path / "nope"))
    assert cli.main(["--record", "--quick"]) == 2
    assert "not a source checkout" in capsys.readouterr().err


def test_help_names_the_module_it_runs_as():
    assert cli.parser().prog == "python -m bench"
    code = ("import importlib.util as u, sys\n"
            "if u.find_spec('fused_ddpm') is None: sys.exit(3)\n"
            "import fused_ddpm.bench.cli as c; print(c.parser().prog)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(ROOT), timeout=120)
    if res.returncode == 3:
        pytest.skip("fused_ddpm is not installed (the harness installs as fused_ddpm.bench)")
    assert res.stdout.strip() == "python -m fused_ddpm.bench", res.stderr[-2000:]
