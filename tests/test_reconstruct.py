"""Block-wise reconstruction (prunus.oneshot.steps.reconstruct): masks kept, error against the dense block lowered."""

from __future__ import annotations

import copy

import pytest
import torch

from prunus.oneshot.calibrate import _block_output, capture_inputs, find_blocks
from prunus.errors import DataError, SpecError
from prunus.core.masks import pattern_violations, topk
from prunus.oneshot.pipeline import prune
from prunus.oneshot.steps.reconstruct import ReconstructOptions, reconstruct_block
from prunus.core.spec import NM, SparsitySpec, Unstructured
from prunus.core.targets import select

from conftest import make_tiny_llama
from test_pipeline import calib  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _block0(model, calib):
    _, blocks = find_blocks(model)
    with torch.inference_mode():
        chunk = capture_inputs(model, blocks, calib, calib.shape[0], torch.device("cpu"))[0]
    return blocks[0], chunk


@pytest.mark.parametrize("pattern", [Unstructured(), NM(2, 4)], ids=["50%", "2:4"])
def test_lowers_the_error_against_the_dense_block_and_keeps_the_masks(tiny_tokenizer, calib, pattern):
    model = make_tiny_llama(len(tiny_tokenizer))
    block, chunk = _block0(model, calib)
    with torch.inference_mode():
        wanted = _block_output(block(chunk.hidden, **chunk.kwargs)).clone()
    targets = [t for t in select(model) if t.name.startswith("model.layers.0.")]
    masks = {}
    for t in targets:
        masks[t.name] = topk(t.get().abs(), 0.5, pattern, name=t.name)
        t.set(t.get() * masks[t.name])

    def error() -> float:
        with torch.inference_mode():
            out = _block_output(block(chunk.hidden, **chunk.kwargs))
        return float((out - wanted).pow(2).mean())

    before = error()
    first, last = reconstruct_block(block, targets, masks, [(chunk.hidden, chunk.kwargs)], [wanted],
                                    ReconstructOptions(epochs=8, lr=1e-3, batch_size=2))
    after = error()
    assert after < 0.7 * before, (before, after)
    assert last < first
    for t in targets:
        assert (t.get()[~masks[t.name]] == 0).all()
        assert pattern_violations(t.get(), pattern) == 0
        assert t.module.weight.requires_grad and t.module.weight.grad is None  # as it was before


def test_epochs_zero_changes_nothing(tiny_tokenizer, calib):
    model = make_tiny_llama(len(tiny_tokenizer))
    block, chunk = _block0(model, calib)
    before = copy.deepcopy(block.state_dict())
    targets = [t for t in select(model) if t.name.startswith("model.layers.0.")]
    masks = {t.name: torch.ones(t.shape, dtype=torch.bool) for t in targets}
    assert reconstruct_block(block, targets, masks, [(chunk.hidden, chunk.kwargs)], [chunk.hidden],
                             ReconstructOptions(epochs=0)) == (0.0, 0.0)
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("method,spec", [("sparsegpt", "0.5"), ("wanda", "2:4"), ("magnitude", "0.5")])
@pytest.mark.parametrize("batch_size", [None, 3], ids=["in-flight", "two-pass"])
def test_end_to_end_closer_to_the_dense_model(tiny_tokenizer, calib, method, spec, batch_size):
    dense = make_tiny_llama(len(tiny_tokenizer))
    with torch.no_grad():
        ref = dense(input_ids=calib).logits
    errs = {}
    for rec in (None, {"epochs": 4, "lr": 1e-3, "batch_size": 2}):
        model = make_tiny_llama(len(tiny_tokenizer))
        sp = SparsitySpec.parse(spec)
        res = prune(model, sp, method, calib, reconstruct=rec, batch_size=batch_size, progress=False)
        assert res.sparsity == pytest.approx(sp.sparsity, abs=1 / 64)
        for t in select(model):
            assert pattern_violations(t.get(), sp.pattern) == 0
            assert (t.get()[~res.masks[t.name]] == 0).all()
        with torch.no_grad():
            errs[rec is None] = float((model(input_ids=calib).logits - ref).pow(2).mean())
    assert errs[False] < errs[True], errs  # with reconstruction < without


def test_bad_options_and_missing_data(tiny_tokenizer):
    with pytest.raises(SpecError):
        ReconstructOptions(lr=0)
    with pytest.raises(SpecError):
        ReconstructOptions(batch_size=0)
    model = make_tiny_llama(len(tiny_tokenizer))
    with pytest.raises(DataError, match="reconstruct needs calibration data"):
        prune(model, SparsitySpec.parse("0.5"), "magnitude", None, reconstruct={"epochs": 1}, progress=False)
    with pytest.raises(SpecError, match="unknown option"):
        prune(model, SparsitySpec.parse("0.5"), "magnitude", None, reconstruct={"epoch": 1}, progress=False)
