"""``prunus export --runtime auto`` on a checkpoint with activation sparsity: the metadata is kept,
the gated layers are planned on inputs with their zeros when the loader attaches the gates (the
contract with prunus.activation, simulated here by tests/actgate.py), and a warning says so when
it does not; the exported model, gates attached after its plan, computes what gate-then-dense does."""

import pytest
import torch
from torch import nn

from actgate import attach

GATED = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


@pytest.fixture
def checkpoint(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_llama
    from prunus import export

    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.endswith("mlp.up_proj"):
            keep = torch.rand_like(m.weight) > 0.5
            m.weight.data *= keep
            masks[name] = keep
    layers = {f"model.layers.{i}.{n}": {"threshold": 0.5, "sparsity": 0.38, "scale": "none"}
              for i in range(2) for n in GATED}
    meta = {"activation_sparsity": {"method": "teal", "target": 0.38, "layers": layers}}
    ck = tmp_path / "ck"
    export.save(model, ck, masks=masks, metadata=meta, tokenizer=tiny_tokenizer)
    return ck, meta


def _attach_from(model, meta):
    for fqn, g in meta["activation_sparsity"]["layers"].items():
        attach(model.get_submodule(fqn), g["threshold"], g["sparsity"], g["scale"])
    return model


def test_export_keeps_the_metadata_and_attaches_the_gates(tmp_path, checkpoint, monkeypatch):
    from prunus.export import read_metadata
    from prunus.kernels import runtime
    from prunus.kernels.runtime import export_runtime

    ck, meta = checkpoint
    lines = []
    export_runtime(str(ck), str(tmp_path / "out"), runtime="dense", log=lines.append)
    assert read_metadata(tmp_path / "out")["activation_sparsity"] == meta["activation_sparsity"]
    assert not any("no layer has a gate attached" in line for line in lines)  # load attached them
    # a model loaded without its gates is planned on dense inputs, and the run says so
    real = runtime.load_checkpoint
    monkeypatch.setattr(runtime, "load_checkpoint", lambda path, **kw: real(path, **{**kw, "activation": False}))
    lines.clear()
    export_runtime(str(ck), str(tmp_path / "out2"), runtime="dense", log=lines.append)
    assert any("no layer has a gate attached" in line for line in lines)


def test_export_plans_gated_layers_and_the_model_computes_gate_then_dense(tmp_path, checkpoint, monkeypatch):
    import prunus
    from prunus import export
    from prunus.kernels import runtime
    from prunus.kernels.plans import PLAN_KEY, Plan

    ck, meta = checkpoint
    real = runtime.load_checkpoint
    monkeypatch.setattr(runtime, "load_checkpoint", lambda path, **kw: _attach_from(real(path, **kw), meta))
    lines = []
    _, plan = runtime.export_runtime(str(ck), str(tmp_path / "out"), tokens=[1], margin=1e-9, threads=1,
                                     log=lines.append)
    gated = {layer.name: layer for layer in plan.layers if layer.input_sparsity}
    assert set(gated) == set(meta["activation_sparsity"]["layers"])
    assert all(layer.input_sparsity == 0.38 and any(t.kernel.startswith(("cpu_skip", "torch_skip"))
                                                    for t in layer.timings) for layer in gated.values())
    stored = export.read_metadata(tmp_path / "out")
    assert stored["activation_sparsity"] == meta["activation_sparsity"] and Plan.from_dict(stored[PLAN_KEY]) == plan
    assert not any("no layer has a gate" in line for line in lines)
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        want = _attach_from(export.load(ck), meta)(input_ids=ids).logits
        model = _attach_from(prunus.load(tmp_path / "out"), meta)  # the plan first, then the gates
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        out = model(input_ids=ids[:, :5], use_cache=True)  # prefill, then one decode step
        step = model(input_ids=ids[:, 5:6], past_key_values=out.past_key_values).logits
        torch.testing.assert_close(step[:, -1], want[:, 5], rtol=1e-4, atol=1e-4)
    # the loader's own gates (prunus.activation's): the skip kernels take them into themselves
    from prunus.kernels import plans
    from prunus.kernels.cpu import compiled_available

    forced = "cpu_skip_f32" if compiled_available() else "torch_skip"
    monkeypatch.setattr(plans, "_decide", lambda timings, tokens, margin: (
        (forced, "forced") if any(t.kernel == forced for t in timings) else ("dense", "forced")))
    runtime.export_runtime(str(ck), str(tmp_path / "out3"), tokens=[1], threads=1, log=lines.append)
    with torch.no_grad():
        model = prunus.load(tmp_path / "out3")
        skip = {n: m for n, m in model.named_modules() if callable(getattr(m, "fuse_gate", None))}
        gated_names = set(meta["activation_sparsity"]["layers"])
        assert gated_names <= set(skip)  # ungated layers may run a skip kernel too, as a dense one
        assert all(m.gate_hook is not None and not m._forward_pre_hooks for n, m in skip.items() if n in gated_names)
        assert all(m.gate_hook is None for n, m in skip.items() if n not in gated_names)
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        out = model(input_ids=ids[:, :5], use_cache=True)
        step = model(input_ids=ids[:, 5:6], past_key_values=out.past_key_values).logits
        torch.testing.assert_close(step[:, -1], want[:, 5], rtol=1e-4, atol=1e-4)


def test_gates_off_holds_back_every_gate_and_restores_them(one_thread):
    from prunus.activation.gate import Gate, attach_gates
    from prunus.kernels.gating import gate_of, gates_off
    from prunus.kernels.swap import build_module

    lin, other = nn.Linear(16, 8), nn.Linear(16, 8)
    attach(lin, 0.8, 0.4)  # the stand-in's function hook
    attach_gates(nn.ModuleDict({"o": other}), {"o": Gate(0.8, 0.4)})
    fused = build_module(other, "torch_skip", name="o", mask=torch.ones(8, 16, dtype=torch.bool))
    x = torch.randn(3, 16)
    gated = [m(x) for m in (lin, fused)]
    with gates_off(nn.ModuleList([lin, fused])) as n:
        assert n == 2 and gate_of(lin) is None and gate_of(fused) is None
        for m, g in zip((lin, fused), gated):
            ungated = m(x)
            torch.testing.assert_close(ungated, torch.nn.functional.linear(x, other.weight if m is fused
                                                                           else lin.weight, m.bias))
            assert not torch.allclose(ungated, g)
    for m, g in zip((lin, fused), gated):
        torch.testing.assert_close(m(x), g)


def test_bench_times_the_dense_baseline_without_gates(checkpoint, monkeypatch):
    from prunus.kernels import runtime
    from prunus.kernels.gating import gate_of

    ck, meta = checkpoint
    real = runtime.load_model
    monkeypatch.setattr(runtime, "load_model", lambda path, **kw: (_attach_from(real(path, **kw)[0], meta), None))
    seen = []

    def fake_generate(model, prompt, new_tokens, repeats=3):
        seen.append(sum(gate_of(m) is not None for m in model.modules()))
        return {"prefill_s": 0.01, "decode_tok_s": 100.0}

    monkeypatch.setattr(runtime, "time_generate", fake_generate)
    res = runtime.bench_model(str(ck), tokens=[1], threads=1, log=lambda s: None)
    e = res["end_to_end"]
    assert seen[:2] == [0, len(meta["activation_sparsity"]["layers"])]  # dense without gates, then with
    assert {"dense", "dense_gated", "planned"} <= set(e)
