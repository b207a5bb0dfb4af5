"""The CPU speed-quality frontier of SmolLM2-135M: what a user gets from each way of making it
smaller, measured side by side in one run.

Rows (each measured in its own process, one after another, so peak RSS is that row's own and no
row shares the cores with another):

- transformers dense fp32 and bf16; torch int8 dynamic quantization of every linear
  (``torch.ao.quantization.quantize_dynamic``, what a PyTorch user picks instead);
- llama.cpp Q8_0, Q4_1 and F16 (``bench/peer_llamacpp.py`` in its own venv, made by
  ``bench/setup_llamacpp.sh``; skipped with a note when that venv is absent);
- prunus at {50%, 2:4, 70%} x {fp32, int8, int4g64} (plus dense int8), pruned with ``--method``
  (SparseGPT by default, which prunes and quantizes in one OBS pass), exported with
  ``prunus export --runtime auto --tokens 1`` (every layer measured, a kernel kept only where it
  is faster than dense), and loaded with ``prunus.load``: perplexity and speed are those of the
  model as it runs, kernels in place;
- ``W8A8`` / ``W4A8`` rows: the same int8 / int4 checkpoints exported with ``--act-int8``, which
  lets the kernels that round the activation to int8 too (one scale per token, int32 sums with
  AVX-512 VNNI) compete; their perplexity is measured with them in place;
- ``+compile`` rows: the same model after ``torch.compile`` (decode and prefill only; the
  perplexity is that of the eager row, the weights being the same);
- activation sparsity rows, ``prunus SPEC +actP% METHOD``: {dense weights (``0``), 2:4+int8,
  50%+int8} x {25%, 40%} x {teal, wina, uniform} (``--act-specs``, ``--act-sparsities``,
  ``--act-methods``), pruned with ``prunus prune ... --activation-sparsity P --activation-method
  METHOD`` (dense weights with ``--method magnitude`` at sparsity 0: the weights are untouched),
  exported like the others, so the kernels that skip zero inputs compete per layer on inputs with
  the gates' zeros; measured with the gates attached (``prunus.load``). Compare with the row of the
  same weights without gates (``dense fp32``, ``prunus 2:4+int8``, ``prunus 0.5+int8``). They need
  the ``prunus.activation`` package; without it they are listed as skipped and the rest runs;
- structured rows, ``prunus SPEC flap+bias+rec`` (``--struct-specs``, default ``mlp@0.270833``:
  416 of SmolLM2's 1536 MLP channels per block, 20% of the block parameters): ``prunus prune
  --method flap --sparsity SPEC --structure-allocation uniform --compensate --reconstruct N --format
  dense``, a smaller dense model that plain transformers loads; measured on prunus's planned kernels
  like the others, and, converted by ``bench/to_gguf.py`` and quantized to ``--struct-llama-formats``
  (default Q8_0 and Q4_1), on llama.cpp: ``llama.cpp FMT of prunus SPEC flap+bias+rec`` (those rows
  run after the prunus rows, which make their checkpoints).

Per row: perplexity over the first ``--windows`` windows of ``--eval`` (prunus's
``eval_windows``; llama.cpp scores the very same token ids), batch-1 decode tokens/s (a
``--prompt-tokens`` prompt, then ``--new-tokens`` greedy tokens, median of 3), the prefill time of
the prompt, size on disk and peak RSS. Output: a markdown table, JSON rows (``--json``, written
after every row, atomically) and a plot of perplexity against decode speed with the Pareto front
(``--plot``).

    bash scripts/setup.sh && bash bench/setup_llamacpp.sh
    .venv/bin/python bench/frontier.py --json runs/frontier.json --plot runs/frontier.png

Pruned checkpoints are cached in ``--work`` (default ``runs/frontier-work``), so a rerun only
measures. ``--only NAME,...`` runs some rows (llama.cpp rows by their names too); ``--windows 4
--nsamples 4`` makes a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import add_data_args, child_env, machine, write_json  # noqa: E402

LLAMA_PY = ROOT / ".venv-llamacpp/bin/python"
SPARSITIES = ("0.5", "2:4", "0.7")
QUANTS = ("", "+int8", "+int4g64")  # int4 in groups of 64: 576, SmolLM2's width, is not a multiple of 128
ACT_SPECS = "0,2:4+int8,0.5+int8"  # weights of the activation sparsity rows ("0": dense)
ACT_SPARSITIES = "0.25,0.4"
ACT_METHODS = "teal,wina,uniform"
#: structured rows (uniform widths, FLAP + bias compensation + reconstruction): 27% of MLP channels
#: is 20% of block parameters, 416 of 1536 channels (a multiple of 32, as bench/structured.py has it)
STRUCT_SPECS = "mlp@0.270833"
STRUCT_TAIL = " flap+bias+rec"


def activation_available() -> bool:
    """Whether this checkout has activation sparsity (``prunus prune --activation-sparsity``)."""
    import importlib.util

    try:
        return importlib.util.find_spec("prunus.activation") is not None
    except (ImportError, ValueError):
        return False


def activation_rows(a: argparse.Namespace) -> list[dict[str, Any]]:
    """{specs} x {fractions of zero inputs} x {gate methods}, in that order."""
    split = lambda text: [v.strip() for v in (text or "").split(",") if v.strip()]  # noqa: E731
    rows = []
    for spec in split(a.act_specs):
        for frac in split(a.act_sparsities):
            for method in split(a.act_methods):
                rows.append({"name": f"prunus {spec} +act{float(frac) * 100:g}% {method}", "kind": "prunus",
                             "spec": spec, "act": {"sparsity": float(frac), "method": method}})
    return rows


def act_args(row: dict[str, Any]) -> list[str]:
    """The ``prunus prune`` flags of a row's activation sparsity ([] for a row without)."""
    act = row.get("act")
    if not act:
        return []
    return ["--activation-sparsity", str(act["sparsity"]), "--activation-method", act["method"]]


