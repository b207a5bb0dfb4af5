"""Score-then-select pruning: every registered criterion becomes a method of the same name.

This is jaxpruner's split: the criterion scores (``prunus.criteria``), :func:`prunus.core.masks.topk`
selects, and nothing else happens; the kept weights are not updated. Magnitude, random and Wanda
(Sun et al. 2023) are all this one function.
"""

from __future__ import annotations

from torch import Tensor

from prunus import criteria
from prunus.algorithms import METHODS, Method, NoOptions, ALL_PATTERNS
from prunus.core.masks import topk
from prunus.core.spec import Pattern
from prunus.core.stats import LayerStats


def score_method(crit: criteria.Criterion) -> Method:
    """The method that prunes by ``crit``'s scores, per row when the criterion says so."""

    def prune(weight: Tensor, stats: LayerStats, sparsity: float, pattern: Pattern,
              options: NoOptions, name: str) -> tuple[Tensor, Tensor]:
        mask = topk(crit(weight, stats), sparsity, pattern, per_row=crit.per_row, name=name)
        return weight * mask, mask

    return Method(crit.name, prune, crit.needs, NoOptions, ALL_PATTERNS, crit.paper)


for _crit in criteria.load_all().values():
    if _crit.name not in METHODS:
        METHODS[_crit.name] = score_method(_crit)
