"""DSnoT: never raises the exact reconstruction error, keeps counts exact, matches a slow reference."""

from __future__ import annotations

import pytest
import torch

from prunus.core.options import build_options
from prunus.algorithms import get_method, get_refiner
from prunus.algorithms.dsnot import DSnoTOptions, _FullHd, _LazyHd, dsnot, reconstruction_error
from prunus.errors import SpecError
from prunus.core.masks import pattern_violations, topk
from prunus.core.spec import NM, Block, Unstructured
from prunus.core.stats import LayerStats

U = Unstructured()
FREE = DSnoTOptions(update_threshold=0.0)  # rows run until no swap helps or cycles run out


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def make_layer(out_f: int, in_f: int, tokens: int = 256, seed: int = 0, mean: float = 0.5):
    """A random weight and the stats of correlated inputs with non-zero, uneven means."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_f) + 0.5 * torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    shift = mean * torch.randn(in_f, generator=g)
    x = (torch.randn(tokens, in_f, generator=g) @ mix + shift) * (0.3 + torch.rand(in_f, generator=g))
    w = torch.randn(out_f, in_f, generator=g)
    stats = LayerStats(tokens, input_sq_norm=x.pow(2).sum(0), input_sum=x.sum(0), hessian=x.T @ x)
    return w, stats


def initial(w, stats, crit: str, sparsity: float, pattern):
    """(pruned weight, keep mask) from a registered one-shot method."""
    m = get_method(crit)
    return m.prune(w, stats, sparsity, pattern, m.options(), "layer")


def refine(w, pruned, keep, stats, pattern, options=FREE):
    return dsnot(w, pruned, keep, stats, pattern, options, "layer")


def slow_dsnot(w, pruned, keep, stats, pattern, max_cycles: int, threshold: float,
               guard: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented rule, one row at a time, with the error recomputed from scratch per swap.

    ``guard=False`` applies every proposal, as the reference implementation does.
    """
    h = stats.hessian.double()
    mean = stats.input_sum.double() / stats.tokens
    var = (torch.diagonal(h) / stats.tokens - mean ** 2).clamp_min(0.0)
    var = var.clamp_min(1e-12 * float(var.mean()) + 1e-300)
    norm = torch.diagonal(h).sqrt()
    W = w.double()
    cur = pruned.double() * keep
    keep = keep.clone()
    out_f, in_f = w.shape
    for r in range(out_f):
        can_grow = [not bool(k) for k in keep[r]]
        can_prune = [bool(k) for k in keep[r]]
        for _ in range(max_cycles):
            d = W[r] - cur[r]
            e = float(d @ mean)
            if abs(e) <= threshold:
                break
            s = 1.0 if e > 0 else -1.0
            grow = [(s * float(W[r, j] * mean[j] / var[j]), -j) for j in range(in_f)
                    if can_grow[j] and s * float(W[r, j] * mean[j]) > 0]
            if not grow:
                break
            g = -max(grow)[1]
            if isinstance(pattern, NM):
                start = g - g % pattern.m
                cols = [j for j in range(start, start + pattern.m) if can_prune[j]]
            else:
                cols = [j for j in range(in_f) if can_prune[j] and s * float(cur[r, j] * mean[j]) < 0]
                if not cols:
                    break
            can_grow[g] = False
            if not cols:
                continue
            p = min((float(cur[r, j].abs() * norm[j]), j) for j in cols)[1]
            new = cur[r].clone()
            new[g], new[p] = W[r, g], 0.0
            d_new = W[r] - new
            if not guard or float(d_new @ h @ d_new) < float(d @ h @ d):
                cur[r] = new
                keep[r, g], keep[r, p] = True, False
                can_prune[p] = False
    return cur.float(), keep


CASES = [("magnitude", U, 0.5), ("wanda", U, 0.5), ("wanda", U, 0.7), ("magnitude", NM(2, 4), 0.5),
         ("wanda", NM(2, 4), 0.5), ("sparsegpt", U, 0.6), ("sparsegpt", NM(2, 4), 0.5)]


@pytest.mark.parametrize("crit,pattern,sparsity", CASES)
@pytest.mark.parametrize("exact", [False, True])
def test_never_raises_error_and_keeps_counts(crit, pattern, sparsity, exact):
    for seed in range(12):
        w, stats = make_layer(12, 24, seed=seed, mean=0.2 + 0.2 * (seed % 4))
        pruned, keep = initial(w, stats, crit, sparsity, pattern)
        for threshold in (0.0, 0.1):
            opts = DSnoTOptions(update_threshold=threshold, exact_selection=exact)
            new_w, new_keep = refine(w, pruned, keep, stats, pattern, opts)
            before = reconstruction_error(w, pruned * keep, stats.hessian)
            after = reconstruction_error(w, new_w, stats.hessian)
            assert after <= before * (1 + 1e-9), (seed, threshold)
            assert torch.equal(new_keep.sum(1), keep.sum(1))
            if isinstance(pattern, NM):
                assert torch.equal(new_keep.reshape(12, -1, 4).sum(-1), keep.reshape(12, -1, 4).sum(-1))
                assert pattern_violations(new_w, pattern) == 0
            assert bool((new_w[~new_keep] == 0).all())


