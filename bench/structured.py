"""Structured pruning that makes SmolLM2-135M smaller: quality, size and CPU speed per configuration.

The configurations remove 10/20/30/50% (``--targets``) of the parameters of the decoder blocks, by
``mlp@`` (MLP channels), ``heads@`` (attention heads, in whole KV groups), ``blocks@`` (whole
blocks) and a mix of heads and MLP channels. Each runs ``prunus prune --method flap`` (FLAP's
activation-aware unit criterion, uniform widths) in four variants: plain, ``--compensate`` (FLAP's
bias compensation), ``--reconstruct N`` (block reconstruction, N epochs) and both; the plain
variant's run also scores the magnitude and random baselines at the same spec. Unstructured
SparseGPT rows remove the same number of block parameters as individual weights.

Specs come from the model's shapes (``--shapes`` child: the parameters of block 0 of the loaded
model), not from hard-coded numbers, by these rules (:func:`plan_cells`):

* ``mlp``: the channel count whose removal is nearest the target, rounded to a multiple of
  ``--mlp-multiple`` channels (default 32: llama.cpp's Q8_0 block runs along ``ffn_down``'s rows,
  so its input width must be a multiple of 32; the kept width is also a multiple);
* ``heads``: whole KV groups (``--heads-unit group``; SmolLM2 has 3 groups of 3 query heads, so
  heads go in thirds of the attention, 8.3% of the block parameters each). The count nearest the
  target; a target that heads alone miss by more than 25% of itself (30%, 50%: at most 2 of 3
  groups, 16.7%, can go) is skipped and says so in the table;
* ``blocks``: ``round(target * blocks)`` whole blocks;
* ``mix`` (a rule, not a search): heads take the target's share of the attention, rounded half
  up to whole KV groups and kept between one group and all but one; MLP channels (same rounding
  as ``mlp``) remove what is left of the target. E.g. 30%: ``heads@1/3`` (8.3%) + ``mlp@0.29``.

Bias compensation and reconstruction act on the width removal only (FLAP's bias is folded from
removed channels into their consumer; reconstruction tunes each block after its widths shrink):
``blocks@`` rows have only the plain variant.

Per row: the removed fraction of block parameters that ``prunus prune --json`` reports
(``structure.removed_fraction``) beside the target; parameters (for SparseGPT: the non-zero
ones); perplexity (``prunus prune``'s, over the first ``--windows`` windows of ``--eval``); size on
disk; batch-1 decode tokens/s and the prefill time of a ``--prompt-tokens`` prompt at
``--threads`` threads (:func:`prunus.kernels.timing.time_generate`, median of 3, each checkpoint in
its own process, dense timed first in the same run); and, for uniform widths and the variants of
``--llama-variants`` (default ``flap`` and ``flap+bias+rec``), the same model on llama.cpp: converted by ``bench/to_gguf.py`` (F32), quantized to ``--llama-formats`` with
``llama_model_quantize`` and measured by ``bench/peer_llamacpp.py`` on the very same evaluation
windows, both in the llama.cpp venv (``bench/setup_llamacpp.sh``). Dense llama.cpp rows come from
the same converter on the unpruned model. Structured checkpoints are plain dense folders timed as
``nn.Linear`` models; SparseGPT checkpoints are exported with ``prunus export --runtime auto
--tokens 1`` (a sparse kernel only where measured faster than dense) and timed as ``prunus.load``
runs them, kernels in place (``--sparsegpt-runtime dense``: as a masked dense model). A SparseGPT
row is run per group of the target's achieved fractions that lie within ``--sparsegpt-tol`` (1
point) of each other, at the group's mean.

    .venv/bin/python bench/structured.py --json runs/structured.json --plot runs/structured.png
    .venv/bin/python bench/structured.py --quick                     # smoke: one target, 4 windows
    .venv/bin/python bench/structured.py --only '0.3/mlp/*,0.3/sparsegpt' --no-llamacpp

Checkpoints are cached in ``--work`` (default ``runs/structured-work``), in a subfolder per
calibration/evaluation setting, so a rerun only measures again; timings are never reused (llama.cpp
results only with ``--reuse-llamacpp``). Every timing row records the 1-minute load average: on a
shared machine another process skews decode speed by several times, and the dense model is timed
again at the end as a drift check.

Duration (2 cores): ``--quick`` about 10-15 min on a quiet machine (34 min at load 5); the full
run about 7 h on a quiet machine, mostly the 20 reconstruction runs (~9 min each) and llama.cpp's
perplexity on 25 checkpoints x 2 formats (~100 s each). Shorter: ``--variants flap,flap+bias,
flap+bias+rec`` (-1.5 h), ``--llama-variants flap`` (-0.8 h).
Output: a markdown table, JSON rows (``--json``, rewritten atomically after every row) and a plot of
perplexity against parameters and against decode speed (``--plot``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import add_data_args, child_env, machine, write_json  # noqa: E402

LLAMA_PY = ROOT / ".venv-llamacpp/bin/python"
PRUNUS = [sys.executable, "-m", "prunus"]
KINDS = ("mlp", "heads", "blocks", "mix")
#: variant -> (label suffix, whether it compensates, whether it reconstructs)
VARIANTS = {"flap": (False, False), "flap+bias": (True, False), "flap+rec": (False, True),
            "flap+bias+rec": (True, True)}
HEADS_TOL = 0.25  # a heads-only cell is skipped when it misses the target by more than this share of it

Log = Callable[[str], None]


# ------------------------------------------------------------------ specs from shapes


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _mlp_channels(params: float, sh: dict[str, Any], multiple: int) -> int:
    """MLP channels per block whose removal (in every block) is nearest ``params`` parameters,
    a multiple of ``multiple``, keeping at least ``multiple`` channels."""
    per_channel = sh["mlp_params"] / sh["mlp_width"]  # a row of gate and up, a column of down
    c = params / (sh["blocks"] * per_channel)
    c = _half_up(c / multiple) * multiple
    return max(0, min(c, sh["mlp_width"] - multiple))


def _ratio(x: float) -> str:
    return f"{x:.6g}"


def plan_cells(sh: dict[str, Any], targets: list[float], kinds: tuple[str, ...] = KINDS,
               mlp_multiple: int = 32) -> list[dict[str, Any]]:
    """Each (target, kind) cell: its spec and the fraction of block parameters it removes.

    ``sh`` holds the model's shapes (:func:`model_shapes`): ``blocks``, ``block_params`` (one
    block, norms included), ``attn_params`` (q, k, v, o of one block), ``mlp_params`` (gate, up,
    down), ``mlp_width``, ``kv_heads``. A skipped cell has ``spec`` None and a ``note``.
    """
    total = sh["blocks"] * sh["block_params"]
    per_channel = sh["mlp_params"] / sh["mlp_width"]
    groups = sh["kv_heads"]
    per_group = sh["attn_params"] / groups  # whole KV groups: q, k, v rows and o columns
    out = []
    for t in targets:
        want = t * total
        for kind in kinds:
            cell: dict[str, Any] = {"target": t, "kind": kind, "name": f"{t:g}/{kind}", "spec": None,
                                    "expected": None, "note": ""}
            if kind == "mlp":
                c = _mlp_channels(want, sh, mlp_multiple)
                if c > 0:
                    cell.update(spec=f"mlp@{_ratio(c / sh['mlp_width'])}",
                                expected=c * per_channel * sh["blocks"] / total)
            elif kind == "heads":
                best = min(range(1, groups), key=lambda k: abs(k * per_group * sh["blocks"] - want),
                           default=None)
                if best is None:
                    cell["note"] = "a single KV group cannot be pruned"
                else:
                    got = best * per_group * sh["blocks"] / total
                    if abs(got - t) > HEADS_TOL * t:
                        top = (groups - 1) * per_group * sh["blocks"] / total
                        cell["note"] = (f"skipped: heads alone remove at most {100 * top:.1f}% of block "
                                        f"parameters ({groups - 1} of {groups} KV groups)")
                    else:
                        cell.update(spec=f"heads@{_ratio(best / groups)}", expected=got)
            elif kind == "blocks":
                k = min(sh["blocks"] - 1, _half_up(t * sh["blocks"]))
                if k > 0:
                    cell.update(spec=f"blocks@{k}", expected=k / sh["blocks"])
            elif kind == "mix":
                if groups < 2:
                    cell["note"] = "a single KV group: no heads to mix"
                else:
                    g = max(1, min(groups - 1, _half_up(t * groups)))
                    rest = want - g * per_group * sh["blocks"]
                    c = _mlp_channels(max(0.0, rest), sh, mlp_multiple)
                    spec = f"heads@{_ratio(g / groups)}" + (f"+mlp@{_ratio(c / sh['mlp_width'])}" if c else "")
                    cell.update(spec=spec, expected=(g * per_group + c * per_channel) * sh["blocks"] / total)
            else:
                raise ValueError(f"unknown kind {kind!r}; choose {', '.join(KINDS)}")
            if cell["spec"] is None and not cell["note"]:
                cell["note"] = "skipped: rounds to nothing removed"
            out.append(cell)
    return out


def sparsegpt_fractions(fracs: list[float], tol: float = 0.01) -> list[list[float]]:
    """Achieved fractions grouped so that each group spans at most ``tol``: one SparseGPT row each."""
    groups: list[list[float]] = []
    for f in sorted(fracs):
        if groups and f - groups[-1][0] <= tol:
            groups[-1].append(f)
        else:
            groups.append([f])
    return groups


# ------------------------------------------------------------------ children


def _run(cmd: list[str], log: Log) -> tuple[subprocess.CompletedProcess, float]:
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        log(r.stderr.strip()[-2000:])
    return r, dt


def _error(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (r.stderr or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {r.returncode}"


def model_shapes(model_name: str) -> dict[str, Any]:
    """The ``--shapes`` child: parameter counts of the loaded model's blocks."""
    from torch import nn

    from prunus.core.targets import select
    from prunus.core.units import find_blocks, layout_of
    from prunus.io.models import load_model

    model, _ = load_model(model_name)
    _, blocks = find_blocks(model)
    b = blocks[0]
    lay = layout_of(b)

    def n(path: str) -> int:
        return sum(p.numel() for p in b.get_submodule(path).parameters())

    per_block = [sum(p.numel() for p in blk.parameters()) for blk in blocks]
    if len(set(per_block)) != 1:
        raise SystemExit("structured: the blocks differ in size; the spec rules assume equal blocks")
    return {"blocks": len(blocks), "block_params": per_block[0],
            "attn_params": sum(n(p) for p in (lay.q, lay.k, lay.v, lay.o)),
            "mlp_params": sum(n(p) for p in (*lay.producers, lay.consumer)),
            "mlp_width": lay.width, "heads": lay.heads, "kv_heads": lay.kv_heads, "head_dim": lay.head_dim,
            "hidden": int(model.config.hidden_size), "total_params": sum(p.numel() for p in model.parameters()),
            "linear_params": sum(t.module.weight.numel() for t in select(model)),
            "linears_in_blocks": sum(m.weight.numel() for m in blocks.modules() if isinstance(m, nn.Linear))}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and
               p.suffix in (".safetensors", ".bin", ".gguf", ".pt"))


