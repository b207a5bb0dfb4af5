"""SparseGPT against a slow, direct OBS reference, plus exact counts, edge sparsities and errors."""

from __future__ import annotations

import pytest
import torch

from prunus.core.options import build_options
from prunus.algorithms import get_method
from prunus.algorithms.sparsegpt import SparseGPTOptions, sparsegpt
from prunus.errors import SpecError
from prunus.core.masks import n_pruned, pattern_violations, topk
from prunus.core.spec import NM, Block, Unstructured
from prunus.core.stats import LayerStats

U = Unstructured()


def make_layer(out_f: int, in_f: int, tokens: int = 256, seed: int = 0, mean: float = 0.3):
    """A random weight and the stats of correlated, shifted inputs (so OBS updates matter)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_f) + 0.5 * torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    x = (torch.randn(tokens, in_f, generator=g) @ mix + mean) * (0.5 + torch.rand(in_f, generator=g))
    w = torch.randn(out_f, in_f, generator=g)
    stats = LayerStats(tokens, input_sq_norm=x.pow(2).sum(0), input_sum=x.sum(0), hessian=x.T @ x)
    return w, stats


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def err(w: torch.Tensor, new_w: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - new_w).double()
    return float(((d @ h.double()) * d).sum())


def run(w, stats, sparsity, pattern, **opts):
    return sparsegpt(w, stats, sparsity, pattern, SparseGPTOptions(**opts), "layer")


def slow_obs(w: torch.Tensor, h: torch.Tensor, sparsity: float, pattern, blocksize: int,
             percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook OBS, column by column, in float64 with plain loops and an explicit inverse Hessian.

    Column i is fixed (kept or pruned) with H_F^-1 the inverse over the columns F = i.. still free;
    pruning w_ri moves the free weights of row r by -w_ri / [H_F^-1]_ii * [H_F^-1]_(i, F), then i
    leaves F by Gaussian elimination. Mask rule: at each block start, prune the exact count
    n_pruned(out * i2) - n_pruned(out * i1) of the lowest w^2 / [H_F^-1]_ii (lower flat index first
    on ties); for N:M, at each group start, the M - N lowest of the group.
    """
    W = w.double().clone()
    H = h.double().clone()
    out_f, in_f = W.shape
    for i in range(in_f):
        if H[i, i] == 0:
            H[i, i] = 1.0
            W[:, i] = 0.0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(in_f, dtype=torch.float64)
    # [H_F^-1]_ii for F = i.., from an explicit inverse of the trailing sub-Hessian
    denom = [float(torch.linalg.inv(H[i:, i:])[0, 0]) for i in range(in_f)]
    prune = torch.zeros(out_f, in_f, dtype=torch.bool)
    hinv = torch.linalg.inv(H)  # over F = all columns
    for i in range(in_f):
        assert abs(float(hinv[0, 0]) - denom[i]) <= 1e-9 * denom[i]
        if isinstance(pattern, Unstructured) and i % blocksize == 0:
            i2 = min(i + blocksize, in_f)
            k = n_pruned(out_f * i2, sparsity) - n_pruned(out_f * i, sparsity)
            flat = [(float(W[r, j]) ** 2 / denom[j], r * (i2 - i) + (j - i), r, j)
                    for r in range(out_f) for j in range(i, i2)]
            for _, _, r, j in sorted(flat)[:k]:
                prune[r, j] = True
        if isinstance(pattern, NM) and i % pattern.m == 0:
            for r in range(out_f):
                group = sorted((float(W[r, j]) ** 2 / denom[j], j) for j in range(i, i + pattern.m))
                for _, j in group[: pattern.m - pattern.n]:
                    prune[r, j] = True
        for r in range(out_f):
            if prune[r, i]:
                scale = W[r, i] / hinv[0, 0]
                for j in range(i, in_f):
                    W[r, j] -= scale * hinv[0, j - i]
                W[r, i] = 0.0
        hinv = hinv[1:, 1:] - torch.outer(hinv[1:, 0], hinv[0, 1:]) / hinv[0, 0]
    return W, ~prune


