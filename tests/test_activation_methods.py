"""Activation methods: TEAL's histograms and greedy allocation, WINA's scores, uniform quantiles, hand-checked."""

import pytest
import torch
from torch import nn

from prunus.activation import calibrate_activations, count_inputs, detach_gates, gate_input, sparsify_activations
from prunus.activation.greedy import effective, greedy_levels, layer_weights
from prunus.activation.histogram import Distribution, score_threshold, subsample, teal_threshold
from prunus.core.targets import select
from prunus.errors import DataError, SpecError

from conftest import make_tiny_llama


# ------------------------------------------------------------------------------------ distributions

def test_exact_icdf_hand_computed():
    d = Distribution.exact(torch.tensor([3.0, 1.0, 2.0, 2.0]))  # centres 1, 2, 3; counts 1, 2, 1
    assert d.centers.tolist() == [1.0, 2.0, 3.0] and d.counts.tolist() == [1.0, 2.0, 1.0]
    assert d.icdf(0.0) == 1.0  # the first centre
    assert d.icdf(0.25) == 1.0  # reaches the first count exactly: 1 + 1 * (1 - 1) / ...
    assert d.icdf(0.5) == pytest.approx(1.5)  # target 2 of the 3 reached at centre 2: 1 + (2 - 1) / 2
    assert d.icdf(0.75) == 2.0
    assert d.icdf(1.0) == 3.0
    assert d.icdf(1.5) == 3.0  # past the end: the last centre
    assert score_threshold(d, 0.0) == 0.0  # sparsity 0 keeps everything


def test_binned_histogram_edges_and_teal_threshold():
    x = torch.arange(-50, 50, dtype=torch.float32) + 0.5  # -49.5 .. 49.5, symmetric
    d = Distribution.binned(x, bins=5, outliers=0.1)  # 10 values out in each tail
    # edges: min, then 4 evenly from the 10th to the 90th value (-39.5 .. 40.5), then max
    edges = torch.tensor([-49.5, -39.5, -12.8333, 13.8333, 40.5, 49.5])
    torch.testing.assert_close(d.centers, (edges[:-1] + edges[1:]) / 2, rtol=0, atol=1e-3)
    assert d.counts.tolist() == [10, 27, 27, 26, 10]  # cumulative 10, 37, 64, 90, 100
    assert teal_threshold(d, 0.0) == 0.0
    # icdf(0.75): 75 is reached in bin 3 (64 -> 90), 11/26 of the way from centre 2 (0.5) to centre 3
    c2, c3 = (-12.8333 + 13.8333) / 2, (13.8333 + 40.5) / 2
    assert teal_threshold(d, 0.5) == pytest.approx(c2 + 11 / 26 * (c3 - c2), abs=1e-3)
    assert teal_threshold(d, 1.0) == pytest.approx(d.centers[-1].item())  # the last centre, not the max


def test_teal_threshold_zeroes_the_target_on_a_symmetric_distribution():
    torch.manual_seed(0)
    y = torch.randn(100_000)
    x = torch.cat([y, -y])  # exactly symmetric: icdf(0.5 + s / 2) zeroes s of |x|
    d = Distribution.binned(x)
    for s in (0.25, 0.5, 0.9):
        t = teal_threshold(d, s)
        assert float((x.abs() < t).float().mean()) == pytest.approx(s, abs=2e-3)


def test_subsample_keeps_small_inputs_and_is_seeded():
    x = torch.arange(10.0)
    assert torch.equal(subsample(x, 100, 0), x) and torch.equal(subsample(x, 0, 0), x)
    a, b = subsample(torch.arange(1000.0), 50, 3), subsample(torch.arange(1000.0), 50, 3)
    assert a.numel() == 50 and torch.equal(a, b)


# ------------------------------------------------------------------------------------ greedy

class LinearCost:
    """A block whose error is sum(cost[layer] * threshold): the greedy's choices can be worked out by hand."""

    def __init__(self, sizes, cost):
        self.names, self.sizes, self.cost = list(sizes), sizes, cost

    def numel(self, name):
        return self.sizes[name]

    def errors(self, candidates, scale, last_fraction):
        return [sum(self.cost[n] * t for n, t in c.items()) for c in candidates]


