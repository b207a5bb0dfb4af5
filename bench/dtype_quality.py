"""Pruning in the model's own dtype: SmolLM2-135M pruned in bfloat16 against float32, same windows.

Each dtype runs in its own process (``prunus prune --dtype D``), one after the other: Wanda and
SparseGPT at 50% and 2:4, calibrated on ``--nsamples`` random ``--seqlen``-token windows of
``--calib`` (seed 0) and scored on the first ``--windows`` windows of ``--eval``, beside the dense
model in the same dtype. In bfloat16 the calibration forward, the evaluation and the stored weights
are bfloat16; the statistics (X^T X, input norms) and SparseGPT's solves are float32 in both.

    .venv/bin/python bench/dtype_quality.py --json runs/dtype_quality.json     # ~15 min on 2 cores

Prints one row per (method, spec): the perplexity in each dtype and the relative difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import add_data_args, child_env, write_json  # noqa: E402


def run(a: argparse.Namespace, dtype: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        js = Path(d) / "r.json"
        cmd = [sys.executable, "-m", "prunus", "prune", a.model, "--method", "wanda,sparsegpt",
               "--sparsity", "50%,2:4", "--calib", a.calib, "--eval", a.eval, "--nsamples", str(a.nsamples),
               "--seqlen", str(a.seqlen), "--windows", str(a.windows), "--baselines", "dense",
               "--dtype", dtype, "--load", a.load, "--json", str(js), "--quiet"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
        if r.returncode != 0:
            raise SystemExit(f"{dtype}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        return json.loads(js.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(p)
    p.add_argument("--load", default="memory", help="memory or stream (the results are the same)")
    p.add_argument("--json", help="write the rows here (atomically)")
    a = p.parse_args()
    res = {dt: run(a, dt) for dt in ("float32", "bfloat16")}
    rows = []
    for r32 in res["float32"]["runs"]:
        r16 = next(r for r in res["bfloat16"]["runs"] if r["label"] == r32["label"] and r["spec"] == r32["spec"])
        p32, p16 = r32["perplexity"], r16["perplexity"]
        rows.append({"method": r32["label"], "spec": r32["spec"], "ppl_float32": p32, "ppl_bfloat16": p16,
                     "relative": p16 / p32 - 1.0, "seconds_float32": r32.get("seconds"),
                     "seconds_bfloat16": r16.get("seconds"), "peak_rss_mb_float32": r32["peak_rss_mb"],
                     "peak_rss_mb_bfloat16": r16["peak_rss_mb"]})
    from prunus.report import table

    print(table(rows, (("method", "method"), ("spec", "spec"), ("ppl_float32", "ppl fp32"),
                       ("ppl_bfloat16", "ppl bf16"), ("relative", "bf16/fp32 - 1"))))
    if a.json:
        write_json(a.json, {"settings": vars(a), "rows": rows, "runs": res}, indent=2, default=float)


if __name__ == "__main__":
    main()
