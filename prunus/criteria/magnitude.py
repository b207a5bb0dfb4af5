"""Magnitude pruning: keep the largest |W| (Han et al. 2015, "Learning both Weights and
Connections for Efficient Neural Networks"; Zhu & Gupta 2017)."""

from torch import Tensor

from prunus.criteria import criterion
from prunus.core.stats import LayerStats


@criterion("magnitude", paper="Han et al. 2015, Learning both Weights and Connections (NeurIPS)")
def magnitude(weight: Tensor, stats: LayerStats) -> Tensor:
    """Score |W_ij|; compared across the whole layer."""
    return weight.detach().abs().float()
