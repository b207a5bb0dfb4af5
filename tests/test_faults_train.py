"""Faults in ``prunus train``: SIGKILL at random points, corrupt checkpoints.

A run killed anywhere (mid-step, mid-checkpoint, mid-JSON) and resumed with ``--resume`` writes a
``--json`` result byte-identical to an uninterrupted run's; no half-written checkpoint or JSON is
ever visible under its final name; a dead process's temporaries are gone after the next run; a
checkpoint with a flipped byte is refused as corrupt, exit 2, one line.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunus.cli import main
from prunus.errors import CheckpointError
from prunus.training.trainer.checkpoints import _verified_payload

from test_bad_input import _case

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--task", "digits", "--model", "mlp", "--method", "set", "--sparsity", "0.8", "--epochs", "3",
         "--batch-size", "64", "-o", "delta_t=3", "--checkpoint-every", "3", "--no-progress"]


def _cmd(ck: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "prunus", "train", *FLAGS, "--checkpoint-dir", str(ck), "--json", str(out),
            *(["--resume"] if resume else [])]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _final_files_whole(ck: Path, out: Path) -> None:
    """What a reader sees under the final names is complete: a verified checkpoint, parseable JSON."""
    pt = ck / "seed0.pt"
    for _ in range(3):  # a rename may land between exists() and the read; the next look is complete
        try:
            if pt.exists():
                _verified_payload(pt)
            if out.exists():
                json.loads(out.read_text())
            return
        except FileNotFoundError:
            continue


def _temporaries(*dirs: Path) -> list[str]:
    return sorted(p.name for d in dirs if d.exists() for p in d.iterdir() if ".tmp-" in p.name)


def test_sigkill_at_random_points_then_resume_is_byte_identical(tmp_path):
    seed = int(os.environ.get("PRUNUS_FAULT_SEED", "20261122"))
    rng = random.Random(seed)
    ref = tmp_path / "ref.json"
    # the uninterrupted run, in a child process like the resumed ones (same threads, same libraries)
    subprocess.run(_cmd(tmp_path / "ref-ck", ref, False), cwd=ROOT, env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck, out = tmp_path / "ck", tmp_path / "out" / "r.json"
    kills = 0
    for attempt in range(6):
        proc = subprocess.Popen(_cmd(ck, out, True), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # kill after the checkpoint has been replaced a random number of times, plus a random delay
        wait_for, seen, last = rng.randint(1, 5), 0, None
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            _final_files_whole(ck, out)
            pt = ck / "seed0.pt"
            try:
                st = pt.stat()
                cur = (st.st_ino, st.st_mtime_ns)
            except FileNotFoundError:
                cur = None
            if cur is not None and cur != last:
                seen, last = seen + 1, cur
                if seen >= wait_for:
                    time.sleep(rng.uniform(0.0, 0.05))
                    break
            time.sleep(0.005)
        if proc.poll() is None and attempt < 3:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=120)
        _final_files_whole(ck, out)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, "the run never finished"
    assert kills >= 1
    assert out.read_bytes() == ref.read_bytes(), f"resumed result differs (PRUNUS_FAULT_SEED={seed})"
    # every temporary a killed run left was removed by the next write to the same destination
    assert _temporaries(ck, out.parent) == [], f"stale temporaries (PRUNUS_FAULT_SEED={seed})"
    # and resuming a finished run again changes nothing
    assert main(_cmd(ck, out, True)[3:]) == 0
    assert out.read_bytes() == ref.read_bytes()


@pytest.fixture(scope="module")
def one_epoch_checkpoint(tmp_path_factory) -> bytes:
    ck = tmp_path_factory.mktemp("ck1")
    argv = ["train", *FLAGS[:9], "1", *FLAGS[10:], "--checkpoint-dir", str(ck)]
    assert main(argv) == 0
    return (ck / "seed0.pt").read_bytes()


@pytest.mark.parametrize("where", ["payload", "digest", "truncated"])
def test_corrupt_checkpoint_is_refused_on_resume(capsys, tmp_path, where, one_epoch_checkpoint):
    capsys.readouterr()
    ck = tmp_path / "ck"
    ck.mkdir()
    pt = ck / "seed0.pt"
    pt.write_bytes(one_epoch_checkpoint)
    raw = bytearray(pt.read_bytes())
    if where == "payload":
        i = len(raw) * 2 // 3
        raw[i] ^= 0x01
    elif where == "digest":
        i = raw.index(b"=") + 5
        raw[i] = ord("0") if raw[i] != ord("0") else ord("1")
    else:
        raw = raw[:len(raw) // 2]
    pt.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        _verified_payload(pt)
    out = tmp_path / "outputs"
    out.mkdir()
    argv = ["train", *FLAGS[:9], "1", *FLAGS[10:], "--checkpoint-dir", ck, "--resume", "--json", out / "r.json"]
    line = _case(capsys, tmp_path, [ck], argv)
    assert "corrupt" in line and "seed0.pt" in line, line
