"""Checkpoints: exact round trips, size, integrity, pickle refusal and atomic writes (prunus.export)."""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import prunus.export as export
from prunus.errors import CheckpointError, PrunusError
from prunus.export.formats import compressed
from prunus.io.fsutil import OutputExistsError, atomic_dir, atomic_file, check_out_dir
from prunus.core.masks import topk
from prunus.core.spec import NM, Unstructured


def prune(model: nn.Module, sparsity: float, pattern=Unstructured(), embeddings: bool = False) -> dict:
    """Magnitude-prune every decoder Linear (and the tied embedding if asked); return the masks."""
    masks = {}
    for name, mod in model.named_modules():
        wanted = isinstance(mod, nn.Linear) and name != "lm_head"
        if embeddings and isinstance(mod, nn.Embedding):
            wanted = True
        if wanted:
            mask = topk(mod.weight.detach().abs(), sparsity, pattern, name=name)
            with torch.no_grad():
                mod.weight.mul_(mask)
            masks[name] = mask
    return masks


def ids(n: int = 12) -> torch.Tensor:
    return torch.arange(n).remainder(200).reshape(1, n)


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary or set-aside folders an atomic write may have left."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,sparsity", [(Unstructured(), 0.5), (NM(2, 4), 0.5)], ids=["50%", "2:4"])
def test_compressed_round_trip_is_exact(tiny_llama, tiny_tokenizer, tmp_path, pattern, sparsity):
    masks = prune(tiny_llama, sparsity, pattern)
    meta = {"spec": str(pattern), "method": "magnitude"}
    info = export.save(tiny_llama, tmp_path / "ck", masks=masks, metadata=meta, tokenizer=tiny_tokenizer)
    assert info.format == "compressed" and set(info.encodings.values()) == {"bitmask"}
    assert export.detect_format(tmp_path / "ck") == "compressed"

    loaded = export.load(tmp_path / "ck")
    assert not loaded.training
    ref, got = tiny_llama.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # re-tied, not copied
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, tiny_llama(ids()).logits)

    back = export.load_masks(tmp_path / "ck")
    assert back.keys() == masks.keys()
    assert all(torch.equal(back[k], masks[k]) for k in masks)
    md = export.read_metadata(tmp_path / "ck")
    assert md["spec"] == str(pattern) and md["method"] == "magnitude"
    assert {"prunus_version", "created"} <= md.keys()
    # The tokenizer travels with the weights; the tied lm_head is stored once.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "ck")
    assert tok("the house").input_ids == tiny_tokenizer("the house").input_ids
    manifest = json.loads((tmp_path / "ck" / "prunus.json").read_text())
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert manifest["metadata"] == md


def test_untied_weights_stay_untied_even_if_the_config_ties_them(tiny_llama, tmp_path):
    with torch.no_grad():
        tiny_llama.lm_head.weight = nn.Parameter(tiny_llama.model.embed_tokens.weight * 2)
    assert tiny_llama.config.tie_word_embeddings
    export.save(tiny_llama, tmp_path / "ck", masks={}, metadata={})
    loaded = export.load(tmp_path / "ck")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, tiny_llama.lm_head.weight)
    assert torch.equal(loaded.model.embed_tokens.weight, tiny_llama.model.embed_tokens.weight)


