"""Human-facing output: the comparison table and the plots.

The table puts every method beside the dense model and the magnitude and random baselines at the
same spec, because a pruning result means little on its own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf"
        return f"{v:,.{nd}f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table; ``columns`` are (key, header) pairs."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


PRUNE_COLUMNS = (("spec", "sparsity spec"), ("label", "method"), ("perplexity", "ppl"),
                 ("sparsity", "achieved"), ("seconds", "prune s"), ("eval_seconds", "eval s"),
                 ("peak_rss_mb", "peak RSS MB"))


STRUCTURE_COLUMNS = (("parameters_m", "params M"), ("removed", "block params removed"))


SIMILARITY_COLUMN = ("similarity_text", "emb cos sim")


def quality_key(rows: Sequence[dict[str, Any]]) -> str:
    """``similarity`` when the runs are an encoder's (scored by embedding similarity), else
    ``perplexity``."""
    return "similarity" if any(r.get("similarity") is not None for r in rows) else "perplexity"


def prune_table(rows: Sequence[dict[str, Any]]) -> str:
    """The ``prunus prune`` comparison table (dense, each method, magnitude, random); with
    structured runs, also the parameters left and the fraction of block parameters removed; with
    activation-sparse runs, the activation sparsity they achieved (``act sparsity``). An
    encoder's runs show the embedding similarity to dense (4 decimals) in place of perplexity."""
    columns = PRUNE_COLUMNS
    if any(r.get("activation") for r in rows):  # activation sparsity achieved on the evaluation data
        rows = [{**r, "act_achieved": (r.get("activation") or {}).get("achieved")} for r in rows]
        columns = columns[:4] + (("act_achieved", "act sparsity"),) + columns[4:]
    if quality_key(rows) == "similarity":
        rows = [{**r, "similarity_text": None if r.get("similarity") is None else f"{r['similarity']:.4f}"}
                for r in rows]
        columns = columns[:2] + (SIMILARITY_COLUMN,) + columns[3:]
    if not any(r.get("structure") for r in rows):
        return table(rows, columns)
    rows = [{**r, "parameters_m": r["parameters"] / 1e6 if r.get("parameters") else None,
             "removed": (r.get("structure") or {}).get("removed_fraction", 0.0 if r.get("role") == "dense" else None)}
            for r in rows]
    return table(rows, columns[:3] + STRUCTURE_COLUMNS + columns[3:])


def plot_prune(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Two panels: perplexity per method and spec (log scale; an encoder's embedding similarity,
    linear), and achieved sparsity per layer (per-block widths for structured runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prunus.io.fsutil import atomic_file

    key = quality_key(rows)
    runs = [r for r in rows if r.get("per_layer") or r.get("structure")]
    specs = list(dict.fromkeys(r["spec"] for r in runs))
    labels = list(dict.fromkeys(r["label"] for r in runs))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(labels))
    for i, lab in enumerate(labels):
        ys = [next((r.get(key) for r in runs if r["label"] == lab and r["spec"] == s), math.nan)
              for s in specs]
        ax1.bar([j + i * width for j in range(len(specs))], ys, width, label=lab)
    dense = next((r for r in rows if r["label"] == "dense"), None)
    if dense and dense.get(key):
        ax1.axhline(dense[key], color="k", ls="--", lw=1, label="dense")
    ax1.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(specs))], specs)
    if key == "perplexity":
        ax1.set_yscale("log")
    ax1.set_ylabel("perplexity (lower is better)" if key == "perplexity" else
                   "embedding similarity to dense (higher is better)")
    ax1.set_title("quality at equal sparsity")
    ax1.legend(fontsize=8)
    structured = [r for r in runs if r.get("structure")]
    for r in runs if not structured else structured:
        if structured:  # the width each block kept, relative to the widest
            ws = r["structure"]["widths"]
            for key, mark in (("intermediate_size", "."), ("num_attention_heads", "x")):
                top = max(w[key] for w in ws) or 1
                ax2.plot(range(len(ws)), [w[key] / top for w in ws], mark, ms=4,
                         label=f"{r['label']} {r['spec']} {'mlp' if mark == '.' else 'heads'}")
            continue
        names = list(r["per_layer"])
        ax2.plot(range(len(names)), [r["per_layer"][n]["achieved"] for n in names], ".", ms=3,
                 label=f"{r['label']} {r['spec']}")
    ax2.set_xlabel("block" if structured else "layer (module order)")
    ax2.set_ylabel("width kept (of the widest block)" if structured else "achieved sparsity")
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_title("per-block widths" if structured else "per-layer sparsity")
    ax2.legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
