"""Streaming one-shot pruning: bit-identical to the in-memory run, one block held at a time, and the
bad inputs (missing shards or tensors, float16 overflow, no disk space) refused before any work."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import prunus
from prunus.cli import main
from prunus.errors import ModelError
from prunus.export import load_masks
from prunus.io.lazy import LazyModel
from prunus.io.shards import INDEX, ShardIndex
from prunus.oneshot.job import job_from_mapping
from prunus.oneshot.stream_run import run_job

from conftest import make_tiny_llama

FAST = ["--nsamples", "4", "--seqlen", "32", "--windows", "3", "--quiet"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _save(d: Path, tok, dtype=torch.float32, layers: int = 3, shard: str = "40KB", seed: int = 0) -> Path:
    m = make_tiny_llama(vocab_size=len(tok), layers=layers, seed=seed).to(dtype)
    m.save_pretrained(d, max_shard_size=shard)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_tokenizer):
    return _save(tmp_path_factory.mktemp("sharded"), tiny_tokenizer)


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory, tiny_tokenizer):
    return _save(tmp_path_factory.mktemp("sharded_bf16"), tiny_tokenizer, torch.bfloat16)


def _job(folder, load, calib, ev, out=None, **kw):
    d = {"model": str(folder), "calib": str(calib), "eval": str(ev), "nsamples": 4, "seqlen": 32, "windows": 3,
         "progress": False, "load": load, **kw}
    if out is not None:
        d["out"] = str(out)
    return job_from_mapping(d)


def _same_checkpoints(a: Path, b: Path) -> None:
    ma, mb = prunus.load(a), prunus.load(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ka, kb = load_masks(a), load_masks(b)
    assert ka.keys() == kb.keys() and ka
    assert all(torch.equal(ka[k], kb[k]) for k in ka)


def _rows(result):
    return [(r["label"], r["spec"], r["perplexity"], r["sparsity"], r.get("per_layer")) for r in result["runs"]]


@pytest.mark.parametrize("method,spec,extra", [
    ("wanda", "50%", {}),
    ("sparsegpt", "2:4", {}),
    ("magnitude", "50%", {"baselines": ["dense", "random"]}),
    ("sparsegpt", "50%", {"reconstruct": {"epochs": 1}, "baselines": ["dense"]}),
    ("wanda", "2:4", {"refine": "dsnot", "calib_batch_size": 2, "eval_batch_size": 2, "baselines": []}),
    ("sparsegpt", "2:4", {"dtype": "bfloat16", "baselines": ["dense"]}),  # cast on load, as from_pretrained
])
def test_streamed_is_bit_identical(method, spec, extra, tmp_path, sharded, text_files, one_thread):
    calib, ev = text_files
    assert len(ShardIndex(sharded).files()) > 3  # really sharded
    res = {}
    for load in ("memory", "stream"):
        res[load] = run_job(_job(sharded, load, calib, ev, tmp_path / load, method=method, sparsity=spec, **extra),
                            log=lambda s: None)
    assert res["stream"]["settings"]["load"] == "stream"
    assert _rows(res["memory"]) == _rows(res["stream"])
    _same_checkpoints(tmp_path / "memory", tmp_path / "stream")


@pytest.mark.parametrize("shard", [None, 100_000])
def test_streamed_bf16_and_dense_format(shard, tmp_path, sharded_bf16, text_files, monkeypatch, one_thread):
    import prunus.export.writer as writer

    if shard:
        monkeypatch.setattr(writer, "DENSE_SHARD_BYTES", shard)
    calib, ev = text_files
    res = {}
    for load in ("memory", "stream"):
        res[load] = run_job(_job(sharded_bf16, load, calib, ev, tmp_path / load, method="sparsegpt", sparsity="2:4",
                                 format="dense", baselines=["dense"]), log=lambda s: None)
    assert _rows(res["memory"]) == _rows(res["stream"])
    assert res["stream"]["settings"]["working_dtype"] == "bfloat16"
    _same_checkpoints(tmp_path / "memory", tmp_path / "stream")
    from transformers import AutoModelForCausalLM  # a plain transformers folder, sharded

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert (tmp_path / "stream" / "model.safetensors.index.json").is_file() == bool(shard)
    assert (tmp_path / "stream" / "model.safetensors").is_file() != bool(shard)
    assert torch.equal(plain.model.layers[2].mlp.up_proj.weight,
                       prunus.load(tmp_path / "memory").model.layers[2].mlp.up_proj.weight)


def test_one_block_at_a_time(tmp_path, sharded, text_files, monkeypatch, one_thread):
    calib, ev = text_files
    peaks = []
    real = LazyModel.load

    def load(self, refs, what=""):
        real(self, refs, what)
        loaded_blocks = sum(any(not p.is_meta for p in b.parameters()) for b in self.blocks)
        outside = any(not p.is_meta for n, p in self.model.named_parameters() if not n.startswith(self.prefix + "."))
        peaks.append((loaded_blocks, outside))

    monkeypatch.setattr(LazyModel, "load", load)
    res = run_job(_job(sharded, "stream", calib, ev, tmp_path / "o", method="sparsegpt", sparsity="50%",
                       baselines=["dense"]), log=lambda s: None)
    assert res["settings"]["load"] == "stream"
    # every load: at most one block, and never a block together with the embeddings and head
    assert peaks and max(b for b, _ in peaks) == 1
    assert all(b + o == 1 for b, o in peaks)
    assert sum(b for b, _ in peaks) == 2 * 3  # dense pass + method pass, 3 blocks each


def test_streaming_is_the_default_and_refusals_fall_back(capsys, tmp_path, sharded, text_files):
    calib, ev = text_files
    code, _, err = run(capsys, "prune", sharded, "--method", "wanda", "--sparsity", "50%", "--calib", calib,
                       "--eval", ev, "--no-baselines", *FAST)
    assert code == 0 and "one block at a time" in err, err
    code, _, err = run(capsys, "prune", sharded, "--method", "wanda", "--sparsity", "mlp@0.25", "--calib", calib,
                       "--no-baselines", *FAST)
    assert code == 0 and "note: loading" in err and "change the model's shape" in err, err
    code, _, err = run(capsys, "prune", sharded, "--method", "wanda", "--sparsity", "50%", "--allocation", "owl",
                       "--calib", calib, "--load", "stream", *FAST)
    assert code == 2 and "--load stream cannot serve this job" in err and "owl" in err, err


def test_streamed_hub_id(tmp_path, sharded, text_files, monkeypatch):
    import huggingface_hub

    calib, ev = text_files
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: str(sharded))
    res = run_job(job_from_mapping({"model": "someone/tiny-llama", "method": "magnitude", "sparsity": "50%",
                                    "eval": str(ev), "seqlen": 32, "windows": 2, "progress": False,
                                    "baselines": []}), log=lambda s: None)
    assert res["settings"]["load"] == "stream" and res["sparsity"] == pytest.approx(0.5)


def test_missing_shard_is_refused_naming_its_tensors(capsys, tmp_path, sharded, text_files):
    calib, _ = text_files
    bad = tmp_path / "bad"
    shutil.copytree(sharded, bad)
    weight_map = json.loads((bad / INDEX).read_text())["weight_map"]
    gone = sorted(set(weight_map.values()))[2]
    (bad / gone).unlink()
    lost = sorted(k for k, f in weight_map.items() if f == gone)
    with pytest.raises(ModelError, match=f"lacks shard.*{gone}.*{lost[0]}"):
        ShardIndex(bad)
    code, _, err = run(capsys, "prune", bad, "--method", "wanda", "--sparsity", "50%", "--calib", calib,
                       "--out", tmp_path / "o", *FAST)
    assert code == 2 and gone in err and lost[0] in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_missing_tensor_is_refused(tmp_path, sharded):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(sharded, bad)
    index = json.loads((bad / INDEX).read_text())
    key = "model.layers.1.self_attn.o_proj.weight"
    shard = bad / index["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    (bad / INDEX).write_text(json.dumps(index))
    with pytest.raises(ModelError, match=f"lacks 1 tensor.*{key}"):
        LazyModel(bad)
    index["weight_map"][key] = shard.name  # the index names it, the shard does not hold it
    (bad / INDEX).write_text(json.dumps(index))
    with pytest.raises(ModelError, match=f"its shards do not hold.*{key}"):
        ShardIndex(bad)


def test_streamed_float16_overflow_is_refused_before_work(capsys, tmp_path, tiny_tokenizer, text_files):
    calib, _ = text_files
    m = make_tiny_llama(vocab_size=len(tiny_tokenizer), layers=2)
    with torch.no_grad():
        m.model.layers[1].self_attn.v_proj.weight[0, 0] = -7.0e4
    m.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    code, _, err = run(capsys, "prune", tmp_path / "m", "--method", "wanda", "--sparsity", "50%", "--calib", calib,
                       "--dtype", "float16", "--load", "stream", "--out", tmp_path / "o", *FAST)
    assert code == 2 and "model.layers.1.self_attn.v_proj.weight" in err and "float16" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("load", ["stream", "memory"])
def test_no_disk_space_is_refused_before_pruning(load, capsys, tmp_path, sharded, text_files, monkeypatch):
    from collections import namedtuple

    import prunus.oneshot.disk as disk

    calib, _ = text_files
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    code, _, err = run(capsys, "prune", sharded, "--method", "wanda", "--sparsity", "50%", "--calib", calib,
                       "--out", tmp_path / "o", "--load", load, *FAST)
    assert code == 2 and "not enough disk space" in err and "GiB" in err, err
    assert ": sparsity" not in err and "dense:" not in err and not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder either


def test_safetensors_writer_header_outgrowing_its_room(tmp_path):
    from safetensors.torch import load_file

    from prunus.export.writer import SafetensorsWriter

    ts = {f"t{i}": torch.randn(7, 3).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(50)}
    ts["mask"] = torch.tensor([True, False, True])
    for reserve in (8, 1 << 16, 4096):  # too small (moved), too large (moved: too much slack), close
        w = SafetensorsWriter(tmp_path / f"{reserve}.safetensors", reserve=reserve)
        for k, t in ts.items():
            w.add(k, t)
        w.close({"format": "pt", "k": "v" * 100})
        back = load_file(tmp_path / f"{reserve}.safetensors")
        assert back.keys() == ts.keys() and all(torch.equal(back[k], ts[k]) for k in ts)
        assert not list(tmp_path.glob("*.moving"))
