"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter 2023, "A Simple and
Effective Pruning Approach for Large Language Models", ICLR 2024, eq. 1)."""

from torch import Tensor

from prunus.criteria import criterion
from prunus.core.stats import LayerStats


@criterion("wanda", needs={"input_sq_norm"}, per_row=True,
           paper="Sun et al. 2023, A Simple and Effective Pruning Approach for LLMs (ICLR 2024)")
def wanda(weight: Tensor, stats: LayerStats) -> Tensor:
    """Score |W_ij| * ||X_j||_2, compared within each output row (the paper's per-output group)."""
    return weight.detach().abs().float() * stats.input_norm.unsqueeze(0)  # (out, in) * (1, in)