def test_gpt2_conv1d_masks_in_out_in_layout(tmp_path):
    """GPT-2's Conv1D stores (in, out); prunus masks are (out, in) and come back that way."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()
    masks = {}
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"):  # (32, 96), square
        w = model.get_submodule(name).weight  # (in, out)
        keep = topk(w.detach().t().abs(), 0.5, NM(2, 4))  # (out, in)
        with torch.no_grad():
            w.mul_(keep.t())
        masks[name] = keep
    for fmt in export.FORMATS:
        export.save(model, tmp_path / fmt, format=fmt, masks=masks, metadata={})
        loaded = export.load(tmp_path / fmt)
        assert type(loaded) is GPT2LMHeadModel
        with torch.no_grad():
            assert torch.equal(loaded(ids(8) % 64).logits, model(ids(8) % 64).logits), fmt
        back = export.load_masks(tmp_path / fmt)
        assert all(torch.equal(back[k], masks[k]) for k in masks), fmt


def test_compressed_bf16_and_dtype_override(tiny_llama, tmp_path):
    model = tiny_llama.to(torch.bfloat16)
    masks = prune(model, 0.5)
    export.save(model, tmp_path / "ck", masks=masks, metadata={})
    loaded = export.load(tmp_path / "ck")
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    as_fp32 = export.load(tmp_path / "ck", dtype=torch.float32)
    assert as_fp32.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


def test_size_at_half_sparsity_and_indices_when_very_sparse(tiny_llama, tmp_path):
    masks = prune(tiny_llama, 0.5, embeddings=True)  # every weight matrix at 50%
    info = export.save(tiny_llama, tmp_path / "half", masks=masks, metadata={})
    state, _ = export.unique_state(tiny_llama)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "dense.safetensors"),
              metadata={"format": "pt"})
    dense_size = (tmp_path / "dense.safetensors").stat().st_size
    assert abs(info.dense_bytes - dense_size) <= 64  # the estimate is the real dense file, +- header
    assert info.bytes / dense_size <= 0.6, info.bytes / dense_size
    assert info.ratio <= 0.6

    model = type(tiny_llama)(tiny_llama.config).eval()
    masks = prune(model, 0.97)
    info97 = export.save(model, tmp_path / "sparse", masks=masks, metadata={})
    assert "csr" in info97.encodings.values()
    for key, enc in info97.encodings.items():  # the choice is always the smaller one
        w = model.state_dict()[key]
        sizes = compressed.encoded_bytes(tuple(w.shape), int((w != 0).sum()), w.element_size())
        assert enc == min(sizes, key=sizes.get), key
    tensors = json.loads((tmp_path / "sparse" / "prunus.json").read_text())["tensors"]
    assert {t["encoding"] for t in tensors.values()} == {"dense", "csr"}  # 97%: indices everywhere
    loaded = export.load(tmp_path / "sparse")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    back = export.load_masks(tmp_path / "sparse")
    assert all(torch.equal(back[k], masks[k]) for k in masks)


def test_encode_edge_sparsities():
    w = torch.randn(6, 40)
    for keep in (torch.zeros(6, 40, dtype=torch.bool), torch.ones(6, 40, dtype=torch.bool)):
        enc, parts = compressed.encode(w * keep, keep)
        assert parts[compressed.VALUES].numel() == int(keep.sum())
    mask = torch.zeros(6, 40, dtype=torch.bool)
    mask[2, 7] = True
    enc, parts = compressed.encode(w * mask, mask)
    assert enc == "csr" and parts[compressed.COLS].dtype == torch.int16
    assert parts[compressed.ROWPTR].tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_dense_format_loads_with_plain_from_pretrained(tiny_llama, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    masks = prune(tiny_llama, 0.5, NM(2, 4))
    info = export.save(tiny_llama, tmp_path / "d", format="dense", masks=masks,
                       metadata={"spec": "2:4"}, tokenizer=tiny_tokenizer)
    assert info.format == "dense" and export.detect_format(tmp_path / "d") == "dense"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    with torch.no_grad():
        assert torch.equal(plain(ids()).logits, tiny_llama(ids()).logits)
    ours = export.load(tmp_path / "d")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), tiny_llama.state_dict().values()))
    back = export.load_masks(tmp_path / "d")
    assert back.keys() == masks.keys() and all(torch.equal(back[k], masks[k]) for k in masks)
    assert export.read_metadata(tmp_path / "d")["spec"] == "2:4"


def test_plain_transformers_folder_loads_as_dense(tiny_llama_dir):
    assert export.detect_format(tiny_llama_dir) == "dense"
    assert export.load_masks(tiny_llama_dir) == {} and export.read_metadata(tiny_llama_dir) == {}
    assert export.load(tiny_llama_dir).config.hidden_size == 64


def test_gguf_like_model_is_saved_through_a_plain_twin(tiny_llama, tmp_path):
    """A GGUF-loaded model refuses save_pretrained; both formats still save it, without the quantizer."""
    from transformers import AutoModelForCausalLM

    tiny_llama.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    tiny_llama.config.quantization_config = {"quant_method": "gguf"}
    with pytest.raises(ValueError, match="not serializable"):
        tiny_llama.save_pretrained(tmp_path / "refused")
    masks = prune(tiny_llama, 0.5)
    for fmt in ("dense", "compressed"):
        export.save(tiny_llama, tmp_path / fmt, format=fmt, masks=masks, metadata={})
        assert "quantization_config" not in json.loads((tmp_path / fmt / "config.json").read_text())
        loaded = export.load(tmp_path / fmt)
        with torch.no_grad():
            assert torch.equal(loaded(ids()).logits, tiny_llama(ids()).logits), fmt
    AutoModelForCausalLM.from_pretrained(tmp_path / "dense")


def test_masks_are_checked_against_the_model(tiny_llama, tmp_path):
    w = tiny_llama.model.layers[0].mlp.up_proj.weight
    bad = {
        "no.such.module": torch.ones(3, 3, dtype=torch.bool),
        "model.layers.0.mlp.up_proj": torch.ones(3, 3, dtype=torch.bool),  # wrong shape
    }
    for name, mask in bad.items():
        with pytest.raises(CheckpointError):
            export.save(tiny_llama, tmp_path / "x", masks={name: mask}, metadata={})
    not_applied = topk(w.detach().abs(), 0.5, Unstructured())  # weights still non-zero where pruned
    with pytest.raises(CheckpointError, match="apply the masks"):
        export.save(tiny_llama, tmp_path / "x", masks={"model.layers.0.mlp.up_proj": not_applied}, metadata={})
    with pytest.raises(CheckpointError, match="JSON"):
        export.save(tiny_llama, tmp_path / "x", masks={}, metadata={"when": object()})
    assert not (tmp_path / "x").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Integrity
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tiny_llama, tmp_path) -> Path:
    export.save(tiny_llama, tmp_path / "ck", masks=prune(tiny_llama, 0.5), metadata={"spec": "0.5"})
    return tmp_path / "ck"


def test_truncated_file_is_a_checkpoint_error(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    for cut in (len(data) - 100, 40, 3):
        f.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
            export.load(saved)


@pytest.mark.parametrize("where", ["dense tensor", "packed bits", "kept values"])
def test_one_flipped_byte_is_a_checkpoint_error(saved, where):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    key = {"dense tensor": "model.norm.weight",
           "packed bits": "model.layers.1.mlp.up_proj.weight.__bits__",
           "kept values": "model.layers.0.self_attn.q_proj.weight.__values__"}[where]
    start, stop = header[key]["data_offsets"]
    data[8 + n + (start + stop) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: .*SHA-256"):
        export.load(saved)
    if where == "packed bits":
        with pytest.raises(CheckpointError, match="corrupt"):
            export.load_masks(saved)


def test_tampered_header_manifest_is_a_checkpoint_error(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    flipped = data.replace(b'\\"spec\\": \\"0.5\\"', b'\\"spec\\": \\"0.9\\"', 1)
    assert flipped != data
    f.write_bytes(flipped)
    with pytest.raises(CheckpointError, match="corrupt"):
        export.load(saved)


def test_dense_checkpoint_is_hash_checked(tiny_llama, tmp_path):
    export.save(tiny_llama, tmp_path / "d", format="dense", masks=prune(tiny_llama, 0.5), metadata={})
    f = tmp_path / "d" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        export.load(tmp_path / "d")


# ---------------------------------------------------------------------------------------------
# Refused and missing paths
# ---------------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this creates ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_is_refused_and_never_unpickled(tiny_llama, tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Trap(probe)))  # the trap works: unpickling does create the file
    assert probe.exists()

    marker = tmp_path / "unpickled"
    payload = {"weights": tiny_llama.state_dict(), "trap": _Trap(marker)}
    files = []
    for suffix in (".bin", ".pt", ".pth", ".pkl", ".safe"):  # ".safe": a pickle under another name
        f = tmp_path / f"model{suffix}"
        torch.save(payload, f)
        files.append(f)
    folder = tmp_path / "hf_pickle"
    folder.mkdir()
    tiny_llama.config.to_json_file(folder / "config.json")
    torch.save(payload, folder / "pytorch_model.bin")
    for target in [*files, folder]:
        for verb in (export.load, export.load_masks, export.read_metadata, export.detect_format):
            with pytest.raises(CheckpointError, match="refuses pickle.*safetensors"):
                verb(target)
    assert not marker.exists()
    for src in Path(export.__file__).parent.rglob("*.py"):
        assert not re.search(r"torch\s*\.\s*load\b", src.read_text()), src


def test_missing_and_foreign_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export.load(tmp_path / "nope")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a prunus or transformers checkpoint"):
        export.load(tmp_path / "notes")
    (tmp_path / "file.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(CheckpointError, match="is a file"):
        export.load(tmp_path / "file.safetensors")
    with pytest.raises(CheckpointError, match="unknown export format"):
        export.save(nn.Linear(2, 2), tmp_path / "o", format="onnx")


def test_compressed_works_for_a_plain_module(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 10))
    masks = {"0": topk(net[0].weight.detach().abs(), 0.9, Unstructured())}
    with torch.no_grad():
        net[0].weight.mul_(masks["0"])
    export.save(net, tmp_path / "mlp", masks=masks, metadata={})
    with pytest.raises(CheckpointError, match="load_state_dict"):
        export.load(tmp_path / "mlp")
    twin = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 10))
    twin.load_state_dict(compressed.load_state_dict(tmp_path / "mlp"))
    x = torch.randn(4, 40)
    assert torch.equal(twin(x), net(x))
    assert torch.equal(export.load_masks(tmp_path / "mlp")["0"], masks["0"])
    with pytest.raises(CheckpointError, match="transformers model"):
        export.save(net, tmp_path / "mlp_dense", format="dense")


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def test_existing_out_dir_is_refused_and_untouched(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        check_out_dir(out)
    for fmt in export.FORMATS:
        with pytest.raises(PrunusError, match="already exists; pass --overwrite"):
            export.save(tiny_llama, out, format=fmt, masks={}, metadata={})
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert leftovers(tmp_path) == []


class _FailingTokenizer:
    """Writes part of its files, then fails, as a full disk would."""

    def save_pretrained(self, folder):
        Path(folder, "tokenizer.json").write_text("{")
        raise OSError("No space left on device")


def test_failure_mid_write_leaves_nothing(tiny_llama, tmp_path):
    for fmt in export.FORMATS:
        out = tmp_path / "deep" / "new" / fmt
        with pytest.raises(OSError, match="No space"):
            export.save(tiny_llama, out, format=fmt, masks={}, metadata={}, tokenizer=_FailingTokenizer())
        assert not (tmp_path / "deep").exists()  # not even the parents it created
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_only_when_complete(tiny_llama, tmp_path):
    out = tmp_path / "ck"
    export.save(tiny_llama, out, masks={}, metadata={"run": 1})
    with pytest.raises(OSError):
        export.save(tiny_llama, out, masks={}, metadata={"run": 2}, tokenizer=_FailingTokenizer(),
                    overwrite=True)
    assert export.read_metadata(out)["run"] == 1 and export.load(out) is not None
    info = export.save(tiny_llama, out, format="dense", masks={}, metadata={"run": 3}, overwrite=True)
    assert info.path == out.absolute() and export.read_metadata(out)["run"] == 3
    assert export.detect_format(out) == "dense" and not (out / "prunus.json").read_text().count('"run": 1')
    assert leftovers(tmp_path) == []


def test_atomic_dir_and_file(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".")
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    f = tmp_path / "results.json"
    f.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(f) as tmp:
            assert tmp.suffix == ".json" and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert f.read_text() == "old" and leftovers(tmp_path) == []
    with atomic_file(f) as tmp:
        tmp.write_text("new")
    assert f.read_text() == "new"
    with pytest.raises(OutputExistsError):
        with atomic_file(f, overwrite=False) as tmp:
            pass
    assert leftovers(tmp_path) == []


class _StateFormat:
    """A format defined in a test: the untied state dict in one plain safetensors file, masks as bools."""

    NAME = "x"

    @staticmethod
    def save(model, path, *, masks=None, metadata=None, tokenizer=None, overwrite=False):
        from prunus.export.manifest import write_manifest, with_provenance
        from prunus.export.tensors import unique_state

        out = check_out_dir(path, overwrite)
        state, tied = unique_state(model)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            model.config.save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "state.safetensors"))
            save_file({k: v.contiguous() for k, v in (masks or {}).items()} or {"_": torch.zeros(1)},
                      str(tmp / "keep.safetensors"))
            write_manifest(tmp, {"format": "x", "metadata": with_provenance(metadata, model), "tied": tied,
                                 "architecture": type(model).__name__})
        size = (out / "state.safetensors").stat().st_size
        return export.ExportInfo(path=out, format="x", bytes=size, dense_bytes=size, total_bytes=size)

    @staticmethod
    def load(path, *, device="cpu", dtype=None):
        import transformers
        from safetensors.torch import load_file

        man = export.read_manifest(path)
        cfg = transformers.AutoConfig.from_pretrained(str(path))
        model = getattr(transformers, man["architecture"])(cfg)
        state = load_file(str(Path(path) / "state.safetensors"))
        model.load_state_dict({**state, **{a: state[s] for a, s in man["tied"].items()}})
        return model.to(device=device, dtype=dtype).eval()

    @staticmethod
    def load_masks(path):
        from safetensors.torch import load_file

        return {k: v for k, v in load_file(str(Path(path) / "keep.safetensors")).items() if k != "_"}

    @staticmethod
    def read_metadata(path):
        return dict(export.read_manifest(path).get("metadata", {}))


@pytest.fixture
def format_x():
    fmt = export.register_format(_StateFormat)
    yield fmt
    export.unregister_format("x")
    assert "x" not in export.FORMATS and "x" not in export.format_names()


def test_a_format_defined_in_a_test_saves_and_loads_through_the_verbs(tiny_llama, tmp_path, format_x):
    assert "x" in export.format_names() and export.format_names()[0] == "compressed"
    masks = prune(tiny_llama, 0.5)
    info = export.save(tiny_llama, tmp_path / "ck", format="x", masks=masks, metadata={"method": "m"})
    assert info.format == "x" and export.detect_format(tmp_path / "ck") == "x"
    loaded = export.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, tiny_llama(ids()).logits)
    back = export.load_masks(tmp_path / "ck")
    assert set(back) == set(masks) and all(torch.equal(back[k], masks[k]) for k in masks)
    assert export.read_metadata(tmp_path / "ck")["method"] == "m"
    with pytest.raises(CheckpointError, match="already registered"):
        export.register_format(SimpleNamespace(NAME="x", save=len, load=len, load_masks=len, read_metadata=len))


def test_unknown_format_lists_the_registered_ones(tiny_llama, tmp_path):
    with pytest.raises(CheckpointError, match="choose one of compressed, dense"):
        export.save(tiny_llama, tmp_path / "ck", format="nope", masks={}, metadata={})


def test_export_imports_neither_kernels_nor_model_loading():
    """Loading a checkpoint's weights needs no kernel; prunus.load (io.models) applies the plan."""
    from test_architecture import import_graph

    graph = import_graph()
    bad = sorted((m, t) for m, ts in graph.items() if m.startswith("prunus.export")
                 for t in ts if t.startswith(("prunus.kernels", "prunus.io.models", "prunus.oneshot")))
    assert bad == []
    assert not any(t.startswith("prunus.export") for t in graph["prunus.kernels.plans"])
