"""RIA (Zhang et al. 2024): hand-computed scores, ties, the exponent option, and its errors."""

import math

import pytest
import torch

import prunus
from prunus import criteria
from prunus.algorithms import get_method
from prunus.core.masks import topk
from prunus.core.options import build_options
from prunus.core.spec import NM, Unstructured
from prunus.core.stats import LayerStats
from prunus.errors import SpecError

from conftest import make_tiny_llama

# |W| row sums 6, 6, 4; column sums 6, 4, 6; ||X_j||_2 = 4, 1, 2
W = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 0.0, 2.0], [1.0, 2.0, -1.0]])
STATS = LayerStats(input_sq_norm=torch.tensor([16.0, 1.0, 4.0]))
# relative importance |W_ij| / row_i + |W_ij| / col_j, worked out by hand
RI = [[1 / 6 + 1 / 6, 2 / 6 + 2 / 4, 3 / 6 + 3 / 6],
      [4 / 6 + 4 / 6, 0.0, 2 / 6 + 2 / 6],
      [1 / 4 + 1 / 6, 2 / 4 + 2 / 4, 1 / 4 + 1 / 6]]


def ria(a=None):
    opts = None if a is None else build_options(criteria.get("ria").options, {"a": a}, "test")
    return criteria.get("ria")(W, STATS, opts)


def test_hand_computed_scores():
    assert torch.allclose(ria(0.0), torch.tensor(RI))
    r2 = math.sqrt(2)
    default = [[2 / 3, 5 / 6, r2], [8 / 3, 0.0, 2 * r2 / 3], [5 / 6, 1.0, 5 * r2 / 12]]  # a = 0.5
    assert torch.allclose(ria(), torch.tensor(default))
    assert torch.allclose(ria(1.0), torch.tensor([[4 / 3, 5 / 6, 2.0], [16 / 3, 0.0, 4 / 3],
                                                  [5 / 3, 1.0, 5 / 6]]))


def test_method_compares_per_row_and_a_changes_the_mask():
    meth = get_method("ria")
    assert criteria.get("ria").per_row and meth.options is criteria.get("ria").options
    assert meth.options().a == 0.5
    keep = meth.prune(W, STATS, 1 / 3, Unstructured(), None, "l")[1]  # default a = 0.5
    assert keep.int().tolist() == [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
    # a = 0: row 2 ties at 5/12 in columns 0 and 2; the lower index is pruned first
    keep0 = meth.prune(W, STATS, 1 / 3, Unstructured(), meth.options(a=0.0), "l")[1]
    assert keep0.int().tolist() == [[0, 1, 1], [1, 0, 1], [0, 1, 1]]
    keep0 = meth.prune(W, STATS, 2 / 3, Unstructured(), meth.options(a=0.0), "l")[1]
    assert keep0.int().tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0]]
    new_w, keep = meth.prune(W, STATS, 1 / 3, Unstructured(), None, "l")
    assert torch.equal(new_w, W * keep)


def test_sparsity_zero_and_one():
    s = ria()
    assert topk(s, 0.0, Unstructured(), per_row=True).all()
    assert not topk(s, 1.0, Unstructured(), per_row=True).any()
    meth = get_method("ria")
    assert meth.prune(W, STATS, 0.0, Unstructured(), None, "l")[1].all()
    assert not meth.prune(W, STATS, 1.0, Unstructured(), None, "l")[1].any()


def test_ranks_differently_from_magnitude():
    # column 1 holds a huge weight, so W[0, 1] = 3 is small *relative to its column* and W[0, 0] = 2 wins:
    # row 0: 2/5 + 2/3 = 1.07 against 3/5 + 3/103 = 0.63
    w = torch.tensor([[2.0, 3.0], [1.0, 100.0]])
    st = LayerStats(input_sq_norm=torch.ones(2))
    opts = get_method("ria").options(a=0.0)
    keep = get_method("ria").prune(w, st, 0.5, Unstructured(), opts, "l")[1]
    assert keep.int().tolist() == [[1, 0], [0, 1]]
    mag = get_method("magnitude").prune(w, st, 0.5, Unstructured(), None, "l")[1]
    assert mag.int().tolist() == [[0, 1], [0, 1]]
    assert topk(w.abs(), 0.5, Unstructured(), per_row=True).int().tolist() == [[0, 1], [0, 1]]


def test_zero_rows_and_columns_score_zero_not_nan():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 2.0, 3.0]])
    s = criteria.get("ria")(w, LayerStats(input_sq_norm=torch.ones(4)))
    assert not torch.isnan(s).any() and (s[0] == 0).all() and (s[:, 1] == 0).all()
    assert get_method("ria").prune(w, LayerStats(input_sq_norm=torch.ones(4)), 0.5, NM(2, 4), None,
                                   "l")[1].int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_wrong_options_type_is_refused():
    with pytest.raises(TypeError, match="RIAOptions"):
        criteria.get("ria")(W, STATS, object())


def test_prune_api_options(tiny_tokenizer):
    torch.manual_seed(0)
    calib = torch.randint(0, len(tiny_tokenizer), (4, 32))
    spec = prunus.SparsitySpec.parse("0.5")

    def masks(opts):
        res = prunus.prune(make_tiny_llama(len(tiny_tokenizer)), spec, "ria", calib,
                           method_options=opts, progress=False)
        return res.masks

    default, half, zero = masks(None), masks({"a": "0.5"}), masks({"a": 0})
    assert all(torch.equal(default[k], half[k]) for k in default)  # "0.5" coerced to the default
    assert any(not torch.equal(default[k], zero[k]) for k in default)
    with pytest.raises(SpecError, match=r"method ria: unknown option\(s\) \['b'\]; known: \['a'\]"):
        masks({"b": 1})
