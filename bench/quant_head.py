"""Perplexity of one SparseGPT quantized spec on SmolLM2-135M, the one-shot benchmark's windows.

Prints one JSON line (and writes it with --json): the spec, perplexity over 64 windows of *Pride and
Prejudice*, and the grid the (tied) embedding got. Used to measure the GPTQ-quantized tied head
(``prunus/oneshot/embeddings.py``) against round-to-nearest.

    .venv/bin/python bench/quant_head.py 2:4+int4g64 --json runs/quant_head.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import add_data_args, write_json  # noqa: E402
from prunus.core.spec import SparsitySpec  # noqa: E402
from prunus.evaluate import perplexity  # noqa: E402
from prunus.io import data  # noqa: E402
from prunus.io.models import load_model  # noqa: E402
from prunus.oneshot.pipeline import prune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--method", default="sparsegpt")
    add_data_args(ap, model=None, calib=None, eval=None, seqlen=None)
    ap.add_argument("--json")
    args = ap.parse_args()
    spec = SparsitySpec.parse(args.spec)
    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    calib = data.calibration_windows(data.tokenize(data.resolve_text("book:emma"), tok),
                                     args.nsamples, 512, 0)
    ev = data.eval_windows(data.tokenize(data.resolve_text("book:pride"), tok), 512, args.windows)
    t = time.perf_counter()
    r = prune(model, spec, args.method, calib=calib, progress=False)
    row = {"spec": str(spec), "method": args.method, "prune_seconds": round(time.perf_counter() - t, 1),
           "ppl": perplexity(model, ev, progress=False), "windows": args.windows,
           "embedding": str(r.quant["model.embed_tokens"].quant) if "model.embed_tokens" in r.quant else None}
    print(json.dumps(row))
    if args.json:
        write_json(args.json, row)


if __name__ == "__main__":
    main()
