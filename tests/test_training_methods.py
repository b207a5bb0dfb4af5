"""Sparse-training methods: schedules, budgets, exact nnz, gradients and rewinding, on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import prunus.training as T
from prunus.budgets import LayerInfo, allocate
from prunus.errors import PrunusError, SpecError
from prunus.core.masks import pattern_violations
from prunus.core.spec import NM, SparsitySpec
from prunus.training import schedules
from prunus.training.methods.dst import drop_grow
from prunus.training.methods.srste import srste_apply


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))


def train(model, opt, sp, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sp.step()


# ---- schedules -------------------------------------------------------------------------------
def test_cubic_hand_values():
    c = lambda t: schedules.cubic(t, 100, 0.9, start=0.25, end=0.75)
    assert c(0) == 0.0 and c(24) == 0.0 and c(25) == 0.0
    assert c(30) == pytest.approx(0.9 * (1 - 0.9 ** 3))  # frac 0.1
    assert c(50) == pytest.approx(0.7875)                # 0.9 - 0.9 * 0.5**3
    assert c(75) == 0.9 and c(100) == 0.9
    assert schedules.cubic(50, 100, 0.8, initial=0.2) == pytest.approx(0.8 - 0.6 * 0.125)


def test_cosine_decay_hand_values():
    assert schedules.cosine_decay(0, 100, 0.3) == pytest.approx(0.3)
    assert schedules.cosine_decay(50, 100, 0.3) == pytest.approx(0.15)
    assert schedules.cosine_decay(100, 100, 0.3) == 0.0


def test_pgf_schedule_hand_values():
    lin = [schedules.pgf(t, 100, 2, 4, decay="linear", dense=0.2, finetune=0.2) for t in (0, 19, 20, 40, 60, 79, 80)]
    assert lin[0] == (4, 1.0) and lin[1] == (4, 1.0)            # dense phase: no mask
    assert lin[2] == (2, 1.0)                                    # decay starts at beta 1
    assert lin[3] == (2, pytest.approx(1 - 20 / 60))
    assert lin[4] == (2, pytest.approx(1 - 40 / 60))
    assert lin[6] == (2, 0.0)                                    # fine-tune: hard mask
    n, b = schedules.pgf(30, 100, 2, 4, decay="exponential", finetune=0.2, coef=0.1)
    assert (n, b) == (2, pytest.approx(math.exp(-3.0)))
    # SDGF 1:16 over 5 frames of the decay phase [0, 80): 15:16, 8:16, 4:16, 2:16, 1:16
    frames = [schedules.pgf(t, 100, 1, 16, decay="structure", finetune=0.2)[0] for t in (0, 16, 32, 48, 64, 90)]
    assert frames == [15, 8, 4, 2, 1, 1]
    with pytest.raises(ValueError):
        schedules.pgf(0, 100, 2, 4, decay="cosine")


# ---- budgets -----------------------------------------------------------------------------------
def test_erk_budgets_on_known_shapes():
    # raw ERK scores: (100+100)/1e4 = 0.02 and (10+100)/1e3 = 0.11; eps = 0.1*11000/(200+110)
    got = allocate([LayerInfo("a", (100, 100)), LayerInfo("b", (10, 100))], 0.9, "erk")
    eps = 1100 / 310
    assert got["a"] == pytest.approx(1 - 0.02 * eps) and got["b"] == pytest.approx(1 - 0.11 * eps)
    # a small layer whose ERK density exceeds 1 is kept dense and the big one takes the budget
    got = allocate([LayerInfo("s", (10, 10)), LayerInfo("big", (1000, 1000))], 0.5, "erk")
    assert got["s"] == 0.0 and got["big"] == pytest.approx(1 - 499950 / 1e6)


def test_static_erk_masks_meet_budgets():
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 10))
    sp = T.static(model, None, "90%", allocation="erk")
    eps = 1100 / 310
    layer = sp.layer_sparsity()
    assert layer["0"] == pytest.approx(1 - 0.02 * eps, abs=1e-4)
    assert layer["1"] == pytest.approx(1 - 0.11 * eps, abs=1e-3)
    assert sp.sparsity() == pytest.approx(0.9, abs=1e-3)


# ---- masks stay applied ------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_masks_stay_applied_with_momentum_and_weight_decay(opt_name):
    model = mlp()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=True)
           if opt_name == "sgd" else torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1))
    sp = T.static(model, opt, "80%")
    train(model, opt, sp, 15)
    for t in sp.targets:
        m = sp.masks[t.name]
        assert torch.all(t.weight[~m] == 0)
        for v in opt.state[t.weight].values():
            if torch.is_tensor(v) and v.shape == m.shape:
                assert torch.all(v[~m] == 0)
    assert sp.sparsity() == pytest.approx(0.8, abs=2e-3)


# ---- GMP ---------------------------------------------------------------------------------------
def test_gmp_reaches_target_with_shrinking_masks():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = T.gmp(model, opt, "90%", total_steps=40, start=0.25, end=0.75, frequency=2)
    prev = {k: v.clone() for k, v in sp.masks.items()}
    for i in range(40):
        train(model, opt, sp, 1, seed=i)
        for k, v in sp.masks.items():
            assert not torch.any(v & ~prev[k])  # a pruned weight never comes back
            prev[k] = v.clone()
        if i + 1 < 10:
            assert sp.sparsity() == 0.0
    assert sp.sparsity() == pytest.approx(0.9, abs=2e-3)


# ---- SET / RigL --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_dst_keeps_exact_nnz(method):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    sp = T.build(method, model, opt, "80%", total_steps=60, allocation="erk", delta_t=3, alpha=0.5)
    nnz = {k: int(v.sum()) for k, v in sp.masks.items()}
    first = {k: v.clone() for k, v in sp.masks.items()}
    for i in range(45):
        train(model, opt, sp, 1, seed=i)
        assert {k: int(v.sum()) for k, v in sp.masks.items()} == nnz
        for t in sp.targets:
            assert int((t.weight != 0).sum()) <= nnz[t.name]
            assert torch.all(t.weight[~sp.masks[t.name]] == 0)
    assert any(not torch.equal(first[k], sp.masks[k]) for k in first)  # the masks did move


def test_drop_grow_constructed_case():
    mask = torch.tensor([True, True, True, False, False, False])
    w = torch.tensor([0.1, 5.0, 3.0, 0.0, 0.0, 0.0])
    grad = torch.tensor([9.0, 0.0, 0.0, 1.0, 7.0, 2.0])
    new = drop_grow(mask, w, grad.abs(), fraction=0.34)  # k = floor(0.34 * 3) = 1
    # drops |w|=0.1 (index 0); grows the largest |grad| among inactive after the drop: index 0 (9.0)
    assert new.tolist() == [True, True, True, False, False, False]
    new = drop_grow(mask, w, torch.tensor([0.0, 0, 0, 1, 7, 2]), fraction=0.7)  # k = 2
    assert new.tolist() == [False, True, False, False, True, True]
    assert int(new.sum()) == 3


def test_rigl_grows_where_grad_is_largest():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = T.rigl(model, opt, "50%", total_steps=100, delta_t=1, alpha=0.25, end=1.0)
    w = model[0].weight
    keep = torch.zeros(16, dtype=torch.bool)
    keep[:8] = True
    sp.masks["0"] = keep.reshape(4, 4)
    with torch.no_grad():
        w.copy_(torch.arange(1.0, 17.0).reshape(4, 4))
    sp.apply()
    w.grad = torch.zeros(4, 4)
    w.grad.view(-1)[13] = -50.0  # the largest |grad|, inactive
    w.grad.view(-1)[10] = 20.0   # the second largest
    w.grad.view(-1)[3] = 100.0   # active: ignored for growing
    sp.step()  # step 1: fraction 0.25/2*(1+cos(pi/100)) * 8 active -> k = 1
    new = sp.masks["0"].reshape(-1)
    assert int(new.sum()) == 8
    assert not new[0] and new[13]  # dropped the smallest |w| (1.0), grew the largest |grad|
    assert w.view(-1)[13] == 0.0   # grown weights start at zero


# ---- SR-STE / PGF ------------------------------------------------------------------------------
def test_srste_gradient_formula():
    torch.manual_seed(0)
    w = torch.randn(4, 8, requires_grad=True)
    keep = torch.rand(4, 8) > 0.5
    c = torch.randn(4, 8)
    (srste_apply(w, keep, 0.1) * c).sum().backward()
    assert torch.allclose(w.grad, c + 0.1 * (~keep) * w.detach())


def test_srste_layer_is_nm_and_refines_pruned_weights():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    sp = T.srste(lin, opt, "2:4", lam=0.5)
    assert pattern_violations(lin.weight.detach(), NM(2, 4)) == 0
    x = torch.randn(3, 8)
    lin(x).sum().backward()
    dense = sp.targets[0].weight
    keep = sp.masks[""]
    expect = x.sum(0).expand(4, 8) + 0.5 * (~keep) * dense.detach()
    assert torch.allclose(dense.grad, expect)
    sp.squash()
    assert pattern_violations(lin.weight.detach(), NM(2, 4)) == 0 and "weight" in dict(lin.named_parameters())


def test_pgf_forward_scales_pruned_weights():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -4.0, 3.0, 2.0]]))
    sp = T.pgf(lin, None, "2:4", total_steps=10, decay="linear", dense=0.0, finetune=0.5)
    assert torch.allclose(lin.weight, torch.tensor([[1.0, -4.0, 3.0, 2.0]]))  # beta = 1 at step 0
    for _ in range(3):
        sp.step()  # step 3: beta = 1 - 3/5
    assert torch.allclose(lin.weight, torch.tensor([[0.4, -4.0, 3.0, 0.8]]))
    for _ in range(3):
        sp.step()  # fine-tune phase
    assert torch.allclose(lin.weight, torch.tensor([[0.0, -4.0, 3.0, 0.0]]))


# ---- LTH ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rewind", [0.0, 0.2])
def test_lth_rewinding_restores_weights_exactly(rewind):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = T.lth(model, opt, "75%", total_steps=40, rounds=3, rewind=rewind)  # phases of 10 steps
    k = int(round(rewind * 10))
    if k == 0:
        theta_k = {n: p.detach().clone() for n, p in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for step in range(1, 11):
        opt.zero_grad()
        model(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
        opt.step()
        sp.step()
        if step == k:
            theta_k = {n: p.detach().clone() for n, p in model.state_dict().items()}
    # step 10 ended round 1: pruned to 1 - 0.25**(1/3), weights rewound to step k
    assert sp.sparsity() == pytest.approx(1 - 0.25 ** (1 / 3), abs=3e-3)
    assert len(opt.state) == 0
    masks = {f"{t.name}.weight": sp.masks[t.name] for t in sp.targets}
    for n, p in model.state_dict().items():
        expect = theta_k[n] * masks[n] if n in masks else theta_k[n]
        assert torch.equal(p, expect), n
    train(model, opt, sp, 30, seed=1)
    assert sp.sparsity() == pytest.approx(0.75, abs=3e-3) and sp.phases == [0, 10, 20, 30, 40]


def test_lth_reinit_uses_the_same_masks_and_new_weights():
    runs = {}
    for name in ("lth", "lth_reinit"):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = T.build(name, model, opt, "75%", total_steps=40, rounds=3, rewind=0.0)
        train(model, opt, sp, 30)
        runs[name] = (sp, {n: p.detach().clone() for n, p in model.state_dict().items()})
    (a, wa), (b, wb) = runs["lth"], runs["lth_reinit"]
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert not torch.equal(wa["0.weight"], wb["0.weight"])
    assert torch.all(wb["0.weight"][~b.masks["0"]] == 0)


# ---- SPDF, Sparse-IFT, random search -----------------------------------------------------------
def test_spdf_releases_mask():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = T.spdf(model, opt, "75%", total_steps=20, dense_from=0.5)
    train(model, opt, sp, 9)
    assert sp.sparsity() == pytest.approx(0.75, abs=3e-3)
    train(model, opt, sp, 3)
    assert sp.released and sp.sparsity() < 0.5  # pruned weights train again


def test_sparse_wide_factor_and_iso_flop_search():
    from prunus.training.methods.sparse_ift import iso_flop_width, sparse_wide_factor

    assert sparse_wide_factor(0.75) == pytest.approx(2.0)
    # a hidden layer widened on both sides: k^2 (1-s) d^2 <= d^2  ->  k = 2 at s = 0.75
    assert iso_flop_width(lambda k: k * k * 0.25, 1.0, hi=4.0) == pytest.approx(2.0, abs=1e-6)


def test_random_search_keeps_best_candidate_and_restores_init():
    model = mlp()
    init = {n: p.detach().clone() for n, p in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []

    def score(sp):
        seen.append({k: v.clone() for k, v in sp.masks.items()})
        train(model, opt, sp, 2)
        return -float(sp.masks["0"].sum())  # prefer the sparsest first layer

    sp = T.random_search(model, opt, "80%", total_steps=10, score_fn=score, candidates=4)
    best = int(sp.state["best"])
    assert all(torch.equal(sp.masks[k], seen[best][k]) for k in sp.masks)
    assert sp.state["scores"][best] == sp.state["scores"].max()
    for t in sp.targets:  # the winner starts from the initial weights (sparse fan-in scaled)
        m = sp.masks[t.name]
        scale = (m.numel() / int(m.sum())) ** 0.5
        assert torch.allclose(t.weight, init[f"{t.name}.weight"] * scale * m)
    assert sp.sparsity() == pytest.approx(0.8, abs=3e-3)


# ---- bad input ---------------------------------------------------------------------------------
def test_nm_with_erk_is_an_error():
    with pytest.raises(SpecError, match="N:M"):
        T.srste(mlp(), None, "2:4", allocation="erk")
    with pytest.raises(SpecError):
        SparsitySpec.parse("2:4", allocation="erk")


def test_bad_input_errors():
    with pytest.raises(SpecError, match="unknown training method 'nope'"):
        T.get("nope")
    with pytest.raises(SpecError, match="unknown option"):
        T.gmp(mlp(), None, "90%", total_steps=10, bogus=1)
    with pytest.raises(SpecError, match="keep no weight"):
        T.static(mlp(), None, "100%")
    with pytest.raises(SpecError, match="does not support"):
        T.srste(mlp(), None, "50%")
    with pytest.raises(SpecError, match="does not support"):
        T.rigl(mlp(), None, "2:4", total_steps=10)
    with pytest.raises(SpecError):
        T.static(mlp(), None, "150%")
    model = mlp()
    sp = T.rigl(model, torch.optim.SGD(model.parameters(), lr=0.1), "50%", total_steps=10, delta_t=1)
    with pytest.raises(PrunusError, match="gradients"):
        sp.step()
    assert all(issubclass(e, PrunusError) for e in (SpecError,))


def test_state_dict_roundtrip():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = T.set(model, opt, "80%", total_steps=40, delta_t=2)
    train(model, opt, sp, 7)
    sd = sp.state_dict()
    model2 = mlp(1)
    sp2 = T.set(model2, torch.optim.SGD(model2.parameters(), lr=0.05), "80%", total_steps=40, delta_t=2)
    sp2.load_state_dict(sd)
    assert sp2.step_count == 7 and all(torch.equal(sp.masks[k], sp2.masks[k]) for k in sd["masks"])
    with pytest.raises(SpecError):
        T.static(mlp(), None, "80%").load_state_dict(sd)
