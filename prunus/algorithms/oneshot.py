"""Score-then-select pruning: every registered criterion becomes a method of the same name.

This is jaxpruner's split: the criterion scores (``prunus.criteria``), :func:`prunus.core.masks.topk`
selects, and nothing else happens; the kept weights are not updated. Magnitude, random, Wanda
(Sun et al. 2023) and RIA (Zhang et al. 2024) are all this one function.

The method's options are the criterion's options dataclass, so ``method_options.a=0.3`` reaches RIA.
Methods are made on lookup (:func:`sync`, run by :func:`prunus.algorithms.load_all`), so a criterion
registered after this module was imported (a test's, a plugin's) still becomes a method.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from prunus import criteria
from prunus.algorithms import METHODS, Method, ALL_PATTERNS, add_provider
from prunus.core.masks import topk
from prunus.core.spec import Pattern
from prunus.core.stats import LayerStats


def score_method(crit: criteria.Criterion) -> Method:
    """The method that prunes by ``crit``'s scores, per row when the criterion says so.

    Its options are ``crit.options``; the pipeline builds them (``build_options``) before calling.
    """

    def prune(weight: Tensor, stats: LayerStats, sparsity: float, pattern: Pattern,
              options: Any, name: str) -> tuple[Tensor, Tensor]:
        mask = topk(crit(weight, stats, options), sparsity, pattern, per_row=crit.per_row, name=name)
        return weight * mask, mask

    return Method(crit.name, prune, crit.needs, crit.options, ALL_PATTERNS, crit.paper)


def sync() -> None:
    """Make a method for every registered criterion that has none yet."""
    for crit in criteria.load_all().values():
        if crit.name not in METHODS:
            METHODS[crit.name] = score_method(crit)


add_provider(sync)
