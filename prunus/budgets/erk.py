"""``erk``: Erdos-Renyi-Kernel budgets (Evci et al. 2020, "Rigging the Lottery: Making All Tickets
Winners", ICML, sec. 3; Mocanu et al. 2018): density proportional to sum(shape) / prod(shape), layers
that would exceed density 1 kept dense. Shared with sparse training (static ERK, SET, RigL).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from prunus.budgets import LayerInfo, budget


def erk_densities(shapes: Mapping[str, tuple[int, ...]], density: float,
                  power: float = 1.0) -> dict[str, float]:
    """ERK densities (Evci et al. 2020): eps * sum(shape)/prod(shape), capped at 1, meeting the budget.

    Layers whose density would exceed 1 are made dense and the rest rescaled, repeatedly, as in the
    RigL reference implementation (``sparse_utils.get_sparsities``).
    """
    dense: set[str] = set()
    numel = {n: float(torch.tensor(s).prod()) for n, s in shapes.items()}
    while True:
        rhs, divisor, raw = 0.0, 0.0, {}
        for n, s in shapes.items():
            if n in dense:
                rhs -= numel[n] * (1 - density)
            else:
                rhs += numel[n] * density
                raw[n] = (sum(s) / numel[n]) ** power
                divisor += raw[n] * numel[n]
        if not raw:
            return {n: 1.0 for n in shapes}
        eps = rhs / divisor if divisor else 0.0
        top = max(raw.values())
        if top * eps > 1.0:
            dense |= {n for n, r in raw.items() if r == top}
            continue
        return {n: (1.0 if n in dense else max(0.0, eps * raw[n])) for n in shapes}


@budget("erk", paper="Evci et al. 2020, Rigging the Lottery (ICML), Erdos-Renyi-Kernel")
def erk(layers: Sequence[LayerInfo], sparsity: float, options: object) -> dict[str, float]:
    dens = erk_densities({l.name: tuple(l.shape) for l in layers}, 1.0 - sparsity)
    return {n: min(1.0, max(0.0, 1.0 - d)) for n, d in dens.items()}