@pytest.mark.parametrize("crit,pattern,sparsity", CASES)
def test_matches_slow_reference(crit, pattern, sparsity):
    for seed in range(3):
        w, stats = make_layer(6, 16, seed=100 + seed)
        pruned, keep = initial(w, stats, crit, sparsity, pattern)
        for cycles, threshold in [(50, 0.0), (3, 0.0), (50, 0.1)]:
            opts = DSnoTOptions(max_cycles=cycles, update_threshold=threshold)
            new_w, new_keep = refine(w, pruned, keep, stats, pattern, opts)
            ref_w, ref_keep = slow_dsnot(w, pruned, keep, stats, pattern, cycles, threshold)
            assert torch.equal(new_keep, ref_keep), (seed, cycles, threshold)
            torch.testing.assert_close(new_w, ref_w)


def test_guard_matters():
    """The reference's rule (apply every proposal) does raise the error on some of these layers."""
    raised = 0
    for seed in range(8):
        w, stats = make_layer(8, 16, seed=200 + seed, mean=0.2)
        pruned, keep = initial(w, stats, "wanda", 0.5, U)
        before = reconstruction_error(w, pruned, stats.hessian)
        ref_w, _ = slow_dsnot(w, pruned, keep, stats, U, 50, 0.0, guard=False)
        raised += reconstruction_error(w, ref_w, stats.hessian) > before
        new_w, _ = refine(w, pruned, keep, stats, U)
        assert reconstruction_error(w, new_w, stats.hessian) <= before * (1 + 1e-9)
    assert raised > 0


@pytest.mark.parametrize("pattern", [U, NM(2, 4)])
@pytest.mark.parametrize("exact", [False, True])
def test_lowers_error_strictly(pattern, exact):
    # Inputs with large means: magnitude pruning leaves a big mean error for DSnoT to take back.
    w, stats = make_layer(16, 32, seed=7, mean=2.0)
    pruned, keep = initial(w, stats, "magnitude", 0.5, pattern)
    before = reconstruction_error(w, pruned, stats.hessian)
    for threshold in (0.0, 0.1):  # the reference's default threshold too
        opts = DSnoTOptions(update_threshold=threshold, exact_selection=exact)
        new_w, new_keep = refine(w, pruned, keep, stats, pattern, opts)
        assert reconstruction_error(w, new_w, stats.hessian) < 0.9 * before
        assert not torch.equal(new_keep, keep)