def split_names(text: str | None) -> list[str]:
    return [v.strip() for v in (text or "").split(",") if v.strip()]


def llama_names(a: argparse.Namespace) -> list[tuple[str, str, str | None]]:
    """The llama.cpp rows (name, format, structured spec or None) that this run measures: the
    bundled model in every ``--llama-formats``, and each structured row's checkpoint converted to
    GGUF in ``--struct-llama-formats``; with ``--only``, those it names."""
    out = [(f"llama.cpp {f}", f, None) for f in split_names(a.llama_formats)]
    out += [(f"llama.cpp {f} of prunus {spec}{STRUCT_TAIL}", f, spec)
            for spec in split_names(a.struct_specs) for f in split_names(a.struct_llama_formats)]
    if a.only:
        keep = set(split_names(a.only))
        out = [x for x in out if x[0] in keep]
    return out


def rows_wanted(a: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"name": "dense fp32", "kind": "dense"},
        {"name": "dense bf16", "kind": "bf16"},
        {"name": "torch int8 dynamic", "kind": "int8dyn"},
        {"name": "prunus int8 (dense)", "kind": "prunus", "spec": "int8"},
    ]
    for sp in SPARSITIES:
        for q in QUANTS:
            rows.append({"name": f"prunus {sp}{q}", "kind": "prunus", "spec": f"{sp}{q}"})
    # the same int8 checkpoints with the W8A8 kernels allowed (activations rounded to int8)
    rows += [{**r, "name": r["name"] + (" W8A8" if r["spec"].endswith("int8") else " W4A8"),
              "act_int8": True} for r in list(rows)
             if r["kind"] == "prunus" and ("int8" in r["spec"] or "int4" in r["spec"])]
    rows += activation_rows(a)
    rows += [{"name": f"prunus {spec}{STRUCT_TAIL}", "kind": "prunus", "spec": spec, "structured": True}
             for spec in split_names(a.struct_specs)]
    for name in a.compile_rows.split(",") if a.compile_rows else []:
        base = next((r for r in rows if r["name"] == name.strip()), None)
        if base is not None:
            rows.append({**base, "name": base["name"] + " +compile", "compile": True})
    if a.only:
        keep = {n.strip() for n in a.only.split(",")}
        rows = [r for r in rows if r["name"] in keep]
    return rows


