"""Activation sparsity end to end at batch-1 decode: the gated checkpoint on the kernels its plan
chose, against the dense model a user would otherwise run, timed in one process, interleaved.

For each checkpoint (``prunus prune ... --activation-sparsity F --out DIR``) it exports a runtime
folder (``prunus export DIR --runtime auto --tokens 1``: every gated layer planned on inputs with its
gate's zeros), then loads five models side by side (two of them one model run two ways):

- ``dense``: the checkpoint's weights on dense kernels with the gates held back (for a checkpoint
  pruned with ``--sparsity 0``, the original model);
- ``gated dense``: the same with the gates on (what the thresholds cost without skip kernels);
- ``weights alone, planned``: the checkpoint without its gates on the kernels a decode plan chooses
  for it (every linear planned, as ``--runtime auto`` does): "those weights alone", the baseline of
  the activation-sparsity targets (prunus's kernels beat torch's dense GEMV on some layers even
  unpruned);
- ``planned``: ``prunus.load`` of the runtime folder (the plan's kernels, the gates fused into the
  kernels that skip zero inputs) -- what a user runs;
- ``planned, gates off``: that same model with its gates held back: the skip kernels on inputs
  without zeros. Against it, the gain is the activation sparsity's alone (against ``weights alone,
  planned`` it also holds the skip kernels' own speed as a dense kernel, which differs by CPU).

Each round times every model with :func:`prunus.kernels.timing.time_generate` (a ``--prompt-tokens``
prompt, then ``--new-tokens`` greedy tokens); the table has the median over ``--rounds`` rounds of
prefill ms and decode tok/s, and the decode speedups over ``dense`` and over ``weights alone,
planned``. The machine should be quiet.

    .venv/bin/python bench/actskip_e2e.py runs/act/u25 runs/act/u40 --json runs/actskip_e2e.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import add_timing_args, child_env, machine, write_json  # noqa: E402


def models(ckpt: str, work: Path, threads: int) -> dict[str, Any]:
    """The three models of one checkpoint (see the module docstring)."""
    from torch import nn

    import prunus
    from prunus.io.models import load_checkpoint
    from prunus.kernels.plans import apply_plan, plan_model
    from prunus.kernels.runtime import masks_for

    rt = work / (Path(ckpt).name + "-rt")
    subprocess.run([sys.executable, "-m", "prunus", "export", ckpt, "--runtime", "auto", "--tokens", "1",
                    "--threads", str(threads), "--out", str(rt), "--overwrite"], check=True, env=child_env(),
                   stdout=subprocess.DEVNULL)
    alone = load_checkpoint(ckpt, runtime="dense", activation=False).eval()
    masks = masks_for(ckpt, alone)
    also = [n for n, m in alone.named_modules() if isinstance(m, nn.Linear) and n not in masks]
    apply_plan(alone, plan_model(alone, masks, [1], 1.1, threads=threads, also=also), masks)
    return {"dense": load_checkpoint(ckpt, runtime="dense").eval(),
            "gated dense": load_checkpoint(ckpt, runtime="dense").eval(),
            "weights alone, planned": alone,
            "planned": (planned := prunus.load(str(rt)).eval()),
            "planned, gates off": planned}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    add_timing_args(ap)
    a = ap.parse_args(argv)
    import torch

    from prunus.kernels.gating import gates_off
    from prunus.kernels.timing import time_generate

    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for ck in a.checkpoints:
            ms = models(ck, Path(d), a.threads)
            prompt = torch.randint(0, ms["dense"].config.vocab_size, (1, a.prompt_tokens),
                                   generator=torch.Generator().manual_seed(0))
            times: dict[str, list[dict[str, float]]] = {k: [] for k in ms}
            for r in range(a.rounds):
                for name, m in ms.items():
                    if name in ("dense", "planned, gates off"):
                        with gates_off(m):
                            times[name].append(time_generate(m, prompt, a.new_tokens, repeats=1))
                    else:
                        times[name].append(time_generate(m, prompt, a.new_tokens, repeats=1))
            base = statistics.median(t["decode_tok_s"] for t in times["dense"])
            alone = statistics.median(t["decode_tok_s"] for t in times["weights alone, planned"])
            for name, ts in times.items():
                dec = statistics.median(t["decode_tok_s"] for t in ts)
                rows.append({"checkpoint": ck, "model": name, "rounds": a.rounds,
                             "prefill_ms": round(1e3 * statistics.median(t["prefill_s"] for t in ts), 1),
                             "decode_tok_s": round(dec, 2), "decode_speedup": round(dec / base, 3),
                             "vs_weights_alone": round(dec / alone, 3),
                             "decode_all": [round(t["decode_tok_s"], 2) for t in ts]})
            print(f"# {ck} done", file=sys.stderr, flush=True)
    print("| checkpoint | model | prefill ms | decode tok/s | vs dense | vs weights alone |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {Path(r['checkpoint']).name} | {r['model']} | {r['prefill_ms']} | {r['decode_tok_s']} | "
              f"{r['decode_speedup']:.2f}x | {r['vs_weights_alone']:.2f}x |")
    if a.json:
        write_json(a.json, {"machine": machine(), "settings": vars(a), "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
