"""The CLI end to end on a tiny random Llama, and every bad input the issue lists."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunus.cli import main

from conftest import make_tiny_llama

FAST = ["--nsamples", "4", "--seqlen", "32", "--windows", "4", "--quiet"]


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_end_to_end(tmp_path, capsys, tiny_llama_dir, text_files):
    calib, ev = text_files
    before = tree_hash(tiny_llama_dir)
    out, js, png = tmp_path / "out", tmp_path / "r.json", tmp_path / "p.png"
    code, stdout, err = run(capsys, "prune", tiny_llama_dir, "--method", "wanda", "--sparsity", "2:4",
                            "--calib", calib, "--eval", ev, "--out", out, "--json", js, "--plot", png, *FAST)
    assert code == 0, err
    for label in ("dense", "wanda", "magnitude", "random"):
        assert label in stdout
    r = json.loads(js.read_text())
    for k in ("perplexity", "sparsity", "per_layer", "seconds", "peak_rss_mb", "baselines"):
        assert k in r
    assert r["sparsity"] == pytest.approx(0.5)
    assert set(r["baselines"]) == {"dense", "magnitude", "random"}
    assert all(v["achieved"] == pytest.approx(0.5) for v in r["per_layer"].values())
    assert png.stat().st_size > 1000
    assert tree_hash(tiny_llama_dir) == before  # the input is never modified

    import prunus

    model = prunus.load(out)
    zeros = [(m.weight == 0).float().mean().item() for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert all(z == pytest.approx(0.5) for z in zeros)
    code, stdout, err = run(capsys, "eval", out, "--text", ev, "--seqlen", "32", "--windows", "4",
                            "--quiet", "--json", tmp_path / "e.json")
    assert code == 0, err
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["perplexity"] == pytest.approx(r["perplexity"], rel=1e-4)


def test_dense_format_loads_in_plain_transformers(tmp_path, capsys, tiny_llama_dir, text_files):
    from transformers import AutoModelForCausalLM

    calib, _ = text_files
    out = tmp_path / "dense"
    code, _, err = run(capsys, "prune", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5",
                       "--calib", calib, "--out", out, "--format", "dense", "--no-baselines", *FAST)
    assert code == 0, err
    m = AutoModelForCausalLM.from_pretrained(out)
    assert (m.model.layers[0].mlp.up_proj.weight == 0).float().mean().item() == pytest.approx(0.5)


def test_grid_recipe_and_overrides(tmp_path, capsys, tiny_llama_dir, text_files):
    calib, ev = text_files
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_llama_dir}\nmethod: [magnitude, wanda]\nsparsity: [0.5, 2:4]\n"
                      f"calib: {calib}\neval: {ev}\nnsamples: 4\nseqlen: 32\nwindows: 2\n")
    js = tmp_path / "g.json"
    code, stdout, err = run(capsys, "prune", "--recipe", recipe, "baselines=[dense, random]",
                            "--json", js, "--quiet")
    assert code == 0, err
    r = json.loads(js.read_text())
    labels = [(x["label"], x["spec"]) for x in r["runs"]]
    assert labels == [("dense", "-"), ("magnitude", "0.5"), ("wanda", "0.5"), ("random", "0.5"),
                      ("magnitude", "2:4"), ("wanda", "2:4"), ("random", "2:4")]
    # a dotted override reaches a method's typed options, and a wrong one is refused
    code, _, err = run(capsys, "prune", "--recipe", recipe, "method=wanda", "sparsity=0.5",
                       "method_options.blocksize=4", "--quiet")
    assert code == 2 and "unknown option" in err


def test_reconstruct_flag_and_recipe(tmp_path, capsys, tiny_llama_dir, text_files):
    calib, ev = text_files
    js = tmp_path / "r.json"
    code, stdout, err = run(capsys, "prune", tiny_llama_dir, "--method", "sparsegpt-asym", "--sparsity", "0.5",
                            "--calib", calib, "--eval", ev, "--reconstruct", "1", "--baselines", "dense",
                            "--json", js, *FAST)
    assert code == 0, err
    r = json.loads(js.read_text())
    assert [x["label"] for x in r["runs"]] == ["dense", "sparsegpt-asym+recon"]
    assert r["sparsity"] == pytest.approx(0.5)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_llama_dir}\nmethod: wanda\nsparsity: 0.5\ncalib: {calib}\n"
                      f"reconstruct: {{epochs: 1, lr: 1.0e-4, steps: 3}}\n")
    code, _, err = run(capsys, "prune", "--recipe", recipe, "--quiet")
    assert code == 2 and "reconstruct: unknown option(s) ['steps']" in err and err.count("\n") == 1


def test_list(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for name in ("magnitude", "random", "wanda", "sparsegpt", "dsnot", "uniform", "global", "erk", "owl"):
        assert name in out


def _nan_model_dir(tmp_path, tokenizer):
    d = tmp_path / "nanmodel"
    m = make_tiny_llama(len(tokenizer))
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    m.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


BAD_SPECS = ["1.5", "-0.1", "5:4", "0:4", "2:0", "abc"]


@pytest.mark.parametrize("case", BAD_SPECS + ["indivisible", "missing_model", "short_text", "nsamples0",
                                              "nan", "out_exists"])
def test_bad_input_one_line_error(tmp_path, capsys, tiny_llama_dir, tiny_tokenizer, text_files, case):
    calib, ev = text_files
    model, sparsity, extra = tiny_llama_dir, "0.5", []
    out = tmp_path / "out"
    match = None
    if case in BAD_SPECS:
        sparsity = case
    elif case == "indivisible":
        sparsity, match = "2:6", "model.layers.0.self_attn.q_proj.*not divisible by M=6"
    elif case == "missing_model":
        model, match = tmp_path / "no" / "such_model", "does not exist"
    elif case == "short_text":
        short = tmp_path / "short.txt"
        short.write_text("Too short.")
        calib, match = short, "32"
    elif case == "nsamples0":
        extra, match = ["--nsamples", "0"], "nsamples"
    elif case == "nan":
        model, match = _nan_model_dir(tmp_path, tiny_tokenizer), "model.layers.1.mlp.down_proj.*NaN"
    elif case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        match = "exists.*--overwrite"
    before = tree_hash(model) if Path(model).exists() else None
    code, stdout, err = run(capsys, "prune", model, "--method", "wanda", "--sparsity", sparsity,
                            "--calib", calib, "--eval", ev, "--out", out, *FAST, *extra)
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("prunus: error:") and "Traceback" not in err
    if match:
        import re
        assert re.search(match, last), last
    if case == "out_exists":
        assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    if before:
        assert tree_hash(model) == before


def _compressed(tmp_path, capsys, tiny_llama_dir, text_files):
    out = tmp_path / "ck"
    code, _, err = run(capsys, "prune", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5",
                       "--calib", text_files[0], "--out", out, "--no-baselines", *FAST)
    assert code == 0, err
    return out


@pytest.mark.parametrize("damage", ["truncate", "tamper"])
def test_corrupt_checkpoint_refused(tmp_path, capsys, tiny_llama_dir, text_files, damage):
    import prunus
    from prunus.errors import CheckpointError

    out = _compressed(tmp_path, capsys, tiny_llama_dir, text_files)
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-100] ^= 0xFF
        f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        prunus.load(out)
    code, _, err = run(capsys, "eval", out, "--text", text_files[1], "--seqlen", "32", "--quiet")
    assert code != 0 and err.strip().splitlines()[-1].startswith("prunus: error:")
    assert "Traceback" not in err


def test_pickle_checkpoint_refused_never_unpickled(tmp_path, capsys, text_files):
    import prunus
    from prunus.errors import PrunusError

    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    p = tmp_path / "model.bin"
    torch.save({"x": Boom()}, p)
    with pytest.raises(PrunusError, match="pickle"):
        prunus.load(p)
    code, _, err = run(capsys, "eval", p, "--text", text_files[1], "--quiet")
    assert code != 0 and "pickle" in err
    assert not marker.exists()


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).parent / "prunus"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "prunus"]
    r = subprocess.run(cmd + ["prune", "x", "--sparsity", "5:4"], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert r.stderr.strip() == "prunus: error: N:M needs 0 < N < M, got 5:4"
