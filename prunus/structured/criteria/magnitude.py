"""Magnitude of a unit: the L2 norm of every weight it owns (its producer rows and consumer columns).

The weight-only baseline of structured pruning (Li et al. 2017, "Pruning Filters for Efficient
ConvNets", the L-norm filter criterion; Magnitude-sp in An et al. 2024, FLAP). Blocks are scored by
their mean squared weight.
"""

from __future__ import annotations

from torch import Tensor

from prunus.structured.registry import UnitView, unit_criterion


@unit_criterion("magnitude", blocks="magnitude",
                paper="Li et al. 2017, Pruning Filters for Efficient ConvNets (L2 norm of a unit's weights)")
def magnitude(view: UnitView, options: object) -> Tensor:
    sq = view.consumer.float().pow(2).sum(dim=(0, 2))
    for p in view.producers:
        sq = sq + p.float().pow(2).sum(dim=(1, 2))
    return sq.sqrt()