def measure_one(a: argparse.Namespace) -> dict[str, Any]:
    """The ``--one`` child: load one checkpoint (or the dense model), time batch-1 generation."""
    import torch

    from prunus.evaluate import peak_rss_mb
    from prunus.io import data
    from prunus.io.models import load_model
    from prunus.kernels.base import SparseLinear
    from prunus.kernels.timing import time_generate

    torch.set_num_threads(a.threads)
    job = json.loads(a.one)
    t0 = time.perf_counter()
    model, tok = load_model(job["path"], runtime=job.get("runtime", "dense"))
    load_s = time.perf_counter() - t0
    model.eval()
    kinds: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, SparseLinear):
            kinds[m.kernel] = kinds.get(m.kernel, 0) + 1
    ids = data.tokenize(data.resolve_text(a.eval), tok)
    prompt = data.eval_windows(ids, a.seqlen, 1)[0:1, : a.prompt_tokens]
    with torch.inference_mode():
        speed = time_generate(model, prompt, a.new_tokens, repeats=3)
    try:
        load = round(os.getloadavg()[0], 2)  # others on the machine skew the timing: recorded with it
    except OSError:
        load = None
    path = Path(job["path"])
    return {"decode_tok_s": round(speed["decode_tok_s"], 2), "prefill_ms": round(speed["prefill_s"] * 1e3, 1),
            "bytes": folder_bytes(path) if path.is_dir() else None,
            "kernels": ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "all dense",
            "timing_peak_rss_mb": round(peak_rss_mb(), 1), "load_s": round(load_s, 1), "threads": a.threads,
            "load_avg_1m": load}


