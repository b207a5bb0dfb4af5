"""Static sparse training: a random mask drawn at initialisation and never changed.

Liu et al. 2022, "The Unreasonable Effectiveness of Random Pruning: Return of the Most Naive
Baseline for Sparse Training" (ICLR); with ERK layer budgets from Evci et al. 2020, "Rigging the
Lottery: Making All Tickets Winners" (ICML), sec. 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

from prunus.core.spec import NM, Block, Channel, SparsitySpec, Unstructured
from prunus.training.registry import TrainingMethod, register
from prunus.training.sparsifier import (Sparsifier, layer_budgets, option_values, prepare, random_masks,
                                        sparse_init)


@dataclass(frozen=True)
class StaticOptions:
    """Static random sparsity has no options: the spec's allocation picks uniform or ERK."""


def static(model: nn.Module, optimizer, spec: SparsitySpec | str | float, *, total_steps: int = 0,
           seed: int = 0, allocation: Optional[str] = None, include: Optional[Sequence[str]] = None,
           exclude: Sequence[str] = (), options: Any = None, **kwargs) -> Sparsifier:
    """Random mask at initialisation, trained sparse (Liu et al. 2022; ERK: Evci et al. 2020).

    Args:
        model, optimizer: the user's model and optimizer.
        spec: target sparsity (``"90%"``, ``SparsitySpec``); its allocation splits it over layers.
        total_steps: unused (the mask never changes); accepted for a uniform signature.
        seed: the masks depend only on (seed, layer name).
        allocation: override the spec's allocation (``uniform``, ``erk``).
        include, exclude: FQN globs of the layers to sparsify.

    Example:
        >>> sp = prunus.training.static(model, opt, "95%", allocation="erk")
    """
    targets, spec, _ = prepare(model, spec, method="static", patterns=(Unstructured, NM, Block, Channel),
                               options=StaticOptions, values=option_values(options, kwargs), allocation=allocation,
                               include=include, exclude=exclude)
    masks = random_masks(targets, layer_budgets(targets, spec), spec.pattern, seed)
    sparse_init(targets, masks)
    return Sparsifier(model, optimizer, targets, masks, spec=spec, method="static",
                      total_steps=total_steps, seed=seed)


register(TrainingMethod("static", static, StaticOptions,
                        "Liu et al. 2022, The Unreasonable Effectiveness of Random Pruning (ICLR); "
                        "ERK: Evci et al. 2020"))
