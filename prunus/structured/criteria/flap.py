"""FLAP's fluctuation metric: how much a unit's output varies, weighted by its consumer weights.

An et al. 2024 ("Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI):
the score of input channel j of the consuming layer (o_proj, down_proj) is its sample variance
over the calibration tokens times the squared norm of its weight column,

    S_j = 1/(N-1) * sum_n (X_nj - mean_j)^2 * ||W_:,j||_2^2,

an MLP channel is one such channel, and a head (or KV group) sums the *squares* of its channels'
scores, as FLAP's reference code scores heads (``W_metric ** 2`` summed over the head's dimensions).
A channel that barely fluctuates is nearly a constant, which FLAP's bias compensation
(``--compensate``) puts back; without it, FLAP removes exactly the near-constant channels whose
loss is largest, so use the two together. Blocks are scored by ShortGPT's block influence.

The variance is the exact sample variance over the calibration tokens (from their sums and sums of
squares, in float64). FLAP's reference accumulates a running estimate that skips the first
calibration batch; that estimator is not reproduced.
"""

from __future__ import annotations

from torch import Tensor

from prunus.structured.registry import UnitView, unit_criterion


@unit_criterion("flap", needs={"input_sq_norm", "input_sum"},
                paper="An et al. 2024, Fluctuation-based Adaptive Structured Pruning for LLMs (FLAP)")
def flap(view: UnitView, options: object) -> Tensor:
    st = view.need()
    n = max(2, st.tokens)
    sq, s = st.input_sq_norm.double(), st.input_sum.double()  # type: ignore[union-attr]
    var = ((sq - s * s / n) / (n - 1)).clamp_min(0)  # (in,)
    col = view.consumer.double().pow(2).sum(dim=0)  # (units, cols)
    per_channel = view.per_unit(var) * col
    if per_channel.shape[1] == 1:
        return per_channel[:, 0].float()
    return per_channel.pow(2).sum(dim=1).float()
