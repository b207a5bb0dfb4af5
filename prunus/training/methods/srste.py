"""N:M training with the sparse-refined straight-through estimator (SR-STE).

Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch"
(ICLR), eq. 6: the forward pass uses ``W~ = W * mask(W)``, the N:M mask recomputed from |W| at
every forward; the dense weights receive ``g + lambda_W * (1 - mask) * W``, where ``g`` is the
gradient with respect to ``W~`` passed straight through. The refining term decays the pruned weights.

The mask is applied through a parametrization of ``weight`` (``torch.nn.utils.parametrize``), so
the dense weights stay in the optimizer and ``sparsifier.squash()`` bakes the final mask in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunus.core.options import option
from prunus.core.spec import NM, SparsitySpec
from prunus.training.registry import TrainingMethod, register
from prunus.training.sparsifier import Sparsifier, magnitude, mask_from_scores, option_values, prepare


class _SRSTE(torch.autograd.Function):
    """``forward(W, keep, lam) = W * keep``; ``backward(g) = g + lam * (1 - keep) * W``."""

    @staticmethod
    def forward(ctx, weight: Tensor, keep: Tensor, lam: float) -> Tensor:
        ctx.save_for_backward(weight, keep)
        ctx.lam = lam
        return weight * keep

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, keep = ctx.saved_tensors
        return grad + ctx.lam * (~keep) * weight, None, None


def srste_apply(weight: Tensor, keep: Tensor, lam: float) -> Tensor:
    """The SR-STE masked weight: forward ``W * keep``, gradient ``g + lam * (1 - keep) * W``."""
    return _SRSTE.apply(weight, keep, lam)


class SRSTEMask(nn.Module):
    """Parametrization: N:M mask of the current |W|, with the SR-STE backward."""

    def __init__(self, pattern: NM, lam: float, name: str) -> None:
        super().__init__()
        self.pattern, self.lam, self.name = pattern, lam, name

    def forward(self, weight: Tensor) -> Tensor:
        keep = mask_from_scores(magnitude(weight), 0.0, self.pattern, self.name)
        return srste_apply(weight, keep, self.lam)


@dataclass(frozen=True)
class SRSTEOptions:
    """Args:
        lam: the refining weight decay lambda_W on pruned weights (the paper's 2e-4).
    """

    lam: float = option(2e-4, min=0)


def srste(model: nn.Module, optimizer, spec: SparsitySpec | str, *, total_steps: int = 0, seed: int = 0,
          allocation: Optional[str] = None, include: Optional[Sequence[str]] = None,
          exclude: Sequence[str] = (), options: Any = None, **kwargs) -> Sparsifier:
    """SR-STE N:M training from scratch (Zhou et al. 2021). ``spec`` must be N:M (``"2:4"``).

    Example:
        >>> sp = prunus.training.srste(model, opt, "2:4", lam=2e-4)
        >>> ...; sp.squash()   # weights now hold the 2:4 pattern, parametrization removed
    """
    targets, spec, opts = prepare(model, spec, method="srste", patterns=(NM,), options=SRSTEOptions,
                                  values=option_values(options, kwargs), allocation=allocation,
                                  include=include, exclude=exclude)
    for t in targets:
        mask_from_scores(t.weight.detach(), 0.0, spec.pattern, t.name)  # divisibility, before touching
    for t in targets:
        parametrize.register_parametrization(t.module, "weight", SRSTEMask(spec.pattern, opts.lam, t.name))

    def current(sp: Sparsifier, step: int) -> None:
        for t in sp.targets:
            sp.masks[t.name] = mask_from_scores(magnitude(t.weight), 0.0, spec.pattern, t.name)

    masks = {t.name: mask_from_scores(magnitude(t.weight), 0.0, spec.pattern, t.name) for t in targets}
    return Sparsifier(model, optimizer, targets, masks, spec=spec, method="srste", total_steps=total_steps,
                      update=current, seed=seed, apply_to_weights=False)


register(TrainingMethod("srste", srste, SRSTEOptions,
                        "Zhou et al. 2021, Learning N:M Fine-grained Structured Sparse Neural Networks "
                        "From Scratch (ICLR)", dense_backward=True))
