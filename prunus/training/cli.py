"""``prunus train``: the reference trainer on a bundled task, as a subcommand.

The lead's ``prunus/cli.py`` calls :func:`add_parser` and dispatches to :func:`run`. Strings become
typed objects here and only here: the spec is parsed, options are typed, and everything a user can
get wrong fails before any training starts or any file is written.

    prunus train --task fashion-mnist --model lenet300 --method rigl --sparsity 90% \\
        --allocation erk --epochs 20 --seeds 3 --json out.json --plot out.png

SPDF, sparse pre-training on one book and dense fine-tuning on another:

    prunus train --task text --model gpt-tiny --method spdf --sparsity 75% --book emma \\
        --finetune-book pride --epochs 2 --finetune-epochs 1

Distributed data-parallel on CPU (gloo), 2 processes; only rank 0 prints and writes files:

    torchrun --nproc_per_node 2 -m prunus train --task digits --model lenet300 --method rigl \\
        --sparsity 90% --epochs 5

FSDP2 instead (parameters, gradients, optimizer state and masks sharded over the ranks; sharded
checkpoints through torch.distributed.checkpoint, resumable with --resume); the same masks, bit for
bit, as one process run with --micro-batches 2:

    torchrun --nproc_per_node 2 -m prunus train --task digits --model lenet300 --method rigl \\
        --sparsity 90% --epochs 5 --parallel fsdp --checkpoint-every 20
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any

from prunus.core.options import coerce
from prunus.errors import DataError, PrunusError, SpecError
from prunus.io.recipe import load_recipe, parse_value
from prunus.training.registry import load_all
from prunus.training.tasks import MODELS, TASKS


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser("train", help="sparse training on a bundled task (reference trainer)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="YAML file of trainer options (flags given here override it)")
    p.add_argument("--task", choices=TASKS)
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--method", help=f"dense or one of: {', '.join(sorted(load_all()))}")
    p.add_argument("--sparsity", help="target sparsity: 90%%, 0.9, 2:4 (N:M)")
    p.add_argument("--allocation", choices=("uniform", "erk"))
    p.add_argument("--epochs", type=int)
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=None, help="first seed")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=("sgd", "adamw"))
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--momentum", type=float, help="SGD momentum (default 0.9; Nesterov when > 0)")
    p.add_argument("--probe-epochs", type=float, help="random_search: epochs of short training per candidate")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. -o delta_t=100 -o alpha=0.3 (repeatable)")
    p.add_argument("--text-file", help="text task: train on this file instead of a bundled book")
    p.add_argument("--book", help="text task: book fetched by prunus.io.books (default emma)")
    p.add_argument("--finetune-book", help="text task: after --epochs, fine-tune on this book "
                   "(SPDF releases its mask here)")
    p.add_argument("--finetune-text-file", help="text task: fine-tune on this file instead of a book")
    p.add_argument("--finetune-epochs", type=int, help="epochs on the fine-tuning corpus")
    p.add_argument("--train-subset", type=int, help="use only the first N training examples")
    p.add_argument("--json", help="write the summary (means, stds, FLOPs, every run) here")
    p.add_argument("--plot", help="write a PNG of the test metric per epoch (mean and std over seeds)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N optimizer steps")
    p.add_argument("--checkpoint-dir", help="checkpoint folder (default prunus-checkpoints)")
    p.add_argument("--resume", action="store_true", help="resume each seed from its checkpoint")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), help="under torchrun: ddp (default) or fsdp "
                   "(FSDP2: model, gradients, optimizer state and masks sharded; sharded checkpoints)")
    p.add_argument("--micro-batches", type=int, help="split each rank's batch into N micro-batches and "
                   "average their gradients (one process with N=2 computes what 2 ranks do, bit for bit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


_FIELDS = {"task": "task", "model": "model", "method": "method", "sparsity": "sparsity",
           "allocation": "allocation", "epochs": "epochs", "seed": "seed", "batch_size": "batch_size",
           "lr": "lr", "optimizer": "optimizer", "weight_decay": "weight_decay", "text_file": "text_file",
           "book": "book", "finetune_book": "finetune_book", "finetune_text_file": "finetune_text_file",
           "finetune_epochs": "finetune_epochs", "train_subset": "train_subset",
           "momentum": "momentum", "probe_epochs": "probe_epochs", "checkpoint_every": "checkpoint_every",
           "checkpoint_dir": "checkpoint_dir", "parallel": "parallel", "micro_batches": "micro_batches"}


def config_from_args(args: argparse.Namespace):
    """Recipe file, then flags, into a :class:`TrainConfig` and a list of seeds."""
    from prunus.training.trainer import TrainConfig

    values: dict[str, Any] = {}
    options: dict[str, Any] = {}
    seeds = 1
    if getattr(args, "train_subset", None) is not None and args.train_subset < 1:
        # the config's 0 means "all"; given explicitly, 0 or less asks for no examples at all
        raise SpecError(f"--train-subset must be at least 1 (leave it out to train on every example), "
                        f"got {args.train_subset}")
    if args.recipe:
        try:  # the one recipe loader: an unquoted 2:4 stays "2:4", unknown keys are refused
            recipe = load_recipe(args.recipe, known={*_FIELDS, "options", "seeds"})
        except DataError as e:  # a missing or unreadable recipe is a wrong argument here
            raise SpecError(str(e)) from None
        opts = recipe.pop("options", None) or {}
        if not isinstance(opts, dict):
            raise SpecError(f"recipe {args.recipe}: options must be a mapping of name: value")
        options.update(opts)
        seeds = coerce(recipe.pop("seeds", seeds), int, "seeds")
        values.update(recipe)
    for flag, fld in _FIELDS.items():
        v = getattr(args, flag, None)
        if v is not None:
            values[fld] = v
    if args.seeds is not None:
        seeds = args.seeds
    for item in args.option:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SpecError(f"--option {item!r}: expected KEY=VALUE")
        options[key.strip()] = parse_value(raw)
    if "sparsity" in values:
        values["sparsity"] = str(values["sparsity"])
    if seeds < 1:
        raise SpecError(f"--seeds must be at least 1, got {seeds}")
    hints = typing.get_type_hints(TrainConfig)
    values = {k: coerce(v, hints[k], k) for k, v in values.items()}  # a recipe's "3" or 2.7 for an int
    cfg = TrainConfig(**values, options=tuple(sorted(options.items())))  # ranges: TrainConfig.__post_init__
    return cfg, list(range(cfg.seed, cfg.seed + seeds))


def format_table(doc: dict[str, Any]) -> str:
    """One-row results table: metric mean ± std over seeds, sparsity, FLOPs sparse / dense."""
    metric = "accuracy" if "accuracy" in doc else "perplexity"
    head = f"{'method':<14}{'spec':>8}{'sparsity':>10}{metric:>18}{'train FLOPs':>22}{'inference FLOPs':>22}"
    unit = "%" if metric == "accuracy" else ""
    row = (f"{doc['method']:<14}{doc['sparsity_spec']:>8}{doc['sparsity']:>10.4f}"
           f"{doc[metric]:>10.2f}{unit} ± {doc[metric + '_std']:<5.2f}"
           f"{doc['train_flops']:>11.3g} / {doc['train_flops_dense']:<8.3g}"
           f"{doc['inference_flops']:>11.3g} / {doc['inference_flops_dense']:<8.3g}")
    note = f"{len(doc['seeds'])} seed(s), {doc['epochs']} epochs; FLOPs: sparse / dense-equivalent"
    if doc.get("finetune_book"):
        note += (f"\n{doc['epochs']} epochs on {doc['book']}, then {doc['finetune_epochs']} on "
                 f"{doc['finetune_book']}; {metric} is on {doc['finetune_book']} "
                 f"({doc['pretrain_' + metric]:.2f} on {doc['book']} before fine-tuning)")
    if doc.get("world_size", 1) > 1 and doc.get("parallel") == "fsdp":
        note += (f"\nFSDP2 over {doc['world_size']} ranks (gloo); masks sharded like the weights, "
                 f"decided on the whole tensors, identical across ranks")
    elif doc.get("world_size", 1) > 1:
        note += f"\nDDP over {doc['world_size']} ranks (gloo); masks identical on every rank"
    return "\n".join([head, row, note])


def plot_history(doc: dict[str, Any], path: str) -> None:
    """PNG of the test metric per epoch, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    vals = np.array([[h["metric"] for h in r["history"]] for r in doc["runs"]])
    mean, std = vals.mean(0), vals.std(0)
    ep = np.arange(1, vals.shape[1] + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ep, mean, label=f"{doc['method']} {doc['sparsity_spec']}")
    ax.fill_between(ep, mean - std, mean + std, alpha=0.3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)" if "accuracy" in doc else "validation perplexity")
    ax.set_title(f"{doc['task']} / {doc['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Run ``prunus train``; returns the exit status (2 on a user error, printed on one line).

    Under torchrun every rank trains; only rank 0 prints the table and writes JSON and plot.
    """
    from prunus.io.fsutil import check_out_file
    from prunus.training import trainer

    try:
        cfg, seeds = config_from_args(args)
        for path in (args.json, args.plot):  # result files: writable now, not after the training
            if path is not None:
                check_out_file(path)
        doc = trainer.run(cfg, seeds, resume=args.resume, progress=not args.no_progress)
        if trainer.global_rank() == 0:
            print(format_table(doc))
            if args.json:
                trainer.write_json(args.json, doc)
            if args.plot:
                plot_history(doc, args.plot)
    except PrunusError as e:
        rank = trainer.global_rank()
        print(f"prunus: error: {'' if rank == 0 else f'[rank {rank}] '}{e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m prunus.training.cli``) until the lead wires ``prunus train``."""
    parser = argparse.ArgumentParser(prog="prunus")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
