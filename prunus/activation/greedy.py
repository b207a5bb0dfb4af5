"""TEAL's block-wise greedy allocation of activation sparsity over a block's layers.

Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models" (arXiv 2408.14690),
Section 4.2, as ``teal/greedyopt.py`` of FasterDecoding/TEAL does it:

- every layer of the block has its own sparsity level, starting at 0 (q, k and v read the same
  input and share its distribution, but each gets its own level and threshold; so do gate and up);
- the block's *effective* sparsity is the levels averaged with the layers' weight counts as weights
  (TEAL's per-model ``weight_dict``: q = 1, k = v = 1/4 with 4x grouped-query attention, gate = up =
  down = intermediate / hidden): the fraction of the block's weight reads that gating skips;
- each step tries, for every layer below level 1, raising its level by ``step / weight`` (so every
  candidate skips the same number of weights) and keeps the one whose block output error
  (:meth:`~prunus.activation.context.BlockCalibration.errors`) is smallest; a tie keeps the first layer;
- it stops once the effective sparsity reaches the target, and, like TEAL's lookup of the row
  closest to the target, returns the levels of the step whose effective sparsity is closest to it.

Every block gets the same target (TEAL's ``load_greedy_sparsities``). The weights here are each
layer's weight count over the first layer's (q_proj in a Llama block), computed from the shapes.
"""

from __future__ import annotations

from typing import Callable

from prunus.activation.context import BlockCalibration

ThresholdAt = Callable[[str, float], float]


def layer_weights(ctx: BlockCalibration) -> dict[str, float]:
    """TEAL's ``weight_dict`` of the block: each layer's weight count over the first layer's."""
    ref = ctx.numel(ctx.names[0])
    return {n: ctx.numel(n) / ref for n in ctx.names}


def effective(levels: dict[str, float], weights: dict[str, float]) -> float:
    """The levels averaged by weight (TEAL's ``f``)."""
    total = sum(weights.values())
    return sum(v * weights[p] for p, v in levels.items() if p in weights) / total


def greedy_levels(ctx: BlockCalibration, target: float, threshold_at: ThresholdAt, scale: str = "none",
                  step: float = 0.05, last_fraction: float = 1.0) -> dict[str, float]:
    """Per-layer sparsity levels of the block whose effective sparsity is closest to ``target``:
    the row of :func:`greedy_path` closest to it (all levels 0 when the path is empty)."""
    rows = greedy_path(ctx, target, threshold_at, scale, step, last_fraction)
    if not rows:
        return {p: 0.0 for p in ctx.names}
    return min(rows, key=lambda r: abs(r[0] - target))[1]


def greedy_path(ctx: BlockCalibration, target: float, threshold_at: ThresholdAt, scale: str = "none",
                step: float = 0.05, last_fraction: float = 1.0) -> list[tuple[float, dict[str, float]]]:
    """TEAL's greedy search up to ``target``: after each step, the effective sparsity and the levels
    (the rows of TEAL's ``lookup/layer-i/results.csv``).

    Args:
        ctx: the block's calibration inputs and rerun.
        target: the block's effective sparsity, in [0, 1).
        threshold_at: ``(layer, level) -> threshold`` (the method's quantile of that layer's scores).
        scale: the score of the gates (``none`` or ``colnorm``).
        step: TEAL's base step: a layer of weight w moves by ``step / w`` per step.
        last_fraction: the error counts the last fraction of each window's positions (TEAL: 0.25,
            because it gates only the second half of a prompt; prunus gates every position: 1).
    """
    known: dict[tuple[str, float], float] = {}

    def at(layer: str, level: float) -> float:  # most (layer, level) pairs recur from step to step
        if (layer, level) not in known:
            known[layer, level] = threshold_at(layer, level)
        return known[layer, level]

    weights = layer_weights(ctx)
    steps = {p: step * (1 / weights[p]) for p in ctx.names}
    levels = {p: 0.0 for p in ctx.names}
    rows: list[tuple[float, dict[str, float]]] = []
    while effective(levels, weights) < target:
        best, best_error = None, float("inf")
        tried = [p for p in ctx.names if levels[p] < 1]
        trials = [{**levels, p: levels[p] + steps[p]} for p in tried]
        errors = ctx.errors([{q: at(q, v) for q, v in t.items()} for t in trials], scale, last_fraction)
        for p, error in zip(tried, errors):
            if error < best_error:
                best, best_error = p, error
        if best is None:  # every layer at level 1
            break
        levels[best] += steps[best]
        rows.append((effective(levels, weights), dict(levels)))
    return rows