def test_greedy_weights_and_steps_follow_teal():
    ctx = LinearCost({"q": 4, "k": 2, "big": 8}, {"q": 1, "k": 1, "big": 1})
    assert layer_weights(ctx) == {"q": 1.0, "k": 0.5, "big": 2.0}  # weight counts over the first layer's
    assert effective({"q": 1.0, "k": 0.0, "big": 0.5}, layer_weights(ctx)) == pytest.approx((1 + 1) / 3.5)
    # each step moves a layer by step / weight: big by 0.125, the cheapest error per step, 7 times to 0.5
    levels = greedy_levels(ctx, 0.5, lambda n, v: v, step=0.25)
    assert levels == {"q": 0.0, "k": 0.0, "big": 0.875}


def test_greedy_returns_the_step_closest_to_the_target():
    ctx = LinearCost({"q": 4, "k": 2, "big": 8}, {"q": 1, "k": 1, "big": 1})
    # effective sparsity per step of big: 1/14; the loop stops at 5/14 = 0.357, 4/14 = 0.286 is closer to 0.3
    assert greedy_levels(ctx, 0.3, lambda n, v: v, step=0.25) == {"q": 0.0, "k": 0.0, "big": 0.5}
    assert greedy_levels(ctx, 0.0, lambda n, v: v, step=0.25) == {"q": 0.0, "k": 0.0, "big": 0.0}


def test_greedy_ties_take_the_first_layer_and_levels_stop_at_one():
    # q's step costs 1 * 0.25, big's 2 * 0.125: a tie every step, so q (first) goes until it reaches 1
    ctx = LinearCost({"q": 4, "k": 2, "big": 8}, {"q": 1, "k": 10, "big": 2})
    levels = greedy_levels(ctx, 0.5, lambda n, v: v, step=0.25)
    assert levels["q"] == 1.0 and levels["k"] == 0.0
    assert levels["big"] == pytest.approx(0.375)  # then big: (1 + 2 * 0.375) / 3.5 = 0.5
    # every layer at level 1 and a target it cannot reach: the loop ends there
    ctx = LinearCost({"a": 1}, {"a": 1})
    assert greedy_levels(ctx, 0.99, lambda n, v: v, step=0.5) == {"a": 1.0}


# ------------------------------------------------------------------------------------ methods on a model

@pytest.fixture
def calib(tiny_tokenizer, tiny_text):
    from prunus.io.data import calibration_windows, tokenize

    return calibration_windows(tokenize(tiny_text, tiny_tokenizer), 4, 32, 0)


