"""Sparse-training benchmark: accuracy vs sparsity on Fashion-MNIST, N:M and SPDF on a tiny GPT.

Prints a table (mean ± std over seeds), writes JSON and a PNG. Run it alone: any other job on the
2 cores slows it by up to 2x.

    python bench/sparse_training.py --out bench/results/sparse_training        # full (see budget)
    python bench/sparse_training.py --quick --out /tmp/st                      # smoke test, ~10-20 s

Parts and epochs (the defaults; 3 seeds everywhere):

1. Fashion-MNIST, LeNet-300-100 and LeNet-5, at 80/90/95/98%: dense, static uniform and ERK, GMP,
   SET, RigL, LTH (2 rounds, late rewinding) and its random re-init control, random search
   (4 candidates, 1 probe epoch each). ``--epochs`` 4 per training phase for LeNet-300-100 and
   ``--lenet5-epochs`` 2 for LeNet-5 (LTH trains 3 phases).
2. N:M on the tiny GPT (byte-level, 400 kB of Emma): 2:4, 1:4, 1:8 with SR-STE and PGF, and dense;
   2 epochs; validation perplexity.
3. SPDF on the tiny GPT: 75% unstructured sparse pre-training on Emma for ``--spdf-pretrain-epochs``
   4 epochs, then dense fine-tuning (mask released at the switch) on Pride and Prejudice for
   ``--spdf-finetune-epochs`` 2 epochs, against the same model trained dense all the way on the
   same schedule (same books, epochs, batch size and learning-rate schedule, which restarts its
   cosine at the switch). Reported: final validation perplexity on Pride and Prejudice (and on
   Emma at the end of pre-training), training FLOPs of both, and the share of training FLOPs SPDF
   saves. The attention score matmuls, embeddings and the output head are never sparse, so the
   saving is below 75% x the pre-training share.

Budget: the whole run must fit in 60 minutes on 2 CPU cores with nothing else running. Part 1 is
52 epoch-equivalents per sparsity and seed (8 methods, counting LTH's 3 phases and random search's
probes) at 4 epochs per phase, so 636 per model with dense. Measured alone: a LeNet-300-100 epoch
is about 1.7 s (the part took 17 min at 4 epochs), a LeNet-5 epoch about 5 s in channels-last
layout (8 s in NCHW), so LeNet-5 runs 2 epochs per phase (about 27 min); parts 2 and 3 are 78 tiny
GPT epochs (about 6 min). The JSON is rewritten after every row, so a killed run keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunus.training.trainer import TrainConfig, run, write_json  # noqa: E402

SPARSE = [("static", "uniform", ()), ("static", "erk", ()), ("gmp", "uniform", ()),
          ("set", "erk", ()), ("rigl", "erk", ()), ("lth", "uniform", (("rounds", 2),)),
          ("lth_reinit", "uniform", (("rounds", 2),)), ("random_search", "uniform", (("candidates", 4),))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/sparse_training")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per training phase, LeNet-300-100")
    ap.add_argument("--lenet5-epochs", type=int, default=2, help="epochs per training phase, LeNet-5")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--spdf-pretrain-epochs", type=int, default=4, help="SPDF: epochs on emma (sparse)")
    ap.add_argument("--spdf-finetune-epochs", type=int, default=2, help="SPDF: epochs on pride (dense)")
    ap.add_argument("--quick", action="store_true", help="digits, 1 epoch, 1 seed, two sparsities")
    ap.add_argument("--models", default="lenet300,lenet5", help="part 1 models (comma-separated)")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run (comma-separated: 1, 2, 3)")
    ap.add_argument("--markdown", metavar="RESULTS_JSON",
                    help="print the README tables of an earlier run's results.json and exit")
    a = ap.parse_args(argv)
    if a.markdown:
        print(markdown(json.loads(Path(a.markdown).read_text())))
        return 0
    parts = {p.strip() for p in a.parts.split(",")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.quick:
        task, models, sparsities, epochs, seeds = "digits", ["lenet300"], ["0.8", "0.95"], 1, [0]
        gpt = dict(epochs=1, train_subset=256, patterns=["2:4"])
        spdf_epochs = (1, 1)
    else:
        task, models, sparsities, epochs, seeds = "fashion-mnist", a.models.split(","), \
            ["0.8", "0.9", "0.95", "0.98"], a.epochs, list(range(a.seeds))
        gpt = dict(epochs=2, train_subset=0, patterns=["2:4", "1:4", "1:8"])
        spdf_epochs = (a.spdf_pretrain_epochs, a.spdf_finetune_epochs)
    rows = []
    log = lambda s: None
    t0 = time.time()

    def go(**kw):
        cfg = TrainConfig(**kw)
        doc = run(cfg, seeds, progress=False, log=log)
        doc["seconds"] = round(time.time() - t0, 1)
        rows.append(doc)
        write_json(str(out / "results.json"), {"rows": rows, "partial": True})  # survives a kill
        metric = "accuracy" if "accuracy" in doc else "perplexity"
        label = doc["method"] + (f">{doc['finetune_book']}" if doc.get("finetune_book") else "")  # spdf>pride
        print(f"{doc['task']:<14}{doc['model']:<10}{label:<14}{doc['allocation']:<8}"
              f"{doc['sparsity_spec']:>6}{doc['sparsity']:>8.3f}{doc[metric]:>9.2f} ± {doc[metric + '_std']:<6.2f}"
              f"{doc['train_flops']:>10.3g}{doc['inference_flops']:>10.3g}  ({doc['seconds']}s)", flush=True)
        return doc

    print(f"{'task':<14}{'model':<10}{'method':<14}{'alloc':<8}{'spec':>6}{'sparse':>8}{'metric':>9}"
          f"{'':9}{'trainFLOP':>10}{'infFLOP':>10}")
    for model in (models if "1" in parts else []):
        ep = a.lenet5_epochs if (model == "lenet5" and not a.quick) else epochs
        go(task=task, model=model, method="dense", epochs=ep)
        for s in sparsities:
            for method, alloc, opts in SPARSE:
                go(task=task, model=model, method=method, sparsity=s, allocation=alloc, epochs=ep,
                   options=opts)
    text = dict(task="text", model="gpt-tiny", epochs=gpt["epochs"], train_subset=gpt["train_subset"],
                batch_size=32)
    if "2" in parts:
        go(**text, method="dense")
        for pat in gpt["patterns"]:
            go(**text, method="srste", sparsity=pat)
            go(**text, method="pgf", sparsity=pat, options=(("decay", "linear"),))
    spdf = spdf_part(go, text, spdf_epochs) if "3" in parts else None
    doc = {"rows": rows, "spdf": spdf, "seconds": round(time.time() - t0, 1)}
    write_json(str(out / "results.json"), doc)
    plot(rows, out / "accuracy_vs_sparsity.png")
    print(markdown(doc))
    print(f"wrote {out / 'results.json'} and {out / 'accuracy_vs_sparsity.png'} in {time.time() - t0:.0f}s")
    return 0


def spdf_part(go, text: dict, epochs: tuple[int, int]) -> dict:
    """SPDF: 75% sparse pre-training on emma, dense fine-tuning on pride, vs dense on both."""
    pre, ft = epochs
    two = dict(text, book="emma", finetune_book="pride", epochs=pre, finetune_epochs=ft)
    sp = go(**two, method="spdf", sparsity="0.75")  # the mask is released at the switch to pride
    dn = go(**two, method="dense")
    saved = 1.0 - sp["train_flops"] / dn["train_flops"]
    summary = {
        "schedule": f"{pre} epoch(s) on emma, then {ft} on pride; batch {text['batch_size']}",
        "spdf_ppl": sp["perplexity"], "spdf_ppl_std": sp["perplexity_std"],
        "dense_ppl": dn["perplexity"], "dense_ppl_std": dn["perplexity_std"],
        "spdf_pretrain_ppl": sp["pretrain_perplexity"], "dense_pretrain_ppl": dn["pretrain_perplexity"],
        "spdf_train_flops": sp["train_flops"], "dense_train_flops": dn["train_flops"],
        "train_flops_saved": saved,
    }
    print(f"\nSPDF ({summary['schedule']}): validation ppl on pride "
          f"{sp['perplexity']:.2f} ± {sp['perplexity_std']:.2f} (SPDF, 75% sparse pre-training) vs "
          f"{dn['perplexity']:.2f} ± {dn['perplexity_std']:.2f} (dense all the way); on emma after "
          f"pre-training {sp['pretrain_perplexity']:.2f} vs {dn['pretrain_perplexity']:.2f}; "
          f"training FLOPs {sp['train_flops']:.3g} vs {dn['train_flops']:.3g}: {100 * saved:.1f}% saved\n",
          flush=True)
    return summary


LABELS = {("static", "uniform"): "static uniform", ("static", "erk"): "static ERK", ("gmp", "uniform"): "GMP",
          ("set", "erk"): "SET (ERK)", ("rigl", "erk"): "RigL (ERK)", ("lth", "uniform"): "LTH, rewinding",
          ("lth_reinit", "uniform"): "LTH masks, random re-init", ("random_search", "uniform"): "random search"}


def markdown(doc: dict) -> str:
    """The README tables: accuracy (mean ± std) per method and sparsity for each model, the N:M
    perplexities and the SPDF summary."""
    rows = doc["rows"]
    out = []
    cls = [r for r in rows if "accuracy" in r]
    for model in dict.fromkeys(r["model"] for r in cls):
        mine = [r for r in cls if r["model"] == model]
        specs = list(dict.fromkeys(r["sparsity_spec"] for r in mine if r["method"] != "dense"))
        epochs = mine[0].get("epochs", "?")
        seeds = mine[0].get("seeds")
        n_seeds = len(seeds) if isinstance(seeds, list) else seeds
        out.append(f"**{mine[0]['task']}, {model}** ({epochs} epochs per phase, {n_seeds} seeds)\n")
        out.append("| method | " + " | ".join(f"{float(s):.0%}" for s in specs) + " |")
        out.append("|---|" + "---|" * len(specs))
        for r in mine:
            if r["method"] == "dense":
                out.append(f"| dense (0%) | {r['accuracy']:.2f} ± {r['accuracy_std']:.2f} |" + " |" * (len(specs) - 1))
        for key, label in LABELS.items():
            cells = {r["sparsity_spec"]: r for r in mine if (r["method"], r["allocation"]) == key}
            if cells:
                out.append(f"| {label} | " + " | ".join(
                    f"{cells[s]['accuracy']:.2f} ± {cells[s]['accuracy_std']:.2f}" if s in cells else ""
                    for s in specs) + " |")
        out.append("")
    text = [r for r in rows if "perplexity" in r and not r.get("finetune_book")]
    if text:
        out.append("**N:M on the tiny GPT** (validation perplexity per byte, mean ± std)\n")
        out.append("| method | pattern | ppl |")
        out.append("|---|---|---|")
        for r in text:
            out.append(f"| {r['method']} | {r['sparsity_spec'] if r['method'] != 'dense' else '-'} | "
                       f"{r['perplexity']:.3f} ± {r['perplexity_std']:.3f} |")
        out.append("")
    sp = doc.get("spdf")
    if sp:
        out.append(f"**SPDF** ({sp['schedule']}): validation ppl on Pride and Prejudice "
                   f"{sp['spdf_ppl']:.3f} ± {sp['spdf_ppl_std']:.3f} (75% sparse pre-training, dense "
                   f"fine-tuning) vs {sp['dense_ppl']:.3f} ± {sp['dense_ppl_std']:.3f} (dense throughout); "
                   f"training FLOPs {sp['spdf_train_flops']:.3g} vs {sp['dense_train_flops']:.3g}, "
                   f"{100 * sp['train_flops_saved']:.1f}% saved.")
    if "seconds" in doc:
        out.append(f"\nTotal time: {doc['seconds'] / 60:.1f} min.")
    return "\n".join(out)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cls = [r for r in rows if "accuracy" in r]
    models = sorted({r["model"] for r in cls})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in cls if r["model"] == model]
        dense = [r for r in mine if r["method"] == "dense"]
        for key in sorted({(r["method"], r["allocation"]) for r in mine if r["method"] != "dense"}):
            pts = sorted((r["sparsity"], r["accuracy"], r["accuracy_std"]) for r in mine
                         if (r["method"], r["allocation"]) == key)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                        marker="o", capsize=2, label=f"{key[0]} ({key[1]})")
        if dense:
            ax.axhline(dense[0]["accuracy"], color="k", ls="--", label="dense")
        ax.set_title(f"{mine[0]['task']} / {model}")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
