"""Quantized weights composed with sparsity: the spec, RTN, GPTQ / joint SparseGPT, checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prunus import export
from prunus.algorithms.sparsegpt import SparseGPTOptions, sparsegpt
from prunus.core.quant import off_grid, rtn
from prunus.core.spec import NM, Quant, SparsitySpec, Unstructured
from prunus.core.stats import LayerStats
from prunus.errors import SpecError
from prunus.export import qcodec
from prunus.oneshot.pipeline import prune

from conftest import make_tiny_llama


# ---------------------------------------------------------------- the spec

@pytest.mark.parametrize("text, pattern, sparsity, quant, canonical", [
    ("2:4+int8", NM(2, 4), 0.5, Quant(8, None, True), "2:4+int8"),
    ("50%+int8", Unstructured(), 0.5, Quant(8, None, True), "0.5+int8"),
    ("50%+int4", Unstructured(), 0.5, Quant(4, 128, True), "0.5+int4"),
    ("0.5+int4g64", Unstructured(), 0.5, Quant(4, 64, True), "0.5+int4g64"),
    ("int4g128z", Unstructured(), 0.0, Quant(4, 128, False), "0+int4z"),
    ("0+int8", Unstructured(), 0.0, Quant(8, None, True), "0+int8"),
    ("int8", Unstructured(), 0.0, Quant(8, None, True), "0+int8"),
    ("4:8+int8g128z", NM(4, 8), 0.5, Quant(8, 128, False), "4:8+int8g128z"),
    ("0.5+int4c", Unstructured(), 0.5, Quant(4, None, True), "0.5+int4c"),
])
def test_quant_specs_parse_and_round_trip(text, pattern, sparsity, quant, canonical):
    s = SparsitySpec.parse(text)
    assert (s.pattern, s.sparsity, s.quant) == (pattern, sparsity, quant)
    assert str(s) == canonical
    assert SparsitySpec.parse(str(s)) == s


def test_specs_without_quant_are_unchanged():
    for text in ("2:4", "0.5", "50%", "4x4@0.5", "channel@0.3"):
        s = SparsitySpec.parse(text)
        assert s.quant is None
        assert s == SparsitySpec(s.pattern, s.sparsity)
        assert "+" not in str(s)
    assert str(SparsitySpec.parse("0.5", "owl")) == "0.5 (owl)"
    assert str(SparsitySpec.parse("0.5+int8", "owl")) == "0.5+int8 (owl)"


@pytest.mark.parametrize("bad, words", [
    ("0.5+int3", "int8 and int4"), ("0.5+int4g0", "power of two"), ("0.5+int8g7", "power of two"),
    ("0.5+int16", "int8 and int4"), ("0.5+fp8", "expected int8 or int4"),
    ("0.5+int8a", "activation"), ("0.5+", "expected int8"), ("0.5+int4+int8", "at most one"),
    ("0.5+int4g64c", "expected int8 or int4"), ("0.5+int4g8192", "power of two"),
])
def test_bad_quant_specs_are_refused_clearly(bad, words):
    with pytest.raises(SpecError, match=words):
        SparsitySpec.parse(bad)


# ---------------------------------------------------------------- round to nearest

W = torch.tensor([[1.75, -0.5, 3.0, 0.3], [0.0, 0.0, 0.0, 0.0]])
KEEP = torch.tensor([[True, True, False, True], [True, True, True, True]])


def test_rtn_symmetric_by_hand():
    qw = rtn(W, KEEP, Quant(4, None, True), "l")  # row 0: kept max |w| 1.75 -> scale 1.75 / 7
    assert qw.codes.tolist() == [[7, -2, 0, 1], [0, 0, 0, 0]]
    assert qw.scales.tolist() == [[0.25], [1.0]]  # an all-zero row: scale 1, codes 0
    assert qw.dequantize().tolist() == [[1.75, -0.5, 0.0, 0.25], [0.0, 0.0, 0.0, 0.0]]
    assert qw.zeros is None and qw.codes.dtype == torch.int8


def test_rtn_asymmetric_by_hand_keeps_pruned_weights_zero():
    qw = rtn(W, KEEP, Quant(4, None, False), "l")  # kept range [-0.5, 1.75] -> scale 2.25/15, z=3
    assert qw.zeros.tolist() == [[3], [0]]
    assert qw.codes.tolist() == [[15, 0, 3, 5], [0, 0, 0, 0]]  # the pruned weight: the zero point
    sc = qw.scales[0, 0].item()  # 0.15 rounded up onto the float16 grid: stored in 2 bytes, exactly
    assert sc == pytest.approx(0.15, rel=1e-3) and sc >= 2.25 / 15
    assert torch.tensor(sc).half().float().item() == sc
    d = qw.dequantize()
    assert d[0].tolist() == pytest.approx([12 * sc, -3 * sc, 0.0, 2 * sc])
    assert d[0, 2].item() == 0.0 and bool((d[1] == 0).all())


def test_scales_round_up_onto_float16():
    from prunus.core.quant import half_up

    s = torch.tensor([0.02, 1.0, 3.0001, 1e-9, 7e4])
    h = half_up(s)
    assert bool((h >= s).all())
    assert torch.equal(h[:3].half().float(), h[:3])  # on the float16 grid, the next one up
    assert h[2].item() == 3.001953125
    assert torch.equal(h[3:], s[3:])  # outside float16's normal range: unchanged (stored as float32)


def test_rtn_single_nonzero_and_int8():
    w = torch.zeros(3, 16)
    w[1, 5] = -2.54
    qw = rtn(w, torch.ones_like(w, dtype=torch.bool), Quant(8), "l")
    assert qw.codes[1, 5].item() == -127 and int(qw.codes.abs().sum()) == 127
    # exact but for the scale's float16 rounding (relative 2^-11 at most)
    assert qw.dequantize()[1, 5].item() == pytest.approx(-2.54, rel=2 ** -11)


def test_zero_points_never_revive_pruned_weights():
    torch.manual_seed(0)
    w = torch.randn(32, 256) + 0.7  # all-positive-ish rows: a large zero point
    keep = torch.rand(32, 256) > 0.5
    for q in (Quant(4, 64, False), Quant(8, None, False), Quant(4, 8, False)):
        qw = rtn(w, keep, q, "l")
        d = qw.dequantize()
        assert bool((d[~keep] == 0).all())
        assert off_grid(d, qw) == 0
        g = qw.group
        z = qw.zeros.float().repeat_interleave(g, 1)
        s = qw.scales.repeat_interleave(g, 1)
        assert torch.equal(d, s * (qw.codes.float() - z) * keep)  # scale * integer, exactly


def test_group_not_dividing_the_width_names_the_layer():
    with pytest.raises(SpecError, match=r"layers\.3\.mlp.*not a multiple of the quantization group 128"):
        rtn(torch.randn(4, 192), torch.ones(4, 192, dtype=torch.bool), Quant(4, 128), "layers.3.mlp")


@pytest.mark.parametrize("q", [Quant(4, 8, True), Quant(4, 8, False), Quant(8, None, True),
                               Quant(8, None, False)])
def test_packing_round_trips(q):
    torch.manual_seed(0)
    w = torch.randn(5, 24)
    keep = torch.rand(5, 24) > 0.3
    qw = rtn(w, keep, q, "l")
    parts = qcodec.encode_quant(qw, masked=True)
    kept = int(keep.sum())
    if q.bits == 4:
        assert parts[qcodec.CODES].numel() == (kept + 1) // 2
    back = qcodec.decode_quant(str(q), (5, 24), keep, kept, parts[qcodec.CODES], parts[qcodec.SCALES],
                               parts.get(qcodec.ZEROS))
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.dequantize(), qw.dequantize())


# ---------------------------------------------------------------- GPTQ and joint SparseGPT

def _layer(seed=0, out_f=64, in_f=256, n=2048):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(n, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) * 0.3 \
        + torch.randn(n, in_f, generator=g)
    return w, x, LayerStats(n, hessian=x.T @ x)


def _err(x, w, wq):
    """The layer's output error, in float64: int8's share of it is small enough that float32
    accumulation noise would decide the comparisons below."""
    return float(((x.double() @ (w.double() - wq.double()).T) ** 2).sum())


@pytest.mark.parametrize("q", [Quant(8), Quant(4, 64), Quant(4, 128, False)])
def test_gptq_beats_rtn_on_dense_weights(q, one_thread):
    w, x, stats = _layer()
    new_w, keep, qw = sparsegpt(w, stats, 0.0, Unstructured(), SparseGPTOptions(), "l", quant=q)
    assert bool(keep.all())
    assert torch.equal(new_w, qw.dequantize()) and off_grid(new_w, qw) == 0
    assert _err(x, w, new_w) < 0.8 * _err(x, w, rtn(w, keep, q, "l").dequantize())


@pytest.mark.parametrize("pattern, sparsity", [(Unstructured(), 0.5), (NM(2, 4), 0.5)])
@pytest.mark.parametrize("q", [Quant(8), Quant(4, 64), Quant(4, 64, False)])
@pytest.mark.parametrize("seed", [0, 1])
def test_joint_sparsegpt_beats_sparsegpt_then_rtn(pattern, sparsity, q, seed, one_thread):
    w, x, stats = _layer(seed)
    new_w, keep, qw = sparsegpt(w, stats, sparsity, pattern, SparseGPTOptions(), "l", quant=q)
    pw, pkeep = sparsegpt(w, stats, sparsity, pattern, SparseGPTOptions(), "l")
    assert torch.equal(keep, pkeep)  # the mask is SparseGPT's, exactly
    assert bool((new_w[~keep] == 0).all()) and off_grid(new_w, qw) == 0
    pruned = _err(x, w, pw)
    joint, then_rtn = _err(x, w, new_w) - pruned, _err(x, w, rtn(pw, pkeep, q, "l").dequantize()) - pruned
    if q.bits == 4:
        assert joint < then_rtn  # the extra error quantization adds over pruning alone
    else:  # int8's extra error is below the run-to-run spread of the second OBS pass (a 1e-4
        # change of the scales moves it 10-40k here, on a pruning error of ~7e7): total error only
        assert pruned + joint < 1.001 * (pruned + then_rtn)


def test_sparsegpt_without_quant_returns_two_values():
    w, _, stats = _layer(out_f=8, in_f=32, n=64)
    assert len(sparsegpt(w, stats, 0.5, Unstructured(), SparseGPTOptions(), "l")) == 2


# ---------------------------------------------------------------- pipeline and checkpoints

def test_pipeline_rtn_after_other_methods_keeps_the_masks(one_thread):
    model = make_tiny_llama()
    calib = torch.randint(0, 300, (4, 32))
    for method in ("magnitude", "wanda"):
        plain, quant = copy.deepcopy(model), copy.deepcopy(model)
        r0 = prune(plain, SparsitySpec.parse("2:4"), method, calib, progress=False)
        r1 = prune(quant, SparsitySpec.parse("2:4+int4g32"), method, calib, progress=False)
        assert r0.quant == {}
        # calibrated methods see the quantized earlier blocks: only block 0 sees the same inputs
        same = [k for k in r0.masks if method == "magnitude"
                or k.startswith("model.layers.0.self_attn.") and k[-6] in "qkv"]
        assert all(torch.equal(r0.masks[k], r1.masks[k]) for k in same)
        for name, mod in quant.named_modules():
            if name in same:
                qw = r1.quant[name]
                assert off_grid(mod.weight, qw) == 0
                assert torch.equal(mod.weight, rtn(plain.get_submodule(name).weight, r0.masks[name],
                                                   Quant(4, 32), name).dequantize())
        emb = quant.model.embed_tokens.weight
        assert off_grid(emb, r1.quant["model.embed_tokens"]) == 0 and quant.lm_head.weight is emb


def test_bad_group_fails_before_any_work():
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SpecError, match=r"model\.layers\.0\.self_attn\.q_proj: input width 64"):
        prune(model, SparsitySpec.parse("2:4+int4g128"), "magnitude", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("text", ["2:4+int4g32", "0.5+int8z", "int4g64z"])
def test_quantized_checkpoint_loads_bit_exact(tmp_path, text, one_thread):
    model = make_tiny_llama(hidden=128, inter=256)
    r = prune(model, SparsitySpec.parse(text), "sparsegpt", torch.randint(0, 300, (4, 32)),
              progress=False)
    info = export.save(model, tmp_path / "q", masks=r.masks, quant=r.quant, metadata={"spec": text})
    back = export.load(tmp_path / "q")
    a, b = model.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    masks = export.load_masks(tmp_path / "q")
    assert set(masks) == set(r.masks) and all(torch.equal(masks[k], r.masks[k]) for k in masks)
    man = json.loads((tmp_path / "q" / "prunus.json").read_text())
    assert man["format_version"] == 3
    entry = man["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert entry["encoding"] == "quant" and entry["quant"] == str(SparsitySpec.parse(text).quant)
    assert set(info.encodings.values()) == {"quant"}


def test_2_4_int4_checkpoint_is_small(tmp_path, one_thread):
    model = make_tiny_llama(hidden=256, inter=512)
    fp32 = export.save(model, tmp_path / "fp32", code_values=False)
    r = prune(model, SparsitySpec.parse("2:4+int4"), "magnitude", progress=False)
    q = export.save(model, tmp_path / "q", masks=r.masks, quant=r.quant)
    assert q.bytes / fp32.bytes < 0.12  # norms, the embedding in int4 groups too, header
    emb = r.quant["model.embed_tokens"]
    assert emb.quant == SparsitySpec.parse("2:4+int4").quant  # int4 everywhere, as asked


def test_embedding_follows_the_spec_grid():
    from prunus.oneshot.pipeline import EMBEDDING_QUANT, embedding_quant

    q4 = SparsitySpec.parse("2:4+int4g64").quant
    assert embedding_quant(q4, 576) == q4
    assert embedding_quant(q4, 100) == EMBEDDING_QUANT  # 100 is not a multiple of 64: int8 per row
    assert embedding_quant(SparsitySpec.parse("int8").quant, 576) == EMBEDDING_QUANT


def test_a_weight_off_its_codes_is_refused(tmp_path):
    model = make_tiny_llama()
    r = prune(model, SparsitySpec.parse("2:4+int8"), "magnitude", progress=False)
    keep = r.masks["model.layers.0.mlp.up_proj"]
    i, j = (int(v) for v in keep.nonzero()[0])
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[i, j] += 1e-3
    from prunus.errors import CheckpointError
    with pytest.raises(CheckpointError, match="not its quantized codes"):
        export.save(model, tmp_path / "bad", masks=r.masks, quant=r.quant)


@pytest.mark.parametrize("text", ["2:4+int4g32", "50%+int8"])
def test_tied_head_is_gptq_quantized_by_a_calibrated_method(text, one_thread):
    """SparseGPT's quant path (GPTQ) also quantizes a tied embedding, on the head's inputs: its head
    output error on the calibration windows is below round-to-nearest's, and it is on the grid."""
    from prunus.oneshot.embeddings import embedding_quant, head_stats, tied_head

    model = make_tiny_llama(hidden=64, inter=128)
    assert tied_head(model, model.model.embed_tokens) is model.lm_head
    calib = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    spec = SparsitySpec.parse(text)
    pruned = copy.deepcopy(model)
    r = prune(pruned, spec, "sparsegpt", calib=calib, progress=False)
    emb = r.quant["model.embed_tokens"]
    got = pruned.model.embed_tokens.weight.detach()
    assert emb.quant == embedding_quant(spec.quant, 64)
    assert torch.equal(got, emb.dequantize()) and pruned.lm_head.weight is pruned.model.embed_tokens.weight
    # the same pruned model, embedding to nearest instead
    w = got.clone()
    with torch.no_grad():
        pruned.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
    dense_w = pruned.lm_head.weight.detach().clone()
    near = rtn(dense_w, torch.ones_like(dense_w, dtype=torch.bool), emb.quant, "emb").dequantize()
    h = head_stats(pruned, pruned.lm_head, calib).hessian
    err = lambda q: float(torch.einsum("oi,ij,oj->", q - dense_w, h, q - dense_w))  # noqa: E731
    assert err(w) < 0.9 * err(near)


def test_round_to_nearest_methods_keep_rounding_the_table(one_thread):
    model = make_tiny_llama(hidden=64, inter=128)
    dense = model.model.embed_tokens.weight.detach().clone()
    calib = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    r = prune(model, SparsitySpec.parse("50%+int8"), "wanda", calib=calib, progress=False)
    near = rtn(dense, torch.ones_like(dense, dtype=torch.bool), Quant(8), "emb")
    assert torch.equal(r.quant["model.embed_tokens"].codes, near.codes)
