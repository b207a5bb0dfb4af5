import pytest
import torch

from prunus import criteria
from prunus.algorithms import get_method
from prunus.errors import SpecError
from prunus.core.masks import topk
from prunus.core.spec import NM, Unstructured
from prunus.core.stats import LayerStats


def test_wanda_equals_formula():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    x = torch.randn(100, 16) * torch.linspace(0.1, 3, 16)
    st = LayerStats()
    st.add(x, frozenset({"input_sq_norm"}))
    expect = w.abs() * torch.sqrt((x ** 2).sum(0)).reshape(1, -1)
    assert torch.allclose(criteria.get("wanda")(w, st), expect)
    # the method compares per output row
    new_w, keep = get_method("wanda").prune(w, st, 0.5, Unstructured(), None, "l")
    assert torch.equal(keep, topk(expect, 0.5, Unstructured(), per_row=True))
    assert ((~keep).sum(1) == 8).all()
    assert torch.equal(new_w, w * keep)


def test_wanda_hand_computed():
    # activations make column 0 matter most, though its weights are smallest
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    st = LayerStats(input_sq_norm=torch.tensor([100.0, 1.0, 1.0, 1.0]))
    keep = get_method("wanda").prune(w, st, 0.5, NM(2, 4), None, "l")[1]
    assert keep.int().tolist() == [[1, 0, 0, 1]]  # scores 10, 2, 3, 4


def test_magnitude_and_random():
    w = torch.tensor([[0.1, -5.0, 0.3, 2.0]])
    keep = get_method("magnitude").prune(w, LayerStats(), 0.5, Unstructured(), None, "l")[1]
    assert keep.int().tolist() == [[0, 1, 0, 1]]
    a = criteria.get("random")(torch.zeros(4, 4), LayerStats(seed=3))
    b = criteria.get("random")(torch.zeros(4, 4), LayerStats(seed=3))
    c = criteria.get("random")(torch.zeros(4, 4), LayerStats(seed=4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_registry_errors():
    with pytest.raises(SpecError, match="registered: .*magnitude"):
        criteria.get("nope")
    with pytest.raises(SpecError, match="unknown method"):
        get_method("nope")
    with pytest.raises(ValueError, match="already registered"):
        criteria.criterion("magnitude")(lambda w, s: w)