def slug(spec: str, method: str, act: dict[str, Any] | None = None) -> str:
    tail = f"_act{act['sparsity']:g}_{act['method']}" if act else ""
    return re.sub(r"[^A-Za-z0-9]+", "_", f"{method}_{spec}{tail}")


def struct_args(row: dict[str, Any], a: argparse.Namespace) -> list[str]:
    """The ``prunus prune`` flags of a structured row: uniform widths, FLAP's bias compensation,
    block-wise reconstruction, and a plain transformers folder (what llama.cpp's converter reads)."""
    if not row.get("structured"):
        return []
    return ["--structure-allocation", "uniform", "--heads-unit", "group", "--compensate",
            "--reconstruct", str(a.struct_reconstruct), "--format", "dense"]


def row_slug(row: dict[str, Any], a: argparse.Namespace) -> str:
    """The stem of a prunus row's checkpoint (``ck-``) and runtime (``rt-``) folders in ``--work``."""
    return slug(row["spec"], prune_method(row, a) if row.get("structured") else a.method, row.get("act"))


def prune_method(row: dict[str, Any], a: argparse.Namespace) -> str:
    """``--method``: the row's pruning method (magnitude for untouched weights, sparsity 0; FLAP's
    channel score for a structured row)."""
    if row.get("structured"):
        return "flap"
    untouched = row["spec"].split("+")[0] in ("0", "0%", "0.0")
    return "magnitude" if row.get("act") and untouched else a.method


def _run(cmd: list[str], log) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    log(" ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if r.returncode != 0:
        log(r.stderr.strip()[-2000:])
    return r


def prepare(row: dict[str, Any], a: argparse.Namespace, log) -> Path | None:  # type: ignore[no-untyped-def]
    """Prune (cached) and export with a measured kernel plan (cached); the runtime folder."""
    work = Path(a.work)
    name = row_slug(row, a)
    ck = work / f"ck-{name}"
    rt = work / f"rt-{name}{'-a8' if row.get('act_int8') else ''}{'-tuned' if a.tune else ''}"
    py = [sys.executable, "-m", "prunus"]
    if not (ck / "prunus.json").is_file():
        t0 = time.perf_counter()
        r = _run(py + ["prune", a.model, "--method", prune_method(row, a), "--sparsity", row["spec"],
                       "--calib", a.calib, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
                       "--no-baselines", "--quiet", "--out", str(ck), "--overwrite"] + act_args(row)
                 + struct_args(row, a), log)
        if r.returncode != 0:
            return None
        (work / f"{name}.prune_seconds").write_text(f"{time.perf_counter() - t0:.1f}\n")
    if a.prune_only or row.get("structured"):
        return ck  # a structured checkpoint is a plain (smaller) dense model: nothing to plan
    if not (rt / "prunus.json").is_file():
        r = _run(py + ["export", str(ck), "--runtime", "auto", "--tokens", "1", "--threads",
                       str(a.threads), "--out", str(rt), "--overwrite"]
                 + (["--act-int8"] if row.get("act_int8") else []) + (["--tune"] if a.tune else []),
                 log)
        if r.returncode != 0:
            return None
    return rt


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and
               p.suffix in (".safetensors", ".bin", ".gguf", ".pt"))


