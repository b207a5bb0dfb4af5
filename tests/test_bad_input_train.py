"""Bad input to ``prunus train``, refused before any training or write: exit 2, one line
``prunus: error: ...``, no traceback, nothing left in the output folder, the inputs unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_bad_input import _case

BASE = ["train", "--task", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "64", "--no-progress"]


def _recipe(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


# (extra argv, expected message fragment); {out} is the output folder, {file} an existing plain file
CASES = [
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr=-1"], "lr must be greater than 0"),
    (["--lr", "0"], "lr must be greater than 0"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number"),
    (["--weight-decay=-1e-4"], "weight_decay must be at least 0"),
    (["--momentum=-0.5"], "momentum must be at least 0"),
    (["--momentum", "nan"], "momentum must be a finite number"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--seed=-1"], "seed must be at least 0"),
    (["--batch-size", "0"], "batch_size must be at least 1"),
    (["--probe-epochs", "nan"], "probe_epochs must be a finite number"),
    (["--probe-epochs", "0"], "probe_epochs must be greater than 0"),
    (["--checkpoint-every=-3"], "checkpoint_every must be at least 0"),
    (["--train-subset=-1"], "--train-subset must be at least 1"),
    (["--train-subset", "0"], "--train-subset must be at least 1"),
    (["--finetune-epochs=-1"], "finetune_epochs must be at least 0"),
    (["--method", "rigl", "--sparsity", "0.9", "-o", "delta_t=-5"], "delta_t must be at least 1"),
    (["--method", "rigl", "--sparsity", "0.9", "-o", "alpha=nan"], "alpha must be a finite number"),
    (["--method", "set", "--sparsity", "0.9", "-o", "end=1.5"], "end must be at most 1"),
    (["--method", "gmp", "--sparsity", "0.9", "-o", "frequency=0"], "frequency must be at least 1"),
    (["--method", "lth", "--sparsity", "0.9", "-o", "rounds=0"], "rounds must be at least 1"),
    (["--method", "lth_reinit", "--sparsity", "0.9", "-o", "rewind=-0.1"], "rewind must be at least 0"),
    (["--method", "srste", "--sparsity", "2:4", "-o", "lam=-1"], "lam must be at least 0"),
    (["--method", "pgf", "--sparsity", "2:4", "-o", "finetune=2"], "finetune must be at most 1"),
    (["--method", "random_search", "--sparsity", "0.9", "-o", "candidates=0"], "candidates must be at least 1"),
    (["--method", "sparse_ift", "--sparsity", "0.5", "-o", "delta_t=0"], "delta_t must be at least 1"),
    (["--method", "rigl", "--sparsity", "0.9", "-o", "bogus=1"], "unknown option(s) ['bogus']"),
    (["--method", "rigl", "--sparsity", "0.9", "-o", "delta_t=2.5"], "delta_t=2.5 is not an integer"),
    (["--json", "{out}"], "is a folder"),
    (["--plot", "{out}"], "is a folder"),
    (["--json", "{file}/r.json"], "is not a folder"),
    (["--checkpoint-every", "5", "--checkpoint-dir", "{file}"], "is a file"),
    (["--checkpoint-every", "5", "--checkpoint-dir", "{file}/ck"], "is not a folder"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_train_bad_flag(capsys, tmp_path, argv, message):
    out = tmp_path / "outputs"
    out.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    argv = [a.format(out=out, file=afile) for a in argv]
    extra = [] if any(a.startswith("--json") for a in argv) else ["--json", str(out / "r.json")]
    extra += [] if "--checkpoint-dir" in argv else ["--checkpoint-dir", str(out / "ck")]
    line = _case(capsys, tmp_path, [afile], [*BASE, *argv, *extra])
    assert message in line, line


RECIPES = [
    ("task: !!python/object/apply:os.system ['echo hi']\n", "recipe"),
    ("train_subset: abc\n", "train_subset='abc' is not an integer"),
    ("lr: .nan\n", "lr must be a finite number"),
    ("seeds: 0\n", "--seeds must be at least 1"),
    ("seeds: two\n", "seeds='two' is not an integer"),
    ("options: [1, 2]\nmethod: rigl\n", "options must be a mapping"),
    ("bogus: 1\n", "unknown key(s) ['bogus']"),
    ("- just\n- a list\n", "must be a mapping"),
]


@pytest.mark.parametrize("text, message", RECIPES, ids=[m for _, m in RECIPES])
def test_train_bad_recipe(capsys, tmp_path, text, message):
    out = tmp_path / "outputs"
    out.mkdir()
    recipe = _recipe(tmp_path, text)
    line = _case(capsys, tmp_path, [recipe], [*BASE, "--recipe", recipe, "--json", out / "r.json",
                                              "--checkpoint-dir", out / "ck", "--checkpoint-every", "5"])
    assert message in line, line
    assert "Traceback" not in line and "internal error" not in line


def test_diverging_run_stops_with_one_line_and_writes_nothing(capsys, tmp_path):
    """A finite but absurd learning rate: the loss turns NaN; the run stops naming the seed, epoch and step."""
    out = tmp_path / "outputs"
    out.mkdir()
    line = _case(capsys, tmp_path, [], [*BASE, "--method", "static", "--sparsity", "0.9", "--lr", "1e30",
                                        "--json", out / "r.json", "--checkpoint-dir", out / "ck",
                                        "--checkpoint-every", "1000"])
    assert "epoch 1/1 step" in line and "loss is nan" in line and "seed 0" in line, line
