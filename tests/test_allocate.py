import pytest
import torch

from prunus.budgets import LayerInfo, allocate
from prunus.budgets.erk import erk_densities
from prunus.budgets.owl import OWLOptions, owl_block_sparsities, owl_outlier_ratio


def _mean(layers, out):
    return sum(out[l.name] * l.numel for l in layers) / sum(l.numel for l in layers)


def test_uniform():
    assert allocate([LayerInfo("a", (4, 4)), LayerInfo("b", (4, 8))], 0.3) == {"a": 0.3, "b": 0.3}


def test_erk_known_shapes_by_hand():
    # raw: a 20/100 = 0.2, b 200/10000 = 0.02; eps would make a's density 4.6 > 1, so a is dense,
    # then b carries the budget: (5050 - 100) / 10000 = 0.495
    d = erk_densities({"a": (10, 10), "b": (100, 100)}, 0.5)
    assert d["a"] == 1.0 and d["b"] == pytest.approx(0.495)
    # no layer saturates: density proportional to (in+out)/(in*out)
    d = erk_densities({"a": (100, 100), "b": (100, 400)}, 0.1)
    assert d["a"] / d["b"] == pytest.approx((200 / 1e4) / (500 / 4e4))
    assert (d["a"] * 1e4 + d["b"] * 4e4) / 5e4 == pytest.approx(0.1)
    # conv kernels count in ERK
    d = erk_densities({"c": (16, 8, 3, 3), "f": (10, 512)}, 0.2)
    assert d["c"] == pytest.approx(d["f"] * ((16 + 8 + 3 + 3) / (16 * 8 * 9)) / (522 / 5120))


def test_erk_sparsities_meet_budget():
    layers = [LayerInfo("a", (64, 32)), LayerInfo("b", (128, 64)), LayerInfo("c", (10, 128))]
    out = allocate(layers, 0.9, "erk")
    assert _mean(layers, out) == pytest.approx(0.9)
    assert out["c"] < out["b"]  # the small layer keeps more


def test_global_threshold_by_hand():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[0.5, 0.6, 10.0, 11.0]])
    layers = [LayerInfo("a", (2, 2), a), LayerInfo("b", (1, 4), b)]
    out = allocate(layers, 0.5, "global")  # 4 smallest: 0.5, 0.6, 1, 2
    assert out == {"a": 0.5, "b": 0.5}
    out = allocate(layers, 0.25, "global")  # 0.5, 0.6
    assert out == {"a": 0.0, "b": 0.5}
    # ties at the threshold are split in layer order so the count is exact
    layers = [LayerInfo("a", (1, 2), torch.ones(1, 2)), LayerInfo("b", (1, 2), torch.ones(1, 2))]
    assert allocate(layers, 0.5, "global") == {"a": 1.0, "b": 0.0}


def test_owl_by_hand():
    # D = [0.1, 0.2, 0.3]: normalised to [0, 0.16], mean-centred: [-0.08, 0, 0.08]
    out = owl_block_sparsities([0.1, 0.2, 0.3], [16, 16, 16], 0.5, lam=0.08)
    assert out == pytest.approx([0.58, 0.5, 0.42])
    # equal outliers: uniform
    assert owl_block_sparsities([0.2] * 3, [16] * 3, 0.7, lam=0.08) == pytest.approx([0.7] * 3)


def test_owl_from_observed_scores():
    # block 0: one outlier in 10 scores (ratio 0.1); block 1: none (ratio 0); lam 0.08 -> 0.42 / 0.58
    outlier = torch.tensor([1.0] * 9 + [91.0]).reshape(2, 5)
    flat = torch.ones(2, 5)
    layers = [LayerInfo("a", (2, 5), block=0, observed=outlier), LayerInfo("b", (2, 5), block=1, observed=flat)]
    out = allocate(layers, 0.5, "owl", OWLOptions(lam=0.08, m=5.0))
    assert out == pytest.approx({"a": 0.42, "b": 0.58})
    assert _mean(layers, out) == pytest.approx(0.5)


def test_owl_outlier_ratio():
    s = torch.tensor([1.0] * 9 + [91.0])  # mean 10; one score above 5 * 10
    assert owl_outlier_ratio([s], 5.0) == pytest.approx(0.1)
