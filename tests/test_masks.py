"""Hand-computed masks for every pattern, ties, and the edge sparsities 0 and 1."""

import pytest
import torch

from prunus.errors import SpecError
from prunus.core.masks import n_pruned, pack, pattern_violations, sparsity_of, topk, unpack
from prunus.core.spec import NM, Block, Channel, Unstructured

U = Unstructured()


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_nm_torchao_example():
    w = torch.arange(1.0, 9.0).reshape(1, 8)
    assert (w * topk(w.abs(), 0.5, NM(2, 4))).tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]


def test_nm_hand_computed_and_other_ratios():
    s = t([[4, 1, 3, 2, 0, 5, 9, 1]])
    assert topk(s, 0.5, NM(2, 4)).int().tolist() == [[1, 0, 1, 0, 0, 1, 1, 0]]
    assert topk(s, 0.75, NM(1, 4)).int().tolist() == [[1, 0, 0, 0, 0, 0, 1, 0]]
    assert topk(s, 0.5, NM(4, 8)).int().tolist() == [[1, 0, 1, 0, 0, 1, 1, 0]]
    assert topk(s, 0.25, NM(3, 4)).int().tolist() == [[1, 0, 1, 1, 0, 1, 1, 1]]


def test_ties_prune_lower_index_first():
    s = torch.ones(2, 8)
    assert topk(s, 0.5, NM(2, 4)).int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 1]] * 2
    assert topk(s, 0.5, U).int().reshape(-1).tolist() == [0] * 8 + [1] * 8
    assert topk(s, 0.25, U, per_row=True).int().tolist() == [[0, 0, 1, 1, 1, 1, 1, 1]] * 2
    # a partial tie: of the three 2s, the first one is pruned
    s = t([[2, 5, 2, 2]])
    assert topk(s, 0.5, U).int().tolist() == [[0, 1, 0, 1]]


def test_unstructured_layer_vs_row():
    s = t([[1, 2, 3, 4], [10, 20, 30, 40]])
    assert topk(s, 0.5, U).int().tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]
    assert topk(s, 0.5, U, per_row=True).int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert topk(s, 0.25, U).int().tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_block_hand_computed():
    s = t([[1, 1, 9, 9],
           [1, 1, 9, 9],
           [5, 5, 0, 0],
           [5, 5, 0, 1]])
    keep = topk(s, 0.5, Block(2, 2))
    assert keep.int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert pattern_violations(s * keep, Block(2, 2)) == 0
    # per row of blocks: each block-row keeps its better block
    keep = topk(t([[1, 1, 9, 9], [1, 1, 9, 9], [9, 9, 1, 1], [9, 9, 1, 1]]), 0.5, Block(2, 2), per_row=True)
    assert keep.int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]


def test_channel_hand_computed():
    s = t([[1, 1, 1], [5, 0, 0], [3, 3, 3], [0, 0, 0.5]])
    assert topk(s, 0.5, Channel()).int().tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]]


@pytest.mark.parametrize("pattern", [U, Block(2, 2), Channel()])
def test_sparsity_zero_and_one(pattern):
    s = torch.rand(4, 8)
    assert topk(s, 0.0, pattern).all()
    assert not topk(s, 1.0, pattern).any()
    for per_row in (True, False):
        assert topk(s, 0.0, pattern, per_row=per_row).all()
        assert not topk(s, 1.0, pattern, per_row=per_row).any()


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7, 0.9, 0.95])
def test_exact_counts(sparsity):
    torch.manual_seed(0)
    s = torch.randn(64, 96)
    assert (~topk(s, sparsity, U)).sum() == n_pruned(64 * 96, sparsity)
    assert ((~topk(s, sparsity, U, per_row=True)).sum(1) == n_pruned(96, sparsity)).all()
    # exact even when every score ties
    assert (~topk(torch.zeros(64, 96), sparsity, U)).sum() == n_pruned(64 * 96, sparsity)


def test_n_pruned_rounding():
    assert n_pruned(10, 0.5) == 5 and n_pruned(5, 0.5) == 3 and n_pruned(10, 0.0) == 0
    assert n_pruned(10, 1.0) == 10 and n_pruned(10, 0.7) == 7 and n_pruned(3, 0.1) == 0


def test_nm_random_validity():
    torch.manual_seed(1)
    for n, m in [(2, 4), (1, 4), (4, 8), (1, 8), (3, 8)]:
        w = torch.randn(16, 32)
        keep = topk(w.abs(), 1 - n / m, NM(n, m))
        assert (keep.reshape(16, -1, m).sum(-1) == n).all()
        assert pattern_violations(w * keep, NM(n, m)) == 0
    assert pattern_violations(torch.ones(1, 4), NM(2, 4)) == 1


def test_indivisible_names_the_layer():
    with pytest.raises(SpecError, match="model.layers.0.mlp.up_proj.*not divisible by M=4"):
        topk(torch.rand(4, 6), 0.5, NM(2, 4), name="model.layers.0.mlp.up_proj")
    with pytest.raises(SpecError, match="blocks"):
        topk(torch.rand(4, 6), 0.5, Block(4, 4))


def test_nan_scores_refused():
    s = torch.rand(2, 4)
    s[0, 1] = float("nan")
    with pytest.raises(SpecError, match="NaN"):
        topk(s, 0.5, U)


def test_pack_roundtrip_and_size():
    torch.manual_seed(0)
    for shape in [(3, 5), (8, 8), (1, 1), (17, 33)]:
        m = torch.rand(shape) > 0.5
        b = pack(m)
        assert b.dtype == torch.uint8 and b.numel() == (m.numel() + 7) // 8
        assert torch.equal(unpack(b, shape), m)
    assert sparsity_of(t([[0, 1], [0, 0]])) == 0.75
