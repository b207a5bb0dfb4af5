"""Gradual magnitude pruning with the cubic schedule.

Zhu & Gupta 2017, "To prune, or not to prune: exploring the efficacy of pruning for model
compression" (ICLR workshop 2018), eq. 1. The window is given as fractions of training, e.g. the
25%-75% window of "The Journey Matters" (Jin et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from prunus.core.options import option
from prunus.core.spec import Block, Channel, SparsitySpec, Unstructured
from prunus.training.registry import TrainingMethod, register
from prunus.training.schedules import cubic
from prunus.training.sparsifier import Sparsifier, layer_budgets, magnitude, mask_from_scores, option_values, prepare


@dataclass(frozen=True)
class GMPOptions:
    """Args:
        start, end: the pruning window as fractions of training (dense before, final after).
        frequency: prune every this many steps inside the window (Zhu & Gupta's delta t).
        initial: sparsity at ``start``.
    """

    start: float = option(0.25, min=0, max=1)
    end: float = option(0.75, min=0, max=1)
    frequency: int = option(100, min=1)
    initial: float = option(0.0, min=0, max=1)


def gmp(model: nn.Module, optimizer, spec: SparsitySpec | str | float, *, total_steps: int,
        seed: int = 0, allocation: Optional[str] = None, include: Optional[Sequence[str]] = None,
        exclude: Sequence[str] = (), options: Any = None, **kwargs) -> Sparsifier:
    """Gradual magnitude pruning (Zhu & Gupta 2017): |W| top-k with a cubic sparsity ramp.

    Every ``frequency`` steps in ``[start, end] * total_steps`` each layer is pruned to
    ``budget_l * s_t / s_final`` by magnitude, where ``s_t`` is :func:`schedules.cubic` and
    ``budget_l`` the layer's share under the spec's allocation. Pruned weights stay pruned.

    Example:
        >>> sp = prunus.training.gmp(model, opt, "90%", total_steps=5000, start=0.25, end=0.75)
    """
    targets, spec, opts = prepare(model, spec, method="gmp", patterns=(Unstructured, Block, Channel),
                                  options=GMPOptions, values=option_values(options, kwargs), allocation=allocation,
                                  include=include, exclude=exclude)
    final = layer_budgets(targets, spec)
    masks = {t.name: torch.ones_like(t.weight, dtype=torch.bool) for t in targets}

    def update(sp: Sparsifier, step: int) -> None:
        s_t = cubic(step, sp.total_steps, spec.sparsity, initial=opts.initial, start=opts.start,
                    end=opts.end)
        if s_t == sp.state.get("sparsity", 0.0) or (step % opts.frequency and s_t != spec.sparsity):
            return
        sp.state["sparsity"] = s_t
        for t in sp.targets:
            s_l = final[t.name] * s_t / spec.sparsity if spec.sparsity > 0 else 0.0
            w = t.weight.detach()
            # Pruned weights score -1 so they are pruned first: masks only ever shrink.
            scores = torch.where(sp.masks[t.name], magnitude(w), torch.full_like(w, -1.0, dtype=torch.float))
            sp.masks[t.name] = mask_from_scores(scores, s_l, spec.pattern, t.name)

    return Sparsifier(model, optimizer, targets, masks, spec=spec, method="gmp",
                      total_steps=total_steps, update=update, seed=seed)


register(TrainingMethod("gmp", gmp, GMPOptions,
                        "Zhu & Gupta 2017, To prune, or not to prune (cubic schedule)"))
