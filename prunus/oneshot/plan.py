"""A one-shot run, resolved and typed: the method, refiner, budget and block steps with their options.

:func:`make_plan` is the edge where names become registry entries and option mappings become the
registered option dataclasses; everything below (:mod:`prunus.oneshot.pipeline`, the calibration loop)
takes a :class:`PrunePlan` and nothing untyped. The job builder calls it once per run of a grid, so a
bad option fails before any model is loaded.

Example:
    >>> plan = make_plan(SparsitySpec.parse("2:4"), "sparsegpt", method_options={"blocksize": 64},
    ...                  steps=[("reconstruct", {"epochs": 2})])
    >>> plan.method_options.blocksize, plan.steps[0].options.epochs
    (64, 2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from prunus import budgets
from prunus.algorithms import Method, Refiner, get_method, get_refiner
from prunus.core.options import build_options
from prunus.core.spec import SparsitySpec
from prunus.errors import DataError
from prunus.oneshot import steps as steps_mod
from prunus.oneshot.steps import StepRun


@dataclass(frozen=True)
class PrunePlan:
    """Everything :func:`prunus.oneshot.pipeline.prune_targets` needs, resolved and typed."""

    spec: SparsitySpec
    method: Method
    method_options: Any
    refiner: Optional[Refiner]
    refine_options: Any
    allocation: budgets.Allocation
    allocation_options: Any
    steps: tuple[StepRun, ...] = ()

    @property
    def needs(self) -> frozenset[str]:
        """Statistics the pruning pass collects (method and refiner)."""
        return self.method.needs | (self.refiner.needs if self.refiner else frozenset())

    @property
    def calibrated(self) -> bool:
        """Whether the plan runs the calibration loop at all (statistics, budget pass or steps)."""
        return bool(self.needs or self.allocation.needs or self.steps)

    def needs_calibration_by(self) -> Optional[str]:
        """The first part of the plan that needs calibration windows, for the error message."""
        if self.method.needs:
            return self.method.name
        if self.refiner is not None and self.refiner.needs:
            return self.refiner.name
        if self.allocation.needs:
            return self.spec.allocation
        return self.steps[0].name if self.steps else None

    @property
    def label(self) -> str:
        """The run's name in tables: ``sparsegpt+dsnot+recon``."""
        return self.method.name + (f"+{self.refiner.name}" if self.refiner else "") + \
            "".join(s.step.label for s in self.steps)


def make_steps(steps: Sequence[Any]) -> tuple[StepRun, ...]:
    """``["reconstruct", ("scale", {"factor": 0.5}), StepRun(...)]`` -> typed steps; inactive ones dropped."""
    out = []
    for item in steps:
        if isinstance(item, StepRun):
            run = item
        else:
            name, values = (item, None) if isinstance(item, str) else tuple(item)
            step = steps_mod.get(str(name))
            run = StepRun(step, build_options(step.options, values, f"block step {step.name}"))
        if run.step.active(run.options):
            out.append(run)
    return tuple(out)


def make_plan(spec: SparsitySpec, method: str, *, refine: Optional[str] = None, method_options: Any = None,
              refine_options: Any = None, allocation_options: Any = None,
              steps: Sequence[Any] = ()) -> PrunePlan:
    """Resolve names against the registries and build every option dataclass.

    Raises:
        SpecError, DataError: an unknown name, an unknown or ill-typed option, or a pattern the
            method or refiner does not support.
    """
    meth = get_method(method)
    meth.check_pattern(spec.pattern)
    ref = get_refiner(refine) if refine else None
    if ref is not None and not isinstance(spec.pattern, ref.patterns):
        raise DataError(f"refiner {ref.name!r} does not support {spec.pattern}")
    alloc = budgets.get(spec.allocation)
    return PrunePlan(
        spec=spec, method=meth,
        method_options=build_options(meth.options, method_options, f"method {meth.name}"),
        refiner=ref,
        refine_options=None if ref is None else build_options(ref.options, refine_options, f"refiner {ref.name}"),
        allocation=alloc,
        allocation_options=build_options(alloc.options, allocation_options, f"allocation {alloc.name}"),
        steps=make_steps(steps))