# ------------------------------------------------------------------ the parent


class Bench:
    def __init__(self, a: argparse.Namespace, log: Log) -> None:
        self.a, self.log = a, log
        key = re.sub(r"[^A-Za-z0-9.]+", "_", f"{a.model}-{a.calib}-{a.nsamples}x{a.seqlen}-{a.eval}-"
                                             f"{a.windows}w-s{a.seed}-rec{a.reconstruct}")
        self.wd = Path(a.work) / key
        self.wd.mkdir(parents=True, exist_ok=True)
        self.doc: dict[str, Any] = {"machine": machine(), "settings": {k: v for k, v in vars(a).items()
                                                                      if k != "one"}, "rows": []}
        self.dense: Optional[dict[str, Any]] = None
        self.llama_ok = not a.no_llamacpp and LLAMA_PY.exists()
        if not a.no_llamacpp and not LLAMA_PY.exists():
            log(f"llama.cpp columns skipped: {LLAMA_PY} is absent (bash bench/setup_llamacpp.sh)")

    # -- helpers
    def wanted(self, name: str) -> bool:
        if not self.a.only:
            return True
        return any(fnmatch.fnmatchcase(name, pat.strip()) for pat in self.a.only.split(",") if pat.strip())

    def add(self, row: dict[str, Any]) -> None:
        self.doc["rows"].append(row)
        self.log("row: " + json.dumps({k: v for k, v in row.items() if k not in ("widths",)}))
        if self.a.json:
            write_json(self.a.json, self.doc, default=float)

    def common(self) -> list[str]:
        a = self.a
        return ["--calib", a.calib, "--eval", a.eval, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
                "--windows", str(a.windows), "--seed", str(a.seed), "--quiet"]

    def time_ck(self, path: Path | str, runtime: str = "dense") -> dict[str, Any]:
        a = self.a
        cmd = [sys.executable, __file__, "--one", json.dumps({"path": str(path), "runtime": runtime})] + [
            f"--{k.replace('_', '-')}={getattr(a, k)}" for k in
            ("model", "eval", "seqlen", "threads", "prompt_tokens", "new_tokens")]
        r, _ = _run(cmd, self.log)
        if r.returncode != 0:
            return {"timing_error": _error(r)}
        return json.loads(r.stdout.strip().splitlines()[-1])

    def speedup(self, row: dict[str, Any]) -> None:
        d = self.dense
        if d and d.get("decode_tok_s") and row.get("decode_tok_s"):
            row["speedup"] = round(row["decode_tok_s"] / d["decode_tok_s"], 3)
        if d and d.get("prefill_ms") and row.get("prefill_ms"):
            row["prefill_speedup"] = round(d["prefill_ms"] / row["prefill_ms"], 3)

    def llamacpp(self, folder: Path, name: str) -> dict[str, Any]:
        """llama.cpp rows of a uniform-width folder: {format: {decode_tok_s, prefill_ms, ppl, bytes}}."""
        a = self.a
        out = self.wd / f"llama-{name}.json"
        if out.is_file() and a.reuse_llamacpp:
            doc = json.loads(out.read_text())
        else:
            gdir = self.wd / "gguf"
            src = gdir / f"{name}.F32.gguf"
            r, conv_s = _run([str(LLAMA_PY), str(ROOT / "bench/to_gguf.py"), str(folder), str(src)], self.log)
            if r.returncode != 0:
                return {"error": "to_gguf: " + _error(r)}
            r, peer_s = _run([str(LLAMA_PY), str(ROOT / "bench/peer_llamacpp.py"), "--source", str(src),
                              "--source-format", "F32", "--formats", a.llama_formats, "--threads", str(a.threads),
                              "--windows", str(a.windows), "--seqlen", str(a.seqlen), "--eval", a.eval,
                              "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
                              "--work", str(gdir), "--json", str(out)], self.log)
            if not a.keep_gguf:
                for f in gdir.glob(f"{name}.*.gguf"):
                    f.unlink()
            if r.returncode != 0:
                return {"error": "peer_llamacpp: " + _error(r)}
            doc = json.loads(out.read_text())
            doc["convert_s"], doc["peer_s"] = round(conv_s, 1), round(peer_s, 1)
            write_json(out, doc, default=float)
        res: dict[str, Any] = {"wall_s": round(doc.get("convert_s", 0) + doc.get("peer_s", 0), 1)}
        for x in doc["rows"]:
            res[x["format"]] = {k: x.get(k) for k in ("decode_tok_s", "prefill_ms", "ppl", "bytes", "peak_rss_mb")}
        return res

    # -- rows
    def run_dense(self) -> None:
        a = self.a
        js = self.wd / "dense-eval.json"
        if not js.is_file():
            r, _ = _run(PRUNUS + ["eval", a.model, "--text", a.eval, "--seqlen", str(a.seqlen), "--windows",
                                  str(a.windows), "--quiet", "--json", str(js)], self.log)
            if r.returncode != 0:
                self.add({"name": "dense", "kind": "dense", "error": _error(r)})
                return
        ev = json.loads(js.read_text())
        sh = self.doc["shapes"]
        row: dict[str, Any] = {"name": "dense", "target": 0.0, "kind": "dense", "spec": "-", "method": "dense",
                               "role": "dense", "achieved": 0.0, "params": sh["total_params"],
                               "ppl": ev["perplexity"], "uniform": True}
        folder = dense_folder(a.model)
        row.update(self.time_ck(a.model))
        row["bytes"] = folder_bytes(folder) if folder is not None else None
        if self.llama_ok and folder is not None:
            row["llamacpp"] = self.llamacpp(folder, "dense")
        self.dense = row
        self.speedup(row)
        self.add(row)

    def prune(self, cell: dict[str, Any], variant: str) -> Optional[list[dict[str, Any]]]:
        a = self.a
        comp, rec = VARIANTS[variant]
        name = slug(f"{cell['spec']}-{variant}")
        js, ck = self.wd / f"prune-{name}.json", self.wd / f"ck-{name}"
        wall = self.wd / f"prune-{name}.wall"
        if not (js.is_file() and (ck / "prunus.json").is_file()):
            cmd = PRUNUS + ["prune", a.model, "--method", "flap", "--sparsity", cell["spec"],
                            "--structure-allocation", "uniform", "--heads-unit", "group", *self.common(),
                            "--out", str(ck), "--format", "dense", "--overwrite", "--json", str(js)]
            cmd += ["--baselines", "magnitude,random"] if variant == "flap" and not a.no_baselines \
                else ["--no-baselines"]
            if comp:
                cmd.append("--compensate")
            if rec:
                cmd += ["--reconstruct", str(a.reconstruct)]
            js.unlink(missing_ok=True)
            r, dt = _run(cmd, self.log)
            if r.returncode != 0:
                self.add({**cell, "name": f"{cell['name']}/{variant}", "variant": variant, "method": variant,
                          "role": "method", "error": _error(r)})
                return None
            wall.write_text(f"{dt:.1f}\n")
        doc = json.loads(js.read_text())
        rows = []
        for run in doc["runs"]:
            if run["role"] == "dense":
                continue
            s = run.get("structure") or {}
            method = variant if run["role"] == "method" else run["label"]
            row = {"name": f"{cell['name']}/{method}", "target": cell["target"], "kind": cell["kind"],
                   "spec": run["spec"], "variant": variant, "method": method, "role": run["role"],
                   "achieved": s.get("removed_fraction"), "expected": cell["expected"],
                   "params": run.get("parameters"), "ppl": run.get("perplexity"),
                   "prune_s": round(run["seconds"], 1) if run.get("seconds") is not None else None,
                   "uniform": s.get("uniform"), "removed_blocks": s.get("removed_blocks"),
                   "widths": (s.get("widths") or [None])[0]}
            if run["role"] == "method":
                row["checkpoint"] = str(ck)
                if wall.is_file():
                    row["prune_wall_s"] = float(wall.read_text())
            rows.append(row)
        return rows

    def run_cell(self, cell: dict[str, Any]) -> Optional[float]:
        """The cell's variants; returns the removed fraction of block parameters of its plain variant
        (as achieved when it ran, else as planned: the same, :func:`plan_cells` predicts prunus's count)."""
        a = self.a
        if cell["spec"] is None:
            if self.wanted(cell["name"] + "/flap"):
                self.add({**cell, "method": "-", "role": "skipped"})
            return None
        variants = [v for v in a.variants if not (cell["kind"] == "blocks" and v != "flap")]
        frac = cell["expected"]
        for v in variants:
            if not self.wanted(f"{cell['name']}/{v}"):
                continue
            rows = self.prune(cell, v)
            if rows is None:
                continue
            for row in rows:
                if row["role"] == "method":
                    row.update(self.time_ck(row["checkpoint"]))
                    self.speedup(row)
                    if v == "flap" and row.get("achieved") is not None:
                        frac = row["achieved"]
                    if self.llama_ok and row.get("uniform") and (v in a.llama_variants or "all" in a.llama_variants):
                        row["llamacpp"] = self.llamacpp(Path(row["checkpoint"]), slug(f"{cell['spec']}-{v}"))
                self.add(row)
        return frac

    def run_sparsegpt(self, target: float, group: list[float]) -> None:
        a = self.a
        sh = self.doc["shapes"]
        frac = round(sum(group) / len(group), 4)  # of block parameters
        blocks_total = sh["blocks"] * sh["block_params"]
        ratio = frac * blocks_total / sh["linear_params"]  # the same count, as weights of the linears
        spec = f"{ratio:.4f}"
        name = slug(f"sparsegpt-{spec}")
        row: dict[str, Any] = {"name": f"{target:g}/sparsegpt", "target": target, "kind": "sparsegpt",
                               "spec": spec, "variant": "sparsegpt", "method": "sparsegpt", "role": "method",
                               "achieved": frac, "matches": [round(f, 4) for f in group], "uniform": False}
        js, ck, rt = self.wd / f"prune-{name}.json", self.wd / f"ck-{name}", self.wd / f"rt-{name}"
        if not (js.is_file() and (ck / "prunus.json").is_file()):
            js.unlink(missing_ok=True)
            r, dt = _run(PRUNUS + ["prune", a.model, "--method", "sparsegpt", "--sparsity", spec, *self.common(),
                                   "--no-baselines", "--out", str(ck), "--overwrite", "--json", str(js)], self.log)
            if r.returncode != 0:
                self.add({**row, "error": _error(r)})
                return
            (self.wd / f"prune-{name}.wall").write_text(f"{dt:.1f}\n")
        path, runtime = ck, "dense"
        if a.sparsegpt_runtime == "auto":
            if not (rt / "prunus.json").is_file():
                r, dt = _run(PRUNUS + ["export", str(ck), "--runtime", "auto", "--tokens", "1", "--threads",
                                       str(a.threads), "--out", str(rt), "--overwrite"], self.log)
                if r.returncode != 0:
                    self.add({**row, "error": "export: " + _error(r)})
                    return
                (self.wd / f"export-{name}.wall").write_text(f"{dt:.1f}\n")
            path, runtime = rt, "auto"
        doc = json.loads(js.read_text())
        run = doc["runs"][0]
        zeros = round(run["sparsity"] * sh["linear_params"])
        row.update(ppl=run["perplexity"], params=run["parameters"] - zeros, sparsity=run["sparsity"],
                   prune_s=round(run["seconds"], 1), checkpoint=str(path), runtime=runtime)
        for f, k in ((self.wd / f"prune-{name}.wall", "prune_wall_s"), (self.wd / f"export-{name}.wall", "export_wall_s")):
            if f.is_file():
                row[k] = float(f.read_text())
        row.update(self.time_ck(path, runtime))
        self.speedup(row)
        self.add(row)

    def run(self) -> None:
        a = self.a
        shp = self.wd / "shapes.json"
        if not shp.is_file():
            r, _ = _run([sys.executable, __file__, "--shapes", f"--model={a.model}"], self.log)
            if r.returncode != 0:
                raise SystemExit(f"structured: error: shapes: {_error(r)}")
            write_json(shp, json.loads(r.stdout.strip().splitlines()[-1]), default=float)
        sh = json.loads(shp.read_text())
        self.doc["shapes"] = sh
        cells = plan_cells(sh, a.targets, tuple(a.kinds), a.mlp_multiple)
        self.doc["cells"] = cells
        for c in cells:
            exp = "-" if c["expected"] is None else f"{100 * c['expected']:.2f}%"
            self.log(f"cell {c['name']}: {c['spec'] or '-'} (expected removed {exp}) {c['note']}")
        t0 = time.perf_counter()
        self.run_dense()
        for t in a.targets:
            fracs: list[float] = []
            for c in (c for c in cells if c["target"] == t):
                f = self.run_cell(c)
                if f is not None:
                    fracs.append(f)
            if not a.no_sparsegpt and self.wanted(f"{t:g}/sparsegpt") and fracs:
                for g in sparsegpt_fractions(fracs, a.sparsegpt_tol):
                    self.run_sparsegpt(t, g)
        if self.dense is not None and len(self.doc["rows"]) > 1:  # drift check: dense once more
            self.doc["dense_retimed"] = self.time_ck(a.model)
        self.doc["wall_s"] = round(time.perf_counter() - t0, 1)
        if a.json:
            write_json(a.json, self.doc, default=float)