def tensor_bytes(model) -> int:  # type: ignore[no-untyped-def]
    """Bytes of the model's tensors, a tied weight once: its safetensors file, less the header."""
    seen: dict[int, int] = {}
    for t in model.state_dict().values():
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure_one(a: argparse.Namespace) -> dict[str, Any]:
    """The ``--one`` mode: load one configuration, measure it, return its row."""
    import torch
    from torch import nn

    from prunus.evaluate import peak_rss_mb, perplexity
    from prunus.io import data
    from prunus.io.models import load_model
    from prunus.kernels.base import SparseLinear
    from prunus.kernels.timing import time_generate

    torch.set_num_threads(a.threads)
    row = json.loads(a.one)
    kind = row["kind"]
    note = ""
    if kind != "prunus":
        base, tok = load_model(a.model)
    if kind == "dense":
        model = base
        size = tensor_bytes(model)
    elif kind == "bf16":
        model = base.to(torch.bfloat16)
        size = tensor_bytes(model)
    elif kind == "int8dyn":
        model = torch.ao.quantization.quantize_dynamic(base, {nn.Linear}, dtype=torch.qint8)
        tmp = Path(a.work) / "int8dyn.pt"
        torch.save(model.state_dict(), tmp)
        size = tmp.stat().st_size
        tmp.unlink()
    else:
        rt = Path(row["runtime_dir"])
        # prunus.load: the planned kernels in place; a structured row's folder is a plain dense model
        model, tok = load_model(str(rt), runtime="dense" if row.get("structured") else "auto")
        size = folder_bytes(rt)
        kinds: dict[str, int] = {}
        for m in model.modules():
            if isinstance(m, SparseLinear):
                kinds[m.kernel] = kinds.get(m.kernel, 0) + 1
        note = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "all dense"
        if row.get("act"):
            from prunus.kernels.gating import gated_layers

            gated = len(gated_layers(model))
            if not gated:
                raise SystemExit(f"{rt}: no activation gate attached after loading")
            note += f"; {gated} gated layers"
    model.eval()
    ids = data.tokenize(data.resolve_text(a.eval), tok)
    windows = data.eval_windows(ids, a.seqlen, a.windows)
    prompt = windows[0:1, : a.prompt_tokens]
    with torch.inference_mode():
        if row.get("compile"):
            from prunus.kernels.compiled_model import compile_model

            t0 = time.perf_counter()
            compile_model(model)
            time_generate(model, prompt, 4, repeats=1)  # compiles (prefill and decode graphs)
            row["compile_seconds"] = round(time.perf_counter() - t0, 1)
        speed = time_generate(model, prompt, a.new_tokens, repeats=3)
    rss = peak_rss_mb()  # loaded and run, before the perplexity pass (as the llama.cpp peer)
    ppl = None
    if not row.get("compile"):
        t0 = time.perf_counter()
        with torch.inference_mode():
            ppl = perplexity(model, windows, progress=False)
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
    row.update(ppl=None if ppl is None else round(ppl, 3), decode_tok_s=round(speed["decode_tok_s"], 2),
               prefill_ms=round(speed["prefill_s"] * 1e3, 1), bytes=int(size),
               peak_rss_mb=round(rss, 1), kernels=note, threads=a.threads)
    return row


def _peer(a: argparse.Namespace, formats: list[str], out: Path, log, source: Path | None = None):  # type: ignore[no-untyped-def]
    """``bench/peer_llamacpp.py`` in the llama.cpp venv: the bundled GGUF, or ``source`` (F32)."""
    src = ["--source", str(source), "--source-format", "F32"] if source is not None else []
    return _run([str(LLAMA_PY), str(ROOT / "bench/peer_llamacpp.py"), *src, "--formats", ",".join(formats),
                 "--threads", str(a.threads), "--windows", str(a.windows), "--seqlen", str(a.seqlen),
                 "--eval", a.eval, "--prompt-tokens", str(a.prompt_tokens), "--new-tokens",
                 str(a.new_tokens), "--work", str(Path(a.work) / "gguf"), "--json", str(out)], log)