@pytest.mark.parametrize("shape,blocksize,sparsity", [
    ((8, 16), 8, 0.5), ((8, 16), 16, 0.5), ((6, 12), 5, 0.5), ((6, 12), 5, 0.3), ((5, 9), 4, 0.7),
])
def test_matches_slow_obs_unstructured(shape, blocksize, sparsity):
    w, stats = make_layer(*shape, seed=sum(shape) + blocksize)
    new_w, keep = run(w, stats, sparsity, U, blocksize=blocksize)
    ref_w, ref_keep = slow_obs(w, stats.hessian, sparsity, U, blocksize)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new_w.double(), ref_w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,pattern,blocksize", [
    ((8, 16), NM(2, 4), 8), ((6, 12), NM(2, 4), 6), ((4, 16), NM(1, 4), 128), ((6, 16), NM(4, 8), 8),
])
def test_matches_slow_obs_nm(shape, pattern, blocksize):
    w, stats = make_layer(*shape, seed=3 * shape[1] + pattern.m)
    new_w, keep = run(w, stats, pattern.sparsity, pattern, blocksize=blocksize)
    ref_w, ref_keep = slow_obs(w, stats.hessian, pattern.sparsity, pattern, blocksize)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new_w.double(), ref_w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.77, 0.95])
@pytest.mark.parametrize("blocksize", [3, 8, 128])
def test_exact_count_and_zeros(sparsity, blocksize):
    w, stats = make_layer(7, 13, seed=1)
    new_w, keep = run(w, stats, sparsity, U, blocksize=blocksize)
    assert keep.dtype == torch.bool and keep.shape == w.shape
    assert int((~keep).sum()) == n_pruned(w.numel(), sparsity)
    assert bool((new_w[~keep] == 0).all())
    assert new_w.dtype == torch.float32


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(1, 4), NM(4, 8)])
def test_nm_mask_is_valid(pattern):
    w, stats = make_layer(6, 24, seed=2)
    new_w, keep = run(w, stats, 0.0, pattern, blocksize=10)  # sparsity is ignored for N:M
    assert (keep.reshape(6, -1, pattern.m).sum(-1) == pattern.n).all()
    assert pattern_violations(new_w, pattern) == 0
    assert bool((new_w[~keep] == 0).all())


def test_sparsity_zero_returns_weight():
    w, stats = make_layer(8, 16)
    new_w, keep = run(w, stats, 0.0, U, blocksize=4)
    assert bool(keep.all())
    assert torch.equal(new_w, w)


def test_sparsity_one_zeros_everything():
    w, stats = make_layer(8, 16)
    new_w, keep = run(w, stats, 1.0, U, blocksize=5)
    assert not bool(keep.any())
    assert bool((new_w == 0).all())


def test_dead_input_column():
    w, stats = make_layer(6, 12, seed=4)
    h = stats.hessian.clone()
    h[3, :] = 0.0
    h[:, 3] = 0.0  # input 3 was always zero
    dead = LayerStats(stats.tokens, hessian=h)
    new_w, keep = run(w, dead, 0.5, U, blocksize=4)
    assert torch.isfinite(new_w).all()
    assert bool((new_w[:, 3] == 0).all())
    assert int((~keep).sum()) == n_pruned(w.numel(), 0.5)
    ref_w, ref_keep = slow_obs(w, h, 0.5, U, 4)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new_w.double(), ref_w, rtol=1e-4, atol=1e-4)
    new_w, keep = run(w, dead, 0.5, NM(2, 4), blocksize=4)
    assert bool((new_w[:, 3] == 0).all()) and pattern_violations(new_w, NM(2, 4)) == 0


@pytest.mark.parametrize("pattern,sparsity", [(U, 0.5), (U, 0.7), (NM(2, 4), 0.5)])
def test_lower_error_than_magnitude_and_wanda(pattern, sparsity):
    w, stats = make_layer(32, 64, tokens=512, seed=5)
    h = stats.hessian
    new_w, _ = run(w, stats, sparsity, pattern)
    magnitude = w * topk(w.abs(), sparsity, pattern)
    wanda = w * topk(w.abs() * stats.input_norm, sparsity, pattern, per_row=True)
    e = err(w, new_w, h)
    assert e < 0.9 * err(w, magnitude, h)
    assert e < 0.9 * err(w, wanda, h)


