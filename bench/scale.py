"""Pruning a model larger than the memory it may use: streaming against in-memory, on a synthetic Llama.

Writes a Llama-architecture checkpoint with random weights as sharded bfloat16 safetensors (by
default about 1.5B parameters: hidden 2048, 24 blocks, MLP 8192, GQA with 32 query and 8 KV heads,
a 32000-token vocabulary, untied head; about 3 GB), then prunes it with Wanda and SparseGPT at 50%
and 2:4 on ``--nsamples`` x ``--seqlen`` calibration tokens of synthetic text, each run its own
``prunus prune`` process, streamed (``--load stream``) and in memory (``--load memory``). Reports
per run the peak RSS of that process, its wall time (start to exit: loading, pruning, writing), the
size of the checkpoint and of the output, and checks the targets: streaming peak RSS at most
0.35x the checkpoint + 0.5 GB, streaming time at most 1.2x in-memory.

    .venv/bin/python bench/scale.py --json runs/scale.json                    # the 1.5B model, ~3 GB disk x 3
    .venv/bin/python bench/scale.py --hidden 256 --blocks 4 --mlp 1024 --heads 8 --kv-heads 2 --vocab 4096

The weights are random, so perplexity means nothing here and is not measured (``--eval-windows N``
adds a streamed evaluation on synthetic text). The checkpoint is written to ``--workdir`` (default: a
temporary folder, removed afterwards) without ever holding the model in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import add_data_args, child_env, write_json  # noqa: E402

WORDS = ("the a of and to in is was that it he she for on with as his her at by had not be but from they you "
         "all were this which have one there an are or been when said would so who what their if no my more").split()


def synthetic_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n"


def write_checkpoint(a: argparse.Namespace, folder: Path) -> int:
    """The synthetic checkpoint, one shard at a time (never the whole model in memory); its bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.mlp,
                      num_hidden_layers=a.blocks, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=max(2048, a.seqlen), tie_word_embeddings=False, dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    with init_empty_weights():
        skeleton = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(a.seed)
    shard: dict[str, torch.Tensor] = {}
    names: list[list[str]] = []
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            names.append(list(shard))
            save_file(shard, str(folder / f"part-{len(names)}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0

    for key, p in skeleton.state_dict().items():
        if key.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        shard[key] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= a.shard_mb * 2**20:
            flush()
    flush()
    n = len(names)
    weight_map = {}
    for i, keys in enumerate(names, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(folder / f"part-{i}.safetensors", folder / final)
        weight_map.update({k: final for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([synthetic_text(20000)], trainers.BpeTrainer(
        vocab_size=min(500, a.vocab), special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def prune(a: argparse.Namespace, ckpt: Path, text: Path, method: str, spec: str, load: str, out: Path) -> dict:
    js = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "prunus", "prune", str(ckpt), "--method", method, "--sparsity", spec,
           "--calib", str(text), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--no-baselines",
           "--load", load, "--out", str(out), "--json", str(js), "--quiet", "--overwrite"]
    if a.eval_windows:
        cmd += ["--eval", str(text), "--windows", str(a.eval_windows)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    res = json.loads(js.read_text())
    return {"wall_s": round(wall, 1), "prune_s": round(res["seconds"], 1), "peak_rss_mb": res["peak_rss_mb"],
            "output_mb": round(sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20, 1),
            "perplexity": res.get("perplexity"), "sparsity": res["sparsity"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--blocks", type=int, default=24)
    p.add_argument("--mlp", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-mb", type=int, default=500, help="shard size of the synthetic checkpoint")
    add_data_args(p, model=None, calib=None, eval=None, nsamples=8, seqlen=256, windows=None)
    p.add_argument("--eval-windows", type=int, default=0)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--specs", default="50%,2:4")
    p.add_argument("--loads", default="stream,memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="make the temporary folder of the checkpoint and outputs in this folder "
                   "(created if missing; the temporary folder is removed afterwards)")
    p.add_argument("--json", help="write the rows here (atomically)")
    a = p.parse_args()
    if a.workdir:
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=a.workdir) as work:
        work_dir = Path(work)
        ckpt = work_dir / "synthetic"
        t0 = time.perf_counter()
        ckpt_bytes = write_checkpoint(a, ckpt)
        params = ckpt_bytes / 2
        print(f"wrote {ckpt}: {params / 1e9:.2f}B parameters, {ckpt_bytes / 2**30:.2f} GiB bf16 in "
              f"{len(list(ckpt.glob('*.safetensors')))} shards ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        text = work_dir / "calib.txt"
        text.write_text(synthetic_text(max(20000, 2 * a.nsamples * a.seqlen)))
        limit = (0.35 * ckpt_bytes + 0.5 * 2**30) / 2**20
        rows = []
        for method in a.methods.split(","):
            for spec in a.specs.split(","):
                runs = {}
                for load in a.loads.split(","):
                    out = work_dir / f"out-{method}-{spec.replace(':', 'of').replace('%', 'pct')}-{load}"
                    r = prune(a, ckpt, text, method, spec, load, out)
                    runs[load] = r
                    row = {"method": method, "spec": spec, "load": load, "checkpoint_mb": round(ckpt_bytes / 2**20, 1),
                           **r}
                    if load == "stream" and "peak_rss_mb" in r:
                        row["rss_target_mb"] = round(limit, 1)
                        row["rss_ok"] = r["peak_rss_mb"] <= limit
                    rows.append(row)
                    print(f"{method} {spec} {load}: {r}", file=sys.stderr)
                    for f in out.iterdir() if out.is_dir() else ():
                        f.unlink()
                if "wall_s" in runs.get("stream", {}) and "wall_s" in runs.get("memory", {}):
                    ratio = runs["stream"]["wall_s"] / max(1e-9, runs["memory"]["wall_s"])
                    rows[-len(runs)].update(time_vs_memory=round(ratio, 3), time_ok=ratio <= 1.2)
    from prunus.report import table

    print(table(rows, (("method", "method"), ("spec", "spec"), ("load", "load"), ("checkpoint_mb", "ckpt MB"),
                       ("output_mb", "out MB"), ("peak_rss_mb", "peak RSS MB"), ("rss_target_mb", "RSS target MB"),
                       ("wall_s", "wall s"), ("time_vs_memory", "stream/mem time"))))
    if a.json:
        write_json(a.json, {"settings": vars(a), "parameters": params, "rows": rows}, indent=2, default=float)


if __name__ == "__main__":
    main()
