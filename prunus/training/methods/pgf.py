"""Progressive Gradient Flow (PGF) for N:M sparsity at high sparsity.

Bambhaniya et al. 2024, "Progressive Gradient Flow for Robust N:M Sparsity Training in
Transformers". The N:M mask of |W| is recomputed at every forward; pruned weights are not cut at
once but scaled by a factor ``beta_t`` that decays to 0 (MDGF: linear or exponential decay), or the
structure itself decays from (M-1):M to N:M in equal frames (SDGF). Either way the gradient that
reaches the pruned weights shrinks progressively: the forward is ``W * (mask + beta * (1 - mask))``
and autograd scales their gradient by ``beta``. (The authors' reference code passes the full
gradient straight through instead; we follow the paper's description of restricting the flow.)
The schedule is :func:`prunus.training.schedules.pgf`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunus.core.options import option
from prunus.core.spec import NM, SparsitySpec
from prunus.training.registry import TrainingMethod, register
from prunus.training.schedules import pgf as pgf_schedule
from prunus.training.sparsifier import Sparsifier, magnitude, mask_from_scores, option_values, prepare


class PGFMask(nn.Module):
    """Parametrization: ``W * (keep + beta * (1 - keep))`` with ``(n_t, beta)`` from the schedule."""

    def __init__(self, m: int, name: str, schedule: Callable[[], tuple[int, float]]) -> None:
        super().__init__()
        self.m, self.name, self.schedule = m, name, schedule

    def forward(self, weight: Tensor) -> Tensor:
        n_t, beta = self.schedule()
        if n_t >= self.m:
            return weight
        keep = mask_from_scores(magnitude(weight), 0.0, NM(n_t, self.m), self.name)
        return weight * (keep + beta * (~keep)).to(weight.dtype)


@dataclass(frozen=True)
class PGFOptions:
    """Args:
        decay: ``linear`` or ``exponential`` (MDGF), or ``structure`` (SDGF, stepwise).
        dense: fraction of training run dense first.
        finetune: final fraction run with the hard N:M mask (beta = 0).
        coef: decay coefficient per step; by default reach 0 (linear) / 0.01 (exponential) at the
            end of the decay phase.
    """

    decay: str = "linear"
    dense: float = option(0.0, min=0, max=1)
    finetune: float = option(0.2, min=0, max=1)
    coef: float | None = option(None, min=0)


def pgf(model: nn.Module, optimizer, spec: SparsitySpec | str, *, total_steps: int, seed: int = 0,
        allocation: Optional[str] = None, include: Optional[Sequence[str]] = None,
        exclude: Sequence[str] = (), options: Any = None, **kwargs) -> Sparsifier:
    """Progressive Gradient Flow N:M training (Bambhaniya et al. 2024). ``spec`` must be N:M.

    Example:
        >>> sp = prunus.training.pgf(model, opt, "1:8", total_steps=5000, decay="structure")
    """
    targets, spec, opts = prepare(model, spec, method="pgf", patterns=(NM,), options=PGFOptions,
                                  values=option_values(options, kwargs), allocation=allocation,
                                  include=include, exclude=exclude)
    pgf_schedule(0, total_steps, spec.pattern.n, spec.pattern.m, decay=opts.decay, dense=opts.dense,
                 finetune=opts.finetune, coef=opts.coef)  # bad options fail before the model changes
    for t in targets:
        mask_from_scores(t.weight.detach(), 0.0, spec.pattern, t.name)
    holder: dict[str, Sparsifier] = {}

    def schedule() -> tuple[int, float]:
        step = holder["sp"].step_count if "sp" in holder else 0
        return pgf_schedule(step, total_steps, spec.pattern.n, spec.pattern.m, decay=opts.decay,
                            dense=opts.dense, finetune=opts.finetune, coef=opts.coef)

    for t in targets:
        parametrize.register_parametrization(t.module, "weight", PGFMask(spec.pattern.m, t.name, schedule))

    def current(sp: Sparsifier, step: int) -> None:
        n_t, _ = schedule()
        for t in sp.targets:
            w = t.weight.detach()
            sp.masks[t.name] = (torch.ones_like(w, dtype=torch.bool) if n_t >= spec.pattern.m else
                                mask_from_scores(magnitude(w), 0.0, NM(n_t, spec.pattern.m), t.name))

    masks = {t.name: torch.ones_like(t.weight, dtype=torch.bool) for t in targets}
    sp = Sparsifier(model, optimizer, targets, masks, spec=spec, method="pgf", total_steps=total_steps,
                    update=current, seed=seed, apply_to_weights=False)
    holder["sp"] = sp
    current(sp, 0)
    return sp


register(TrainingMethod("pgf", pgf, PGFOptions,
                        "Bambhaniya et al. 2024, Progressive Gradient Flow for Robust N:M Sparsity "
                        "Training in Transformers", dense_backward=True))