@pytest.mark.parametrize("pattern", [U, NM(2, 4)])
def test_exact_selection_first_swap_is_the_documented_best(pattern):
    """With one cycle, exact selection makes, per row, the swap its docstring promises."""
    w, stats = make_layer(6, 16, seed=11)
    pruned, keep = initial(w, stats, "wanda", 0.5, pattern)
    opts = DSnoTOptions(max_cycles=1, update_threshold=0.0, exact_selection=True)
    new_w, new_keep = refine(w, pruned, keep, stats, pattern, opts)
    h = stats.hessian.double()

    def row_err(row):
        d = w[r].double() - row.double()
        return float(d @ h @ d)

    for r in range(6):
        base = row_err(pruned[r])
        grown = [j for j in range(16) if not keep[r, j]]
        kept = [j for j in range(16) if keep[r, j]]

        def swapped(g, p):
            row = pruned[r].clone()
            row[g], row[p] = w[r, g], 0.0
            return row_err(row)

        if isinstance(pattern, NM):
            pairs = [(g, p) for g in grown for p in kept if g // 4 == p // 4]
        else:
            def grow_alone(g):
                row = pruned[r].clone()
                row[g] = w[r, g]
                return row_err(row)
            g = min(grown, key=grow_alone)
            pairs = [(g, p) for p in kept]
        g, p = min(pairs, key=lambda gp: swapped(*gp))
        if swapped(g, p) < base:
            assert bool(new_keep[r, g]) and not bool(new_keep[r, p])
            assert int((new_keep[r] != keep[r]).sum()) == 2
        else:
            assert torch.equal(new_keep[r], keep[r])


def test_sparsegpt_weights_grown_dense_others_kept():
    w, stats = make_layer(12, 24, seed=3, mean=1.5)
    pruned, keep = initial(w, stats, "sparsegpt", 0.5, U)
    new_w, new_keep = refine(w, pruned, keep, stats, U)
    grown = new_keep & ~keep
    stayed = new_keep & keep
    assert grown.any()
    assert torch.equal(new_w[grown], w[grown])
    assert torch.equal(new_w[stayed], pruned[stayed])
    assert not torch.equal(pruned[stayed], w[stayed])  # SparseGPT did update them


def test_all_kept_or_nothing_to_do_returns_unchanged():
    w, stats = make_layer(8, 16)
    keep = torch.ones_like(w, dtype=torch.bool)
    new_w, new_keep = refine(w, w, keep, stats, U)
    assert torch.equal(new_w, w) and torch.equal(new_keep, keep)
    keep = torch.zeros_like(w, dtype=torch.bool)
    new_w, new_keep = refine(w, w * keep, keep, stats, U)
    assert bool((new_w == 0).all()) and torch.equal(new_keep, keep)
    pruned, keep = initial(w, stats, "wanda", 0.5, U)
    new_w, new_keep = refine(w, pruned, keep, stats, U, DSnoTOptions(max_cycles=0))
    assert torch.equal(new_w, pruned) and torch.equal(new_keep, keep)
    new_w, new_keep = refine(w, pruned, keep, stats, U, DSnoTOptions(update_threshold=1e30))
    assert torch.equal(new_w, pruned) and torch.equal(new_keep, keep)


def test_max_cycles_bounds_the_swaps_per_row():
    w, stats = make_layer(16, 32, seed=9, mean=2.0)
    pruned, keep = initial(w, stats, "magnitude", 0.5, U)
    for cycles in (1, 2):
        _, new_keep = refine(w, pruned, keep, stats, U, DSnoTOptions(max_cycles=cycles,
                                                                      update_threshold=0.0))
        assert int((new_keep != keep).sum(1).max()) <= 2 * cycles


def test_inputs_not_modified():
    w, stats = make_layer(8, 16, seed=5, mean=1.0)
    pruned, keep = initial(w, stats, "sparsegpt", 0.5, U)
    copies = [t.clone() for t in (w, pruned, keep, stats.hessian, stats.input_sum)]
    for exact in (False, True):
        refine(w, pruned, keep, stats, U, DSnoTOptions(update_threshold=0.0, exact_selection=exact))
    for a, b in zip(copies, (w, pruned, keep, stats.hessian, stats.input_sum)):
        assert torch.equal(a, b)


def test_lazy_and_full_hd_agree():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(5, 12, generator=g, dtype=torch.float64)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64)
    h = x.T @ x
    lazy, full = _LazyHd(d, h, 6), _FullHd(d, h)
    for _ in range(3):
        rows = torch.tensor([0, 2, 4])
        gc, pc = torch.randint(0, 12, (3,), generator=g), torch.randint(0, 12, (3,), generator=g)
        a = torch.randn(3, generator=g, dtype=torch.float64)
        b = torch.randn(3, generator=g, dtype=torch.float64)
        lazy.add(rows, gc, a, pc, b)
        full.add(rows, gc, a, pc, b)
        d[rows, gc] += a
        d[rows, pc] += b
        cols = torch.randint(0, 12, (5,), generator=g)
        torch.testing.assert_close(lazy.at(torch.arange(5), cols), full.at(torch.arange(5), cols))
        torch.testing.assert_close(full.hd, d @ h)


def test_registry_and_errors():
    r = get_refiner("dsnot")
    assert r.refine is dsnot and r.options is DSnoTOptions
    assert r.needs == frozenset({"hessian", "input_sum"})
    assert NM in r.patterns and Unstructured in r.patterns and Block not in r.patterns
    assert DSnoTOptions().max_cycles == 50 and DSnoTOptions().update_threshold == 0.1
    assert build_options(r.options, {"max_cycles": "5"}, "r") == DSnoTOptions(max_cycles=5)
    w, stats = make_layer(4, 8)
    keep = torch.ones_like(w, dtype=torch.bool)
    with pytest.raises(SpecError, match="layer.*shape"):
        refine(w, w[:, :4], keep, stats, U)
    with pytest.raises(SpecError, match="layer.*input sum"):
        refine(w, w, keep, LayerStats(10, hessian=stats.hessian), U)
    with pytest.raises(SpecError, match="layer.*Hessian"):
        refine(w, w, keep, LayerStats(10, input_sum=stats.input_sum), U)
    with pytest.raises(SpecError, match="layer.*divisible"):
        refine(w[:, :6], w[:, :6], keep[:, :6], stats, NM(2, 4))
