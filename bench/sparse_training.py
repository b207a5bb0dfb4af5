"""Sparse-training benchmark: accuracy vs sparsity on Fashion-MNIST, N:M and SPDF on a tiny GPT.

Prints a table (mean ± std over seeds), writes JSON and a PNG. Run it alone: any other job on the
2 cores slows it by up to 1.7x.

    python bench/sparse_training.py --out bench/results/sparse_training        # full (see budget)
    python bench/sparse_training.py --quick --out /tmp/st                      # smoke test, ~2 min

Budget of the full run on 2 CPU cores (LeNet-300-100: ~0.5 s/epoch, LeNet-5: ~2.3 s/epoch on
Fashion-MNIST, shared/DATA.md): 2 models x 4 sparsities x 8 sparse methods x 3 seeds at
``--epochs`` (default 4; LTH trains rounds+1 = 3 phases, random search adds 4 probe epochs), plus
dense, plus the GPT part (2:4, 1:4, 1:8 x SR-STE/PGF, SPDF; 2 epochs on 400 kB of text). With the
defaults this is estimated at about 45-55 minutes; pass ``--epochs`` lower if a machine is slower.
Not yet measured end to end: the estimate comes from the per-epoch costs above.
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
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="digits, 1 epoch, 1 seed, two sparsities")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.quick:
        task, models, sparsities, epochs, seeds = "digits", ["lenet300"], ["0.8", "0.95"], 1, [0]
        gpt = dict(epochs=1, train_subset=256, patterns=["2:4"])
    else:
        task, models, sparsities, epochs, seeds = "fashion-mnist", ["lenet300", "lenet5"], \
            ["0.8", "0.9", "0.95", "0.98"], a.epochs, list(range(a.seeds))
        gpt = dict(epochs=2, train_subset=0, patterns=["2:4", "1:4", "1:8"])
    rows = []
    log = lambda s: None
    t0 = time.time()

    def go(**kw):
        cfg = TrainConfig(**kw)
        doc = run(cfg, seeds, progress=False, log=log)
        doc["seconds"] = round(time.time() - t0, 1)
        rows.append(doc)
        metric = "accuracy" if "accuracy" in doc else "perplexity"
        print(f"{doc['task']:<14}{doc['model']:<10}{doc['method']:<14}{doc['allocation']:<8}"
              f"{doc['sparsity_spec']:>6}{doc['sparsity']:>8.3f}{doc[metric]:>9.2f} ± {doc[metric + '_std']:<6.2f}"
              f"{doc['train_flops']:>10.3g}{doc['inference_flops']:>10.3g}  ({doc['seconds']}s)", flush=True)

    print(f"{'task':<14}{'model':<10}{'method':<14}{'alloc':<8}{'spec':>6}{'sparse':>8}{'metric':>9}"
          f"{'':9}{'trainFLOP':>10}{'infFLOP':>10}")
    for model in models:
        go(task=task, model=model, method="dense", epochs=epochs)
        for s in sparsities:
            for method, alloc, opts in SPARSE:
                go(task=task, model=model, method=method, sparsity=s, allocation=alloc, epochs=epochs,
                   options=opts)
    text = dict(task="text", model="gpt-tiny", epochs=gpt["epochs"], train_subset=gpt["train_subset"],
                batch_size=32)
    go(**text, method="dense")
    for pat in gpt["patterns"]:
        go(**text, method="srste", sparsity=pat)
        go(**text, method="pgf", sparsity=pat, options=(("decay", "linear"),))
    go(**text, method="spdf", sparsity="0.75", options=(("dense_from", 0.75),))
    write_json(str(out / "results.json"), {"rows": rows, "seconds": round(time.time() - t0, 1)})
    plot(rows, out / "accuracy_vs_sparsity.png")
    print(f"wrote {out / 'results.json'} and {out / 'accuracy_vs_sparsity.png'} in {time.time() - t0:.0f}s")
    return 0


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