def _inputs(model, calib):
    """Every linear's input on the calibration windows (the model's own stream, no gates)."""
    got, handles = {}, []
    for t in select(model):
        handles.append(t.module.register_forward_pre_hook(
            lambda m, a, n=t.name: got.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def test_uniform_zeroes_the_target_fraction_of_every_layer(tiny_llama, calib, one_thread):
    xs = _inputs(tiny_llama, calib)
    res = calibrate_activations(tiny_llama, calib, select(tiny_llama), 0.4, "uniform", {"stream": "ungated"},
                                progress=False)
    assert set(res.gates) == set(xs) and not res.dense
    for name, g in res.gates.items():
        frac = float((xs[name].abs() < g.threshold).float().mean())
        assert g.sparsity == pytest.approx(frac, abs=1e-6)  # the calibrated sparsity is what it zeroes
        assert frac == pytest.approx(0.4, abs=2 / xs[name].numel() + 1e-6)
        assert g.scale == "none"
    zero = calibrate_activations(tiny_llama, calib, select(tiny_llama), 0.0, "uniform", progress=False)
    assert all(g.threshold == 0.0 and g.sparsity == 0.0 for g in zero.gates.values())


def test_teal_and_wina_reach_the_block_target_weighted_by_size(tiny_llama, calib, one_thread):
    targets = select(tiny_llama)
    for method, scale in (("teal", "none"), ("wina", "colnorm")):
        res = calibrate_activations(tiny_llama, calib, targets, 0.3, method, {"step": 0.1}, progress=False)
        for b in range(2):
            mine = [t for t in targets if f"layers.{b}." in t.name]
            n = {t.name: t.shape[0] * t.shape[1] for t in mine}
            eff = sum(res.gates[k].sparsity * v for k, v in n.items()) / sum(n.values())
            assert eff == pytest.approx(0.3, abs=0.06), (method, b)
        assert {g.scale for g in res.gates.values()} == {scale}
        again = calibrate_activations(tiny_llama, calib, targets, 0.3, method, {"step": 0.1}, progress=False)
        assert again.gates == res.gates  # deterministic


def test_teal_without_greedy_gives_every_layer_the_target(tiny_llama, calib, one_thread):
    xs = _inputs(tiny_llama, calib)
    res = calibrate_activations(tiny_llama, calib, select(tiny_llama), 0.5, "teal",
                                {"greedy": False, "stream": "ungated"}, progress=False)
    for name, g in res.gates.items():
        d = Distribution.binned(xs[name])
        assert g.threshold == pytest.approx(max(0.0, d.icdf(0.75)), rel=1e-6)


def test_wina_scores_use_the_column_norms_of_the_current_weights(tiny_llama, calib, one_thread):
    xs = _inputs(tiny_llama, calib)
    name = "model.layers.1.mlp.down_proj"
    res = calibrate_activations(tiny_llama, calib, select(tiny_llama), 0.5, "wina",
                                {"greedy": False, "stream": "ungated"}, progress=False)
    w = dict(tiny_llama.named_modules())[name].weight
    scores = xs[name].abs() * w.norm(dim=0)
    frac = float((scores < res.gates[name].threshold).float().mean())
    assert frac == pytest.approx(0.5, abs=1e-3) and res.gates[name].sparsity == pytest.approx(frac, abs=1e-6)


def test_the_gated_stream_calibrates_each_block_on_the_gated_blocks_before_it(tiny_llama, calib, one_thread):
    from prunus.activation import attach_gates

    res = calibrate_activations(tiny_llama, calib, select(tiny_llama), 0.5, "uniform", progress=False)
    first = {n: g for n, g in res.gates.items() if ".layers.0." in n}
    attach_gates(tiny_llama, first)  # what block 1 sees at run time
    xs = _inputs(tiny_llama, calib)
    detach_gates(tiny_llama)
    for name, g in res.gates.items():
        if ".layers.1." in name:
            assert g.sparsity == pytest.approx(float((xs[name].abs() < g.threshold).float().mean()), abs=1e-6)
            assert g.sparsity == pytest.approx(0.5, abs=2 / xs[name].numel() + 1e-6)
    ungated = calibrate_activations(tiny_llama, calib, select(tiny_llama), 0.5, "uniform", {"stream": "ungated"},
                                    progress=False)
    assert all(ungated.gates[n] == g for n, g in first.items())  # block 0 sees the same either way
    assert any(ungated.gates[n] != g for n, g in res.gates.items() if ".layers.1." in n)
    with pytest.raises(SpecError, match="stream must be gated or ungated"):
        calibrate_activations(tiny_llama, calib, select(tiny_llama), 0.5, "uniform", {"stream": "both"})


def test_sparsify_attaches_and_the_model_meets_its_target(tiny_llama, calib, one_thread):
    res = sparsify_activations(tiny_llama, calib, 0.5, "uniform", progress=False)
    with count_inputs(tiny_llama) as counts, torch.no_grad():
        tiny_llama(input_ids=calib, use_cache=False)
    assert set(counts) == set(res.gates)
    # on the calibration windows, with every gate on, the zeros are about the target (later layers see
    # gated earlier layers, so not exactly)
    z = sum(c[0] for c in counts.values()) / sum(c[1] for c in counts.values())
    assert 0.4 < z < 0.65
    detach_gates(tiny_llama)


def test_layers_that_cannot_be_gated_stay_dense(calib, tiny_tokenizer, one_thread):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=1,
                                      n_head=2)).eval()
    res = calibrate_activations(gpt2, calib, select(gpt2), 0.3, "teal", progress=False)
    assert res.gates == {} and len(res.dense) == 4  # c_attn, c_proj, c_fc, mlp.c_proj: Conv1D
    assert all("Conv1D" in why for why in res.dense.values())
    assert "stay dense" in res.notes()[0]
    untied = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    untied.config.tie_word_embeddings = False
    untied.lm_head = nn.Linear(64, len(tiny_tokenizer), bias=False)
    res = calibrate_activations(untied, calib, select(untied, exclude=["*embed*"]), 0.3, "uniform",
                                progress=False)
    assert list(res.dense) == ["lm_head"] and "outside the transformer blocks" in res.dense["lm_head"]
    assert len(res.gates) == 14


