"""Activation sparsity in plans: gated layers planned (masked or not) with the kernels that skip
zero inputs among the candidates, timed on inputs with the gate's zeros; the prefill choice; plans
round-tripping the new fields (old plans still load); apply_plan / tune_plan carrying the gate to
the new module (gate then dense == gate then kernel); export keeping the activation metadata."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actgate import Gate, attach, gate_hook, gated_reference
from prunus.core.spec import Unstructured, format_sparsity
from prunus.kernels import KERNELS, SparseLinear
from prunus.kernels.cpu import compiled_available
from prunus.kernels.decide import decide, is_input_sparse, prefill_choice
from prunus.kernels.gating import carry_gate, gated_layers
from prunus.kernels.plans import LayerPlan, Plan, apply_plan, plan_model
from prunus.kernels.timing import Timing

needs_build = pytest.mark.skipif(not compiled_available(), reason="compiled kernels unavailable")
SKIP = "cpu_skip_f32" if compiled_available() else "torch_skip"
QUICK = dict(repeats=1, warmup=1, min_sample_ms=0.01, cold=False)


def _mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    attach(model[2], threshold=0.3, sparsity=0.5)  # its input is post-ReLU: many exact zeros too
    return model


def _timing(kernel, speedup, tokens=1):
    return Timing("cpu", 8, 8, "0%", 0.0, tokens, "float32", 1.0, 1.0 / speedup, speedup, kernel, 1)


def test_prefill_choice_by_hand():
    t = [_timing(SKIP, 1.5), _timing("cpu_csr", 1.2), _timing("cpu_bitmap", 0.9)]
    assert decide(t, [1], 1.1)[0] == SKIP
    # a decode plan measured no prefill: the skip kernel's own dense product, whatever won at 1 token
    assert prefill_choice(SKIP, t, [1], 1.1) == "dense"
    # prefill is judged at the token counts above SKIP_TOKENS only: cpu_bitmap loses at 1 token,
    # wins at 16 and 128; cpu_csr wins at 1 token, loses at 128
    t += [_timing(SKIP, 0.9, 16), _timing("cpu_csr", 1.3, 16), _timing("cpu_bitmap", 1.4, 16),
          _timing(SKIP, 0.9, 128), _timing("cpu_csr", 0.8, 128), _timing("cpu_bitmap", 1.2, 128)]
    assert prefill_choice(SKIP, t, [1, 16, 128], 1.1) == "cpu_bitmap"
    assert prefill_choice(SKIP, t, [1, 16, 128], 1.25) == "dense"  # no other kernel wins by the margin
    assert prefill_choice(SKIP, t, [1, 16], 1.1) == "cpu_bitmap"
    assert prefill_choice("cpu_csr", t, [1], 1.1) == ""  # only a skip kernel gets one
    assert is_input_sparse(SKIP) and not is_input_sparse("cpu_csr") and not is_input_sparse("dense")


def test_plan_considers_skip_kernels_for_every_layer_gated_ones_on_their_zeros(one_thread):
    model = _mlp()
    mask = torch.rand(128, 64) > 0.5
    plan = plan_model(model, {"0": mask}, [1], 1e-9, **QUICK)
    by = {layer.name: layer for layer in plan.layers}
    assert list(by) == ["0", "2"]  # the gated layer is planned without a mask
    gated, masked = by["2"], by["0"]
    assert gated.input_sparsity == 0.5 and masked.input_sparsity == 0.0
    assert {SKIP, "torch_skip"} <= {t.kernel for t in gated.timings}
    assert all(t.input_sparsity == 0.5 for t in gated.timings)
    # an ungated layer: the input-major kernels compete as dense-weight kernels, on inputs without zeros
    assert {SKIP, "torch_skip"} <= {t.kernel for t in masked.timings}
    assert all(t.input_sparsity == 0.0 for t in masked.timings)
    rows = plan_model(model, {"0": mask}, [1], 1e-9, input_major=False, **QUICK)  # gated layers only
    assert not any(is_input_sparse(t.kernel) for t in rows.layers[0].timings)
    assert {SKIP, "torch_skip"} <= {t.kernel for t in rows.layers[1].timings}
    for layer in plan.layers:
        assert layer.prefill == prefill_choice(layer.kernel, layer.timings, [1], 1e-9)
    only = plan_model(model, {"0": mask}, [1], 1e-9, kernels=[SKIP], **QUICK)
    assert only.kernels == {"0": SKIP, "2": SKIP}  # margin ~0: any measured kernel is kept
    assert plan_model(model, {"0": mask}, [1], 1e-9, kernels=[SKIP], input_major=False,
                      **QUICK).kernels == {"0": "dense", "2": SKIP}
    assert only.layers[1].prefill == "dense" and "50% zero inputs" in only.layers[1].reason
    assert plan_model(nn.Sequential(nn.Linear(8, 8)), {"0": torch.ones(8, 8, dtype=torch.bool)}, [1],
                      1e-9, **QUICK).layers[0].timings[0].input_sparsity == 0.0


def test_plan_round_trips_the_new_fields_and_old_plans_load():
    timing = dataclasses.replace(_timing(SKIP, 1.3), input_sparsity=0.4)
    layer = LayerPlan("2", 64, 128, format_sparsity(Unstructured(), 0.0), 0.0, SKIP, "why", (timing,), "int8",
                      0.4, "cpu_bitmap_int8")
    plan = Plan("cpu", "float32", 2, (1,), 1.1, (layer,))
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.layers[0].input_sparsity == 0.4 and again.layers[0].prefill == "cpu_bitmap_int8"
    old = json.loads(plan.to_json())
    for key in ("input_sparsity", "prefill"):
        del old["layers"][0][key]
    del old["layers"][0]["timings"][0]["input_sparsity"]
    legacy = Plan.from_dict(old).layers[0]
    assert legacy.input_sparsity == 0.0 and legacy.prefill == "" and legacy.timings[0].input_sparsity == 0.0


def _one_layer_plan(kernel, prefill, quant=""):
    return Plan("cpu", "float32", 1, (1,), 1.1, (LayerPlan("2", 64, 128, format_sparsity(Unstructured(), 0.0),
                                                           0.0, kernel, "test", (), quant, 0.5, prefill),))


@pytest.mark.parametrize("scale", ["none", "colnorm"])
@pytest.mark.parametrize("kernel,prefill,runs", [(SKIP, "cpu_bitmap", "cpu_bitmap"), (SKIP, "dense", "dense"),
                                                 (SKIP, "cpu_int8", "dense"), ("torch_csr", "", None)])
def test_apply_plan_moves_the_gate(one_thread, scale, kernel, prefill, runs):
    if prefill == "cpu_bitmap" and not compiled_available():
        pytest.skip("compiled kernels unavailable")
    model = _mlp()
    lin = model[2]
    if scale == "colnorm":
        lin.prunus_gate = dataclasses.replace(lin.prunus_gate, scale="colnorm")
        lin.register_buffer("prunus_gate_scale", lin.weight.detach().norm(dim=0), persistent=False)
    x1, x16 = torch.randn(1, 64), torch.randn(16, 64)
    with torch.no_grad():
        want = [model(x1), model(x16)]
    applied = apply_plan(model, _one_layer_plan(kernel, prefill))
    new = model[2]
    assert applied == {"2": kernel} and isinstance(new, SparseLinear) and new is not lin
    assert new.prunus_gate == lin.prunus_gate and gate_hook in new._forward_pre_hooks.values()
    assert gated_layers(model) == {"2": 0.5}
    if scale == "colnorm":
        assert torch.equal(new.prunus_gate_scale, lin.prunus_gate_scale)
        assert "prunus_gate_scale" not in new.state_dict()  # non-persistent stays non-persistent
    if runs is not None:
        assert new.prefill_kernel == runs
    seen = []
    inner = new.matmul
    new.__dict__["matmul"] = lambda x: seen.append(float((x == 0).float().mean())) or inner(x)
    with torch.no_grad():
        got = [model(x1), model(x16)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert seen and min(seen) > 0.3  # the kernel received the gated (zeroed) input


def test_gate_then_kernel_equals_gate_then_dense():
    lin = attach(nn.Linear(96, 40), threshold=0.5, sparsity=0.38)
    sparse = SparseLinear.from_dense(lin, None, SKIP)
    carry_gate(lin, sparse)
    carry_gate(lin, sparse)  # twice: the hook is not registered twice
    assert len(sparse._forward_pre_hooks) == 1
    x = torch.randn(3, 96)
    torch.testing.assert_close(sparse(x), gated_reference(x, lin), rtol=1e-5, atol=1e-5)
    plain = nn.Linear(4, 4)
    other = SparseLinear.from_dense(plain, None, "torch_csr")
    carry_gate(plain, other)  # no gate: nothing moves
    assert not other._forward_pre_hooks and not hasattr(other, "prunus_gate")


def test_unavailable_skip_kernel_keeps_the_gated_layer_dense(monkeypatch):
    model = _mlp()
    monkeypatch.setitem(KERNELS, SKIP, dataclasses.replace(KERNELS[SKIP], available=lambda: False))
    with pytest.warns(RuntimeWarning, match="stays dense"):
        assert apply_plan(model, _one_layer_plan(SKIP, "dense")) == {}
    assert isinstance(model[2], nn.Linear) and gated_layers(model) == {"2": 0.5}


@needs_build
def test_tune_plan_times_decode_with_the_gates(tiny_llama):
    from prunus.kernels.tune import tune_plan

    model = tiny_llama
    ran_on = set()

    def counting(module, args):
        ran_on.add(type(module).__name__)
        return gate_hook(module, args)

    block = model.model.layers[0]
    for lin in (block.self_attn.q_proj, block.self_attn.o_proj, block.mlp.up_proj, block.mlp.down_proj):
        lin.prunus_gate = Gate(0.4, 0.4)
        lin.register_forward_pre_hook(counting)
    plan = plan_model(model, None, [1], 1e-9, threads=1, **QUICK)
    assert {layer.name for layer in plan.layers if layer.input_sparsity} == {
        f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
    before = {n: m for n, m in model.named_modules()}
    tuned = tune_plan(model, plan, prompt_tokens=4, new_tokens=2, repeats=1, rounds=1, candidates=2, threads=1)
    assert {n: m for n, m in model.named_modules()} == before  # left as it was given
    assert ran_on - {"Linear"}  # some decode ran the gate on a kernel module
    for layer in tuned.layers:
        assert layer.prefill == prefill_choice(layer.kernel, layer.timings, plan.tokens, plan.margin)
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        apply_plan(model, tuned)
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