def dense_folder(model: str) -> Optional[Path]:
    """A save_pretrained folder of the unpruned model (the converter's input), if there is one."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    from prunus.io.cache import cache_root
    from prunus.io.models import ALIASES

    if model.lower() in ALIASES:
        c = cache_root() / "models" / ALIASES[model.lower()]
        if (c / "config.json").is_file():
            return c
    return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


# ------------------------------------------------------------------ output


def _f(v: Any, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def table(doc: dict[str, Any], formats: list[str]) -> str:
    cols = ["target %", "kind", "spec", "method", "removed %", "params M", "ppl", "size MB", "decode tok/s",
            "vs dense", "prefill ms"]
    for f in formats:
        cols += [f"llama.cpp {f} tok/s", f"llama.cpp {f} ppl"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in doc["rows"]:
        tgt = "-" if r.get("kind") == "dense" else _f(100 * r["target"], ".0f") if r.get("target") is not None else ""
        if r.get("role") == "skipped":
            lines.append(f"| {tgt} | {r['kind']} | - | - | {r.get('note', '')} |" + " |" * (len(cols) - 5))
            continue
        if r.get("error"):
            lines.append(f"| {tgt} | {r.get('kind', '')} | {r.get('spec', '')} | {r.get('method', '')} | "
                         f"error: {str(r['error'])[:90]} |" + " |" * (len(cols) - 5))
            continue
        ll = r.get("llamacpp") or {}
        cells = [tgt, r.get("kind", ""), str(r.get("spec", "")), r.get("method", ""),
                 _f(None if r.get("achieved") is None else 100 * r["achieved"], ".1f"),
                 _f(None if r.get("params") is None else r["params"] / 1e6, ".1f"),
                 _f(r.get("ppl"), ".2f"), _f(None if r.get("bytes") is None else r["bytes"] / 2**20, ".0f"),
                 _f(r.get("decode_tok_s"), ".1f"), _f(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
                 _f(r.get("prefill_ms"), ".0f")]
        for f in formats:
            x = ll.get(f) or {}
            if ll.get("error"):
                cells += ["error", str(ll["error"])[:40]]
            else:
                cells += [_f(x.get("decode_tok_s"), ".1f"), _f(x.get("ppl"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["removed %: of the block parameters, as achieved (`structure.removed_fraction`); for SparseGPT the "
             "same count removed as individual weights (params M: the non-zero ones).",
             "magnitude / random rows: the same spec and shapes as the flap row above them (same speed).",
             "blocks@ rows have only the plain variant: bias compensation and reconstruction act on widths.",
             "flap+rec: --reconstruct N epochs; flap+bias: --compensate (FLAP's bias compensation; the biases it "
             "adds are parameters too, so +bias rows remove slightly less).",
             "llama.cpp: the checkpoint converted by bench/to_gguf.py, then llama_model_quantize; empty for the "
             "variants not in --llama-variants."]
    d, e = doc["rows"][0] if doc["rows"] else {}, doc.get("dense_retimed") or {}
    if d.get("decode_tok_s") and e.get("decode_tok_s"):
        notes.append(f"dense timed first: {d['decode_tok_s']} tok/s, prefill {d.get('prefill_ms')} ms "
                     f"(load {d.get('load_avg_1m')}); again at the end: {e['decode_tok_s']} tok/s, prefill "
                     f"{e.get('prefill_ms')} ms (load {e.get('load_avg_1m')}). Each row's load average is in the JSON.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def plot(doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r.get("ppl") and not r.get("error") and r.get("role") != "baseline"]
    colors = {"dense": "black", "mlp": "tab:blue", "heads": "tab:orange", "blocks": "tab:red", "mix": "tab:green",
              "sparsegpt": "tab:purple"}
    markers = {"flap": "o", "flap+bias": "s", "flap+rec": "^", "flap+bias+rec": "D", "sparsegpt": "x", "dense": "*"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, key, label in ((axes[0], "params", "parameters (M)"), (axes[1], "decode_tok_s",
                                                                    "batch-1 decode tokens/s, 2 threads")):
        for r in rows:
            x = r.get(key)
            if x is None:
                continue
            x = x / 1e6 if key == "params" else x
            ax.scatter(x, r["ppl"], c=colors.get(r["kind"], "gray"), marker=markers.get(r.get("method"), "o"),
                       s=40)
            if r.get("method") in ("flap", "sparsegpt", "dense"):
                text = {"dense": "dense", "sparsegpt": f"sparsegpt {r['spec']}"}.get(r["kind"], r["spec"])
                ax.annotate(text, (x, r["ppl"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity (log)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", ls="", label=k) for k, c in colors.items()]
    handles += [Line2D([], [], color="gray", marker=m, ls="", label=k) for k, m in markers.items()
                if k not in ("dense", "sparsegpt")]
    axes[1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(f"{doc['settings']['model']}: structured pruning (FLAP) against parameters and CPU decode speed")
    fig.tight_layout()
    p = Path(path)
    tmp = p.with_name(f".{p.stem}.tmp-{os.getpid()}{p.suffix}")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, p)


# ------------------------------------------------------------------ main


def _floats(text: str) -> list[float]:
    vals = [float(x) for x in text.split(",") if x.strip()]
    if not vals or any(not 0 < v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"targets must be fractions in (0, 1), got {text!r}")
    return vals


def _names(allowed: tuple[str, ...] | list[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        vals = [x.strip() for x in text.split(",") if x.strip()]
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}, got {text!r}")
        return vals
    return parse


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", type=_floats, default=[0.1, 0.2, 0.3, 0.5],
                    help="fractions of block parameters to remove (default 0.1,0.2,0.3,0.5)")
    ap.add_argument("--kinds", type=_names(KINDS), default=list(KINDS), help="mlp,heads,blocks,mix")
    ap.add_argument("--variants", type=_names(tuple(VARIANTS)), default=list(VARIANTS),
                    help=", ".join(VARIANTS))
    ap.add_argument("--reconstruct", type=int, default=4, help="epochs of the +rec variants (default 4)")
    ap.add_argument("--mlp-multiple", type=int, default=32, help="MLP channels removed in multiples of this")
    ap.add_argument("--no-baselines", action="store_true", help="no magnitude / random rows")
    ap.add_argument("--no-sparsegpt", action="store_true", help="no unstructured SparseGPT rows")
    ap.add_argument("--sparsegpt-tol", type=float, default=0.01,
                    help="achieved fractions within this share one SparseGPT row (default 0.01)")
    ap.add_argument("--sparsegpt-runtime", choices=("auto", "dense"), default="auto",
                    help="time SparseGPT after `prunus export --runtime auto` (default) or as dense")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--llama-formats", default="Q8_0,F16", help="llama.cpp formats (default Q8_0,F16)")
    ap.add_argument("--llama-variants", type=_names((*VARIANTS, "all")), default=["flap", "flap+bias+rec"],
                    help="variants whose checkpoints also run on llama.cpp (default flap,flap+bias+rec; 'all')")
    ap.add_argument("--reuse-llamacpp", action="store_true",
                    help="reuse the llama.cpp results of an earlier run in --work (their timings are then "
                         "not from this run); by default every llama.cpp row is measured again")
    ap.add_argument("--keep-gguf", action="store_true", help="keep the converted GGUF files")
    ap.add_argument("--only", help="comma-separated globs over row names: dense, 0.3/mlp/flap+bias, "
                                   "0.3/sparsegpt, '0.3/*', '*/heads/*'")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: one target (the first of --targets, else 0.3), 4 windows, 4 calibration "
                         "windows, variants flap and flap+bias+rec (1 epoch), llama.cpp Q8_0")
    ap.add_argument("--work", default=str(ROOT / "runs/structured-work"))
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.shapes:
        print(json.dumps(model_shapes(a.model)), flush=True)
        return 0
    if a.one:
        print(json.dumps(measure_one(a)), flush=True)
        return 0
    if a.quick:
        given = "--targets" in " ".join(sys.argv)
        a.targets = a.targets[:1] if given else [0.3]
        a.windows, a.nsamples, a.reconstruct = min(a.windows, 4), min(a.nsamples, 4), 1
        if "--variants" not in " ".join(sys.argv):
            a.variants = ["flap", "flap+bias+rec"]
        if "--llama-formats" not in " ".join(sys.argv):
            a.llama_formats = "Q8_0"
    for name in ("nsamples", "seqlen", "windows", "threads", "prompt_tokens", "new_tokens", "mlp_multiple"):
        if getattr(a, name) < 1:
            print(f"structured: error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if a.prompt_tokens > a.seqlen:
        print("structured: error: --prompt-tokens must not exceed --seqlen (the prompt is a window's start)",
              file=sys.stderr)
        return 2

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    b = Bench(a, log)
    b.run()
    formats = [f.strip() for f in a.llama_formats.split(",") if f.strip()] if b.llama_ok else []
    print(table(b.doc, formats))
    print(f"\nwall {b.doc.get('wall_s')} s; machine: {b.doc['machine']}")
    if a.plot:
        plot(b.doc, a.plot)
        log(f"wrote {a.plot}")
    if a.json:
        log(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