def llamacpp_rows(a: argparse.Namespace, log) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The llama.cpp rows of :func:`llama_names`: the bundled model, and each structured checkpoint
    (``ck-`` in ``--work``, pruned by its prunus row) converted by ``bench/to_gguf.py``."""
    wanted = llama_names(a)
    if not wanted:
        return []
    if not LLAMA_PY.exists():
        log(f"llama.cpp rows skipped: {LLAMA_PY} is absent (bash bench/setup_llamacpp.sh)")
        return []
    groups: dict[str | None, list[tuple[str, str]]] = {}
    for name, fmt, spec in wanted:
        groups.setdefault(spec, []).append((name, fmt))
    rows: list[dict[str, Any]] = []
    for spec, items in groups.items():
        source = None
        if spec is not None:
            ck = Path(a.work) / f"ck-{row_slug({'spec': spec, 'structured': True}, a)}"
            source = Path(a.work) / "gguf" / f"{ck.name}.F32.gguf"
            source.parent.mkdir(parents=True, exist_ok=True)
            err = None
            if not (ck / "config.json").is_file():
                err = f"{ck} is missing: run its row (prunus {spec}{STRUCT_TAIL}) first"
            elif (r := _run([str(LLAMA_PY), str(ROOT / "bench/to_gguf.py"), str(ck), str(source)], log)).returncode:
                err = "to_gguf: " + ((r.stderr.strip().splitlines() or ["?"])[-1])
            if err:
                rows += [{"name": n, "kind": "llamacpp", "error": err} for n, _ in items]
                continue
        out = Path(a.work) / f"llamacpp{'' if spec is None else '-' + source.stem}.json"  # type: ignore[union-attr]
        r = _peer(a, [f for _, f in items], out, log, source)
        if r.returncode != 0:
            err = (r.stderr.strip().splitlines() or ["?"])[-1]
            rows += [{"name": n, "kind": "llamacpp", "error": err} for n, _ in items]
            continue
        doc = json.loads(out.read_text())
        by_fmt = {x["format"]: x for x in doc["rows"]}
        for name, fmt in items:
            x = by_fmt.get(fmt, {})
            rows.append({"name": name, "kind": "llamacpp", "ppl": x.get("ppl"),
                         "decode_tok_s": x.get("decode_tok_s"), "prefill_ms": x.get("prefill_ms"),
                         "bytes": x.get("bytes"), "peak_rss_mb": x.get("peak_rss_mb"),
                         "kernels": doc.get("runtime", ""), "threads": a.threads,
                         **({"structured": spec} if spec is not None else {})})
    return rows


def pareto(rows: list[dict[str, Any]]) -> set[str]:
    """Names of the rows no other row beats on both perplexity (lower) and decode speed (higher)."""
    pts = [r for r in rows if r.get("ppl") and r.get("decode_tok_s")]
    front = set()
    for r in pts:
        if not any(o is not r and o["ppl"] <= r["ppl"] and o["decode_tok_s"] >= r["decode_tok_s"]
                   and (o["ppl"] < r["ppl"] or o["decode_tok_s"] > r["decode_tok_s"]) for o in pts):
            front.add(r["name"])
    return front


def table(rows: list[dict[str, Any]]) -> str:
    dense = next((r for r in rows if r["name"] == "dense fp32" and r.get("decode_tok_s")), None)
    front = pareto(rows)
    lines = ["| configuration | ppl | decode tok/s | vs fp32 | prefill 128 ms | size MB | peak RSS MB | kernels |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['name']} | error: {r['error'][:80]} | | | | | | |")
            continue
        sp = f"{r['decode_tok_s'] / dense['decode_tok_s']:.2f}x" if dense and r.get("decode_tok_s") else ""
        star = " *" if r["name"] in front else ""
        ppl = f"{r['ppl']:.2f}" if r.get("ppl") else "(eager row)"
        lines.append(f"| {r['name']}{star} | {ppl} | {r.get('decode_tok_s', '')} | {sp} | "
                     f"{r.get('prefill_ms', '')} | {r.get('bytes', 0) / 2**20:.1f} | "
                     f"{r.get('peak_rss_mb', '')} | {r.get('kernels', '')} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto(rows)
    pts = [r for r in rows if r.get("ppl") and r.get("decode_tok_s")]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {"prunus": "tab:blue", "llamacpp": "tab:orange"}
    for r in pts:
        c = "tab:green" if r.get("structured") else colors.get(r["kind"], "tab:gray")
        ax.scatter(r["decode_tok_s"], r["ppl"], c=c, s=60 if r["name"] in front else 25,
                   edgecolors="black" if r["name"] in front else "none")
        ax.annotate(r["name"], (r["decode_tok_s"], r["ppl"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    fr = sorted((r for r in pts if r["name"] in front), key=lambda r: r["decode_tok_s"])
    ax.plot([r["decode_tok_s"] for r in fr], [r["ppl"] for r in fr], "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel("batch-1 decode tokens/s (higher is better)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M on CPU: quality against decode speed")
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(ap)
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--llama-formats", default="Q8_0,Q4_1,F16")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--compile-rows",
                    default="dense fp32,prunus 2:4+int4g64 W4A8,prunus 0.5+int8 W8A8,"
                            "prunus 2:4+int8 W8A8",
                    help="rows to repeat after torch.compile ('' for none)")
    ap.add_argument("--act-specs", default=ACT_SPECS,
                    help="weights of the activation sparsity rows ('' for none)")
    ap.add_argument("--act-sparsities", default=ACT_SPARSITIES, help="fractions of zero inputs")
    ap.add_argument("--act-methods", default=ACT_METHODS, help="gate methods (teal, wina, uniform)")
    ap.add_argument("--struct-specs", default=STRUCT_SPECS,
                    help="structured rows: uniform widths, FLAP + bias compensation + reconstruction ('' for none)")
    ap.add_argument("--struct-reconstruct", type=int, default=4, help="reconstruction epochs of the structured rows")
    ap.add_argument("--struct-llama-formats", default="Q8_0,Q4_1",
                    help="llama.cpp formats of the structured rows' checkpoints ('' for none)")
    ap.add_argument("--only", help="comma-separated row names (llama.cpp rows included)")
    ap.add_argument("--work", default=str(ROOT / "runs/frontier-work"))
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--tune", action="store_true",
                    help="export with --tune (the plan checked on the decode of the whole model)")
    ap.add_argument("--update", metavar="JSON",
                    help="re-measure the --only rows and replace them in this earlier --json file")
    ap.add_argument("--prune-only", action="store_true",
                    help="only prune (and cache) the prunus checkpoints, measure nothing")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    return ap


def main() -> int:
    a = parser().parse_args()
    for name in ("nsamples", "seqlen", "windows", "threads", "prompt_tokens", "new_tokens"):
        if getattr(a, name) < 1:
            print(f"frontier: error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if a.one:
        print(json.dumps(measure_one(a)), flush=True)
        return 0
    Path(a.work).mkdir(parents=True, exist_ok=True)

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    doc: dict[str, Any] = {"machine": machine(kernel_isa=True),
                           "settings": {k: v for k, v in vars(a).items() if k != "one"},
                           "rows": []}
    update = None
    if a.update:
        update = json.loads(Path(a.update).read_text())
        a.json = a.json or a.update
    if a.prune_only:
        for row in rows_wanted(a):
            if row.get("act") and not activation_available():
                log(f"{row['name']}: skipped (no prunus.activation)")
                continue
            if row["kind"] == "prunus" and not row.get("compile") and not row.get("act_int8"):
                log(f"{row['name']}: {'ok' if prepare(row, a, log) else 'FAILED'}")
        return 0
    act_ok = activation_available()
    for row in rows_wanted(a):
        if row.get("act") and not act_ok:
            doc["rows"].append({**row, "error": "skipped: no prunus.activation in this checkout "
                                                "(prunus prune --activation-sparsity)"})
            continue
        if row["kind"] == "prunus":
            rt = prepare(row, a, log)
            if rt is None:
                doc["rows"].append({**row, "error": "prune or export failed (see the log)"})
                continue
            row["runtime_dir"] = str(rt)
            sec = Path(a.work) / f"{row_slug(row, a)}.prune_seconds"
            if sec.exists():
                row["prune_seconds"] = float(sec.read_text())
        cmd = [sys.executable, __file__, "--one", json.dumps(row)] + [
            f"--{k.replace('_', '-')}={getattr(a, k)}" for k in
            ("model", "eval", "seqlen", "windows", "threads", "prompt_tokens", "new_tokens", "work")]
        r = _run(cmd, log)
        if r.returncode != 0:
            doc["rows"].append({**row, "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            doc["rows"].append(json.loads(r.stdout.strip().splitlines()[-1]))
        log(json.dumps(doc["rows"][-1]))
        if a.json and update is None:
            write_json(a.json, doc)
    if not a.skip_llamacpp:
        doc["rows"] += llamacpp_rows(a, log)
    if update is not None:  # the re-measured rows replace their namesakes, in place
        new = {r["name"]: {**r, "remeasured": doc["machine"]["date"]} for r in doc["rows"]}
        update["rows"] = [new.pop(r["name"], r) for r in update["rows"]] + list(new.values())
        doc = update
    if a.json:
        write_json(a.json, doc)
    print(table(doc["rows"]))
    print(f"\n* on the Pareto front. Machine: {doc['machine']}")
    if a.plot:
        plot(doc["rows"], a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
