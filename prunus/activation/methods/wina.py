"""WINA: weight-informed thresholds, |x_j| * ||W[:, j]||_2, allocated with TEAL's greedy search.

Chen et al. 2025, "WINA: Weight Informed Neuron Activation for Accelerating Large Language Model
Inference" (arXiv 2505.19427; reference implementation github.com/microsoft/wina). An input entry
is kept when its score, its magnitude times the L2 norm of the weight column it multiplies, reaches
the layer's threshold: the ``level`` quantile of the scores over the calibration inputs (the
reference's histogram of distinct values, ``icdf(level)``). The levels come from TEAL's block-wise
greedy search, as in the reference (``wina/greedyopt.py``); ``greedy=false`` gives every layer the
target. The column norms are those of the layer's weight when the gates are attached, so they see
pruned and quantized weights.

Where prunus differs from the reference: the paper's score is used on every linear (the reference
code weights only k_proj and gate_proj by column norms, after its optional orthogonal transform
of the model, which prunus does not apply), every position is gated, and the search settings and
the calibration stream are TEAL's (see :mod:`prunus.activation.methods.teal`).
"""

from __future__ import annotations

from dataclasses import dataclass

from prunus.activation.greedy import greedy_levels
from prunus.activation.histogram import score_threshold
from prunus.activation.registry import GreedyOptions, activation_method


@dataclass(frozen=True)
class WinaOptions(GreedyOptions):
    """TEAL's greedy allocation, as the WINA reference uses it (false: uniform levels)."""


@activation_method("wina", options=WinaOptions, scale="colnorm", paper="Chen et al. 2025, WINA: Weight "
                   "Informed Neuron Activation for Accelerating Large Language Model Inference")
def wina(ctx, sparsity, options):  # noqa: ANN001 - the registry's signature
    dists = {n: ctx.distribution(n, "exact", "colnorm") for n in ctx.names}

    def at(name: str, level: float) -> float:
        return score_threshold(dists[name], level)

    levels = (greedy_levels(ctx, sparsity, at, "colnorm", options.step, options.last_fraction) if options.greedy
              else {n: sparsity for n in ctx.names})
    return {n: ctx.gate(n, at(n, levels[n]), "colnorm") for n in ctx.names}
