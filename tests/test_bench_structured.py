"""bench/structured.py's specs for a target, and bench/to_gguf.py's conversion, on a tiny Llama.

The spec rules are checked against what prunus then removes (``removed_fraction`` of the real
structured pass), and the converter against transformers' own GGUF loader (which undoes llama.cpp's
rotary permutation of Q and K): the converted model must give the folder model's logits.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _tiny(layers: int = 10):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=6, num_key_value_heads=3, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _shapes(model) -> dict:
    b = model.model.layers[0]
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    a = b.self_attn
    return {"blocks": len(model.model.layers), "block_params": n(b),
            "attn_params": n(a.q_proj) + n(a.k_proj) + n(a.v_proj) + n(a.o_proj), "mlp_params": n(b.mlp),
            "mlp_width": b.mlp.gate_proj.out_features, "kv_heads": 3}


def test_specs_for_targets_match_what_prunus_removes():
    import copy

    from prunus.core.spec import SparsitySpec
    from prunus.structured.prune import StructureOptions, prune_structure

    st = _load("structured")
    model = _tiny()
    sh = _shapes(model)
    cells = st.plan_cells(sh, [0.1, 0.2, 0.3, 0.5], mlp_multiple=8)
    by = {c["name"]: c for c in cells}
    # heads come in thirds of the attention here too; alone they cannot reach 30% or 50%
    assert by["0.3/heads"]["spec"] is None and "skipped" in by["0.3/heads"]["note"]
    assert by["0.5/heads"]["spec"] is None
    assert by["0.1/blocks"]["spec"] == "blocks@1" and by["0.5/blocks"]["spec"] == "blocks@5"
    assert by["0.3/mix"]["spec"].startswith("heads@0.333333+mlp@")
    for c in cells:
        if c["spec"] is None:
            continue
        structure = SparsitySpec.parse(c["spec"]).structure
        res = prune_structure(copy.deepcopy(model), structure, "magnitude",
                              options=StructureOptions(heads="group"), progress=False)
        # the plan's expected fraction is what prunus achieves, and it lies near the target
        assert res.removed_fraction == pytest.approx(c["expected"], abs=2e-3), c
        assert abs(res.removed_fraction - c["target"]) <= 0.25 * c["target"], c
        if c["kind"] in ("mlp", "mix") and "mlp@" in c["spec"]:
            assert res.widths[0]["intermediate_size"] % 8 == 0


def test_sparsegpt_groups_span_at_most_tol():
    st = _load("structured")
    assert st.sparsegpt_fractions([0.3, 0.0937, 0.1, 0.0989, 0.0833], 0.01) == [[0.0833], [0.0937, 0.0989, 0.1],
                                                                               [0.3]]


@pytest.mark.parametrize("structure", ["mlp@0.25", "blocks@1", "heads@0.5"])
def test_to_gguf_round_trips_through_transformers(tmp_path, structure):
    gguf = pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from prunus.core.spec import SparsitySpec
    from prunus.structured.prune import StructureOptions, prune_structure

    tg = _load("to_gguf")
    model = make_tiny_llama(vocab_size=96, layers=3)
    prune_structure(model, SparsitySpec.parse(structure).structure, "magnitude",
                    options=StructureOptions(), progress=False)
    folder = tmp_path / "pruned"
    model.save_pretrained(folder)
    template = tmp_path / "template.gguf"  # metadata to copy: a name and a tiny vocabulary
    w = gguf.GGUFWriter(str(template), "llama")
    w.add_name("tiny")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(96)])
    w.add_block_count(99)  # shape keys of the template are replaced by the folder's
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out" / "m.F32.gguf"
    info = tg.convert(folder, out, "f32", template)
    assert info["block_count"] == model.config.num_hidden_layers
    assert info["feed_forward_length"] == model.config.intermediate_size
    r = gguf.GGUFReader(str(out))
    assert r.fields["llama.block_count"].contents() == model.config.num_hidden_layers
    assert r.fields["general.name"].contents() == "tiny"
    assert "output.weight" not in {t.name for t in r.tensors}  # tied head
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_to_gguf_refuses_per_layer_widths(tmp_path):
    tg = _load("to_gguf")
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "per_layer_config": {"0": {"intermediate_size": 8}}}')
    with pytest.raises(tg.ConvertError, match="per-layer widths"):
        tg.convert(folder, tmp_path / "x.gguf")
