"""SparseGPT with the dense model's outputs as the target ("asymmetric" calibration).

SparseGPT (Frantar & Alistarh 2023) reconstructs each layer's output on its *own* inputs ``X~``,
which already carry the errors of every layer pruned before it: it minimises
``||X~ W^T - X~ W'^T||``, so those errors are never corrected, only not made worse. The asymmetric
objective of GPTAQ (Li et al. 2025, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric
Calibration", ICML) instead asks the pruned layer, fed ``X~``, to reproduce what the *dense* layer
gave on the dense model's inputs ``X`` for the same tokens::

    min ||X W^T - X~ W'^T||^2    over W' with the sparsity pattern

Because ``||X W^T - X~ W'^T||^2 = ||X~ (W* - W')^T||^2 + const`` with the least-squares solution
``W* = W X^T X~ (X~^T X~)^-1``, this is exactly SparseGPT's problem on the corrected weight
``W*`` with the usual Hessian ``H = X~^T X~``: compute ``W*`` with the same dampening, then run
:func:`prunus.algorithms.sparsegpt.sparsegpt` on it. The statistic ``cross = X^T X~`` comes from the
calibration loop's dense stream (:mod:`prunus.oneshot.calibrate`), which costs one more forward per block.

Example:
    >>> from prunus.core.spec import Unstructured
    >>> x = torch.randn(256, 16); d = x + 0.1 * torch.randn(256, 16)    # pruned vs dense inputs
    >>> stats = LayerStats(256, hessian=x.T @ x, cross=d.T @ x)
    >>> w, keep = sparsegpt_asym(torch.randn(8, 16), stats, 0.5, Unstructured(), SparseGPTOptions(), "demo")
    >>> int((~keep).sum())
    64
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunus.algorithms import method
from prunus.core.finite import all_finite
from prunus.algorithms.sparsegpt import SparseGPTOptions, inverse_hessian_factor, sparsegpt
from prunus.errors import SpecError
from prunus.core.spec import NM, Pattern, Unstructured
from prunus.core.stats import LayerStats


def corrected_weight(weight: Tensor, stats: LayerStats, percdamp: float, name: str) -> Tensor:
    """``W X^T X~ (X~^T X~ + damp I)^-1``: the dense layer's output, refitted to the pruned inputs.

    Args:
        weight: (out, in) dense weight.
        stats: needs ``hessian`` (``X~^T X~``) and ``cross`` (``X^T X~``), both (in, in).
        percdamp: SparseGPT's dampening, as a fraction of mean(diag(H)).
        name: layer name for errors.
    """
    in_f = weight.shape[1]
    for field in ("hessian", "cross"):
        t = getattr(stats, field)
        if t is None or tuple(t.shape) != (in_f, in_f):
            got = None if t is None else tuple(t.shape)
            raise SpecError(f"{name}: sparsegpt-asym needs an ({in_f}, {in_f}) {field}, got {got}")
    if not all_finite(stats.cross):
        raise SpecError(f"{name}: the cross statistic contains NaN or inf (are the activations finite?)")
    u, dead = inverse_hessian_factor(stats.hessian, percdamp, name)  # U^T U = (H + damp I)^-1
    u = u.to(torch.float32)
    rhs = weight.detach().to(torch.float32) @ stats.cross.to(torch.float32)  # (out, in): W X^T X~
    rhs[:, dead] = 0.0  # an input that is always zero in the pruned model cannot carry anything
    return (rhs @ u.t()) @ u


@method("sparsegpt-asym", needs={"hessian", "cross"}, options=SparseGPTOptions, patterns=(Unstructured, NM),
        paper="Frantar & Alistarh 2023 (SparseGPT) with the asymmetric objective of Li et al. 2025, "
              "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration (ICML)")
def sparsegpt_asym(weight: Tensor, stats: LayerStats, sparsity: float, pattern: Pattern,
                   options: SparseGPTOptions, name: str) -> tuple[Tensor, Tensor]:
    """Prune one linear layer so that, on the pruned model's inputs, it reproduces the dense outputs.

    Args and returns as :func:`prunus.algorithms.sparsegpt.sparsegpt`; ``stats`` also needs ``cross``.
    """
    target = corrected_weight(weight, stats, options.percdamp, name)
    return sparsegpt(target, stats, sparsity, pattern, options, name)
