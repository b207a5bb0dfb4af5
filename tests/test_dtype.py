"""The model's own dtype (--dtype auto|float32|bfloat16|float16): loading, fp32 statistics and solves,
weights written back in the working dtype, compact bf16 checkpoints, and the bad inputs."""

import dataclasses
import json

import pytest
import torch

import prunus
from prunus.cli import main
from prunus.core.stats import LayerStats
from prunus.errors import ModelError, SpecError
from prunus.io.dtypes import check_half_range, dtype_choice, parse_dtype_name, stored_dtype
from prunus.io.models import load_model

from conftest import make_tiny_llama

FAST = ["--nsamples", "4", "--seqlen", "32", "--windows", "4", "--quiet"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("bf16")
    make_tiny_llama(vocab_size=len(tiny_tokenizer)).to(torch.bfloat16).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def test_dtype_names():
    assert parse_dtype_name("auto") is None
    assert parse_dtype_name("bf16") is torch.bfloat16 and parse_dtype_name("Float16") is torch.float16
    assert dtype_choice("fp32") == "float32"
    with pytest.raises(SpecError, match="unknown dtype 'int8'"):
        dtype_choice("int8")


def test_auto_keeps_the_checkpoints_dtype(bf16_dir, tiny_llama_dir):
    assert stored_dtype(bf16_dir.glob("*.safetensors")) is torch.bfloat16
    model, _ = load_model(str(bf16_dir), dtype=None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_model(str(tiny_llama_dir), dtype=None)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model, _ = load_model(str(bf16_dir), dtype=torch.float32)  # the explicit dtype wins
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model, _ = load_model(str(tiny_llama_dir), dtype=torch.bfloat16)  # cast as from_pretrained casts:
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the computed rotary
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32     # frequencies stay float32
    assert model.lm_head.weight is model.model.embed_tokens.weight    # and tied weights stay tied


def test_statistics_accumulate_in_float32():
    # 1000 tokens of ones in bf16: a bf16 accumulator stalls at 256 (256 + 1 rounds back to 256)
    x = torch.ones(1000, 8, dtype=torch.bfloat16)
    st = LayerStats()
    st.add(x, frozenset({"input_sq_norm", "hessian", "input_sum"}))
    assert st.input_sq_norm.dtype == torch.float32 and st.hessian.dtype == torch.float32
    assert torch.allclose(st.input_sq_norm, torch.full((8,), 1000.0), rtol=1e-6)  # sqrt(1000)^2
    assert torch.equal(st.hessian, torch.full((8, 8), 1000.0))
    assert torch.equal(st.input_sum, torch.full((8,), 1000.0))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bf16_pruning_solves_in_float32_and_writes_bf16(method, bf16_dir, tiny_tokenizer, tiny_text,
                                                        monkeypatch, one_thread):
    from prunus import algorithms
    from prunus.io.data import calibration_windows, tokenize

    algorithms.load_all()
    seen = []
    real = algorithms.METHODS[method]

    def spy(weight, stats, *args, **kw):
        seen.append((weight.dtype, stats.input_sq_norm.dtype if stats.input_sq_norm is not None
                     else stats.hessian.dtype))
        return real.prune(weight, stats, *args, **kw)

    monkeypatch.setitem(algorithms.METHODS, method, dataclasses.replace(real, prune=spy))
    model, _ = load_model(str(bf16_dir), dtype=None)
    before = {n: p.clone() for n, p in model.named_parameters()}
    calib = calibration_windows(tokenize(tiny_text, tiny_tokenizer), 4, 32, 0)
    res = prunus.prune(model, prunus.SparsitySpec.parse("2:4"), method=method, calib=calib, progress=False)
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for name, keep in res.masks.items():
        w = model.get_submodule(name).weight
        assert torch.equal(w != 0, keep | (w != 0)) and not bool((w[~keep] != 0).any())
        if method == "wanda":  # Wanda keeps the weights it keeps: exactly the bf16 values
            assert torch.equal(w[keep], before[name + ".weight"][keep])


def test_bf16_checkpoint_is_stored_and_loaded_as_bf16(tmp_path, capsys, bf16_dir, text_files):
    calib, ev = text_files
    out = tmp_path / "out"
    code, _, err = run(capsys, "prune", bf16_dir, "--method", "wanda", "--sparsity", "50%", "--calib", calib,
                       "--eval", ev, "--out", out, "--json", tmp_path / "r.json", "--baselines", "dense", *FAST)
    assert code == 0, err
    assert "(bfloat16)" in err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["settings"]["dtype"] == "auto" and r["settings"]["working_dtype"] == "bfloat16"
    man = json.loads((out / "prunus.json").read_text())
    assert man["dtype"] == "bfloat16"
    up = man["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert up["dtype"] == "bfloat16" and up["encoding"] == "bitmask"
    model = prunus.load(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # 2 bytes per kept bf16 value + 1/8 per mask bit, less what the exponent coding saves
    dense = sum(p.numel() * 2 for p in model.parameters())
    assert (out / "model.safetensors").stat().st_size < 0.75 * dense


def test_float32_flag_overrides_a_bf16_checkpoint(tmp_path, capsys, bf16_dir, text_files):
    calib, _ = text_files
    out = tmp_path / "out"
    code, _, err = run(capsys, "prune", bf16_dir, "--method", "magnitude", "--sparsity", "50%",
                       "--dtype", "float32", "--out", out, "--no-baselines", *FAST)
    assert code == 0, err
    assert {p.dtype for p in prunus.load(out).parameters()} == {torch.float32}


def test_float16_overflow_is_refused_naming_the_layer(tmp_path, capsys, tiny_tokenizer, text_files):
    m = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[3, 5] = 1.0e5
    m.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError, match=r"model\.layers\.1\.mlp\.down_proj\.weight holds \|w\| up to 1e\+05"):
        load_model(str(tmp_path / "m"), dtype=torch.float16)
    code, _, err = run(capsys, "prune", tmp_path / "m", "--method", "magnitude", "--sparsity", "50%",
                       "--dtype", "float16", "--out", tmp_path / "o", *FAST)
    assert code == 2 and "model.layers.1.mlp.down_proj.weight" in err and "float16" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    model, _ = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)  # bf16 has the range: fine
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    check_half_range([("ok", torch.full((3,), 65504.0))], "x")  # the largest float16 is fine


def test_float16_pruning_runs(tmp_path, capsys, tiny_llama_dir, text_files):
    calib, ev = text_files
    code, _, err = run(capsys, "prune", tiny_llama_dir, "--method", "sparsegpt", "--sparsity", "2:4",
                       "--calib", calib, "--eval", ev, "--dtype", "fp16", "--out", tmp_path / "o",
                       "--baselines", "dense", *FAST)
    assert code == 0, err
    assert {p.dtype for p in prunus.load(tmp_path / "o").parameters()} == {torch.float16}


def test_bad_dtype_and_quant_specs(tmp_path, capsys, tiny_llama_dir, bf16_dir, text_files):
    code, _, err = run(capsys, "prune", tiny_llama_dir, "--sparsity", "50%", "--dtype", "int3", *FAST)
    assert code == 2 and "unknown dtype 'int3'" in err
    code, _, err = run(capsys, "prune", tiny_llama_dir, "--sparsity", "50%", "--load", "disk", *FAST)
    assert code == 2 and "unknown load 'disk'" in err
    code, _, err = run(capsys, "prune", tiny_llama_dir, "--method", "magnitude", "--sparsity", "50%+int8",
                       "--dtype", "bfloat16", *FAST)
    assert code == 2 and "--dtype float32" in err
    # auto on a bf16 checkpoint with a quant spec: worked in float32, and said so
    out = tmp_path / "q"
    code, _, err = run(capsys, "prune", bf16_dir, "--method", "magnitude", "--sparsity", "50%+int8",
                       "--out", out, "--no-baselines", *FAST)
    assert code == 0, err
    assert "working in float32" in err
