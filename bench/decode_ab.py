"""Batch-1 decode of several models as transformers runs them (dense kernels), timed interleaved in
one process: round after round each model once, so the machine's drift hits all alike. For a model
made smaller by structure (``prunus prune ... --format dense``) against the model it came from.

    .venv/bin/python bench/decode_ab.py smollm2-135m runs/frontier-work/ck-flap_mlp_0_270833 --rounds 7

Models are anything ``prunus.io.models.load_model`` takes (an alias, a hub id, a folder), loaded
with ``runtime="dense"``; the first is the baseline of the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import add_timing_args, machine, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    add_timing_args(ap, rounds=7)
    a = ap.parse_args(argv)
    if a.rounds < 1:
        print("decode_ab: error: --rounds must be at least 1", file=sys.stderr)
        return 2
    import torch

    from prunus.io.models import load_model
    from prunus.kernels.timing import time_generate

    torch.set_num_threads(a.threads)
    models = [load_model(m, runtime="dense")[0].eval() for m in a.models]
    params = [sum(p.numel() for p in m.parameters()) for m in models]
    prompt = torch.randint(0, models[0].config.vocab_size, (1, a.prompt_tokens),
                           generator=torch.Generator().manual_seed(0))
    times: list[list[dict[str, float]]] = [[] for _ in models]
    with torch.inference_mode():
        for _ in range(a.rounds):
            for i, m in enumerate(models):
                times[i].append(time_generate(m, prompt, a.new_tokens, repeats=1))
    rows = [{"model": name, "parameters": n,
             "decode_tok_s": round(statistics.median(t["decode_tok_s"] for t in ts), 2),
             "prefill_ms": round(1e3 * statistics.median(t["prefill_s"] for t in ts), 1),
             "decode_all": [round(t["decode_tok_s"], 2) for t in ts]}
            for name, n, ts in zip(a.models, params, times)]
    base = rows[0]["decode_tok_s"]
    print("| model | parameters | decode tok/s | vs the first | prefill ms | rounds faster than the first |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        won = sum(x > y for x, y in zip(r["decode_all"], rows[0]["decode_all"]))
        print(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['decode_tok_s']} | {r['decode_tok_s'] / base:.2f}x | "
              f"{r['prefill_ms']} | {won} of {a.rounds} |")
    if a.json:
        write_json(a.json, {"machine": machine(), "settings": vars(a), "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
