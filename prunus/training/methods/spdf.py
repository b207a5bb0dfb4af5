"""Sparse pre-training, then dense fine-tuning (SPDF).

Thangarasa et al. 2023, "SPDF: Sparse Pre-training and Dense Fine-tuning for Large Language
Models" (UAI). Phase one trains with a static random unstructured mask; phase two releases the mask
and trains every weight (the pruned ones restart from zero). The switch happens after optimizer step
``release_step`` when given (the reference trainer passes the first step on the fine-tuning corpus),
else after ``dense_from * total_steps``, or whenever the user calls ``sparsifier.release()`` (e.g.
when moving from the pre-training corpus to the fine-tuning one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

from prunus.errors import SpecError
from prunus.core.options import option
from prunus.core.spec import SparsitySpec, Unstructured
from prunus.training.registry import RunPlan, TrainingMethod, register
from prunus.training.sparsifier import (Sparsifier, layer_budgets, option_values, prepare, random_masks,
                                        sparse_init)


@dataclass(frozen=True)
class SPDFOptions:
    """Args:
        dense_from: fraction of training after which the mask is released (1.0: only by hand).
    """

    dense_from: float = option(0.75, min=0, max=1)


def spdf(model: nn.Module, optimizer, spec: SparsitySpec | str | float, *, total_steps: int, seed: int = 0,
         allocation: Optional[str] = None, include: Optional[Sequence[str]] = None,
         exclude: Sequence[str] = (), release_step: Optional[int] = None, options: Any = None, **kwargs) -> Sparsifier:
    """Sparse pre-training with a static random mask, then dense fine-tuning (Thangarasa et al. 2023).

    ``release_step`` (an integer step, overriding ``dense_from``) releases the mask once
    ``sparsifier.step()`` has been called that many times: the first step after it is dense.

    Example:
        >>> sp = prunus.training.spdf(model, opt, "75%", total_steps=4000, dense_from=0.75)
    """
    targets, spec, opts = prepare(model, spec, method="spdf", patterns=(Unstructured,), options=SPDFOptions,
                                  values=option_values(options, kwargs), allocation=allocation,
                                  include=include, exclude=exclude)
    masks = random_masks(targets, layer_budgets(targets, spec), spec.pattern, seed)
    sparse_init(targets, masks)
    if release_step is not None and release_step < 0:
        raise SpecError(f"spdf release_step must be >= 0, not {release_step}")
    switch = release_step if release_step is not None else opts.dense_from * total_steps

    def update(sp: Sparsifier, step: int) -> None:
        if not sp.released and step >= switch:
            sp.apply()  # the step just taken was still sparse: its update must not reach pruned weights
            sp.release()

    return Sparsifier(model, optimizer, targets, masks, spec=spec, method="spdf", total_steps=total_steps,
                      update=update, seed=seed)


def _check(opts: SPDFOptions, plan: RunPlan) -> None:
    """With a fine-tuning corpus the mask is released at the switch: ``dense_from`` has no say."""
    if plan.two_phase and "dense_from" in plan.given:
        raise SpecError("spdf with a fine-tuning corpus releases its mask at the corpus switch; "
                        "drop the dense_from option")


def _run_args(plan: RunPlan, opts: SPDFOptions) -> dict[str, Any]:
    """Dense fine-tuning on the second corpus: release the mask at the first step on it."""
    return {"release_step": plan.switch_step} if plan.switch_step is not None else {}


register(TrainingMethod("spdf", spdf, SPDFOptions,
                        "Thangarasa et al. 2023, SPDF: Sparse Pre-training and Dense Fine-tuning (UAI)",
                        check=_check, run_args=_run_args))
