"""RIA: relative importance and activations (Zhang, Bai, Lin, Zhao, Yin, Mocanu, Wang 2024,
"Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models", ICLR 2024, eq. 3).

A weight matters relative to the other weights of its output row *and* of its input column:

    RIA_ij = (|W_ij| / sum_k |W_ik|  +  |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** a

with W (out, in), the first sum over the row's inputs, the second over the column's outputs. Scores are
compared within each output row, as in the authors' code in its default unstructured setting
(github.com/biomedical-cybernetics/Relative-importance-and-activation-pruning) and as in Wanda.
The paper's channel permutation for N:M is not part of this criterion.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from prunus.criteria import criterion
from prunus.core.stats import LayerStats


@dataclass(frozen=True)
class RIAOptions:
    """a: exponent of the activation norm ||X_j||_2 (the paper's default 0.5; 0: relative importance only)."""

    a: float = 0.5


@criterion("ria", needs={"input_sq_norm"}, per_row=True, options=RIAOptions,
           paper="Zhang et al. 2024, Plug-and-Play: An Efficient Post-training Pruning Method for LLMs (ICLR)")
def ria(weight: Tensor, stats: LayerStats, options: RIAOptions) -> Tensor:
    """Score (|W_ij| / row sum + |W_ij| / column sum) * ||X_j||_2^a; an all-zero row or column adds 0."""
    w = weight.detach().abs().float()
    tiny = torch.finfo(w.dtype).tiny
    row = w.sum(dim=1, keepdim=True).clamp_min(tiny)  # (out, 1): sum_k |W_ik|
    col = w.sum(dim=0, keepdim=True).clamp_min(tiny)  # (1, in): sum_k |W_kj|
    return (w / row + w / col) * stats.input_norm.pow(options.a).unsqueeze(0)  # (1, in): ||X_j||_2^a
