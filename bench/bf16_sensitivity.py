"""How far apart two equally valid SparseGPT runs land: bf16 against fp32, and fp32 against itself.

``bench/dtype_quality.py`` finds SparseGPT 2:4 pruned in bfloat16 1.76% above float32. This script
asks whether that is bfloat16 or the method's own sensitivity, in one process on SmolLM2-135M
(calibration 32 x 512 tokens of ``book:emma``, seed 0; 64 windows of ``book:pride``):

- ``A``: float32 pruning, evaluated in float32 and, cast, in bfloat16 (the evaluation's share);
- ``C``: float32 pruning of the weights first rounded to bfloat16 (the input rounding's share);
- ``B``: bfloat16 pruning (``prunus.prune`` on the bfloat16 model), evaluated in both dtypes;
- ``D``: float32 pruning with SparseGPT's dampening 0.0101 instead of 0.01 (a perturbation that
  changes no decision of principle).

    .venv/bin/python bench/bf16_sensitivity.py --spec 2:4 --json runs/bf16_sensitivity.json   # ~30 min
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import machine, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="2:4")
    p.add_argument("--variants", default="A,C,B,D")
    p.add_argument("--json", help="write the rows here (atomically)")
    a = p.parse_args()
    import torch

    from prunus.api import prune
    from prunus.evaluate import perplexity
    from prunus.io import data
    from prunus.io.models import load_model

    m32, tok = load_model("smollm2-135m", dtype=torch.float32)
    calib = data.calibration_windows(data.tokenize(data.resolve_text("book:emma"), tok), 32, 512, 0)
    ev = data.eval_windows(data.tokenize(data.resolve_text("book:pride"), tok), 512, 64)
    dense = copy.deepcopy(m32.state_dict())
    rows = []

    def row(variant: str, what: str, model: torch.nn.Module, seconds: float) -> None:
        rows.append({"variant": variant, "what": what, "perplexity": perplexity(model, ev, batch_size=4),
                     "prune_seconds": round(seconds, 1)})
        print(f"{variant}  {what:44s} {rows[-1]['perplexity']:.3f}", flush=True)

    for v in a.variants.split(","):
        m32.load_state_dict(dense)
        t = time.perf_counter()
        if v == "A":
            prune(m32, a.spec, "sparsegpt", calib, progress=False)
            s = time.perf_counter() - t
            row(v, "float32 pruning, float32 evaluation", m32, s)
            row(v, "float32 pruning, bfloat16 evaluation", m32.to(torch.bfloat16), s)
            m32.float()
        elif v == "B":
            m = m32.to(torch.bfloat16)
            prune(m, a.spec, "sparsegpt", calib, progress=False)
            s = time.perf_counter() - t
            row(v, "bfloat16 pruning, bfloat16 evaluation", m, s)
            row(v, "bfloat16 pruning, float32 evaluation", m.float(), s)
        elif v == "C":
            m = m32.to(torch.bfloat16).float()
            prune(m, a.spec, "sparsegpt", calib, progress=False)
            row(v, "float32 pruning of bf16-rounded weights", m, time.perf_counter() - t)
        elif v == "D":
            prune(m32, a.spec, "sparsegpt", calib, progress=False, method_options={"percdamp": 0.0101})
            row(v, "float32 pruning, percdamp 0.0101", m32, time.perf_counter() - t)
        else:
            raise SystemExit(f"bf16_sensitivity: unknown variant {v!r} (A, B, C, D)")
    if a.json:
        write_json(a.json, {"settings": vars(a), "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
