"""Random search over sparse configurations, the baseline for sparse architecture search.

"Random Search as a Baseline for Sparse Neural Network Architecture Search" (2024). Sample ``K``
random sparse configurations at the same total budget, short-train each from the same
initialisation, keep the best, and train it. A configuration here is a per-layer density (a random
log-uniform perturbation of the uniform budget, rescaled so the total number of kept weights is
exact) plus a random mask at those densities. Compare it with plain random masks (``static``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from prunus.errors import SpecError
from prunus.core.masks import n_pruned
from prunus.core.options import option
from prunus.core.spec import SparsitySpec, Unstructured
from prunus.training.registry import RunPlan, TrainingMethod, register
from prunus.training.sparsifier import (Sparsifier, Target, generator, layer_budgets, option_values,
                                        prepare, random_masks, sparse_init, unwrap)


@dataclass(frozen=True)
class RandomSearchOptions:
    """Args:
        candidates: how many configurations K to sample and short-train.
        spread: per-layer densities vary by up to this factor around the uniform budget.
    """

    candidates: int = option(8, min=1)
    spread: float = option(4.0, min=1)


def sample_budgets(targets: Sequence[Target], sparsity: float, spread: float,
                   gen: torch.Generator) -> dict[str, float]:
    """Random per-layer sparsities keeping ``round((1 - sparsity) * total)`` weights in all.

    Densities are ``d * exp(u_l)`` with ``u_l ~ U(-log spread, log spread)``, rescaled to the
    budget; a layer capped at density 1 hands its excess to the others. Every layer keeps >= 1.
    """
    numel = [t.weight.numel() for t in targets]
    keep_total = sum(numel) - n_pruned(sum(numel), sparsity)
    u = (torch.rand(len(targets), generator=gen) * 2 - 1) * math.log(max(spread, 1.0))
    raw = [math.exp(float(x)) * n for x, n in zip(u, numel)]
    keep = [0.0] * len(targets)
    free = list(range(len(targets)))
    left = float(keep_total)
    while free:
        scale = left / sum(raw[i] for i in free)
        over = [i for i in free if raw[i] * scale >= numel[i]]
        if not over:
            for i in free:
                keep[i] = raw[i] * scale
            break
        for i in over:
            keep[i] = numel[i]
            left -= numel[i]
            free.remove(i)
    return {t.name: min(1.0 - 1.0 / n, max(0.0, 1.0 - k / n)) for t, k, n in zip(targets, keep, numel)}


def random_search(model: nn.Module, optimizer, spec: SparsitySpec | str | float, *, total_steps: int,
                  score_fn: Callable[[Sparsifier], float], seed: int = 0,
                  allocation: Optional[str] = None, include: Optional[Sequence[str]] = None,
                  exclude: Sequence[str] = (), options: Any = None, **kwargs) -> Sparsifier:
    """Best of K random sparse configurations, each scored by ``score_fn`` after a short training.

    Args:
        score_fn: given a candidate's sparsifier (masks applied to the model), short-trains it
            (calling ``sparsifier.step()`` after each optimizer step) and returns a validation
            score, higher is better. Model and optimizer are restored after every candidate.

    Returns:
        A static sparsifier with the winning masks on the initial weights; ``state["scores"]``
        holds every candidate's score and ``state["best"]`` the winner's index.

    Example:
        >>> sp = prunus.training.random_search(model, opt, "90%", total_steps=5000,
        ...                                    score_fn=lambda sp: short_train_and_eval(sp), candidates=8)
    """
    targets, spec, opts = prepare(model, spec, method="random_search", patterns=(Unstructured,),
                                  options=RandomSearchOptions, values=option_values(options, kwargs), allocation=allocation,
                                  include=include, exclude=exclude)
    if opts.candidates < 1:
        raise SpecError("random_search needs candidates >= 1")
    layer_budgets(targets, spec)  # the spec's own checks (a layer left empty) before searching
    model_state = copy.deepcopy(unwrap(model).state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None

    def restore() -> None:
        unwrap(model).load_state_dict(model_state)
        if optimizer is not None:
            optimizer.load_state_dict(copy.deepcopy(opt_state))

    scores, configs = [], []
    for i in range(opts.candidates):
        budgets = sample_budgets(targets, spec.sparsity, opts.spread, generator(seed, f"search:{i}"))
        masks = random_masks(targets, budgets, spec.pattern, seed + 7919 * (i + 1))
        sparse_init(targets, masks)
        candidate = Sparsifier(model, optimizer, targets, masks, spec=spec, method="random_search",
                               total_steps=total_steps, seed=seed)
        scores.append(float(score_fn(candidate)))
        configs.append(masks)
        restore()
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    sparse_init(targets, configs[best])
    sp = Sparsifier(model, optimizer, targets, configs[best], spec=spec, method="random_search",
                    total_steps=total_steps, seed=seed)
    sp.state["scores"] = torch.tensor(scores)
    sp.state["best"] = best
    return sp


def _run_args(plan: RunPlan, opts: RandomSearchOptions) -> dict[str, Any]:
    """The trainer's short-train-and-validate scorer is this method's ``score_fn``."""
    if plan.scorer is None:
        raise SpecError("random_search needs a scorer (a trainer that can short-train candidates)")
    return {"score_fn": plan.scorer()}


register(TrainingMethod("random_search", random_search, RandomSearchOptions,
                        "Random Search as a Baseline for Sparse Neural Network Architecture Search (2024)",
                        run_args=_run_args))
