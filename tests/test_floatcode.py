"""Lossless float coding of checkpoint values (prunus.export.floatcode) and its use in checkpoints."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import prunus.export as export
from prunus.errors import CheckpointError
from prunus.export import floatcode as fc
from prunus.core.masks import topk
from prunus.core.spec import NM, Unstructured

from test_export import prune

SPECIALS = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -3e-39, 65504.0, 1.0, -2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(20_000, generator=g) * 0.02).to(dtype)
    t[: len(SPECIALS)] = torch.tensor(SPECIALS).to(dtype)
    t[20] = torch.tensor(0x7FC00123, dtype=torch.int32).view(torch.float32).to(dtype)  # a NaN payload
    parts = fc.encode(t)
    assert parts is not None and set(parts) == {fc.HI, fc.LO}
    size = t.element_size()
    assert parts[fc.LO].numel() == t.numel() * (size - 1)
    back = fc.decode(parts[fc.HI], parts[fc.LO], dtype, t.numel())
    assert back.dtype == dtype
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))  # every bit, NaNs included


def test_the_exponent_plane_compresses_like_its_entropy():
    t = torch.randn(100_000, generator=torch.Generator().manual_seed(1)) * 0.02
    parts = fc.encode(t)
    # Gaussian weights: ~2.6 bits of exponent entropy; Huffman codes it in well under 4 bits
    assert parts[fc.HI].numel() < 0.45 * t.numel()
    assert fc.coded_bytes(parts) < 0.87 * 4 * t.numel()
    bf = fc.encode(t.bfloat16())
    assert fc.coded_bytes(bf) < 0.72 * 2 * t.numel()


def test_not_coded_when_it_does_not_pay_or_cannot():
    assert fc.encode(torch.randn(100)) is None  # too small for the table to pay
    assert fc.encode(torch.arange(10_000)) is None  # integers
    assert fc.encode(torch.randn(10_000, dtype=torch.float64)) is None  # not a supported float
    # every bit pattern equally likely: the exponents do not compress
    bits = torch.randint(-2**31, 2**31 - 1, (50_000,), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    assert fc.encode(bits.view(torch.float32)) is None
    assert fc.encode(torch.randn(100), min_values=10) is not None


def test_corrupt_parts_raise_value_error():
    t = torch.randn(8192) * 0.1
    parts = fc.encode(t)
    hi, lo = parts[fc.HI], parts[fc.LO]
    with pytest.raises(ValueError):
        fc.decode(hi, lo, torch.float32, t.numel() + 1)  # wrong count
    with pytest.raises(ValueError):
        fc.decode(hi, lo[:-3], torch.float32, t.numel())
    with pytest.raises(ValueError):
        fc.decode(hi[: hi.numel() // 2], lo, torch.float32, t.numel())  # truncated stream
    bad = hi.clone()
    bad[0] ^= 0xFF
    with pytest.raises(ValueError):
        fc.decode(bad, lo, torch.float32, t.numel())
    more = torch.cat([hi, hi])  # trailing data after the stream
    with pytest.raises(ValueError):
        fc.decode(more, lo, torch.float32, t.numel())


def _bigger_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("pattern", [Unstructured(), NM(2, 4)], ids=["50%", "2:4"])
def test_checkpoint_at_half_sparsity_is_at_most_0_6_of_dense_with_embeddings_dense(tmp_path, pattern):
    model = _bigger_llama()
    masks = prune(model, 0.5, pattern)  # decoder linears only: the tied embedding stays dense
    state, _ = export.unique_state(model)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "dense.safetensors"),
              metadata={"format": "pt"})
    dense = (tmp_path / "dense.safetensors").stat().st_size
    coded = export.save(model, tmp_path / "coded", masks=masks, metadata={})
    plain = export.save(model, tmp_path / "plain", masks=masks, metadata={}, code_values=False)
    assert coded.bytes / dense <= 0.6, coded.bytes / dense
    assert plain.bytes / dense > 0.6  # without the value coding the dense embedding keeps it above
    tensors = json.loads((tmp_path / "coded" / "prunus.json").read_text())["tensors"]
    assert tensors["model.embed_tokens.weight"]["coding"] == fc.CODING
    assert tensors["model.layers.0.mlp.up_proj.weight"]["coding"] == fc.CODING
    for folder in ("coded", "plain"):
        loaded = export.load(tmp_path / folder)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
        back = export.load_masks(tmp_path / folder)
        assert all(torch.equal(back[k], masks[k]) for k in masks)


@pytest.mark.parametrize("key", ["model.embed_tokens.weight.__hi__",
                                 "model.layers.0.mlp.up_proj.weight.__values__.__lo__"])
def test_flipped_byte_in_coded_values_is_a_checkpoint_error(tmp_path, key):
    model = _bigger_llama()
    export.save(model, tmp_path / "ck", masks=prune(model, 0.5), metadata={})
    f = tmp_path / "ck" / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start, stop = json.loads(data[8:8 + n])[key]["data_offsets"]
    data[8 + n + (start + stop) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt: .*SHA-256"):
        export.load(tmp_path / "ck")


def test_a_newer_format_version_is_refused_clearly(tmp_path, monkeypatch):
    from prunus.export.formats import compressed

    model = _bigger_llama()
    monkeypatch.setattr(compressed, "FORMAT_VERSION", export.FORMAT_VERSION + 1)
    export.save(model, tmp_path / "ck", masks=prune(model, 0.5), metadata={})
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="newer prunus"):
        export.load(tmp_path / "ck")
