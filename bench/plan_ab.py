"""Decode speed of checkpoints planned two ways, against dense fp32 and torch int8 dynamic, all
timed interleaved in one process: the per-layer plan of ``prunus export --runtime auto --tokens 1``
with the input-major kernels (``cpu_skip_*``) competing for every layer (the default) and with them
kept to gated layers (``plan_model(..., input_major=False)``, the plans before 2026-12-02).

Each round times every model once with :func:`prunus.kernels.timing.time_generate` (a
``--prompt-tokens`` prompt of random ids, then ``--new-tokens`` greedy tokens); the table has the
medians over ``--rounds`` and the kernel counts of each plan. Speed only: the kernels are exact, so
a checkpoint's perplexity is that of its weights whichever plan runs it (``prunus eval``). The
machine should be quiet.

    .venv/bin/python bench/plan_ab.py runs/int8 runs/q50int8 --rounds 5 --json runs/plan_ab.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import add_timing_args, machine, write_json  # noqa: E402


def planned(ck: str, input_major: bool, threads: int) -> tuple[Any, dict[str, int]]:
    """The checkpoint with a fresh decode plan applied; (model, kernel -> layer count)."""
    from torch import nn

    from prunus import export
    from prunus.io.models import load_checkpoint
    from prunus.kernels.plans import apply_plan, plan_model

    masks, qweights = export.load_masks(ck), export.load_quantized(ck)
    model = load_checkpoint(ck, runtime="dense").eval()
    unpruned = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                and n not in masks and n not in qweights]  # as prunus export plans them
    plan = plan_model(model, masks, [1], 1.1, threads=threads, qweights=qweights, also=unpruned,
                      input_major=input_major)
    apply_plan(model, plan, masks, qweights=qweights)
    counts: dict[str, int] = {}
    for layer in plan.layers:
        counts[layer.kernel] = counts.get(layer.kernel, 0) + 1
    return model, counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--model", default="smollm2-135m", help="the dense baseline")
    add_timing_args(ap)
    a = ap.parse_args(argv)
    bad = [c for c in a.checkpoints if not (Path(c) / "prunus.json").is_file()]
    if bad or a.rounds < 1:
        print(f"plan_ab: error: {bad[0] + ' is not a prunus checkpoint' if bad else '--rounds must be at least 1'}",
              file=sys.stderr)
        return 2
    import torch
    from torch import nn

    from prunus.io.models import load_model
    from prunus.kernels.timing import time_generate

    torch.set_num_threads(a.threads)
    dense, _ = load_model(a.model)
    models: dict[str, Any] = {"dense fp32": dense.eval(),
                              "torch int8 dynamic": torch.ao.quantization.quantize_dynamic(
                                  load_model(a.model)[0].eval(), {nn.Linear}, dtype=torch.qint8)}
    kernels: dict[str, dict[str, int]] = {}
    for ck in a.checkpoints:
        for label, im in (("gated layers only", False), ("every layer", True)):
            name = f"{Path(ck).name}, input-major kernels for {label}"
            models[name], kernels[name] = planned(ck, im, a.threads)
            print(f"# planned {name}: {kernels[name]}", file=sys.stderr, flush=True)
    prompt = torch.randint(0, dense.config.vocab_size, (1, a.prompt_tokens),
                           generator=torch.Generator().manual_seed(0))
    times: dict[str, list[dict[str, float]]] = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(a.rounds):
            for name, m in models.items():
                times[name].append(time_generate(m, prompt, a.new_tokens, repeats=1))
    base = statistics.median(t["decode_tok_s"] for t in times["dense fp32"])
    q8 = statistics.median(t["decode_tok_s"] for t in times["torch int8 dynamic"])
    rows = []
    for name, ts in times.items():
        dec = statistics.median(t["decode_tok_s"] for t in ts)
        rows.append({"model": name, "decode_tok_s": round(dec, 2), "vs_dense": round(dec / base, 3),
                     "vs_torch_int8_dynamic": round(dec / q8, 3),
                     "prefill_ms": round(1e3 * statistics.median(t["prefill_s"] for t in ts), 1),
                     "kernels": kernels.get(name, {}), "decode_all": [round(t["decode_tok_s"], 2) for t in ts]})
    print("| model | decode tok/s | vs dense fp32 | vs torch int8 dynamic | prefill ms | kernels |\n|---|---|---|---|---|---|")
    for r in rows:
        ks = ", ".join(f"{k} x{v}" for k, v in sorted(r["kernels"].items()))
        print(f"| {r['model']} | {r['decode_tok_s']} | {r['vs_dense']:.2f}x | {r['vs_torch_int8_dynamic']:.2f}x | "
              f"{r['prefill_ms']} | {ks} |")
    if a.json:
        write_json(a.json, {"machine": machine(kernel_isa=True), "settings": vars(a), "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
