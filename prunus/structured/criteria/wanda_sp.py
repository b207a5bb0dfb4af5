"""Wanda-sp: Wanda's |W| * ||X|| summed over a unit's consumer columns.

Sun et al. 2023 ("A Simple and Effective Pruning Approach for Large Language Models") score a weight
by |W_ij| * ||X_j||_2; An et al. 2024 (FLAP, "Fluctuation-based Adaptive Structured Pruning for
Large Language Models") extend it to structures as Wanda-sp: the score of input channel j of the
consuming layer is sum_i |W_ij| * ||X_j||_2, and a unit (head, channel) sums its channels. Blocks are
scored by ShortGPT's block influence.
"""

from __future__ import annotations

from torch import Tensor

from prunus.structured.registry import UnitView, unit_criterion


@unit_criterion("wanda-sp", needs={"input_sq_norm"},
                paper="An et al. 2024, FLAP (Wanda-sp); Sun et al. 2023, Wanda")
def wanda_sp(view: UnitView, options: object) -> Tensor:
    norm = view.per_unit(view.need().input_norm)  # (units, cols)
    return (view.consumer.float().abs().sum(dim=0) * norm).sum(dim=1)
