"""The main job across processes: ``torchrun --nproc_per_node=K -m fused_ddpm.sample`` writes
the same file, byte for byte, for every K and batch size (gloo on the CPU), with and without
a shared shard directory, and a killed run resumes to the same file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# A few samples, few steps: the point is the bytes, not the pictures. Guidance and random
# labels put both hashed streams (noise and labels) and the doubled model batch in play.
COMMON = ["--num-samples", "7", "--steps", "10", "--seed", "5", "--guidance-scale", "2",
          "--class-labels", "random", "--model-batch", "4", "--grid", "", "--no-progress"]
TIMEOUT = 600


def _env():
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


def _cmd(nproc, args):
    if nproc is None:
        return [sys.executable, "-m", "fused_ddpm.sample", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "fused_ddpm.sample", *args]


def _run(nproc, args):
    r = subprocess.run(_cmd(nproc, args), capture_output=True, text=True, timeout=TIMEOUT,
                       env=_env())
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, one batch."""
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    _run(None, COMMON + ["--batch-size", "7", "--out", str(out)])
    return out.read_bytes()


@pytest.mark.parametrize("nproc,batch", [(1, 2), (2, 3), (3, 2)])
def test_torchrun_same_bytes(tmp_path, reference, nproc, batch):
    out = tmp_path / "s.npz"
    text = _run(nproc, COMMON + ["--batch-size", str(batch), "--out", str(out)])
    assert f"{nproc} process(es)" in text
    assert out.read_bytes() == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_torchrun_without_a_shared_shard_dir(tmp_path, reference):
    """Each rank keeps its shards in its own directory: rank 0 receives the others' shards
    over torch.distributed instead of reading them."""
    out = tmp_path / "s.npz"
    text = _run(3, COMMON + ["--batch-size", "1", "--out", str(out),
                      "--shard-dir", str(tmp_path / "shards-{rank}")])
    assert "shards received from other ranks" in text
    assert out.read_bytes() == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_killed_run_resumes_to_the_same_file(tmp_path, reference):
    out = tmp_path / "s.npz"
    shards = tmp_path / "s.npz.shards"
    args = COMMON + ["--batch-size", "1", "--out", str(out)]
    proc = subprocess.Popen(_cmd(None, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(shards.glob("*/*.npz"))) >= 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    done = len(list(shards.glob("*/*.npz")))
    assert 2 <= done < 7
    assert not out.exists(), "a killed run must not leave a file under the final name"
    text = _run(2, args)                 # resumed by a different number of processes
    assert f"{done} resumed from shards" in text
    assert out.read_bytes() == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]
