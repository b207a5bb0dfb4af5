"""Bad input to ``eval``, ``bench``, ``export`` and ``prunus.load``: refused before any work, on one line
(exit status 2), nothing left behind, inputs unchanged; and the README's export-then-eval workflow with
every layer on a sparse kernel (eval, prune and bench on the exported folder)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import prunus
from prunus.cli import main
from prunus.errors import CheckpointError, ModelError, PrunusError

from test_bad_input import _case

FAST = ["--nsamples", "2", "--seqlen", "16", "--quiet"]
BENCH = ["--tokens", "1", "--prompt-tokens", "4", "--new-tokens", "2"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_llama_dir, text_files) -> Path:
    out = tmp_path_factory.mktemp("rtbad") / "ck"
    assert main(["prune", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.9", "--calib",
                 str(text_files[0]), "--out", str(out), "--no-baselines", *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def planned(tmp_path_factory, pruned) -> Path:
    """``prunus export --runtime auto`` with a margin so small that every layer takes a sparse kernel."""
    out = tmp_path_factory.mktemp("rtplan") / "planned"
    assert main(["export", str(pruned), "--runtime", "auto", "--out", str(out), "--margin", "1e-9",
                 "--tokens", "1", "--quiet"]) == 0
    return out


def _copy(src: Path, tmp_path: Path, name: str = "in") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _drop_tensor(folder: Path, key: str = "model.layers.0.mlp.up_proj.weight") -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    state.pop(key)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------------- broken model folders

def _no_manifest(tmp_path, pruned, tiny_llama_dir):
    d = _copy(pruned, tmp_path)
    (d / "prunus.json").unlink()
    return d


def _masks_no_manifest(tmp_path, pruned, tiny_llama_dir):  # a dense-format prunus folder
    d = _copy(tiny_llama_dir, tmp_path)
    (d / "masks.safetensors").write_bytes((pruned / "model.safetensors").read_bytes()[:64])
    return d


def _missing_tensor(tmp_path, pruned, tiny_llama_dir):
    d = _copy(tiny_llama_dir, tmp_path)
    _drop_tensor(d)
    return d


def _string_plan(tmp_path, pruned, tiny_llama_dir):
    d = _copy(pruned, tmp_path)
    _edit_json(d / "prunus.json", lambda m: m["metadata"].__setitem__("kernel_plan", "fast"))
    return d


def _version_string(tmp_path, pruned, tiny_llama_dir):
    d = _copy(pruned, tmp_path)
    _edit_json(d / "prunus.json", lambda m: m.__setitem__("format_version", "2"))
    return d


def _negative_hidden(tmp_path, pruned, tiny_llama_dir):
    d = _copy(tiny_llama_dir, tmp_path)
    _edit_json(d / "config.json", lambda c: c.__setitem__("hidden_size", -5))
    return d


def _negative_hidden_prunus(tmp_path, pruned, tiny_llama_dir):
    d = _copy(pruned, tmp_path)
    _edit_json(d / "config.json", lambda c: c.__setitem__("hidden_size", -5))
    return d


def _flipped(tmp_path, pruned, tiny_llama_dir):
    d = _copy(pruned, tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    return d


def _pickle_gguf(tmp_path, pruned, tiny_llama_dir):
    f = tmp_path / "model.gguf"
    f.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    return f


BROKEN = {
    "no prunus.json": (_no_manifest, "prunus.json is missing"),
    "masks without prunus.json": (_masks_no_manifest, "prunus.json is missing"),
    "missing tensor": (_missing_tensor, "model.layers.0.mlp.up_proj.weight"),
    "kernel_plan string": (_string_plan, "malformed kernel plan"),
    "format_version '2'": (_version_string, "malformed format_version '2'"),
    "hidden_size -5": (_negative_hidden, "hidden size (-5)"),
    "hidden_size -5 prunus": (_negative_hidden_prunus, "hidden size (-5)"),
    "flipped bytes": (_flipped, "corrupt"),
    "pickle as .gguf": (_pickle_gguf, "not a GGUF file"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_eval_refuses_broken_model(capsys, tmp_path, pruned, tiny_llama_dir, text_files, case):
    make, msg = BROKEN[case]
    src = make(tmp_path, pruned, tiny_llama_dir)
    line = _case(capsys, tmp_path, [src, text_files[1]], ["eval", src, "--text", text_files[1], "--quiet"])
    assert msg in line, line
    assert "random" in line or case not in ("missing tensor",), line


@pytest.mark.parametrize("case", sorted(set(BROKEN) - {"pickle as .gguf"}))
def test_load_refuses_broken_folder(tmp_path, pruned, tiny_llama_dir, case):
    from test_cli import tree_hash

    make, msg = BROKEN[case]
    src = make(tmp_path, pruned, tiny_llama_dir)
    before = tree_hash(src)
    with pytest.raises(PrunusError) as e:
        prunus.load(src)
    assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert tree_hash(src) == before


def test_load_model_refuses_pickle_named_gguf(tmp_path, pruned, tiny_llama_dir):
    from prunus.io.models import load_model

    f = _pickle_gguf(tmp_path, pruned, tiny_llama_dir)
    with pytest.raises(ModelError, match="not a GGUF file.*pickle"):
        load_model(f)
    with pytest.raises(CheckpointError):
        prunus.load(f)


@pytest.mark.parametrize("case", ["no prunus.json", "missing tensor"])
def test_bench_and_prune_refuse_random_weights(capsys, tmp_path, pruned, tiny_llama_dir, text_files, case):
    make, msg = BROKEN[case]
    src = make(tmp_path, pruned, tiny_llama_dir)
    out = tmp_path / "outputs"
    line = _case(capsys, tmp_path, [src], ["bench", src, *BENCH, "--json", out / "b.json", "--quiet"])
    assert msg in line, line
    line = _case(capsys, tmp_path, [src, text_files[0]],
                 ["prune", src, "--sparsity", "0.5", "--calib", text_files[0], "--no-baselines", "--out",
                  out / "ck", *FAST])
    assert msg in line, line


# ------------------------------------------------------------------------------- bad numbers/paths

BENCH_BAD = [
    (["--prompt-tokens", "0"], "prompt_tokens must be at least 1"),
    (["--new-tokens", "-1"], "new_tokens must be at least 1"),
    (["--new-tokens", "0"], "new_tokens must be at least 1"),
    (["--tokens", "0"], "--tokens must be positive"),
    (["--threads", "0"], "threads must be at least 1"),
    (["--device", "tpu9"], "device 'tpu9'"),
    (["--json", "/proc/prunus-test.json"], "cannot write to /proc"),
    (["--json", "{out}"], "is a folder"),
]


@pytest.mark.parametrize("extra,msg", BENCH_BAD, ids=[" ".join(c[0]) for c in BENCH_BAD])
def test_bench_refuses(capsys, tmp_path, pruned, extra, msg):
    out = tmp_path / "outputs"
    extra = [a.replace("{out}", str(out)) for a in extra]
    line = _case(capsys, tmp_path, [pruned], ["bench", pruned, *BENCH, *extra, "--quiet"])
    assert msg in line, line


EXPORT_BAD = [
    (["--margin", "nan"], "margin must be a finite number"),
    (["--margin", "inf"], "margin must be a finite number"),
    (["--margin", "0"], "margin must be greater than 0"),
    (["--tokens", "0"], "--tokens must be positive"),
    (["--tokens", "1,x"], "--tokens must be comma-separated integers"),
    (["--threads", "0"], "threads must be at least 1"),
    (["--device", "tpu9"], "device 'tpu9'"),
    (["--out", "/proc/prunus-test"], "cannot write to /proc"),
]


@pytest.mark.parametrize("extra,msg", EXPORT_BAD, ids=[" ".join(c[0]) for c in EXPORT_BAD])
def test_export_refuses(capsys, tmp_path, pruned, extra, msg):
    argv = ["export", pruned, "--runtime", "auto", "--out", tmp_path / "outputs" / "x", *extra, "--quiet"]
    line = _case(capsys, tmp_path, [pruned], argv)
    assert msg in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("cmd", ["eval", "bench", "export"])
def test_cuda_absent(capsys, tmp_path, pruned, text_files, cmd):
    extra = {"eval": ["--text", text_files[1]], "bench": BENCH,
             "export": ["--out", tmp_path / "outputs" / "x"]}[cmd]
    line = _case(capsys, tmp_path, [pruned], [cmd, pruned, *extra, "--device", "cuda", "--quiet"])
    assert "CUDA is not available" in line, line


def test_eval_refuses_bad_device(capsys, tmp_path, tiny_llama_dir, text_files):
    line = _case(capsys, tmp_path, [tiny_llama_dir], ["eval", tiny_llama_dir, "--text", text_files[1],
                                                      "--device", "tpu9", "--quiet"])
    assert "device 'tpu9'" in line, line


def test_check_device():
    from prunus.io.models import check_device

    assert check_device("cpu") == torch.device("cpu")
    for bad in ("tpu9", "gpu", "xla"):
        with pytest.raises(ModelError, match="device"):
            check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            check_device("cuda")


# ------------------------------------------------------------------------------------ disk full

def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_export_disk_full(capsys, tmp_path, pruned, monkeypatch):
    from prunus.export.formats import compressed

    monkeypatch.setattr(compressed, "save_file", _enospc)
    line = _case(capsys, tmp_path, [pruned], ["export", pruned, "--runtime", "dense", "--out",
                                              tmp_path / "outputs" / "deep" / "x", "--quiet"])
    assert "No space left on device" in line and "nothing was written" in line, line


def test_atomic_writers_disk_full(tmp_path, monkeypatch):
    from prunus.io import fsutil

    monkeypatch.setattr(Path, "write_text", _enospc)
    with pytest.raises(fsutil.WriteError, match="No space left on device") as e:
        fsutil.write_text(tmp_path / "new" / "r.json", "{}")
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    with pytest.raises(PrunusError, match="No space"):
        with fsutil.atomic_dir(tmp_path / "ck") as tmp:
            (tmp / "a").write_text("x")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------- the README workflow, all layers sparse

def test_export_then_eval_prune_bench(capsys, tmp_path, pruned, planned, text_files):
    from prunus.core.targets import select
    from prunus.evaluate import count_zeros
    from prunus.export import read_metadata
    from prunus.kernels import SparseLinear

    layers = read_metadata(planned)["kernel_plan"]["layers"]
    assert layers and all(layer["kernel"] != "dense" for layer in layers)
    model = prunus.load(planned)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == len(layers)
    for m in sparse:
        assert tuple(m.weight.shape) == (m.out_features, m.in_features)
    dense = prunus.load(planned, runtime="dense")
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            torch.testing.assert_close(m.weight, dense.get_submodule(name).weight * (m.weight != 0))
    targets = select(model)
    # the plan also covers the unpruned (tied) output head, which is no pruning target
    assert len(targets) == len([layer for layer in layers if layer["name"] != "lm_head"])
    assert "lm_head" in {layer["name"] for layer in layers}
    z, n = count_zeros(model)
    assert abs(z / n - 0.9) < 0.01
    with pytest.raises(PrunusError, match="read-only"):
        targets[0].set(targets[0].get())

    ev = text_files[1]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", str(pruned), "--text", str(ev), "--seqlen", "16", "--windows", "2", "--quiet",
                 "--json", str(a)]) == 0
    assert main(["eval", str(planned), "--text", str(ev), "--seqlen", "16", "--windows", "2", "--quiet",
                 "--json", str(b)]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert rb["perplexity"] == pytest.approx(ra["perplexity"], rel=1e-4)
    assert rb["sparsity"] == pytest.approx(ra["sparsity"]) and rb["sparsity"] > 0.85

    again = tmp_path / "again"
    assert main(["prune", str(planned), "--method", "magnitude", "--sparsity", "0.95", "--calib",
                 str(text_files[0]), "--out", str(again), "--no-baselines", *FAST]) == 0
    z, n = count_zeros(prunus.load(again))
    assert abs(z / n - 0.95) < 0.01

    js = tmp_path / "bench.json"
    assert main(["bench", str(planned), *BENCH, "--json", str(js), "--quiet"]) == 0
    r = json.loads(js.read_text())
    assert len({row["layer"] for row in r["layers"]}) == len(layers)
    assert r["end_to_end"]["planned"]["decode_tok_s"] > 0
    capsys.readouterr()
