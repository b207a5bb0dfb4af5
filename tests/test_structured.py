"""Structured pruning of decoders: specs, unit criteria, allocation, surgery, depth, export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunus.core.spec import NM, SparsitySpec, Structure, Unstructured
from prunus.core.stats import LayerStats
from prunus.core.units import find_blocks, layout_of, remove_heads, remove_mlp
from prunus.errors import ModelError, SpecError
from prunus.structured import StructureOptions, prune_structure
from prunus.structured import allocate
from prunus.structured.registry import UnitView, get

from conftest import make_tiny_llama


def tiny(layers: int = 3, heads: int = 4, kv: int = 2, inter: int = 64, seed: int = 0, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=8, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------- specs


@pytest.mark.parametrize("text,structure,pattern,sparsity", [
    ("mlp@0.3", Structure(mlp=0.3), Unstructured(), 0.0),
    ("heads@25%+mlp@0.3", Structure(mlp=0.3, heads=0.25), Unstructured(), 0.0),
    ("blocks@4", Structure(blocks=4), Unstructured(), 0.0),
    ("blocks@2+mlp@0.2+2:4", Structure(mlp=0.2, blocks=2), NM(2, 4), 0.5),
    ("mlp@0.25+0.5", Structure(mlp=0.25), Unstructured(), 0.5),
])
def test_structured_specs_parse_and_round_trip(text, structure, pattern, sparsity):
    spec = SparsitySpec.parse(text)
    assert (spec.structure, spec.pattern, spec.sparsity) == (structure, pattern, sparsity)
    assert SparsitySpec.parse(str(spec)) == spec


def test_structure_with_quant_and_without_structure():
    spec = SparsitySpec.parse("mlp@0.3+int8")
    assert spec.structure == Structure(mlp=0.3) and spec.quant.bits == 8 and spec.sparsity == 0
    assert str(spec) == "mlp@0.3+int8"
    assert SparsitySpec.parse("2:4").structure is None
    assert SparsitySpec.parse("mlp@0").structure is None  # removes nothing


@pytest.mark.parametrize("text,message", [
    ("mlp@1", "leaves nothing"), ("heads@1.5", "fraction in"), ("blocks@1.5", "whole number"),
    ("2:4+mlp@0.3", "come first"), ("mlp@0.3+mlp@0.2", "given twice"), ("heads@x", "fraction"),
    ("blocks@-1", "whole number"),
])
def test_bad_structured_specs(text, message):
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SparsitySpec.parse(text)


# -------------------------------------------------------------------------------------- criteria


def _stats(x: torch.Tensor) -> LayerStats:
    st = LayerStats()
    st.add(x, frozenset({"input_sq_norm", "input_sum"}))
    return st


def test_unit_criteria_hand_computed():
    # 2 units of 2 columns each; consumer (out=2, in=4)
    cons = torch.tensor([[1.0, -2.0, 0.0, 3.0], [0.0, 1.0, 1.0, -1.0]])
    x = torch.tensor([[1.0, 0.0, 2.0, 1.0], [3.0, 0.0, 2.0, -1.0]])  # tokens x in
    prod = torch.tensor([[1.0, 1.0], [2.0, 0.0]]).reshape(2, 1, 2)  # (units, 1, in_prod)
    view = UnitView((prod,), cons.reshape(2, 2, 2), _stats(x))
    # magnitude: sqrt(producer row^2 + consumer columns^2)
    mag = get("magnitude").score(view, None)
    assert torch.allclose(mag, torch.tensor([(2 + 1 + 4 + 1) ** 0.5, (4 + 0 + 1 + 9 + 1) ** 0.5]))
    # wanda-sp: sum_i |W_ij| * ||X_j||
    norms = x.pow(2).sum(0).sqrt()  # [sqrt10, 0, sqrt8, sqrt2]
    w = get("wanda-sp").score(view, None)
    expect = torch.tensor([1 * norms[0] + 3 * norms[1], 1 * norms[2] + 4 * norms[3]])
    assert torch.allclose(w, expect)
    # flap: sample variance of X_j times ||W_:,j||^2
    var = x.var(dim=0, unbiased=True)  # [2, 0, 0, 2]
    f = get("flap").score(view, None)
    col = cons.pow(2).sum(0)  # [1, 5, 1, 10]
    s = var * col  # per channel; a unit of several channels sums their squares (FLAP's head score)
    assert torch.allclose(f, torch.tensor([s[0] ** 2 + s[1] ** 2, s[2] ** 2 + s[3] ** 2]))
    one = UnitView((prod.reshape(4, 1, 1)[:2],), cons[:, :2].reshape(2, 2, 1), _stats(x[:, :2]))
    assert torch.allclose(get("flap").score(one, None), s[:2])  # single-channel units: the score itself


def test_random_criterion_is_seeded():
    view = UnitView((), torch.zeros(2, 8, 1), None, seed=3)
    a, b = get("random").score(view, None), get("random").score(view, None)
    assert torch.equal(a, b) and a.unique().numel() == 8
    assert not torch.equal(a, get("random").score(UnitView((), torch.zeros(2, 8, 1), None, seed=4), None))


def test_unknown_structure_method():
    with pytest.raises(SpecError, match="unknown structure method 'nope'.*flap"):
        get("nope")


# ------------------------------------------------------------------------------------ allocation


def test_choose_removes_lowest_with_ties_by_index():
    s = torch.tensor([3.0, 1.0, 1.0, 2.0, 1.0])
    assert allocate.choose(s, 2).tolist() == [0, 3, 4]  # the first two 1.0s go
    assert allocate.choose(s, 0).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        allocate.choose(s, 5)  # a layer always keeps a unit


def test_choose_equal_numbers_per_group():
    s = torch.tensor([5.0, 1.0, 9.0, 0.0, 2.0, 3.0])  # 2 groups of 3
    assert allocate.choose(s, 2, groups=2).tolist() == [0, 2, 4, 5]  # 1.0 from group 0, 0.0 from group 1
    with pytest.raises(ValueError):
        allocate.choose(s, 3, groups=2)


def test_uniform_and_global_counts():
    layers = [allocate.LayerUnits(0, "mlp", 10), allocate.LayerUnits(1, "mlp", 10)]
    assert allocate.uniform_counts(layers, {"mlp": 0.3}) == {(0, "mlp"): 3, (1, "mlp"): 3}
    assert allocate.uniform_counts(layers, {"mlp": 0.0}) == {(0, "mlp"): 0, (1, "mlp"): 0}
    # layer 1's standardised scores: two clear low outliers; layer 0 flat-ish
    s0 = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.02, 0.98, 1.0])
    s1 = torch.tensor([5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, -20.0, -20.0])
    counts = allocate.global_counts(layers, {"mlp": 0.1}, {(0, "mlp"): s0, (1, "mlp"): s1})
    assert counts == {(0, "mlp"): 0, (1, "mlp"): 2}
    # never all of a layer
    counts = allocate.global_counts(layers, {"mlp": 0.9}, {(0, "mlp"): s0, (1, "mlp"): s1})
    assert all(v <= 9 for v in counts.values()) and sum(counts.values()) == 18


def test_cfsp_keeps_more_of_important_blocks_and_meets_the_budget():
    keep = allocate.cfsp_keep([0.1, 0.2, 0.3, 0.4], 0.5)
    assert keep == sorted(keep) and keep[0] < keep[-1] <= 1
    assert sum(keep) / 4 == pytest.approx(0.5)
    assert allocate.cfsp_keep([0.2, 0.2], 0.3) == pytest.approx([0.7, 0.7])  # equal importance: uniform


def test_round_kept_to_multiple():
    layers = [allocate.LayerUnits(0, "mlp", 64)]
    assert allocate.round_kept({(0, "mlp"): 17}, layers, "mlp", 4) == {(0, "mlp"): 16}  # keeps 48
    assert allocate.round_kept({(0, "mlp"): 63}, layers, "mlp", 8) == {(0, "mlp"): 56}  # keeps >= 8


# --------------------------------------------------------------------------------------- surgery


def test_removing_a_unit_with_zero_consumer_columns_changes_nothing():
    model = tiny()
    block = find_blocks(model)[1][0]
    lay = layout_of(block)
    with torch.no_grad():
        block.mlp.down_proj.weight[:, [3, 7]] = 0  # channels 3 and 7 contribute nothing
        block.self_attn.o_proj.weight[:, 8:16] = 0  # query head 1 contributes nothing
        want = model(IDS).logits
        keep = torch.tensor([i for i in range(lay.width) if i not in (3, 7)])
        lay = remove_mlp(block, lay, keep)
        # head 1 alone cannot go (its KV group keeps 2 query heads): remove one head per group
        model2 = copy.deepcopy(model)
        blk2 = find_blocks(model2)[1][0]
        blk2.self_attn.o_proj.weight[:, 16:24] = 0  # and head 2 (group 1) too
        want2 = model2(IDS).logits
        remove_heads(blk2, layout_of(blk2), torch.tensor([0, 3]), torch.tensor([0, 1]))
        got, got2 = model(IDS).logits, model2(IDS).logits
    assert block.mlp.gate_proj.out_features == lay.width == 62
    assert torch.allclose(got, want, atol=1e-6)
    assert blk2.self_attn.q_proj.out_features == 16 and blk2.self_attn.num_key_value_groups == 1
    assert torch.allclose(got2, want2, atol=1e-6)


def test_gqa_heads_must_stay_balanced():
    model = tiny()
    block = find_blocks(model)[1][0]
    with pytest.raises(ModelError, match="equal numbers"):
        remove_heads(block, layout_of(block), torch.tensor([0, 1, 2]), torch.tensor([0, 1]))


def test_bias_compensation_keeps_the_mean_output_on_the_calibration_tokens():
    model = tiny(layers=1)
    outs = {}

    def grab(m, a, o):
        outs.setdefault("y", []).append(o.detach().reshape(-1, o.shape[-1]))

    h = find_blocks(model)[1][0].mlp.down_proj.register_forward_hook(grab)
    with torch.no_grad():
        model(IDS)
    dense_mean = outs.pop("y")[0].mean(0)
    h.remove()
    prune_structure(model, Structure(mlp=0.5), "flap", IDS, options=StructureOptions(compensate=True),
                    progress=False)
    block = find_blocks(model)[1][0]
    assert block.mlp.down_proj.bias is not None and model.config.mlp_bias
    assert torch.count_nonzero(block.mlp.gate_proj.bias) == 0  # zero biases where none was computed
    block.mlp.down_proj.register_forward_hook(grab)
    with torch.no_grad():
        model(IDS)
    assert torch.allclose(outs["y"][0].mean(0), dense_mean, atol=1e-5)


# ---------------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("method", ["magnitude", "random", "wanda-sp", "flap"])
@pytest.mark.parametrize("allocation", ["uniform", "global", "cfsp"])
def test_every_method_and_allocation_gives_a_working_smaller_model(method, allocation):
    model = tiny(layers=3)
    before = sum(p.numel() for p in model.parameters())
    res = prune_structure(model, Structure(mlp=0.25, heads=0.5, blocks=1), method, IDS,
                          options=StructureOptions(allocation=allocation), progress=False)
    assert len(find_blocks(model)[1]) == 2 and model.config.num_hidden_layers == 2
    assert sum(p.numel() for p in model.parameters()) < before
    assert 0 < res.removed_fraction < 1
    for w in res.widths:
        assert w["num_attention_heads"] % w["num_key_value_heads"] == 0
    out = model.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False)  # the KV cache indexes fine
    assert out.shape == (1, 8)
    if allocation == "uniform":
        assert res.uniform and all(w["intermediate_size"] == 48 for w in res.widths)


def test_depth_removes_the_block_that_does_nothing():
    model = tiny(layers=4)
    blocks = find_blocks(model)[1]
    with torch.no_grad():  # block 2 passes its input through: block influence 0
        blocks[2].self_attn.o_proj.weight.zero_()
        blocks[2].mlp.down_proj.weight.zero_()
    res = prune_structure(model, Structure(blocks=1), "flap", IDS, progress=False)
    assert res.removed_blocks == [2]
    assert res.block_scores[2] == pytest.approx(0, abs=1e-6) and min(res.block_scores[:2]) > 1e-3
    assert [b.self_attn.layer_idx for b in find_blocks(model)[1]] == [0, 1, 2]


def test_depth_by_magnitude_removes_the_smallest_block():
    model = tiny(layers=3)
    with torch.no_grad():
        for p in find_blocks(model)[1][1].parameters():
            p.mul_(0.1)
    assert prune_structure(model, Structure(blocks=1), "magnitude", progress=False).removed_blocks == [1]


def test_query_and_group_head_units():
    m1, m2 = tiny(heads=4, kv=2), tiny(heads=4, kv=2)
    r1 = prune_structure(m1, Structure(heads=0.5), "magnitude", options=StructureOptions(heads="group"),
                         progress=False)
    r2 = prune_structure(m2, Structure(heads=0.5), "magnitude", options=StructureOptions(heads="query"),
                         progress=False)
    assert r1.widths[0]["num_attention_heads"] == 2 and r1.widths[0]["num_key_value_heads"] == 1
    assert r2.widths[0]["num_attention_heads"] == 2 and r2.widths[0]["num_key_value_heads"] == 2
    assert r2.params_after > r1.params_after  # query units keep the KV projections


def test_extremes_and_bad_input():
    model = tiny(layers=2)
    res = prune_structure(model, Structure(blocks=0, mlp=0.0), "flap", IDS, progress=False)
    assert res.params_after == res.params_before and res.removed_blocks == []
    with pytest.raises(SpecError, match="all 2 blocks"):
        prune_structure(model, Structure(blocks=2), "magnitude", progress=False)
    from prunus.errors import DataError

    with pytest.raises(DataError, match="calibration"):
        prune_structure(model, Structure(mlp=0.5), "flap", None, progress=False)
    gpt2 = _gpt2()
    with pytest.raises(ModelError, match="Llama-family"):
        prune_structure(gpt2, Structure(mlp=0.5), "magnitude", progress=False)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2)).eval()


def test_uniform_widths_load_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    import prunus

    model = tiny()
    prune_structure(model, Structure(mlp=0.5, heads=0.5, blocks=1), "flap", IDS,
                    options=StructureOptions(compensate=True), progress=False)
    with torch.no_grad():
        want = model(IDS).logits
    prunus.save(model, tmp_path / "d", format="dense", masks={}, metadata={})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()  # no prunus involved
    with torch.no_grad():
        assert torch.allclose(plain(IDS).logits, want, atol=1e-5)
    prunus.save(model, tmp_path / "c", masks={}, metadata={})
    with torch.no_grad():
        assert torch.allclose(prunus.load(tmp_path / "c")(IDS).logits, want, atol=1e-5)


def test_per_layer_widths_load_back_with_prunus(tmp_path):
    import prunus
    from prunus.errors import CheckpointError

    fmt = "compressed"
    model = tiny(layers=4)
    res = prune_structure(model, Structure(mlp=0.4), "flap", IDS, options=StructureOptions(allocation="cfsp"),
                          progress=False)
    assert not res.uniform
    assert model.config.to_dict()["per_layer_config"]
    with torch.no_grad():
        want = model(IDS).logits
    prunus.save(model, tmp_path / "m", format=fmt, masks={}, metadata={})
    back = prunus.load(tmp_path / "m")
    assert [b.mlp.down_proj.in_features for b in find_blocks(back)[1]] == [w["intermediate_size"] for w in res.widths]
    with torch.no_grad():
        assert torch.allclose(back(IDS).logits, want, atol=1e-5)
    # stock Llama ignores per_layer_config: a plain transformers folder of it would not load
    with pytest.raises(CheckpointError, match="per_layer_config.*format='compressed'"):
        prunus.save(model, tmp_path / "d", format="dense")
    assert not (tmp_path / "d").exists()


def test_structure_then_two_four_on_what_remains():
    import prunus

    model = tiny()
    res = prunus.prune(model, "mlp@0.3+2:4", method="wanda", calib=IDS, progress=False)
    assert res.structure is not None and res.label == "wanda-sp+wanda"
    for name, keep in res.masks.items():
        assert keep.shape[1] % 4 == 0
        assert torch.all(keep.reshape(keep.shape[0], -1, 4).sum(-1) <= 2), name
    for w in res.structure.widths:
        assert w["intermediate_size"] % 4 == 0  # rounded so that 2:4 applies to down_proj
    assert res.sparsity == pytest.approx(0.5)


def test_api_refuses_a_structure_criterion_for_the_remainder():
    import prunus

    with pytest.raises(SpecError, match="scores structures only"):
        prunus.prune(tiny(), "mlp@0.3+2:4", method="flap", calib=IDS, progress=False)


def test_tiny_llama_fixture_architecture_is_supported():
    model = make_tiny_llama(vocab_size=64)
    lay = layout_of(find_blocks(model)[1][0])
    assert (lay.heads, lay.kv_heads, lay.width, lay.family) == (4, 2, 128, "decoder")


def test_rounding_of_heads_is_stated():
    model = tiny(heads=6, kv=3, hidden=48)  # 3 groups of 2: heads@0.25 -> a whole group (1/3)
    res = prune_structure(model, Structure(heads=0.25), "magnitude", progress=False)
    assert len(res.notes) == 1 and "heads@0.25: removed 0.333" in res.notes[0] and "whole group" in res.notes[0]
    model = tiny(heads=4, kv=2)
    res = prune_structure(model, Structure(heads=0.9), "magnitude", options=StructureOptions(heads="query"),
                          progress=False)  # each group keeps one of its two query heads
    assert all(w["num_attention_heads"] == 2 for w in res.widths)
    assert "removed 0.500" in res.notes[0] and "at least one" in res.notes[0]
    assert prune_structure(tiny(), Structure(heads=0.5), "magnitude", progress=False).notes == []
