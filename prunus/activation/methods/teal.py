"""TEAL: magnitude thresholds from activation histograms, allocated over a block's layers greedily.

Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models" (arXiv 2408.14690;
reference implementation github.com/FasterDecoding/TEAL). Every linear of a block gets its own
sparsity level from the block-wise greedy search (:mod:`prunus.activation.greedy`, TEAL's
``greedyopt.py``), and its threshold from TEAL's histogram of its signed input
(:meth:`~prunus.activation.histogram.Distribution.binned`, 10000 bins between the 1% and 99%
quantiles): ``icdf(0.5 + level / 2)``, which assumes a zero-mean, symmetric input (a negative
result is clamped to 0: the layer then zeroes nothing). ``greedy=false`` gives every layer the
target level (TEAL's "uniform" mode).

Where prunus differs from the reference: a gate zeroes every position of a window, so the error
counts every position (``last_fraction=1``; TEAL gates the second half of a prompt and scores its
last quarter), the search runs on ``windows`` calibration windows (TEAL: 10 of 2048 tokens), a
distribution is estimated from at most ``samples`` values, and by default (``stream=gated``) each
block is calibrated on the outputs of the blocks before it with their gates on, as the model runs
(TEAL calibrates every block on the ungated model: ``stream=ungated``).
"""

from __future__ import annotations

from dataclasses import dataclass

from prunus.activation.greedy import greedy_levels
from prunus.activation.histogram import teal_threshold
from prunus.activation.registry import GreedyOptions, activation_method
from prunus.core.options import option


@dataclass(frozen=True)
class TealOptions(GreedyOptions):
    bins: int = option(10000, min=3)
    outliers: float = option(0.01, min=0, max=0.49)


@activation_method("teal", options=TealOptions, paper="Liu et al. 2024, Training-Free Activation Sparsity "
                   "in Large Language Models (TEAL)")
def teal(ctx, sparsity, options):  # noqa: ANN001 - the registry's signature
    dists = {n: ctx.distribution(n, "binned", bins=options.bins, outliers=options.outliers) for n in ctx.names}

    def at(name: str, level: float) -> float:
        return max(0.0, teal_threshold(dists[name], level))

    levels = (greedy_levels(ctx, sparsity, at, "none", options.step, options.last_fraction) if options.greedy
              else {n: sparsity for n in ctx.names})
    return {n: ctx.gate(n, at(n, levels[n]), "none") for n in ctx.names}
