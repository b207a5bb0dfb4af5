"""Block steps: work run on each decoder block right after its layers are pruned.

A block step runs inside the one calibration loop (:func:`prunus.oneshot.calibrate.run_blockwise`,
``after_block``), which keeps a dense stream of hidden states beside the pruned one. It receives a
:class:`BlockContext` (the block, its pruned targets and masks, the pruned model's inputs to the block,
the dense block's outputs) and may update the block's kept weights in place; masks must not change.
The block's outputs are computed after the steps, so the next block sees their effect.

Adding one is one file in this package, registered by being there::

    @block_step("scale", options=ScaleOptions, paper="...")
    def scale(ctx: BlockContext, options: ScaleOptions) -> None:
        for t in ctx.targets:
            t.set(t.get() * options.factor)

It is then ``prunus prune --step scale steps.scale.factor=0.5``, ``steps: {scale: {factor: 0.5}}`` in a
recipe, or ``prunus.prune(..., steps=[("scale", {"factor": 0.5})])``; ``prunus list`` shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from torch import Tensor, nn

from prunus.core.options import NoOptions
from prunus.core.registry import discover, lookup
from prunus.core.targets import Target


@dataclass
class BlockContext:
    """What a block step sees of one block.

    Attributes:
        index: the block's position among the decoder blocks.
        block: the (pruned) block module, on the calibration device.
        targets: the block's pruned linears.
        masks: layer name -> bool keep mask (out, in), for every layer pruned so far.
        inputs: per chunk, the pruned model's hidden states (batch, seq, hidden) and the block's kwargs.
        wanted: per chunk, the dense block's outputs on the dense model's hidden states.
    """

    index: int
    block: nn.Module
    targets: Sequence[Target]
    masks: Mapping[str, Tensor]
    inputs: Sequence[tuple[Tensor, Mapping[str, Any]]]
    wanted: Sequence[Tensor]


StepFn = Callable[[BlockContext, Any], None]


@dataclass(frozen=True)
class BlockStep:
    """A registered block step.

    Attributes:
        name: registry key (``--step NAME``, a recipe's ``steps:``).
        run: ``(context, options) -> None``; updates the block in place.
        options: frozen dataclass of its options.
        paper: citation shown by ``prunus list``.
        label: suffix of the run's label in tables (``wanda+recon``); default ``+<name>``.
        active: whether the options switch the step on (reconstruction with 0 epochs is off).
    """

    name: str
    run: StepFn
    options: type
    paper: str
    label: str
    active: Callable[[Any], bool]


STEPS: dict[str, BlockStep] = {}


def block_step(name: str, *, options: type = NoOptions, paper: str = "", label: Optional[str] = None,
               active: Callable[[Any], bool] = lambda o: True) -> Callable[[StepFn], StepFn]:
    """Register a block step under ``name``. A duplicate name raises."""

    def deco(fn: StepFn) -> StepFn:
        if name in STEPS:
            raise ValueError(f"block step {name!r} is already registered")
        STEPS[name] = BlockStep(name, fn, options, paper, label or f"+{name}", active)
        return fn

    return deco


def load_all() -> dict[str, BlockStep]:
    """Import every module of this package once, so that all registrations have run."""
    discover(__name__)
    return STEPS


def get(name: str) -> BlockStep:
    """The block step registered as ``name``; an unknown name lists the registered ones."""
    load_all()
    return lookup(STEPS, name, "block step")


@dataclass(frozen=True)
class StepRun:
    """One block step of a job, with its typed options."""

    step: BlockStep
    options: Any

    @property
    def name(self) -> str:
        return self.step.name
