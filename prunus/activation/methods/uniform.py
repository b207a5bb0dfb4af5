"""Uniform magnitude thresholds: every gated linear zeroes the same fraction of its inputs.

The baseline of activation sparsity (TEAL's "uniform" rows, Liu et al. 2024, arXiv 2408.14690; CATS,
Lee et al. 2024, thresholds by the same quantile of |x|): a layer's threshold is the ``sparsity``
quantile of ``|x|`` over its calibration inputs, and the block is not consulted. ``prunus prune``
reports it beside every other method at the same target.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunus.activation.histogram import score_threshold
from prunus.activation.registry import SampledOptions, activation_method


@dataclass(frozen=True)
class UniformOptions(SampledOptions):
    """``samples`` and ``stream`` only (:class:`~prunus.activation.registry.SampledOptions`)."""


@activation_method("uniform", options=UniformOptions, paper="magnitude quantile per layer (TEAL's uniform "
                   "baseline, Liu et al. 2024; CATS, Lee et al. 2024)")
def uniform(ctx, sparsity, options):  # noqa: ANN001 - the registry's signature
    return {n: ctx.gate(n, score_threshold(ctx.distribution(n, "exact"), sparsity), "none") for n in ctx.names}
