"""The reference trainer: kill-and-resume determinism, foreign checkpoints, CLI errors (digits)."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from prunus.errors import CheckpointError, SpecError  # noqa: E402
from prunus.training import cli  # noqa: E402
from prunus.training.trainer import TrainConfig, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(task="digits", model="mlp", method="set", sparsity="0.8", epochs=3, batch_size=64,
            options=(("delta_t", 3),))


def quiet(**kw):
    return run(TrainConfig(**{**BASE, **kw}), [0], progress=False, log=lambda s: None)


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    ref = quiet(checkpoint_dir=str(tmp_path / "ref"))
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "prunus.training.cli", "train", "--task", "digits", "--model", "mlp",
           "--method", "set", "--sparsity", "0.8", "--epochs", "3", "--batch-size", "64", "-o", "delta_t=3",
           "--checkpoint-every", "7", "--checkpoint-dir", str(ck), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while not (ck / "seed0.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL) if proc.poll() is None else None
    proc.wait()
    assert (ck / "seed0.pt").exists()
    doc = run(TrainConfig(**{**BASE, "checkpoint_every": 7, "checkpoint_dir": str(ck)}), [0], resume=True,
              progress=False, log=lambda s: None)
    assert doc["runs"][0]["masks_sha"] == ref["runs"][0]["masks_sha"]
    assert doc["accuracy"] == ref["accuracy"]
    assert [h["metric"] for h in doc["runs"][0]["history"]] == [h["metric"] for h in ref["runs"][0]["history"]]
    assert doc["train_flops"] == pytest.approx(ref["train_flops"])
    for key in ("method", "sparsity", "accuracy", "accuracy_std", "train_flops", "inference_flops"):
        assert key in doc


def test_resume_from_other_spec_is_an_error_and_writes_nothing(tmp_path):
    ck = tmp_path / "ck"
    quiet(epochs=1, checkpoint_every=5, checkpoint_dir=str(ck))
    before = (ck / "seed0.pt").read_bytes()
    with pytest.raises(CheckpointError, match="sparsity"):
        run(TrainConfig(**{**BASE, "epochs": 1, "sparsity": "0.9", "checkpoint_every": 5,
                           "checkpoint_dir": str(ck)}), [0], resume=True, progress=False, log=lambda s: None)
    with pytest.raises(CheckpointError, match="model"):
        run(TrainConfig(**{**BASE, "epochs": 1, "model": "lenet300", "checkpoint_every": 5,
                           "checkpoint_dir": str(ck)}), [0], resume=True, progress=False, log=lambda s: None)
    assert (ck / "seed0.pt").read_bytes() == before


def _args(*argv):
    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["train", *argv])


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "unknown training method"),
    (["--sparsity", "abc"], "invalid sparsity"),
    (["--method", "srste", "--sparsity", "2:4", "--allocation", "erk"], "N:M"),
    (["--sparsity", "1.0"], "keep no weight"),
    (["--task", "text", "--text-file", "/nonexistent/book.txt", "--model", "gpt-tiny"], "not found"),
    (["--model", "gpt-tiny"], "does not fit"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "r.json"
    base = ["--task", "digits", "--model", "mlp", "--method", "static", "--sparsity", "0.9", "--epochs", "1"]
    args = _args(*base, *argv, "--json", str(out), "--no-progress")
    assert cli.run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunus: error:") and message in err[0]
    assert not out.exists()


def test_cli_table_json_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = _args("--task", "digits", "--model", "lenet5", "--method", "gmp", "--sparsity", "90%",
                 "--epochs", "1", "--seeds", "2", "-o", "frequency=2", "--train-subset", "640", "--json", str(out), "--plot", str(png),
                 "--no-progress")
    assert cli.run(args) == 0
    doc = json.loads(out.read_text())
    assert doc["seeds"] == [0, 1] and doc["sparsity"] == pytest.approx(0.9, abs=2e-3)
    assert doc["inference_flops"] < 0.5 * doc["inference_flops_dense"]
    assert png.stat().st_size > 1000
    assert "gmp" in capsys.readouterr().out


def test_recipes_parse():
    for name in ("gmp_90.yaml", "rigl_80.yaml"):
        cfg, seeds = cli.config_from_args(_args("--recipe", str(ROOT / "recipes" / name)))
        assert cfg.method in ("gmp", "rigl") and seeds
    with pytest.raises(SpecError):
        cli.config_from_args(_args("--recipe", str(ROOT / "recipes" / "nope.yaml")))


def test_unquoted_2_4_recipe_trains_2_4(tmp_path, capsys):
    """YAML 1.1 reads an unquoted 2:4 as the integer 124; the one recipe loader keeps it N:M."""
    recipe = tmp_path / "srste.yaml"
    recipe.write_text("task: digits\nmodel: mlp\nmethod: srste\nsparsity: 2:4\nepochs: 1\nbatch_size: 64\n"
                      "train_subset: 256\n")
    cfg, _ = cli.config_from_args(_args("--recipe", str(recipe)))
    assert cfg.sparsity == "2:4"
    out = tmp_path / "r.json"
    assert cli.run(_args("--recipe", str(recipe), "--json", str(out), "--no-progress")) == 0
    doc = json.loads(out.read_text())
    assert doc["sparsity_spec"] == "2:4" and doc["sparsity"] == pytest.approx(0.5)
