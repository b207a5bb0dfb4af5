"""One-shot pruning of SmolLM2-135M: prunus against llm-compressor, same windows, same machine.

Each configuration runs in its own process (so peak RSS is that run's own), one after another
(never in parallel: on 2 cores a neighbour slows a run by up to 1.7x). Both tools calibrate on the
same ``nsamples`` random windows of ``--calib`` (``prunus.io.data.calibration_windows``, seed 0) and
are scored on the same first ``windows`` windows of ``--eval`` (``prunus.io.data.eval_windows``).

    bash scripts/setup.sh && bash bench/setup_peer.sh
    .venv/bin/python bench/oneshot_llm.py --json runs/oneshot_llm.json          # ~25 min on 2 cores
    .venv/bin/python bench/oneshot_llm.py --skip-peer --extra                   # prunus only, + beyond-peer configs
    .venv/bin/python bench/oneshot_llm.py --skip-peer --only ria --no-dense      # some methods only

"seconds" is the one-shot time: calibration plus pruning, without model loading or evaluation.
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

# this interpreter, on this checkout's code (a worktree without its own .venv runs its own prunus)
PRUNUS = [sys.executable, "-m", "prunus"]
PEER = [str(ROOT / ".venv-peer/bin/python"), str(ROOT / "bench/peer_llmcompressor.py")]

BASE = [("sparsegpt", "0.5"), ("sparsegpt", "2:4"), ("wanda", "0.5"), ("wanda", "2:4"),
        ("ria", "0.5"), ("ria", "2:4"), ("magnitude", "0.5"), ("magnitude", "2:4")]
# configurations that try to go past the peers with the same calibration budget
# (method, spec, refiner, allocation[, block-step epochs[, block step, default reconstruct]])
EXTRA = [("sparsegpt", "0.5", None, "uniform", 4), ("sparsegpt", "2:4", None, "uniform", 4),
         ("sparsegpt", "0.5", None, "uniform", 4, "reconstruct-sub"),
         ("sparsegpt", "2:4", None, "uniform", 4, "reconstruct-sub"),
         ("sparsegpt-asym", "0.5", None, "uniform"), ("sparsegpt-asym", "0.5", None, "uniform", 4),
         ("sparsegpt-asym", "2:4", None, "uniform"), ("sparsegpt-asym", "2:4", None, "uniform", 4),
         ("sparsegpt", "0.5", "dsnot", "uniform"), ("sparsegpt", "2:4", "dsnot", "uniform"),
         ("sparsegpt", "0.5", None, "owl"), ("sparsegpt", "0.5", "dsnot", "owl"),
         ("wanda", "0.5", "dsnot", "uniform"), ("wanda", "2:4", "dsnot", "uniform")]


def _run(cmd: list[str], js: Path) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail}
    return json.loads(js.read_text())


def prunus_run(a: argparse.Namespace, method: str, sparsity: str, refine: str | None = None,
               allocation: str = "uniform", reconstruct: int = 0, step: str = "reconstruct") -> dict:
    with tempfile.TemporaryDirectory() as d:
        js = Path(d) / "r.json"
        # another block step than reconstruct: --step NAME, its epochs as an override after the model
        over = [f"steps.{step}.epochs={reconstruct}"] if reconstruct and step != "reconstruct" else []
        cmd = PRUNUS + ["prune", a.model, *over, "--method", method, "--sparsity", sparsity, "--allocation",
                        allocation, "--calib", a.calib, "--eval", a.eval, "--nsamples", str(a.nsamples),
                        "--seqlen", str(a.seqlen), "--windows", str(a.windows), "--no-baselines",
                        "--quiet", "--json", str(js)]
        if refine:
            cmd += ["--refine", refine]
        if over:
            cmd += ["--step", step]
        elif reconstruct:
            cmd += ["--reconstruct", str(reconstruct)]
        r = _run(cmd, js)
    return r if "error" in r else {k: r[k] for k in ("perplexity", "sparsity", "seconds", "peak_rss_mb")}


def prunus_dense(a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as d:
        js = Path(d) / "r.json"
        r = _run(PRUNUS + ["eval", a.model, "--text", a.eval, "--seqlen", str(a.seqlen), "--windows",
                           str(a.windows), "--quiet", "--json", str(js)], js)
    return r


def peer_run(a: argparse.Namespace, method: str, sparsity: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        js = Path(d) / "r.json"
        r = _run(PEER + ["--method", method, "--sparsity", sparsity, "--calib", a.calib, "--eval", a.eval,
                         "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--windows",
                         str(a.windows), "--json", str(js)], js)
    if "error" not in r:
        r["sparsity"] = r.get("achieved_sparsity", r.get("sparsity"))
    return r


def fmt(v, nd=2):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(ap)
    ap.add_argument("--skip-peer", action="store_true", help="prunus only")
    ap.add_argument("--extra", action="store_true", help="also the beyond-peer configurations")
    ap.add_argument("--only", help="comma-separated method names to run (default all)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense evaluation")
    ap.add_argument("--json", help="write all rows here")
    a = ap.parse_args()
    if not a.skip_peer and not Path(PEER[0]).exists():
        print("no .venv-peer: run `bash bench/setup_peer.sh` first, or pass --skip-peer", file=sys.stderr)
        return 2
    only = set(a.only.split(",")) if a.only else None
    rows = []
    if not a.no_dense:
        dense = prunus_dense(a)
        rows.append({"tool": "prunus", "method": "dense", "spec": "-",
                     **{k: dense.get(k) for k in ("perplexity", "sparsity", "peak_rss_mb", "error") if k in dense}})
        print(f"dense ppl {fmt(dense.get('perplexity'))}", flush=True)
    for method, sp in BASE:
        if only and method not in only:
            continue
        p = prunus_run(a, method, sp)
        rows.append({"tool": "prunus", "method": method, "spec": sp, **p})
        print(f"prunus {method} {sp}: {p}", flush=True)
        if not a.skip_peer and method in ("wanda", "sparsegpt"):
            q = peer_run(a, method, sp)
            rows.append({"tool": "llm-compressor", "method": method, "spec": sp, **q})
            print(f"llm-compressor {method} {sp}: {q}", flush=True)
    if a.extra:
        for method, sp, refine, alloc, *rec in EXTRA:
            if only and method not in only:
                continue
            epochs = rec[0] if rec else 0
            step = rec[1] if len(rec) > 1 else "reconstruct"
            p = prunus_run(a, method, sp, refine, alloc, epochs, step)
            label = method + (f"+{refine}" if refine else "") + ("" if alloc == "uniform" else f" ({alloc})") \
                + (f" + {step} {epochs}" if epochs else "")
            rows.append({"tool": "prunus", "method": label, "spec": sp, **p})
            print(f"prunus {label} {sp}: {p}", flush=True)

    print()
    print(f"{'method':<34}{'spec':<6}{'tool':<16}{'ppl':>9}{'sparsity':>10}{'one-shot s':>12}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['method']:<34}{r['spec']:<6}{r['tool']:<16}{fmt(r.get('perplexity')):>9}"
              f"{fmt(r.get('sparsity'), 4):>10}{fmt(r.get('seconds'), 1):>12}{fmt(r.get('peak_rss_mb'), 0):>13}"
              + (f"   {r['error']}" if "error" in r else ""))
    if a.json:
        settings = {k: getattr(a, k) for k in ("model", "calib", "eval", "nsamples", "seqlen", "windows")}
        write_json(a.json, {"settings": settings, "rows": rows}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
