"""``kill -9`` at random points of ``prunus prune --out``: no partial checkpoint is ever visible at the
output path, and the next run removes the temporaries the killed one left."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _cmd(model: Path, out: Path, calib: Path, ev: Path) -> list[str]:
    return [sys.executable, "-m", "prunus", "prune", str(model), "--method", "wanda", "--sparsity", "0.5",
            "--calib", str(calib), "--eval", str(ev), "--nsamples", "2", "--seqlen", "16", "--windows", "2",
            "--no-baselines", "--quiet", "--out", str(out), "--overwrite"]


def _check_visible(out: Path) -> None:
    """The output is absent or a complete checkpoint that loads."""
    if not out.exists():
        return
    import prunus

    model = prunus.load(out)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_kill9_during_prune_out(tmp_path, tiny_llama_dir, text_files):
    calib, ev = text_files
    out = tmp_path / "ck"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    t0 = time.time()
    full = subprocess.run(_cmd(tiny_llama_dir, out, calib, ev), env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    span = time.time() - t0
    rng = random.Random(0)
    killed = 0
    for attempt in range(6):
        p = subprocess.Popen(_cmd(tiny_llama_dir, out, calib, ev), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        if attempt % 2 == 0:  # at a random point of the run
            time.sleep(rng.uniform(0.2, 0.9) * span)
        else:  # while the checkpoint is being written: its hidden temporary folder exists
            while p.poll() is None and not any(q.name.startswith(".ck.tmp-") for q in tmp_path.iterdir()):
                time.sleep(0.002)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            killed += 1
        p.wait()
        _check_visible(out)
        if killed >= 3:
            break
    # the next write to the same destination removes the temporaries of the dead processes
    again = subprocess.run(_cmd(tiny_llama_dir, out, calib, ev), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    _check_visible(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ck.")] == []
