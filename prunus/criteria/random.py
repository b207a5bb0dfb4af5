"""Random pruning: the baseline every method must beat (Liu et al. 2022, "The Unreasonable
Effectiveness of Random Pruning: Return of the Most Naive Baseline for Sparse Training", ICLR)."""

import torch
from torch import Tensor

from prunus.criteria import criterion
from prunus.core.stats import LayerStats, as_generator


@criterion("random", paper="Liu et al. 2022, The Unreasonable Effectiveness of Random Pruning (ICLR)")
def random(weight: Tensor, stats: LayerStats) -> Tensor:
    """I.i.d. uniform scores from the layer's own seed: the same (seed, layer) gives the same mask."""
    return torch.rand(weight.shape, generator=as_generator(stats))
