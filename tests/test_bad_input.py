"""Bad input, refused before any work: exit status 2, one line ``prunus: error: ...``, no traceback,
nothing left behind in the output folder, and the inputs unchanged (hashed before and after)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prunus.cli import main

from test_cli import tree_hash

FAST = ["--nsamples", "2", "--seqlen", "16", "--windows", "2", "--quiet"]


def _case(capsys, tmp_path: Path, inputs: list[Path], argv: list[str]) -> str:
    out = tmp_path / "outputs"
    out.mkdir(exist_ok=True)
    before = {p: tree_hash(p) if p.is_dir() else p.read_bytes() for p in inputs}
    capsys.readouterr()  # what the test's own setup printed
    code = main([str(a) for a in argv])
    o, err = capsys.readouterr()
    assert code == 2, (argv, o, err)
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("prunus: error: ")]
    # one error line, last; a log line of work done before the fault (``loaded MODEL``) may precede it
    assert len(errors) == 1 and lines[-1] == errors[0] and len(lines) <= 2, err
    assert "Traceback" not in err and "Error:" not in errors[0].split("prunus: error: ", 1)[1][:40], err
    lines = errors
    assert sorted(os.listdir(out)) == [], f"left behind: {os.listdir(out)}"
    for p, h in before.items():
        assert (tree_hash(p) if p.is_dir() else p.read_bytes()) == h, f"{p} changed"
    return lines[0]


# (extra argv after "prune MODEL", expected message fragment); {out} is the output folder
PRUNE = [
    (["--method", "", "--sparsity", "0.5"], "--method needs"),
    (["--sparsity", ""], "--sparsity needs"),
    (["--sparsity", ","], "--sparsity needs"),
    (["--sparsity", "1.5"], "sparsity"),
    (["--sparsity", "5:4"], "N:M"),
    (["--sparsity", "0.5", "--method", "nope"], "unknown method 'nope'"),
    (["--sparsity", "0.5", "--refine", "nope"], "unknown refiner"),
    (["--sparsity", "0.5", "--allocation", "nope"], "unknown allocation 'nope'"),
    (["--sparsity", "2:4", "--allocation", "owl"], "allocation"),
    (["--sparsity", "0.5", "--step", "nope"], "unknown block step 'nope'"),
    (["--sparsity", "0.5", "--calib-batch-size", "0"], "calib_batch_size must be at least 1"),
    (["--sparsity", "0.5", "--calib-batch-size", "-1"], "calib_batch_size must be at least 1"),
    (["--sparsity", "0.5", "--batch-size", "-1"], "eval_batch_size must be at least 1"),
    (["--sparsity", "0.5", "--seqlen", "1"], "seqlen must be at least 2"),
    (["--sparsity", "0.5", "--nsamples", "0"], "nsamples must be at least 1"),
    (["--sparsity", "0.5", "--windows", "0"], "windows must be at least 1"),
    (["--sparsity", "0.5", "--seed", "-1"], "seed must be at least 0"),
    (["calib_batch_size=2.7", "--sparsity", "0.5"], "calib_batch_size=2.7 is not an integer"),
    (["seed=true", "--sparsity", "0.5"], "seed=True is not an integer"),
    (["reconstruct.lr=.nan", "--sparsity", "0.5"], "lr must be a finite number"),
    (["reconstruct.lr=-1", "--sparsity", "0.5"], "lr must be greater than 0"),
    (["reconstruct.epochs=-2", "--sparsity", "0.5"], "epochs must be at least 0"),
    (["reconstruct.bogus=1", "--sparsity", "0.5"], "unknown option(s) ['bogus']"),
    (["reconstruct=3", "--sparsity", "0.5"], "reconstruct must be a mapping"),
    (["method_options=hello", "--sparsity", "0.5"], "method_options must be a mapping"),
    (["method_options.blocksize=abc", "--method", "sparsegpt", "--sparsity", "0.5"], "not an integer"),
    (["method_options.nope=1", "--method", "sparsegpt", "--sparsity", "0.5"], "unknown option(s) ['nope']"),
    (["allocation_options.lam=.inf", "--allocation", "owl", "--sparsity", "0.5"], "finite"),
    (["refine_options=[1]", "--refine", "dsnot", "--sparsity", "0.5"], "refine_options must be a mapping"),
    (["out=[a, b]", "--sparsity", "0.5"], "is not a string"),
    (["steps=5", "--sparsity", "0.5"], "steps must map"),
    (["bogus_key=1", "--sparsity", "0.5"], "unknown setting(s) ['bogus_key']"),
    (["--sparsity", "0.5", "--out", ""], "--out needs a path"),
    (["--sparsity", "0.5", "--json", ""], "--json needs a path"),
    (["--sparsity", "0.5", "--json", "/proc/prunus-test.json"], "cannot write to /proc"),
    (["--sparsity", "0.5", "--plot", "/proc/prunus-test.png"], "cannot write to /proc"),
    (["--sparsity", "0.5", "--out", "/proc/prunus-test"], "cannot write to /proc"),
    (["--sparsity", "0.5", "--json", "{out}"], "is a folder"),
    (["--sparsity", "0.5,2:4", "--out", "{out}/ck"], "--out saves one model"),
    (["--sparsity", "0.5", "--format", "zip"], "unknown format 'zip'; choose compressed or dense"),
    (["--sparsity", "0.5", "--baselines", "dense,nope"], "unknown baseline"),
    (["--sparsity", "0.5", "--device", "tpu9"], "tpu9"),
    (["--sparsity", "0.5", "--device", "cuda:7"], "cuda"),
    (["--sparsity", "2:4", "--method", "sparsegpt", "--refine", "dsnot", "refine_options.nope=1"], "unknown option"),
]


@pytest.mark.parametrize("extra,msg", PRUNE, ids=[" ".join(c[0])[:60] for c in PRUNE])
def test_prune_refuses(capsys, tmp_path, tiny_llama_dir, text_files, extra, msg):
    calib, ev = text_files
    out = tmp_path / "outputs"
    extra = [a.replace("{out}", str(out)) for a in extra]
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]  # positional, before the flags
    flags = [a for a in extra if a not in overrides]
    argv = ["prune", tiny_llama_dir, *overrides, "--calib", calib, "--eval", ev, *FAST, *flags]
    line = _case(capsys, tmp_path, [tiny_llama_dir, calib, ev], argv)
    assert msg in line, line


EVAL = [
    (["--seqlen", "1"], "--seqlen must be at least 2"),
    (["--windows", "0"], "--windows must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--json", "/proc/prunus-test.json"], "cannot write to /proc"),
]


@pytest.mark.parametrize("extra,msg", EVAL, ids=[" ".join(c[0]) for c in EVAL])
def test_eval_refuses(capsys, tmp_path, tiny_llama_dir, text_files, extra, msg):
    _, ev = text_files
    line = _case(capsys, tmp_path, [tiny_llama_dir, ev], ["eval", tiny_llama_dir, "--text", ev, *extra, "--quiet"])
    assert msg in line, line


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    from prunus.io import fsutil

    dest = tmp_path / "ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    stale = tmp_path / f".ckpt.tmp-{dead}-0123456789ab"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".ckpt.tmp-{os.getppid()}-0123456789ab"  # a live process: left alone
    live.mkdir()
    other = tmp_path / ".other.tmp-1-0123456789ab"  # another destination: left alone
    other.mkdir()
    with fsutil.atomic_dir(dest) as tmp:
        (tmp / "a").write_text("new")
    assert not stale.exists() and live.exists() and other.exists()
    assert (dest / "a").read_text() == "new"


def test_nan_in_a_tensor_that_is_not_pruned(capsys, tmp_path, tiny_tokenizer, text_files):
    import torch

    from conftest import make_tiny_llama

    d = tmp_path / "nan_norm"
    m = make_tiny_llama(len(tiny_tokenizer))
    with torch.no_grad():
        m.model.layers[0].post_attention_layernorm.weight[3] = float("nan")
    m.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    calib, ev = text_files
    line = _case(capsys, tmp_path, [d, calib, ev], ["prune", d, "--sparsity", "0.5", "--calib", calib,
                                                    "--eval", ev, "--out", tmp_path / "outputs" / "ck", *FAST])
    assert "model.layers.0.post_attention_layernorm.weight (1)" in line and "NaN" in line, line
    from prunus import prune
    from prunus.core.spec import SparsitySpec
    from prunus.errors import ModelError

    with pytest.raises(ModelError, match="post_attention_layernorm"):
        prune(m, SparsitySpec.parse("0.5"), "magnitude", progress=False)


@pytest.mark.parametrize("method,threads_free", [("magnitude", True), ("wanda", True), ("ria", True), ("sparsegpt", False)])
def test_determinism_contract(tiny_tokenizer, method, threads_free):
    """Same seed and thread count: identical masks, for every method. Across thread counts only the
    score-then-select methods are identical (SparseGPT's float32 Hessian sums depend on the BLAS
    thread split; README, Determinism)."""
    import torch

    import prunus
    from conftest import make_text, make_tiny_llama

    ids = torch.tensor(tiny_tokenizer(make_text(seed=2))["input_ids"][:8 * 32]).reshape(8, 32)
    n = torch.get_num_threads()
    got = []
    try:
        for th in (1, 1, 2):
            torch.set_num_threads(th)
            model = make_tiny_llama(len(tiny_tokenizer))
            got.append(prunus.prune(model, prunus.SparsitySpec.parse("2:4"), method, ids, progress=False,
                                    seed=1).masks)
    finally:
        torch.set_num_threads(n)
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    assert same(got[0], got[1])
    if threads_free:
        assert same(got[0], got[2])
