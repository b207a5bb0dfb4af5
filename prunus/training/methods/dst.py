"""Dynamic sparse training: drop the smallest active weights, grow as many inactive ones.

One drop/grow function with two grow rules, and two thin factories over it:

- ``set``: random grow. Mocanu et al. 2018, "Scalable training of artificial neural networks with
  adaptive sparse connectivity inspired by network science" (Nature Communications).
- ``rigl``: grow where the dense |gradient| is largest. Evci et al. 2020, "Rigging the Lottery:
  Making All Tickets Winners" (ICML), Algorithm 1.

Both update every ``delta_t`` steps until ``end * total_steps``, with the cosine-decayed update
fraction of RigL (:func:`schedules.cosine_decay`). Every layer keeps exactly its number of non-zeros.
Grown weights start at zero with zeroed optimizer state (RigL's choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from prunus.errors import PrunusError
from prunus.core.options import option
from prunus.core.spec import SparsitySpec, Unstructured
from prunus.training.registry import TrainingMethod, register
from prunus.training.schedules import cosine_decay
from prunus.training.sparsifier import (Sparsifier, generator, layer_budgets, magnitude, option_values, prepare,
                                        random_masks, sparse_init)


@dataclass(frozen=True)
class DSTOptions:
    """Args:
        delta_t: steps between mask updates (RigL's delta T).
        alpha: initial update fraction, cosine-decayed to 0 at ``end``.
        end: fraction of training after which masks are frozen.
    """

    delta_t: int = option(100, min=1)
    alpha: float = option(0.3, min=0, max=1)
    end: float = option(0.75, min=0, max=1)


def drop_grow(mask: Tensor, weight: Tensor, grow_scores: Tensor, fraction: float) -> Tensor:
    """One layer's update: a new mask with exactly as many True entries as ``mask``.

    Drops ``k = floor(fraction * nnz)`` active weights of smallest |weight|, then grows the ``k``
    entries with the largest ``grow_scores`` among those inactive after the drop (a weight just
    dropped may be grown back, as in RigL). Ties go to the lower flat index.

    Args:
        mask: (...) bool, True = active.
        weight: (...) the current weights.
        grow_scores: (...) higher means grow first (|grad| for RigL, uniform noise for SET).
        fraction: share of active weights to replace, in [0, 1].
    """
    flat = mask.reshape(-1)
    k = int(math.floor(fraction * int(flat.sum())))
    if k <= 0:
        return mask.clone()
    inf = torch.tensor(float("inf"))
    drop_scores = torch.where(flat, magnitude(weight).reshape(-1), inf)
    new = flat.clone()
    new[torch.sort(drop_scores, stable=True).indices[:k]] = False
    g = torch.where(new, -inf, grow_scores.detach().reshape(-1).float())
    new[torch.sort(g, descending=True, stable=True).indices[:k]] = True
    return new.reshape(mask.shape)


def _dst(name: str, grow: str, model: nn.Module, optimizer, spec, *, total_steps: int, seed: int,
         allocation: Optional[str], include, exclude, options: Any) -> Sparsifier:
    targets, spec, opts = prepare(model, spec, method=name, patterns=(Unstructured,), options=DSTOptions,
                                  values=options, allocation=allocation,
                                  include=include, exclude=exclude)
    masks = random_masks(targets, layer_budgets(targets, spec), spec.pattern, seed)
    sparse_init(targets, masks)
    end_step = opts.end * total_steps

    def update(sp: Sparsifier, step: int) -> None:
        if step % opts.delta_t or step >= end_step:
            return
        frac = cosine_decay(step, end_step, opts.alpha)
        if grow == "gradient":
            sp.dense_grad_steps += 1
        for t in sp.targets:
            w = t.weight
            if grow == "gradient":
                if w.grad is None:
                    raise PrunusError(f"rigl needs gradients at sparsifier.step() (layer {t.name}); "
                                      f"call it after backward() and optimizer.step(), before zero_grad()")
                scores = w.grad.abs()
            else:
                scores = torch.rand(w.shape, generator=generator(sp.seed, f"{t.name}:{step}"))
            old = sp.masks[t.name]
            after_drop_and_grow = drop_grow(old, w, scores, frac)
            with torch.no_grad():
                # Grown weights (inactive before this update) start from zero with no momentum.
                grown = after_drop_and_grow & ~old
                w.masked_fill_(grown, 0.0)
                sp.mask_optimizer_state(w, ~grown)
            sp.masks[t.name] = after_drop_and_grow

    return Sparsifier(model, optimizer, targets, masks, spec=spec, method=name, total_steps=total_steps,
                      update=update, seed=seed)


def set_(model: nn.Module, optimizer, spec: SparsitySpec | str | float, *, total_steps: int, seed: int = 0,
         allocation: Optional[str] = None, include: Optional[Sequence[str]] = None,
         exclude: Sequence[str] = (), options: Any = None, **kwargs) -> Sparsifier:
    """SET (Mocanu et al. 2018): magnitude drop, random grow, every ``delta_t`` steps.

    Example:
        >>> sp = prunus.training.set(model, opt, "90%", total_steps=5000, allocation="erk")
    """
    return _dst("set", "random", model, optimizer, spec, total_steps=total_steps, seed=seed,
                allocation=allocation, include=include, exclude=exclude,
                options=option_values(options, kwargs))


def rigl(model: nn.Module, optimizer, spec: SparsitySpec | str | float, *, total_steps: int, seed: int = 0,
         allocation: Optional[str] = None, include: Optional[Sequence[str]] = None,
         exclude: Sequence[str] = (), options: Any = None, **kwargs) -> Sparsifier:
    """RigL (Evci et al. 2020): magnitude drop, grow where |grad| is largest among inactive weights.

    The gradient read is the one of the step just taken (``w.grad`` after ``optimizer.step()``);
    under DDP it is already all-reduced, so every rank computes the same masks.

    Example:
        >>> sp = prunus.training.rigl(model, opt, "90%", total_steps=5000, delta_t=100, alpha=0.3)
    """
    return _dst("rigl", "gradient", model, optimizer, spec, total_steps=total_steps, seed=seed,
                allocation=allocation, include=include, exclude=exclude,
                options=option_values(options, kwargs))


register(TrainingMethod("set", set_, DSTOptions,
                        "Mocanu et al. 2018, Sparse Evolutionary Training (Nature Communications)"))
register(TrainingMethod("rigl", rigl, DSTOptions,
                        "Evci et al. 2020, Rigging the Lottery: Making All Tickets Winners (ICML)"))
