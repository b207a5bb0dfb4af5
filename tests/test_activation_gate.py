"""Activation gates: the pure gating function, the pre-hooks, the metadata, and the zero counts."""

import math

import pytest
import torch
from torch import nn

from prunus.activation import (ACT_KEY, Gate, attach_gates, count_inputs, detach_gates, gate_input, gates_metadata,
                               gates_of, measured, read_gates, reattach_gates, summarize)
from prunus.errors import CheckpointError, ModelError, PrunusError, SpecError


# ------------------------------------------------------------------------------------ gate_input

def test_gate_input_hand_computed_ties_kept():
    x = torch.tensor([0.1, -2.0, 0.5, -0.5, 0.0, 0.49])
    out = gate_input(x, 0.5)
    assert out.tolist() == [0.0, -2.0, 0.5, -0.5, 0.0, 0.0]  # |x| == 0.5 is kept, 0.49 is not
    assert gate_input(x, 0.0).tolist() == x.tolist()  # threshold 0 keeps everything
    assert gate_input(x, 3.0).tolist() == [0.0] * 6  # above every |x|: all zero
    assert gate_input(x, math.inf).abs().sum() == 0


def test_gate_input_zeros_are_positive_zero_and_pure():
    x = torch.tensor([-0.1, -3.0])
    before = x.clone()
    out = gate_input(x, 1.0)
    assert torch.equal(x, before)  # the input is not modified
    assert math.copysign(1.0, float(out[0])) == 1.0  # exactly +0.0, not -0.0


def test_gate_input_colnorm_scale_and_broadcast():
    x = torch.tensor([[1.0, 1.0, 1.0], [0.25, 3.0, 0.25]])
    scale = torch.tensor([1.0, 0.125, 2.0])  # scores: [[1, .125, 2], [.25, .375, .5]]
    out = gate_input(x, 0.5, scale)
    assert out.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.25]]


def test_gate_input_low_precision_scores_in_float32():
    x = torch.tensor([0.30078125, 0.296875], dtype=torch.bfloat16)  # both exact in bfloat16
    out = gate_input(x, 0.3)  # 0.3 itself rounds to 0.30078125 in bfloat16: the float32 score keeps it apart
    assert out.dtype == torch.bfloat16 and out.tolist() == [0.30078125, 0.0]


def test_gate_validation():
    with pytest.raises(SpecError):
        Gate(float("nan"), 0.1)
    with pytest.raises(SpecError):
        Gate(-0.1, 0.1)
    with pytest.raises(SpecError):
        Gate(0.1, 1.5)
    with pytest.raises(SpecError):
        Gate(0.1, 0.1, "rows")
    assert Gate(1, 0).threshold == 1.0 and isinstance(Gate(1, 0).threshold, float)


# ------------------------------------------------------------------------------------ hooks

def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_attach_gates_matches_manual_gating_and_detaches():
    net = _net()
    x = torch.randn(5, 4)
    dense = net(x)
    handles = attach_gates(net, {"0": Gate(0.5, 0.3)})
    assert set(handles) == {"0"} and net[0].prunus_gate == Gate(0.5, 0.3)
    want = net[2](net[1](net[0].forward(gate_input(x, 0.5))))
    assert torch.equal(net(x), want)
    assert gates_of(net) == {"0": Gate(0.5, 0.3)}
    assert detach_gates(net) == 1 and not hasattr(net[0], "prunus_gate")
    assert torch.equal(net(x), dense)


def test_colnorm_gate_uses_weight_at_attach_time():
    net = _net()
    x = torch.randn(5, 4)
    norms = net[0].weight.norm(dim=0)
    attach_gates(net, {"0": Gate(0.4, 0.2, "colnorm")})
    with torch.no_grad():
        net[0].weight.mul_(10)  # later edits do not move the stored column norms
    got = net[0](x)
    want = nn.functional.linear(gate_input(x, 0.4, norms), net[0].weight, net[0].bias)
    assert torch.equal(got, want)


def test_reattach_is_idempotent_and_follows_a_swapped_module():
    net = _net()
    gates = {"0": Gate(0.5, 0.3), "2": Gate(0.1, 0.2)}
    attach_gates(net, gates)
    reattach_gates(net, gates)
    reattach_gates(net, gates)
    assert len(net[0]._forward_pre_hooks) == 1 and len(net[2]._forward_pre_hooks) == 1
    new = nn.Linear(4, 3)
    new.load_state_dict(net[0].state_dict())
    net[0] = new  # a kernel module swapped in at that name: the hook went with the old module
    assert not hasattr(net[0], "prunus_gate")
    reattach_gates(net, gates)
    assert net[0].prunus_gate == gates["0"] and len(net[0]._forward_pre_hooks) == 1


def test_gate_on_a_kernel_module():
    from prunus.kernels.backends.torch_sparse import TorchCSRLinear

    torch.manual_seed(0)
    w = torch.randn(6, 8)
    mask = torch.rand(6, 8) > 0.5
    lin = TorchCSRLinear(w, mask, None)
    net = nn.Sequential(lin)
    attach_gates(net, {"0": Gate(0.7, 0.5, "colnorm")})
    x = torch.randn(3, 8)
    want = gate_input(x, 0.7, (w * mask).norm(dim=0)) @ (w * mask).t()
    torch.testing.assert_close(net(x), want)


