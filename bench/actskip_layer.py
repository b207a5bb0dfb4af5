"""One layer, dense against every kernel, on inputs with a fraction of exact zeros: what the kernels
that skip zero inputs (``cpu_skip_*``, activation sparsity) save at decode, layer by layer.

For each input sparsity (the smallest magnitudes of each random input row set to zero, as a TEAL
gate leaves them) it times dense ``F.linear`` and every applicable kernel with
:func:`prunus.kernels.timing.time_linear` (weights flushed from the cache before each call, as at
the decode of a model larger than the cache), and prints a table and, with ``--json``, the rows.
A layer-level timing only; the decision for a model is ``prunus export --runtime auto``'s, made by
measuring, and the end-to-end number is ``bench/frontier.py``'s.

    .venv/bin/python bench/actskip_layer.py --shape 1536x576 --spec 2:4+int8 --input-sparsity 0,0.25,0.4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import write_json  # noqa: E402


def layer(shape: str, spec: str, seed: int = 0):  # type: ignore[no-untyped-def]
    """(nn.Linear, keep mask, QuantizedWeight or None) of a random ``OUTxIN`` layer pruned to ``spec``
    by magnitude (``0``, ``50%``, ``2:4``, optionally ``+int8`` / ``+int4g64``)."""
    from prunus.core.masks import topk
    from prunus.core.quant import rtn
    from prunus.core.spec import parse_spec

    out_f, in_f = (int(v) for v in shape.lower().split("x"))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    pattern, sparsity, quant = parse_spec(spec)
    keep = topk(w.abs(), sparsity, pattern) if sparsity > 0 else torch.ones_like(w, dtype=torch.bool)
    qw = rtn(w, keep, quant, "layer") if quant is not None else None
    lin = nn.Linear(in_f, out_f)
    lin.weight.data = qw.dequantize() if qw is not None else w * keep
    return lin, keep, qw


def run(a: argparse.Namespace) -> list[dict[str, Any]]:
    from prunus.kernels.timing import time_linear

    lin, keep, qw = layer(a.shape, a.spec)
    rows = []
    for s in (float(v) for v in a.input_sparsity.split(",")):
        for t in time_linear(lin, keep, [int(n) for n in a.tokens.split(",")], threads=a.threads,
                             repeats=a.repeats, cold=not a.warm, qweight=qw, input_sparsity=s,
                             name=a.shape):
            rows.append({"spec": a.spec, **t.to_dict()})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'input zeros':>11} {'tokens':>6} {'kernel':<22} {'dense ms':>9} {'kernel ms':>9} {'speedup':>8}"]
    for r in rows:
        lines.append(f"{r['input_sparsity']:>11.2f} {r['tokens']:>6} {r['kernel']:<22} "
                     f"{r['dense_ms']:>9.4f} {r['sparse_ms']:>9.4f} {r['speedup']:>7.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1536x576", help="OUTxIN")
    ap.add_argument("--spec", default="0", help="weight sparsity (+ quantization), e.g. 2:4+int8")
    ap.add_argument("--input-sparsity", default="0,0.25,0.4")
    ap.add_argument("--tokens", default="1")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warm", action="store_true", help="do not flush the cache between calls")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rows = run(a)
    print(table(rows))
    if a.json:
        write_json(a.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
