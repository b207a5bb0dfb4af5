"""``uniform``: every layer at the target sparsity."""

from __future__ import annotations

from typing import Sequence

from prunus.budgets import LayerInfo, budget


@budget("uniform", paper="every layer at the target")
def uniform(layers: Sequence[LayerInfo], sparsity: float, options: object) -> dict[str, float]:
    return {l.name: sparsity for l in layers}