def test_attach_refuses_missing_and_non_linear_layers_naming_them():
    net = _net()
    with pytest.raises(ModelError, match="layer 5"):
        attach_gates(net, {"0": Gate(0.1, 0.1), "5": Gate(0.1, 0.1)})
    assert not gates_of(net)  # nothing attached when one name is bad
    with pytest.raises(ModelError, match="layer 1: it is a ReLU"):
        attach_gates(net, {"1": Gate(0.1, 0.1)})


# ------------------------------------------------------------------------------------ counting

def test_count_inputs_counts_gated_zeros_hand_computed():
    net = _net()
    attach_gates(net, {"0": Gate(0.5, 0.3)})
    x = torch.tensor([[0.1, 0.6, -0.7, 0.2], [1.0, 1.0, 1.0, 0.0]])  # 3 of 8 below 0.5
    with count_inputs(net) as counts:
        net(x)
    assert counts == {"0": [3, 8]}
    s = summarize(counts, net)
    assert s["achieved"] == pytest.approx(3 / 8) and s["per_type"] == {"0": pytest.approx(3 / 8)}
    out, m = measured(net, lambda: net(x))
    assert m["per_layer"] == {"0": pytest.approx(3 / 8)}
    assert measured(_net(), lambda: 1) == (1, None)  # no gates: nothing measured


def test_summarize_weights_by_layer_size():
    net = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 4))  # 8 weights each
    big = nn.Sequential(nn.Linear(4, 6))
    net.append(big)
    s = summarize({"0": [1, 4], "1": [0, 2], "2.0": [4, 4]}, net)
    assert s["achieved"] == pytest.approx((0.25 * 8 + 0 * 8 + 1.0 * 24) / 40)


# ------------------------------------------------------------------------------------ metadata

def test_metadata_round_trip():
    gates = {"a.q_proj": Gate(0.25, 0.4), "a.down_proj": Gate(0.0, 0.0, "colnorm")}
    meta = {ACT_KEY: gates_metadata("wina", 0.25, gates)}
    assert read_gates(meta) == gates
    assert read_gates({}) == {} and read_gates({"kernel_plan": {}}) == {}


@pytest.mark.parametrize("layers, match", [
    ({"m.q": {"threshold": -1, "sparsity": 0.1, "scale": "none"}}, "layer m.q has threshold -1"),
    ({"m.q": {"threshold": "x", "sparsity": 0.1, "scale": "none"}}, "layer m.q has threshold"),
    ({"m.q": {"threshold": float("nan"), "sparsity": 0.1, "scale": "none"}}, "layer m.q has threshold"),
    ({"m.q": {"threshold": 0.1, "sparsity": 2, "scale": "none"}}, "layer m.q has sparsity 2"),
    ({"m.q": {"threshold": 0.1, "sparsity": 0.1, "scale": "rows"}}, "layer m.q has scale 'rows'"),
    ({"m.q": {"threshold": 0.1, "scale": "none"}}, "layer m.q has no sparsity"),
    ({"m.q": {"threshold": 0.1, "sparsity": 0.1, "scale": "none", "x": 1}}, "layer m.q has unknown"),
    ({"m.q": [0.1]}, "entry of layer m.q"),
])
def test_read_gates_names_the_bad_layer(layers, match):
    with pytest.raises(CheckpointError, match=match):
        read_gates({ACT_KEY: {"method": "teal", "target": 0.25, "layers": layers}})


@pytest.mark.parametrize("entry", [[], {"method": "", "target": 0.2, "layers": {}},
                                   {"method": "teal", "target": 1.0, "layers": {}},
                                   {"method": "teal", "target": 0.2, "layers": []}])
def test_read_gates_refuses_a_malformed_entry(entry):
    with pytest.raises(PrunusError):
        read_gates({ACT_KEY: entry})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", [0.0, 1e-30, 0.3, 0.5, 1.7, 100.0, 1e39])
@pytest.mark.parametrize("scaled", [False, True])
def test_gate_input_is_the_masked_definition(dtype, threshold, scaled):
    """gate_input (hardshrink at the float32 just below the threshold) zeroes exactly the entries
    the definition does, ``score < threshold`` in float32: ties kept, NaN kept, zeros stay zero."""
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(64, generator=g) * 2 if scaled else None
    x = torch.randn(5, 64, generator=g).to(dtype)
    tie = min(threshold, 3e38)  # 1e39: past float32, nothing finite is kept
    x[0, 3], x[1, 4], x[2, 5], x[3, 6] = tie, -tie, float("nan"), 0.0
    if scaled:
        x[4, 7] = tie / max(float(scale[7]), 1.0)
    score = x.abs().float() * (1.0 if scale is None else scale)
    want = x.masked_fill(score < threshold, 0.0)
    got = gate_input(x, threshold, scale)
    assert got.dtype == x.dtype
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(want, nan=7.0))
