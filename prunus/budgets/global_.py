"""``global``: one magnitude threshold across all layers (Han et al. 2015, "Learning both Weights and
Connections for Efficient Neural Networks"; See et al. 2016).

The budgets come from |W| even when the method that then prunes each layer is Wanda or SparseGPT: a
global ranking of calibrated scores would need every layer's statistics at once, which the
block-by-block runner deliberately never holds.
"""

from __future__ import annotations

from typing import Sequence

import torch

from prunus.budgets import LayerInfo, budget
from prunus.core.masks import n_pruned


@budget("global", reads_weights=True, paper="Han et al. 2015; one |W| threshold across layers")
def global_magnitude(layers: Sequence[LayerInfo], sparsity: float, options: object) -> dict[str, float]:
    """One threshold on |W| over all layers; each layer's sparsity is the share of it below."""
    for l in layers:
        if l.weight is None:
            raise ValueError(f"global allocation needs the weight of {l.name}")
    total = sum(l.numel for l in layers)
    k = n_pruned(total, sparsity)
    if k == 0:
        return {l.name: 0.0 for l in layers}
    if k == total:
        return {l.name: 1.0 for l in layers}
    # k-th smallest |w| over all layers, without concatenating every weight in memory twice.
    flat = torch.cat([l.weight.detach().abs().float().reshape(-1) for l in layers])
    thr = torch.kthvalue(flat, k).values.item()
    del flat
    below = [int((l.weight.detach().abs() < thr).sum()) for l in layers]
    ties = [int((l.weight.detach().abs() == thr).sum()) for l in layers]
    rest = k - sum(below)  # weights equal to the threshold, pruned in layer order
    out = {}
    for l, b, t in zip(layers, below, ties):
        take = min(t, max(0, rest))
        rest -= take
        out[l.name] = (b + take) / l.numel
    return out