def test_bad_requests(tiny_llama, calib):
    targets = select(tiny_llama)
    for bad in (1.0, -0.1, 1.5, "abc", float("nan")):
        with pytest.raises(SpecError, match="activation sparsity"):
            calibrate_activations(tiny_llama, calib, targets, bad, "uniform", progress=False)
    with pytest.raises(SpecError, match="unknown activation method 'nope'"):
        calibrate_activations(tiny_llama, calib, targets, 0.2, "nope", progress=False)
    with pytest.raises(SpecError, match="unknown option"):
        calibrate_activations(tiny_llama, calib, targets, 0.2, "teal", {"stepp": 1}, progress=False)
    with pytest.raises(SpecError, match="step must be greater than 0"):
        calibrate_activations(tiny_llama, calib, targets, 0.2, "teal", {"step": 0}, progress=False)
    with pytest.raises(DataError, match="needs calibration data"):
        calibrate_activations(tiny_llama, None, targets, 0.2, "teal", progress=False)


def test_gates_already_on_the_model_do_not_change_the_calibration(tiny_llama, calib, one_thread):
    first = sparsify_activations(tiny_llama, calib, 0.6, "uniform", progress=False)
    again = calibrate_activations(tiny_llama, calib, select(tiny_llama), 0.6, "uniform", progress=False)
    assert again.gates == first.gates  # calibrated ungated, and the gates are back afterwards
    x = torch.randn(3, 64)
    q = tiny_llama.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q(x), nn.functional.linear(gate_input(x, first.gates["model.layers.0.self_attn.q_proj"].threshold), q.weight))


def test_stacked_candidates_give_the_errors_of_one_forward_each(tiny_llama, calib, one_thread):
    from prunus.activation.context import BlockCalibration
    from prunus.oneshot.calibrate import capture_inputs, find_blocks

    prefix, blocks = find_blocks(tiny_llama)
    chunks = [(c.hidden, c.kwargs) for c in capture_inputs(tiny_llama, blocks, calib, 2, torch.device("cpu"))]
    layers = [t for t in select(tiny_llama) if t.name.startswith(f"{prefix}.1.")]
    ctx = BlockCalibration.collect(1, blocks[1], layers, chunks, windows=3)  # a whole chunk and half of one
    cands = [{n: 0.05 * (i + 1) * (j == i) + 0.02 for j, n in enumerate(ctx.names)} for i in range(len(ctx.names))]
    for scale in ("none", "colnorm"):
        one_by_one = [ctx.error(c, scale) for c in cands]
        assert ctx.errors(cands, scale) == pytest.approx(one_by_one, rel=1e-5)
        assert ctx._batched is True
        assert len(set(one_by_one)) >= 5  # the candidates differ
    ctx._batched = None
    ctx._stacked = lambda *a: (_ for _ in ()).throw(RuntimeError("shape"))  # a block that cannot stack
    assert ctx.errors(cands) == pytest.approx([ctx.error(c) for c in cands], rel=1e-7) and ctx._batched is False


def test_encoders_are_gated_through_the_same_loop(one_thread):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 100, (4, 16))
    res = sparsify_activations(bert, ids, 0.3, "wina", options={"windows": 2}, progress=False)
    assert len(res.gates) == 12 and not res.dense  # query/key/value/output + intermediate/output, 2 layers
    with count_inputs(bert) as counts, torch.no_grad():
        bert(input_ids=ids)
    assert all(c[1] > 0 for c in counts.values())
