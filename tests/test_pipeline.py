"""End-to-end one-shot pruning on tiny models built in the test (Llama, OPT, GPT-2)."""

import pytest
import torch

from prunus.algorithms import METHODS, method
from prunus.oneshot.calibrate import find_blocks
from prunus.errors import DataError, ModelError, SparsityCheckError, SpecError
from prunus.core.masks import pattern_violations, topk
from prunus.oneshot.pipeline import prune
from prunus.core.spec import SparsitySpec, Unstructured
from prunus.core.targets import select

from conftest import make_tiny_llama


@pytest.fixture(scope="module")
def calib(tiny_tokenizer, tiny_text):
    ids = tiny_tokenizer(tiny_text, return_tensors="pt").input_ids[0]
    return torch.stack([ids[i * 64:(i + 1) * 64] for i in range(6)])  # (6, 64)


def _inputs(model, names, calib):
    """The real input of each named linear when the (final) model runs on ``calib``."""
    got, hooks = {}, []
    mods = dict(model.named_modules())
    for n in names:
        hooks.append(mods[n].register_forward_pre_hook(
            lambda m, a, n=n: got.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).clone())))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for h in hooks:
        h.remove()
    return got


@pytest.mark.parametrize("spec", ["0.5", "2:4", "4x4@0.5", "channel@0.25", "0.9"])
@pytest.mark.parametrize("meth", ["magnitude", "random", "wanda"])
def test_methods_patterns_exact(tiny_tokenizer, calib, meth, spec):
    model = make_tiny_llama(len(tiny_tokenizer))
    sp = SparsitySpec.parse(spec)
    res = prune(model, sp, meth, calib, progress=False)
    assert res.sparsity == pytest.approx(sp.sparsity, abs=1 / 64)  # rounding: half a weight per row of 64
    for t in select(model):
        assert pattern_violations(t.get(), sp.pattern) == 0
        assert torch.equal(t.get() == 0, ~res.masks[t.name]) or (t.get()[~res.masks[t.name]] == 0).all()
    assert torch.isfinite(model(input_ids=calib[:1]).logits).all()


def test_in_flight_wanda_matches_formula_on_real_inputs(tiny_tokenizer, calib):
    dense = make_tiny_llama(len(tiny_tokenizer))
    model = make_tiny_llama(len(tiny_tokenizer))
    res = prune(model, SparsitySpec.parse("0.5"), "wanda", calib, progress=False)
    names = [t.name for t in select(model)]
    xs = _inputs(model, names, calib)  # pruned model: the inputs each layer saw while being pruned
    dmods = dict(dense.named_modules())
    for n in names:
        w = dmods[n].weight.detach()
        expect = topk(w.abs() * xs[n].pow(2).sum(0).sqrt(), 0.5, Unstructured(), per_row=True)
        assert torch.equal(res.masks[n], expect), n


def test_two_pass_replays_pruned_outputs(tiny_tokenizer, calib):
    dense = make_tiny_llama(len(tiny_tokenizer))
    model = make_tiny_llama(len(tiny_tokenizer))
    res = prune(model, SparsitySpec.parse("0.5"), "wanda", calib, batch_size=4, progress=False)  # 2 chunks
    # the first linear of each block sees the previous (pruned) block's output
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.gate_proj"]
    xs = _inputs(model, names[:2], calib)
    dmods = dict(dense.named_modules())
    for n in names[:2]:
        w = dmods[n].weight.detach()
        expect = topk(w.abs() * xs[n].pow(2).sum(0).sqrt(), 0.5, Unstructured(), per_row=True)
        assert torch.equal(res.masks[n], expect), n


def test_opt_and_gpt2_without_per_architecture_code(calib):
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=128,
                                   word_embed_proj_dim=32)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=128)).eval()
    for model, prefix in [(opt, "model.decoder.layers"), (gpt2, "transformer.h")]:
        assert find_blocks(model)[0] == prefix
        for meth, spec in [("wanda", "2:4"), ("wanda", "0.5")]:
            res = prune(model, SparsitySpec.parse(spec), meth, calib, progress=False)
            assert res.sparsity == pytest.approx(0.5)
            assert all(l.violations == 0 for l in res.layers)
        assert torch.isfinite(model(input_ids=calib[:1]).logits).all()
    # GPT-2's Conv1D weights are (in, out): the (out, in) view is what gets N:M groups
    t = next(t for t in select(gpt2) if t.name.endswith("c_fc"))
    assert t.transposed and t.shape == (128, 32)


@pytest.mark.parametrize("alloc", ["global", "erk", "owl"])
def test_allocations_end_to_end(tiny_tokenizer, calib, alloc):
    model = make_tiny_llama(len(tiny_tokenizer))
    res = prune(model, SparsitySpec.parse("0.6", alloc), "wanda", calib, progress=False)
    assert res.sparsity == pytest.approx(0.6, abs=1 / 64)
    if alloc != "owl" or len(set(res.budgets.values())) > 1:
        assert len(set(round(v, 6) for v in res.budgets.values())) > 1


def test_nan_weight_refused_before_any_change(tiny_tokenizer, calib):
    model = make_tiny_llama(len(tiny_tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match="model.layers.1.mlp.up_proj.*NaN"):
        prune(model, SparsitySpec.parse("0.5"), "wanda", calib, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k], ) or torch.isnan(before[k]).any() for k in before)


def test_indivisible_nm_names_layer(tiny_tokenizer, calib):
    model = make_tiny_llama(len(tiny_tokenizer))
    with pytest.raises(SpecError, match="model.layers.0.*not divisible by M=48"):
        prune(model, SparsitySpec.parse("2:48"), "magnitude", calib, progress=False)


def test_calibrated_method_needs_data(tiny_tokenizer):
    with pytest.raises(DataError, match="calibration"):
        prune(make_tiny_llama(len(tiny_tokenizer)), SparsitySpec.parse("0.5"), "wanda", None)


def test_sparsity_check_fails_loudly(tiny_tokenizer):
    if "test_lazy" not in METHODS:
        @method("test_lazy")
        def lazy(weight, stats, sparsity, pattern, options, name):
            keep = torch.ones_like(weight, dtype=torch.bool)  # ignores its budget
            return weight, keep
    with pytest.raises(SparsityCheckError, match="does not meet"):
        prune(make_tiny_llama(len(tiny_tokenizer)), SparsitySpec.parse("0.5"), "test_lazy", progress=False)
    del METHODS["test_lazy"]


def test_include_exclude(tiny_tokenizer, calib):
    model = make_tiny_llama(len(tiny_tokenizer))
    res = prune(model, SparsitySpec.parse("0.5"), "magnitude", include=["*.mlp.*"], progress=False)
    assert all(".mlp." in n for n in res.masks) and len(res.masks) == 6
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()
    names = [t.name for t in select(model)]
    assert "lm_head" not in names and not any("embed" in n for n in names)


def test_chunked_head_perplexity_equals_full_logits(tiny_tokenizer, calib):
    from prunus.evaluate import perplexity

    model = make_tiny_llama(len(tiny_tokenizer))
    full = perplexity(model, calib, batch_size=2, head_chunk=0, progress=False)
    for chunk in (7, 64, 1000):
        assert perplexity(model, calib, batch_size=2, head_chunk=chunk, progress=False) == pytest.approx(full, rel=1e-5)
    # by hand for one window
    with torch.no_grad():
        logits = model(input_ids=calib[:1]).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, calib[0, 1:])
    assert perplexity(model, calib[:1], progress=False) == pytest.approx(float(nll.exp()), rel=1e-5)