def test_inputs_not_modified():
    w, stats = make_layer(8, 16)
    w0, h0 = w.clone(), stats.hessian.clone()
    h0[2, :] = 0.0
    h0[:, 2] = 0.0
    stats.hessian = h0.clone()
    run(w, stats, 0.5, U, blocksize=4)
    run(w, stats, 0.5, NM(2, 4), blocksize=4)
    assert torch.equal(w, w0) and torch.equal(stats.hessian, h0)
    row, row_stats = make_layer(1, 8, seed=8)  # a 1-row weight: its transpose is contiguous already
    row0 = row.clone()
    row_stats.hessian[5] = 0.0
    row_stats.hessian[:, 5] = 0.0  # a dead input, whose weight is zeroed in the copy
    new_row, _ = run(row, row_stats, 0.5, U)
    assert torch.equal(row, row0) and new_row[0, 5] == 0


def test_rank_deficient_hessian_is_finite():
    w, stats = make_layer(8, 32, tokens=5, seed=6)  # rank 5 < 32
    for pattern, sparsity in [(U, 0.6), (NM(2, 4), 0.5)]:
        new_w, keep = run(w, stats, sparsity, pattern, blocksize=8)
        assert torch.isfinite(new_w).all()
        assert int((~keep).sum()) == n_pruned(w.numel(), sparsity)


def test_scale_of_hessian_does_not_matter():
    w, stats = make_layer(6, 12, seed=7)
    a, ka = run(w, stats, 0.5, U, blocksize=4)
    b, kb = run(w, LayerStats(1, hessian=stats.hessian / stats.tokens), 0.5, U, blocksize=4)
    assert torch.equal(ka, kb)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_registry_and_errors():
    m = get_method("sparsegpt")
    assert m.needs == frozenset({"hessian"}) and m.options is SparseGPTOptions
    assert build_options(m.options, {"blocksize": "64"}, "m") == SparseGPTOptions(blocksize=64)
    with pytest.raises(SpecError, match="does not support"):
        m.check_pattern(Block(4, 4))
    w, stats = make_layer(4, 10)
    with pytest.raises(SpecError, match="layer.*divisible"):
        run(w, stats, 0.5, NM(2, 4))
    with pytest.raises(SpecError, match="layer.*Hessian"):
        run(w, LayerStats(10, hessian=torch.eye(9)), 0.5, U)
    with pytest.raises(SpecError, match="layer.*Hessian"):
        run(w, LayerStats(10), 0.5, U)
    with pytest.raises(SpecError, match="layer.*percdamp"):
        run(w, LayerStats(1, hessian=torch.ones(10, 10)), 0.5, U, percdamp=0.0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_factor_in_place_is_the_out_of_place_chain(symmetric):
    """The inverse-Hessian factor computed in place on one copy (exactly symmetric H) is
    bit-identical to cholesky -> cholesky_inverse -> cholesky(upper); an H that is not exactly
    symmetric takes the out-of-place calls (which read its lower triangle)."""
    from prunus.algorithms.sparsegpt import _factor

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 96, generator=g)
    h = x.t() @ x + torch.eye(96)
    if symmetric:
        h = torch.tril(h) + torch.tril(h, -1).t()
        assert torch.equal(h, h.t())
    else:
        h[3, 50] += 1e-3  # upper triangle only: the lower triangle is the matrix
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    got = _factor(h.clone())
    assert torch.equal(got, want)
    assert _factor(-torch.eye(4)) is None


def test_factor_cache_reused_for_the_same_hessian_and_dropped_with_it():
    """q/k/v share one Hessian tensor: one factorisation serves all three; once the tensor is gone
    the cached factor goes too (it was held into the next block: 256 MiB at in=8192)."""
    import gc

    from prunus.algorithms import sparsegpt as sg

    _, stats = make_layer(4, 16)
    h = stats.hessian
    u1, _ = sg.inverse_hessian_factor(h, 0.01, "q")
    u2, _ = sg.inverse_hessian_factor(h, 0.01, "k")
    assert u2 is u1  # reused
    u3, _ = sg.inverse_hessian_factor(h, 0.02, "q")
    assert u3 is not u1  # another dampening: factorised again
    h2 = h.clone()
    assert sg.inverse_hessian_factor(h2, 0.02, "v")[0] is not u3  # equal values, another tensor
    assert sg._last is not None
    del h2
    gc.collect()
    assert sg._last is None
