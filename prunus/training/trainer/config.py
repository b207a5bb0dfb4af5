"""What one training run depends on: the frozen config, and its validation into a prepared run.

Everything the trainer knows comes from a frozen :class:`TrainConfig` built at the CLI edge;
:func:`prepare` checks every input (the spec, the method's typed options and its own ``check`` hook,
the model against the task, the layer budgets) and loads the data before anything runs or is written.
A method that changes the model's width (Sparse-IFT's Sparse Wide) declares a ``width`` hook; the
trainer hands it the FLOP counts it needs, and never asks which method it is.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from prunus.core.options import build_options, check, option
from prunus.core.spec import SparsitySpec
from prunus.errors import SpecError
from prunus.training import flops as fl
from prunus.training.registry import RunPlan, WidthProblem, get as get_method
from prunus.training.sparsifier import find_targets, layer_budgets
from prunus.training.tasks import Dataset, build_model, default_exclude, load_task


PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one run depends on.

    Attributes:
        task, model: names from ``prunus.training.tasks``.
        method: a registered training method, or ``dense``.
        sparsity: a sparsity string (``"90%"``, ``"2:4"``); ignored for ``dense``.
        allocation: layer budgets, ``uniform`` or ``erk``.
        epochs: epochs per training phase (LTH trains ``rounds + 1`` phases).
        seed: the run's seed.
        batch_size, lr, optimizer, momentum, weight_decay: the optimizer (``sgd`` with Nesterov
            momentum for images, ``adamw`` for text); ``lr=None`` picks 0.05 (sgd) or 3e-3 (adamw).
            The learning rate follows a cosine decay within each phase.
        options: the method's options as ``(name, value)`` pairs.
        text_file, book: the text task's source.
        finetune_book, finetune_text_file, finetune_epochs: a second text corpus trained on for
            ``finetune_epochs`` after the ``epochs`` on the first (the cosine learning rate restarts;
            SPDF releases its mask there). Validation metrics of those epochs are on the second corpus.
        train_subset: use only the first N training examples (0: all); for quick runs.
        probe_epochs: random search's short training per candidate.
        checkpoint_every: write a checkpoint every N optimizer steps (0: never).
        checkpoint_dir: where checkpoints go (``seed<S>.pt``; ``seed<S>.dcp/`` with FSDP2).
        parallel: under torchrun, ``ddp`` (replicated model, all-reduced gradients) or ``fsdp``
            (FSDP2: parameters, gradients, optimizer state and masks sharded over the ranks).
        micro_batches: split each rank's batch into this many micro-batches (strided, like the ranks'
            slices) and average their gradients. One process with ``micro_batches=2`` computes the
            gradient exactly as two ranks do, bit for bit: the same run as ``torchrun --nproc_per_node 2``.
    """

    task: str = "digits"
    model: str = "mlp"
    method: str = "dense"
    sparsity: str = "0.9"
    allocation: str = "uniform"
    epochs: int = option(10, min=1)
    seed: int = option(0, min=0)
    batch_size: int = option(128, min=1)
    lr: Optional[float] = option(None, gt=0)
    optimizer: Optional[str] = None
    momentum: float = option(0.9, min=0, max=1)
    weight_decay: float = option(5e-4, min=0)
    options: tuple[tuple[str, Any], ...] = ()
    text_file: Optional[str] = None
    book: str = "emma"
    finetune_book: Optional[str] = None
    finetune_text_file: Optional[str] = None
    finetune_epochs: int = option(0, min=0)
    train_subset: int = option(0, min=0)
    probe_epochs: float = option(1.0, gt=0)
    checkpoint_every: int = option(0, min=0)
    checkpoint_dir: str = "prunus-checkpoints"
    parallel: str = "ddp"
    micro_batches: int = option(1, min=1)

    def __post_init__(self) -> None:
        # every numeric field in its range (finite, positive where it must be), at the edge
        check(self, "")
        if not str(self.checkpoint_dir).strip():
            raise SpecError("checkpoint_dir is empty")
        if self.parallel not in PARALLEL:
            raise SpecError(f"unknown parallel mode {self.parallel!r}; choose {' or '.join(PARALLEL)}")

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (everything but where checkpoints go)."""
        d = dataclasses.asdict(self)
        for k in ("checkpoint_every", "checkpoint_dir", "seed", "parallel"):
            d.pop(k)  # (ddp and fsdp write different checkpoint files: seed<S>.pt and seed<S>.dcp/)
        if self.micro_batches == 1:
            d.pop("micro_batches")  # the fingerprint of runs from before micro-batches existed
        if not self.finetune_epochs and self.finetune_book is None and self.finetune_text_file is None:
            for k in ("finetune_book", "finetune_text_file", "finetune_epochs"):
                d.pop(k)  # single-phase runs: the same fingerprint as before two-phase runs existed
        d["options"] = [list(x) for x in self.options]
        return d


@dataclass
class Prepared:
    """A validated config: data loaded, spec parsed, method resolved; nothing written yet.

    ``options`` is the method's typed options dataclass (None for ``dense``), built once here;
    ``given`` names the options the user set explicitly.
    """

    config: TrainConfig
    data: Dataset
    spec: Optional[SparsitySpec]
    rounds: int
    dense_backward: bool
    width: float = 1.0
    finetune: Optional[Dataset] = None  # the second corpus of a two-phase (text) run
    options: Any = None
    given: frozenset[str] = frozenset()


def prepare(config: TrainConfig, data: Optional[Dataset] = None) -> Prepared:
    """Check every user input before anything runs or is written; load the data."""
    if config.epochs < 1 or config.batch_size < 1:
        raise SpecError("epochs and batch size must be positive")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if config.batch_size % (world * config.micro_batches):
        raise SpecError(f"batch size {config.batch_size} must divide evenly over {world} rank(s) "
                        f"x {config.micro_batches} micro-batch(es)")
    if config.parallel == "fsdp" and world < 2:
        raise SpecError("--parallel fsdp shards the model over ranks: launch with "
                        "torchrun --nproc_per_node N (N >= 2) -m prunus train ...")
    two_phase = config.finetune_book is not None or config.finetune_text_file is not None
    if config.finetune_epochs < 0 or two_phase != (config.finetune_epochs > 0):
        raise SpecError("fine-tuning needs both a second corpus (finetune_book or finetune_text_file) "
                        "and finetune_epochs >= 1")
    if two_phase and config.task != "text":
        raise SpecError(f"a fine-tuning corpus is for the text task, not {config.task!r}")
    spec, rounds, dense_backward, opts, given = None, 1, False, None, frozenset()
    entry = None
    if config.method != "dense":
        entry = get_method(config.method)
        spec = SparsitySpec.parse(config.sparsity, config.allocation)
        given = frozenset(k for k, _ in config.options)
        opts = build_options(entry.options, dict(config.options), f"training method {config.method!r}")
        rounds, dense_backward = entry.rounds(opts), entry.dense_backward
        if two_phase and rounds > 1:
            raise SpecError(f"training method {config.method!r} trains {rounds} phases of its own; "
                            f"it cannot be combined with a fine-tuning corpus")
        if entry.check is not None:
            entry.check(opts, RunPlan(two_phase=two_phase, seed=config.seed, given=given))
    data = data or load_task(config.task, text_file=config.text_file, book=config.book)
    finetune = load_task(config.task, text_file=config.finetune_text_file,
                         book=config.finetune_book or "") if two_phase else None
    with torch.random.fork_rng(devices=[]):
        probe = build_model(config.model, data)  # model/task mismatch fails here
    prep = Prepared(config, data, spec, rounds, dense_backward, finetune=finetune, options=opts, given=given)
    if entry is not None and spec is not None:
        targets = find_targets(probe, exclude=default_exclude(config.model))
        layer_budgets(targets, spec)  # sparsity 1.0 on a layer, N:M divisibility of shapes
        if entry.width is not None:
            prep.width = entry.width(width_problem(prep, probe))
    return prep


def width_problem(prep: Prepared, base: nn.Module) -> WidthProblem:
    """The FLOP counts a ``width`` hook chooses from: the dense model's, and the widened sparse one's."""
    ex = example_input(prep.data)
    dense = fl.forward_flops(fl.layer_flops(base, ex))
    excl = default_exclude(prep.config.model)

    def sparse(w: float) -> float:
        with torch.random.fork_rng(devices=[]):
            m = build_model(prep.config.model, prep.data, width=w)
        budgets = layer_budgets(find_targets(m, exclude=excl), prep.spec)
        return fl.forward_flops(fl.layer_flops(m, ex), {k: 1 - v for k, v in budgets.items()})

    return WidthProblem(prep.spec, dense, sparse)


def example_input(data: Dataset) -> torch.Tensor:
    """One input example (text: one block without its last byte), for FLOP counting."""
    return data.x_train[:1, :-1] if data.kind == "text" else data.x_train[:1]
