"""Peer benchmark: prune SmolLM2-135M with llm-compressor's Wanda or SparseGPT, then measure it.

Runs in the separate venv made by ``bench/setup_peer.sh`` (llmcompressor pins its own transformers).
It uses prunus's own data and model code, so both tools see the very same calibration windows
(:func:`prunus.io.data.calibration_windows`, seed 0) and evaluation windows
(:func:`prunus.io.data.eval_windows`): only the pruning differs.

Usage::

    .venv-peer/bin/python bench/peer_llmcompressor.py --method wanda --sparsity 0.5 \\
        --nsamples 32 --seqlen 512 --windows 64 --calib book:emma --eval book:pride --json out.json

Writes ``{method, sparsity, perplexity, seconds, peak_rss_mb, achieved_sparsity, ...}`` where
``seconds`` times the ``oneshot`` call alone, ``peak_rss_mb`` is the process's peak RSS
(``ru_maxrss``, model load included), ``perplexity`` is exp of the mean next-token NLL over every
predicted token of the evaluation windows, and ``achieved_sparsity`` is the fraction of zeros in
the pruned linears (every ``nn.Linear`` but ``lm_head``).

llm-compressor traps avoided here (see shared/DATA.md): ``ignore=["lm_head"]`` is silently not
honoured, so ``"re:.*lm_head"`` is used; ``MagnitudePruningModifier`` prunes nothing in ``oneshot``,
so it is not offered.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # prunus.io.data / prunus.io.models need only torch + transformers

from bench._common import add_data_args, write_json  # noqa: E402
from prunus.io.data import calibration_windows, eval_windows, resolve_text, tokenize  # noqa: E402
from prunus.errors import PrunusError, SpecError  # noqa: E402
from prunus.core.spec import NM, Unstructured, parse_sparsity  # noqa: E402
from prunus.io.models import load_model  # noqa: E402

CALIB_SEED = 0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2**20


def pruned_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears both tools prune: every ``nn.Linear`` except the (tied) ``lm_head``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith("lm_head")}


def achieved_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over the pruned linears."""
    zeros = total = 0
    for m in pruned_linears(model).values():
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros / max(1, total)


def nm_valid(model: nn.Module, n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive input weights of every pruned linear keeps <= n."""
    for lin in pruned_linears(model).values():
        w = lin.weight
        if w.shape[1] % m:
            return False
        if int((w.reshape(w.shape[0], -1, m) != 0).sum(-1).max()) > n:  # (out, in/m) kept per group
            return False
    return True


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over all predicted tokens of ``windows`` ``(k, seqlen)``."""
    nll, count = 0.0, 0
    for w in windows:  # one window at a time: (1, seqlen)
        logits = model(input_ids=w[None]).logits[0, :-1].float()  # (seqlen-1, vocab)
        nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        count += w.numel() - 1
    return math.exp(nll / count)


def build_recipe(method: str, sparsity: str) -> list[Any]:
    """``[WandaPruningModifier(...)]`` or ``[SparseGPTModifier(...)]`` for ``0.5`` or ``2:4``."""
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    pattern, ratio = parse_sparsity(sparsity)  # SpecError for anything malformed
    kwargs: dict[str, Any] = {"targets": ["Linear"], "ignore": ["re:.*lm_head"], "sparsity": ratio}
    if isinstance(pattern, NM):  # 2:4 -> sparsity 0.5 within each group of 4
        kwargs["mask_structure"] = f"{pattern.n}:{pattern.m}"
    elif not isinstance(pattern, Unstructured):
        raise SpecError(f"llm-compressor prunes unstructured or N:M, not {pattern}")
    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    return [cls(**kwargs)]


def windows_dataset(windows: torch.Tensor) -> Any:
    """A ``datasets.Dataset`` of ``input_ids``/``attention_mask`` rows, one per window."""
    from datasets import Dataset

    rows = windows.tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def run(args: argparse.Namespace) -> dict[str, Any]:
    recipe = build_recipe(args.method, args.sparsity)  # a bad --sparsity fails before any load
    pattern, _ = parse_sparsity(args.sparsity)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    load_s = time.perf_counter() - t0

    calib = calibration_windows(tokenize(resolve_text(args.calib), tok), args.nsamples,
                                args.seqlen, seed=CALIB_SEED)  # (nsamples, seqlen)
    evalw = eval_windows(tokenize(resolve_text(args.eval), tok), args.seqlen, k=args.windows)
    dense_ppl = perplexity(model, evalw) if args.dense else None

    from llmcompressor import oneshot

    dataset = windows_dataset(calib)
    rss_before = peak_rss_mb()
    with tempfile.TemporaryDirectory(prefix="peer-llmc-") as scratch:
        cwd = os.getcwd()
        os.chdir(scratch)  # whatever llm-compressor writes beside itself stays out of the repo
        try:
            t0 = time.perf_counter()
            model = oneshot(model=model, tokenizer=tok, dataset=dataset, recipe=recipe,
                            num_calibration_samples=args.nsamples, max_seq_length=args.seqlen,
                            shuffle_calibration_samples=False, batch_size=1,
                            pipeline=args.pipeline)
            seconds = time.perf_counter() - t0
        finally:
            os.chdir(cwd)
    rss_after = peak_rss_mb()
    model.eval()

    t0 = time.perf_counter()
    ppl = perplexity(model, evalw)
    eval_s = time.perf_counter() - t0
    import llmcompressor

    return {
        "tool": "llmcompressor",
        "version": getattr(llmcompressor, "__version__", "?"),
        "method": args.method,
        "sparsity": args.sparsity,
        "perplexity": ppl,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "achieved_sparsity": achieved_sparsity(model),
        "nm_valid": nm_valid(model, pattern.n, pattern.m) if isinstance(pattern, NM) else None,
        "dense_perplexity": dense_ppl,
        "peak_rss_before_oneshot_mb": rss_before,
        "peak_rss_after_oneshot_mb": rss_after,
        "load_seconds": load_s,
        "eval_seconds": eval_s,
        "model": args.model,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "windows": int(evalw.shape[0]),
        "calib": args.calib,
        "eval": args.eval,
        "calib_seed": CALIB_SEED,
        "pipeline": args.pipeline,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    p.add_argument("--sparsity", default="0.5", help="0.5 (unstructured) or N:M such as 2:4")
    add_data_args(p)
    p.add_argument("--pipeline", default="independent",
                   help="llm-compressor pipeline (independent picks sequential for these modifiers)")
    p.add_argument("--dense", action="store_true", help="also measure the dense perplexity first")
    p.add_argument("--json", type=Path, help="write the result here (atomically)")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except PrunusError as e:
        print(f"peer_llmcompressor: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        write_json(args.json, result, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
