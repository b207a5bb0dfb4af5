"""SparseGPT with dense targets: the corrected weight, the objective it lowers, and the dense stream."""

from __future__ import annotations

import pytest
import torch

from prunus.algorithms import get_method
from prunus.algorithms.sparsegpt import SparseGPTOptions, sparsegpt
from prunus.algorithms.sparsegpt_asym import corrected_weight, sparsegpt_asym
from prunus.oneshot.calibrate import run_blockwise
from prunus.errors import SpecError
from prunus.core.masks import n_pruned, pattern_violations
from prunus.oneshot.pipeline import prune
from prunus.core.spec import NM, SparsitySpec, Unstructured
from prunus.core.stats import LayerStats
from prunus.core.targets import select

from conftest import make_tiny_llama
from test_pipeline import _inputs, calib  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def pair(tokens=512, in_f=24, out_f=10, noise=0.3, seed=0):
    """Dense inputs X, pruned-model inputs X~ = X + drift, a weight, and the statistics."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_f) + 0.4 * torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    x = torch.randn(tokens, in_f, generator=g) @ mix + 0.2
    xt = x + noise * torch.randn(tokens, in_f, generator=g) @ mix
    w = torch.randn(out_f, in_f, generator=g)
    x, xt = x.double(), xt.double()
    stats = LayerStats(tokens, hessian=(xt.T @ xt).float(), cross=(x.T @ xt).float())
    return w, x, xt, stats


def dense_target_error(w, new_w, x, xt) -> float:
    """||X W^T - X~ W'^T||^2, the objective sparsegpt-asym minimises."""
    return float((x @ w.double().T - xt @ new_w.double().T).pow(2).sum())


def test_corrected_weight_is_the_least_squares_fit():
    w, x, xt, stats = pair()
    got = corrected_weight(w, stats, 0.0, "l").double()
    want = torch.linalg.lstsq(xt, x @ w.double().T).solution.T  # argmin ||X W^T - X~ W'^T||
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-3)


def test_identical_inputs_reduce_to_sparsegpt():
    w, x, _, _ = pair()
    xf = x.float()
    stats = LayerStats(x.shape[0], hessian=xf.T @ xf, cross=xf.T @ xf)
    opts = SparseGPTOptions(percdamp=0.0)
    a_w, a_k = sparsegpt_asym(w, stats, 0.5, Unstructured(), opts, "l")
    b_w, b_k = sparsegpt(w, stats, 0.5, Unstructured(), opts, "l")
    assert torch.equal(a_k, b_k)
    assert torch.allclose(a_w, b_w, atol=1e-3)


@pytest.mark.parametrize("pattern,sparsity", [(Unstructured(), 0.5), (NM(2, 4), 0.5), (Unstructured(), 0.75)])
def test_lower_dense_target_error_than_sparsegpt(pattern, sparsity):
    """Exact counts and patterns, and over several layers a lower error against the dense outputs.

    The mask is chosen greedily, so a single layer may come out worse (at 75% one of these five
    does); the sum may not: that is what the method is for.
    """
    ours = theirs = 0.0
    for seed in range(5):
        w, x, xt, stats = pair(seed=seed)
        opts = SparseGPTOptions()
        a_w, a_k = sparsegpt_asym(w, stats, sparsity, pattern, opts, "l")
        b_w, _ = sparsegpt(w, stats, sparsity, pattern, opts, "l")
        assert int((~a_k).sum()) == n_pruned(w.numel(), sparsity) and (a_w[~a_k] == 0).all()
        assert pattern_violations(a_w, pattern) == 0
        ours += dense_target_error(w, a_w, x, xt)
        theirs += dense_target_error(w, b_w, x, xt)
    assert ours < theirs


def test_sparsity_zero_and_one():
    w, x, xt, stats = pair()
    w0, k0 = sparsegpt_asym(w, stats, 0.0, Unstructured(), SparseGPTOptions(), "l")
    assert k0.all() and torch.allclose(w0, corrected_weight(w, stats, 0.01, "l"), atol=1e-4)
    w1, k1 = sparsegpt_asym(w, stats, 1.0, Unstructured(), SparseGPTOptions(), "l")
    assert not k1.any() and (w1 == 0).all()


def test_missing_or_bad_cross_is_an_error():
    w, _, _, stats = pair()
    with pytest.raises(SpecError, match="cross"):
        sparsegpt_asym(w, LayerStats(1, hessian=stats.hessian), 0.5, Unstructured(), SparseGPTOptions(), "l")
    bad = LayerStats(1, hessian=stats.hessian, cross=stats.cross.clone())
    bad.cross[0, 0] = float("nan")
    with pytest.raises(SpecError, match="NaN"):
        sparsegpt_asym(w, bad, 0.5, Unstructured(), SparseGPTOptions(), "l")
    assert get_method("sparsegpt-asym").needs == frozenset({"hessian", "cross"})


@pytest.mark.parametrize("batch_size", [None, 4], ids=["in-flight", "two-pass"])
def test_dense_stream_gives_the_dense_models_inputs(tiny_tokenizer, calib, batch_size):
    """``cross`` = D^T X~, D from an untouched dense copy and X~ from the pruned model, per layer."""
    dense = make_tiny_llama(len(tiny_tokenizer))
    model = make_tiny_llama(len(tiny_tokenizer))
    targets = select(model)
    got = {}

    def zero_half(t, stats):  # prune something, so the two streams really differ after it
        got[t.name] = stats.cross.clone()
        w = t.get()
        t.set(w * (torch.arange(w.shape[1]) % 2 == 0))

    run_blockwise(model, calib, targets, frozenset({"cross"}), zero_half, batch_size=batch_size,
                  progress=False)
    names = [t.name for t in targets]
    d = _inputs(dense, names, calib)
    if batch_size is None:  # in-flight: each layer saw the inputs of the final pruned model
        p = _inputs(model, names, calib)
        for n in names:
            assert torch.allclose(got[n], d[n].T @ p[n], atol=1e-3, rtol=1e-4), n
    else:  # two-pass: each block was calibrated on the previous blocks pruned, itself dense
        first = "model.layers.0.self_attn.q_proj"
        assert torch.allclose(got[first], d[first].T @ d[first], atol=1e-3, rtol=1e-4)
    q1 = "model.layers.1.self_attn.q_proj"
    assert not torch.allclose(got[q1], d[q1].T @ d[q1], atol=1e-2)  # the streams did diverge


def test_end_to_end_on_a_tiny_llama(tiny_tokenizer, calib):
    for spec in ("0.5", "2:4"):
        model = make_tiny_llama(len(tiny_tokenizer))
        sp = SparsitySpec.parse(spec)
        res = prune(model, sp, "sparsegpt-asym", calib, progress=False)
        assert res.sparsity == pytest.approx(0.5, abs=1 / 64)
        for t in select(model):
            assert pattern_violations(t.get(), sp.pattern) == 0
        assert torch.isfinite(model(input_ids=calib[:1]).logits).all()
