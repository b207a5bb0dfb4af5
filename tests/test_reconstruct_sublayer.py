"""Sub-layer-wise reconstruction (block step ``reconstruct-sub``): masks kept, error lowered, phases separate."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from prunus.cli import main
from prunus.core.masks import pattern_violations, topk
from prunus.core.spec import NM, SparsitySpec, Unstructured
from prunus.core.targets import select
from prunus.errors import SpecError
from prunus.oneshot.calibrate import _block_output, capture_inputs, find_blocks
from prunus.oneshot.pipeline import prune
from prunus.oneshot.steps import BlockContext, get
from prunus.oneshot.steps.reconstruct_sublayer import SublayerOptions, split_sublayers

from conftest import make_tiny_llama
from test_pipeline import calib  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--nsamples", "4", "--seqlen", "32", "--windows", "4", "--quiet"]


def _pruned_block0(tokenizer, calib, pattern):
    """Block 0 of a tiny Llama pruned by magnitude, its context, and the dense block's outputs."""
    model = make_tiny_llama(len(tokenizer))
    _, blocks = find_blocks(model)
    with torch.inference_mode():
        chunk = capture_inputs(model, blocks, calib, calib.shape[0], torch.device("cpu"))[0]
        wanted = _block_output(blocks[0](chunk.hidden, **chunk.kwargs)).clone()
    targets = [t for t in select(model) if t.name.startswith("model.layers.0.")]
    masks = {}
    for t in targets:
        masks[t.name] = topk(t.get().abs(), 0.5, pattern, name=t.name)
        t.set(t.get() * masks[t.name])
    ctx = BlockContext(0, blocks[0], targets, masks, [(chunk.hidden, chunk.kwargs)], [wanted])
    return ctx


def _error(ctx) -> float:
    (x, kw), y = ctx.inputs[0], ctx.wanted[0]
    with torch.inference_mode():
        return float((_block_output(ctx.block(x, **kw)) - y).pow(2).mean())


def _weights(ctx) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ctx.block.state_dict().items()}


@pytest.mark.parametrize("pattern", [Unstructured(), NM(2, 4)], ids=["50%", "2:4"])
def test_lowers_the_block_error_and_keeps_the_masks(tiny_tokenizer, calib, pattern):
    ctx = _pruned_block0(tiny_tokenizer, calib, pattern)
    masks = {k: v.clone() for k, v in ctx.masks.items()}
    before = _error(ctx)
    get("reconstruct-sub").run(ctx, SublayerOptions(epochs=8, lr=1e-3, batch_size=2))
    after = _error(ctx)
    assert after < 0.7 * before, (before, after)
    for t in ctx.targets:
        assert torch.equal(ctx.masks[t.name], masks[t.name])
        assert (t.get()[~masks[t.name]] == 0).all()
        assert (t.get() != 0).sum() == masks[t.name].sum()  # kept weights stay nonzero: sparsity exact
        assert pattern_violations(t.get(), pattern) == 0
        assert t.module.weight.requires_grad and t.module.weight.grad is None


