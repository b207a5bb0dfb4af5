"""Decode speed of several GGUF files on llama.cpp, interleaved in one process: round after round,
each file is timed once (``peer_llamacpp.speed``: a prompt in one eval, then greedy tokens), so a
drift of the machine's speed hits every file alike. For comparisons between rows of
``bench/frontier.py`` that its sequential runs cannot settle (this VM's speed moves by up to a third
within an hour). Runs in the llama.cpp venv (``bench/setup_llamacpp.sh``).

    .venv-llamacpp/bin/python bench/llamacpp_ab.py A.Q8_0.gguf B.Q8_0.gguf --rounds 7 --json out.json

The prompt is the first ``--prompt-tokens`` tokens of ``--eval`` tokenized with prunus's SmolLM2
tokenizer (the ids ``peer_llamacpp`` scores), so every file must have SmolLM2's vocabulary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import add_timing_args, machine, write_json  # noqa: E402
from bench.peer_llamacpp import prunus_windows, quiet_llama_cpp, speed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", nargs="+", type=Path)
    add_timing_args(ap, rounds=7)
    ap.add_argument("--eval", default="book:pride")
    a = ap.parse_args(argv)
    missing = [str(p) for p in a.gguf if not p.is_file()]
    if missing or a.rounds < 1:
        print(f"llamacpp_ab: error: {'no such file: ' + missing[0] if missing else '--rounds must be at least 1'}",
              file=sys.stderr)
        return 2
    from llama_cpp import Llama

    quiet_llama_cpp()
    prompt = prunus_windows(a.eval, a.prompt_tokens, 1)[0].tolist()
    n_ctx = a.prompt_tokens + a.new_tokens
    llms = [Llama(model_path=str(p), n_ctx=n_ctx, n_batch=a.prompt_tokens, n_threads=a.threads,
                  n_threads_batch=a.threads, logits_all=True, verbose=False) for p in a.gguf]
    times: list[list[tuple[float, float]]] = [[] for _ in llms]
    for _ in range(a.rounds):
        for i, llm in enumerate(llms):
            times[i].append(speed(llm, prompt, a.new_tokens, 1))
    rows = []
    for p, ts in zip(a.gguf, times):
        rows.append({"gguf": str(p), "bytes": p.stat().st_size,
                     "decode_tok_s": round(statistics.median(t[1] for t in ts), 2),
                     "prefill_ms": round(1e3 * statistics.median(t[0] for t in ts), 1),
                     "decode_all": [round(t[1], 2) for t in ts]})
    base = rows[0]["decode_tok_s"]
    print("| file | decode tok/s | vs the first | prefill ms | all rounds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {Path(r['gguf']).name} | {r['decode_tok_s']} | {r['decode_tok_s'] / base:.2f}x | "
              f"{r['prefill_ms']} | {', '.join(map(str, r['decode_all']))} |")
    if a.json:
        write_json(a.json, {"machine": machine(), "settings": {k: str(v) for k, v in vars(a).items()},
                            "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
