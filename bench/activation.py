"""Activation sparsity on SmolLM2-135M: TEAL, WINA and uniform thresholds at equal targets.

Each target runs ``prunus prune smollm2-135m --method magnitude --sparsity 0 --activation-sparsity
T`` (no weight is pruned: the activation thresholds alone) once with ``--activation-method teal``,
which also scores the dense model (first target only) and the uniform baseline, and once with
``wina`` and no baselines; all on the same calibration windows (``--nsamples`` x ``--seqlen`` of
``--calib``) and evaluation windows (the first ``--windows`` of ``--eval``). Per row: perplexity,
its change over dense, the activation sparsity achieved on the evaluation windows (weighted by the
layers' weight counts, and per layer type) and the calibration time.

    .venv/bin/python bench/activation.py --json runs/activation.json           # 0.25 and 0.40
    .venv/bin/python bench/activation.py --targets 0.5 --windows 16 --methods teal
    .venv/bin/python bench/activation.py --markdown runs/activation.json       # the table again

Options of a method go as dotted overrides (``--set activation.options.windows=2``). The JSON is
rewritten atomically after every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import add_data_args, write_json  # noqa: E402

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rows_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in result["runs"]:
        act = r.get("activation") or {}
        out.append({"label": r["label"], "method": act.get("method", "dense"), "target": act.get("target"),
                    "perplexity": r["perplexity"], "achieved": act.get("achieved"),
                    "per_type": act.get("per_type"), "calib_s": act.get("seconds")})
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    order = ("dense", "uniform", "teal", "wina")
    lines = ["| target | method | ppl | vs dense | act sparsity | " + " | ".join(TYPES) + " | calib s |",
             "|" + "---|" * (6 + len(TYPES))]
    for r in sorted(rows, key=lambda r: (r["target"] or 0, order.index(r["method"]) if r["method"] in order else 9)):
        vs = f"{100 * (r['perplexity'] / dense - 1):+.1f}%" if dense and r["method"] != "dense" else ""
        types = " | ".join(f"{r['per_type'].get(t, 0):.2f}" if r["per_type"] else "" for t in TYPES)
        achieved = "" if r["achieved"] is None else f"{r['achieved']:.3f}"
        calib = "" if r["calib_s"] is None else f"{r['calib_s']:.0f}"
        target = "-" if r["target"] is None else f"{r['target']:g}"
        lines.append(f"| {target} | {r['method']} | {r['perplexity']:.2f} | {vs} | {achieved} | {types} | {calib} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(ap)
    ap.add_argument("--targets", default="0.25,0.4")
    ap.add_argument("--methods", default="teal,wina")
    ap.add_argument("--set", action="append", default=[], help="dotted override for every run")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--markdown", help="print the table of an earlier --json and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())["rows"]))
        return 0
    from prunus.io.recipe import apply_override
    from prunus.oneshot.job import job_from_mapping
    from prunus.oneshot.runner import run_prune

    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    first = True
    for target in (float(t) for t in args.targets.split(",")):
        for method in args.methods.split(","):
            d: dict[str, Any] = {"model": args.model, "method": "magnitude", "sparsity": "0", "calib": args.calib,
                                 "eval": args.eval, "nsamples": args.nsamples, "seqlen": args.seqlen,
                                 "windows": args.windows, "activation": {"sparsity": target, "method": method},
                                 "progress": False}
            d["baselines"] = (["dense"] if first else []) + (["uniform-activation"] if method == "teal" else [])
            for o in args.set:
                apply_override(d, o)
            first = False
            t0 = time.perf_counter()
            result = run_prune(job_from_mapping(d), log=lambda s: print(s, file=sys.stderr, flush=True))
            new = [r for r in rows_of(result) if r["method"] != "dense" or not any(x["method"] == "dense" for x in rows)]
            rows += new
            runs.append({"target": target, "method": method, "wall_s": time.perf_counter() - t0,
                         "settings": result["settings"]})
            print(f"# {method} {target}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            if args.json:
                write_json(args.json, {"rows": rows, "runs": runs, "overrides": args.set,
                                       "wall_s": time.perf_counter() - t_start}, indent=2, default=float)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
