"""Sub-layer-wise reconstruction: tune a block's attention and its MLP separately, one after the other.

The block step ``reconstruct`` (EBFT / Wanda++) tunes every kept weight of a block at once. arXiv
2510.14444 reports that reconstructing the attention and the MLP sub-layers *separately* inside each
block does better than reconstructing the whole block. This step is that idea in the form the one
calibration loop can feed without anything new:

1. **attention phase**: only the kept weights of the block's attention sub-layer are tuned (the MLP
   and everything else frozen) so that the pruned block, fed the pruned model's hidden states,
   reproduces the dense block's outputs;
2. **MLP phase**: then only the kept weights of the MLP sub-layer are tuned (the attention, now
   tuned, frozen) towards the same dense block outputs.

Each phase is its own Adam loop (:func:`prunus.oneshot.steps.reconstruct.reconstruct_block` on that
sub-layer's linears: same loss ``|| block(X~; W' * M) - block_dense(X; W) ||^2 / mean(block_dense^2)``,
same masking of gradients and weights after every step, so masks, sparsity and pattern are exactly the
one-shot method's), with ``epochs`` passes over the calibration windows each.

How this differs from the paper, precisely: this implementation was written without the paper's
text at hand (its title and authors are not cited here for that reason), from the idea that the
attention and the MLP are reconstructed separately. A sub-layer reconstruction in the strict sense
would fit the attention sub-layer's output (the residual stream after attention) to the *dense*
model's after-attention residual. The calibration loop hands a block step only the dense block's
final outputs (:class:`~prunus.oneshot.steps.BlockContext` ``wanted``), not the dense
after-attention state, and the block it sees is already pruned, so that target cannot be
recomputed here. Both phases therefore use the block-output objective; what is separate is which
weights each phase moves and that each phase has its own optimiser and full epoch budget. The
``phases`` option chooses the phases and their order (``"attention,mlp"`` by default; ``"mlp"`` or
``"attention"`` runs one phase only; ``"mlp,attention"`` reverses them).

Sub-layers are found by structure: a target belongs to the attention if it lies under a child of
the block named ``self_attn``, ``attn``, ``attention`` or ``self_attention`` (or whose class name
contains ``Attention``), and to the MLP if under ``mlp``, ``feed_forward``, ``ffn`` (class name with
``MLP`` or ``FeedForward``) or if it is one of OPT's ``fc1``/``fc2`` children of the block. A target
in neither raises :class:`~prunus.errors.SpecError` naming the block. Cost: about twice
``reconstruct`` with the same ``epochs`` (two loops, each a forward of the whole block per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from prunus.core.targets import Target
from prunus.errors import SpecError
from prunus.oneshot.steps import BlockContext, block_step
from prunus.oneshot.steps.reconstruct import ReconstructOptions, reconstruct_block

PAPER = "arXiv 2510.14444 (attention and MLP reconstructed separately; block-output objective here)"

PHASES = ("attention", "mlp")
_ATTENTION_NAMES = {"self_attn", "attn", "attention", "self_attention"}
_MLP_NAMES = {"mlp", "feed_forward", "ffn", "fc1", "fc2"}


@dataclass(frozen=True)
class SublayerOptions:
    """Options of the ``reconstruct-sub`` step.

    Attributes:
        epochs: passes over the calibration windows per phase (0 switches the step off).
        lr: Adam's learning rate (each phase has its own Adam).
        batch_size: calibration windows per step.
        seed: order of the windows (the same order in each phase).
        phases: comma-separated phases in the order they run: ``attention``, ``mlp``.
    """

    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    phases: str = "attention,mlp"

    def __post_init__(self) -> None:
        ReconstructOptions(self.epochs, self.lr, self.batch_size, self.seed)  # same checks
        names = self.phase_list()
        if not names or any(p not in PHASES for p in names) or len(set(names)) != len(names):
            raise SpecError(f"reconstruct-sub: phases must be a comma-separated list of distinct "
                            f"{'/'.join(PHASES)}, got {self.phases!r}")

    def phase_list(self) -> list[str]:
        return [p.strip() for p in self.phases.split(",") if p.strip()]


def _kind(child_name: str, child: nn.Module) -> str | None:
    cls = type(child).__name__
    if child_name in _ATTENTION_NAMES or "Attention" in cls:
        return "attention"
    if child_name in _MLP_NAMES or "MLP" in cls or "FeedForward" in cls:
        return "mlp"
    return None


def split_sublayers(block: nn.Module, targets: Sequence[Target], index: int = -1) -> dict[str, list[Target]]:
    """The block's targets by sub-layer: ``{"attention": [...], "mlp": [...]}``.

    Raises:
        SpecError: a target is not under a child of ``block`` recognisable as attention or MLP.
    """
    children = list(block.named_children())
    out: dict[str, list[Target]] = {p: [] for p in PHASES}
    for t in targets:
        owner = next(((n, c) for n, c in children if any(m is t.module for m in c.modules())), None)
        kind = _kind(*owner) if owner is not None else None
        if kind is None:
            where = f"block {index}" if index >= 0 else "block"
            raise SpecError(f"reconstruct-sub: {where} ({type(block).__name__}): cannot tell whether "
                            f"{t.name} belongs to the attention or the MLP (children: "
                            f"{', '.join(n for n, _ in children) or 'none'})")
        out[kind].append(t)
    return out


@block_step("reconstruct-sub", options=SublayerOptions, paper=PAPER, label="+recon-sub",
            active=lambda o: o.epochs > 0)
def reconstruct_sublayer(ctx: BlockContext, options: SublayerOptions) -> None:
    """The block step: tune the attention's kept weights, then the MLP's, each towards the dense block's
    outputs (sub-layer-wise reconstruction after arXiv 2510.14444; see the module docstring)."""
    parts = split_sublayers(ctx.block, ctx.targets, ctx.index)
    rec = ReconstructOptions(options.epochs, options.lr, options.batch_size, options.seed)
    for phase in options.phase_list():
        reconstruct_block(ctx.block, parts[phase], ctx.masks, ctx.inputs, ctx.wanted, rec)