@pytest.mark.parametrize("phase,other", [("attention", "mlp"), ("mlp", "attention")])
def test_each_phase_changes_only_its_own_sub_layer(tiny_tokenizer, calib, phase, other):
    ctx = _pruned_block0(tiny_tokenizer, calib, Unstructured())
    parts = split_sublayers(ctx.block, ctx.targets)
    assert [t.name.split(".")[-2:] for t in parts["attention"]] == [
        ["self_attn", p] for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert [t.name.split(".")[-1] for t in parts["mlp"]] == ["gate_proj", "up_proj", "down_proj"]
    before = _weights(ctx)
    err0 = _error(ctx)
    get("reconstruct-sub").run(ctx, SublayerOptions(epochs=2, batch_size=2, phases=phase))
    after = _weights(ctx)
    mine = {t.name.removeprefix("model.layers.0.") + ".weight" for t in parts[phase]}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == mine  # every weight of this phase moved, nothing else (norms, the other sub-layer)
    assert _error(ctx) < err0
    assert parts[other]  # the other sub-layer has targets that stayed put


def test_both_phases_beat_either_alone_and_nothing(tiny_tokenizer, calib):
    errs = {}
    for phases in ("attention", "mlp", "attention,mlp"):
        ctx = _pruned_block0(tiny_tokenizer, calib, Unstructured())
        errs[None] = _error(ctx)
        get("reconstruct-sub").run(ctx, SublayerOptions(epochs=4, batch_size=2, phases=phases))
        errs[phases] = _error(ctx)
    assert errs["attention,mlp"] < min(errs["attention"], errs["mlp"]) < errs[None], errs


@pytest.mark.parametrize("method,spec", [("sparsegpt", "0.5"), ("wanda", "2:4")])
def test_end_to_end_closer_to_the_dense_model(tiny_tokenizer, calib, method, spec):
    dense = make_tiny_llama(len(tiny_tokenizer))
    with torch.no_grad():
        ref = dense(input_ids=calib).logits
    errs = {}
    for steps in ([], [("reconstruct-sub", {"epochs": 2, "batch_size": 2})]):
        model = make_tiny_llama(len(tiny_tokenizer))
        sp = SparsitySpec.parse(spec)
        res = prune(model, sp, method, calib, steps=steps, progress=False)
        assert res.sparsity == pytest.approx(sp.sparsity, abs=1e-9)
        for t in select(model):
            assert pattern_violations(t.get(), sp.pattern) == 0
            assert torch.equal(t.get() != 0, res.masks[t.name])
        with torch.no_grad():
            errs[bool(steps)] = float((model(input_ids=calib).logits - ref).pow(2).mean())
    assert errs[True] < errs[False], errs


class _Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)


class _OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = _Mixer()


class _OptLikeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.out_proj = nn.Linear(8, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)


def test_sub_layers_found_by_structure_or_a_clear_error():
    opt = nn.ModuleList([_OptLikeBlock()])
    parts = split_sublayers(opt[0], select(opt))
    assert [t.name for t in parts["attention"]] == ["0.self_attn.out_proj"]
    assert [t.name for t in parts["mlp"]] == ["0.fc1", "0.fc2"]
    odd = nn.ModuleList([_OddBlock()])
    with pytest.raises(SpecError, match=r"block 3 \(_OddBlock\).*0\.mixer\.proj.*children: mixer"):
        split_sublayers(odd[0], select(odd), 3)


def test_bad_options():
    for bad in ({"phases": "attention,attention"}, {"phases": "mlp,norm"}, {"phases": ""}, {"lr": 0},
                {"epochs": -1}, {"batch_size": 0}):
        with pytest.raises(SpecError):
            SublayerOptions(**bad)
    assert SublayerOptions(phases=" mlp , attention").phase_list() == ["mlp", "attention"]
    assert not get("reconstruct-sub").active(SublayerOptions(epochs=0))


def test_cli_and_list(tmp_path, capsys, tiny_llama_dir, text_files):
    calib, ev = text_files
    js = tmp_path / "r.json"
    code = main([str(a) for a in ("prune", tiny_llama_dir, "steps.reconstruct-sub.epochs=1",
                                  "steps.reconstruct-sub.phases=mlp", "--method", "sparsegpt",
                                  "--sparsity", "0.5", "--step", "reconstruct-sub", "--calib", calib,
                                  "--eval", ev, "--baselines", "dense", "--json", js, *FAST)])
    _, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(js.read_text())
    assert [x["label"] for x in r["runs"]] == ["dense", "sparsegpt+recon-sub"]
    assert r["sparsity"] == pytest.approx(0.5)
    code = main(["list"])
    out, _ = capsys.readouterr()
    assert code == 0
    line = next(x for x in out.splitlines() if "reconstruct-sub" in x)
    assert "block step" in line and "2510.14444" in line
