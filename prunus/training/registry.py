"""The registry of sparse-training methods, and the hooks through which a method talks to a trainer.

A method is one file in :mod:`prunus.training.methods` that calls :func:`register` at import time;
:func:`load_all` imports every module of that package, so being there is the registration. A trainer
never branches on a method's name: what a method needs beyond the common factory arguments it
declares here, as hooks on :class:`TrainingMethod`:

- ``check(options, run)``: method-specific validation of a run's setup, before anything runs;
- ``width(problem)``: a width multiplier for the model (Sparse-IFT's Sparse Wide);
- ``run_args(run, options)``: extra factory arguments derived from the run (a release step at a
  corpus switch, a scorer for random search).

Example:
    >>> register(TrainingMethod("mine", my_factory, MyOptions, "Me et al. 2025"))
    >>> get("mine").factory(model, opt, "90%", total_steps=1000)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from prunus.core.registry import discover, lookup


@dataclass(frozen=True)
class RunPlan:
    """What a trainer tells a method about the run before building its sparsifier.

    Attributes:
        total_steps: optimizer steps of the whole run.
        two_phase: True when training moves to a second corpus part-way (text fine-tuning).
        switch_step: the first optimizer step on the second corpus (None for one corpus).
        seed: the run's seed.
        given: the option names the user set explicitly (the rest are the dataclass defaults).
        scorer: ``scorer()`` returns a score function ``(sparsifier) -> float`` that short-trains a
            candidate and returns a validation score, higher is better (None where not available).
    """

    total_steps: int = 0
    two_phase: bool = False
    switch_step: Optional[int] = None
    seed: int = 0
    given: frozenset[str] = frozenset()
    scorer: Optional[Callable[[], Callable[[Any], float]]] = None


@dataclass(frozen=True)
class WidthProblem:
    """What a method needs to choose a width multiplier for the model.

    Attributes:
        spec: the run's :class:`prunus.core.spec.SparsitySpec`.
        dense_flops: forward FLOPs of the un-widened dense model.
        sparse_flops: ``sparse_flops(w)``, forward FLOPs of the model widened by ``w`` at the spec's
            layer budgets.
    """

    spec: Any
    dense_flops: float
    sparse_flops: Callable[[float], float]


@dataclass(frozen=True)
class TrainingMethod:
    """A registered sparse-training method.

    Attributes:
        name: registry key (``prunus train --method``).
        factory: ``(model, optimizer, spec, *, total_steps, ..., options=None, **kwargs) -> Sparsifier``.
        options: the frozen dataclass of its options.
        paper: citation shown by ``prunus list``.
        rounds: how many times the run repeats training (LTH trains ``rounds + 1`` times); a
            function of the options.
        dense_backward: True when the backward pass uses dense weights (SR-STE, PGF), for FLOPs.
        check: ``check(options, plan)`` raises a SpecError for a setup the method cannot run.
        width: ``width(problem) -> float``, the model's width multiplier (None: 1.0).
        run_args: ``run_args(plan, options) -> dict`` of extra factory keyword arguments.
    """

    name: str
    factory: Callable[..., Any]
    options: type
    paper: str
    rounds: Callable[[Any], int] = lambda o: 1
    dense_backward: bool = False
    check: Optional[Callable[[Any, RunPlan], None]] = None
    width: Optional[Callable[[WidthProblem], float]] = None
    run_args: Optional[Callable[[RunPlan, Any], dict[str, Any]]] = None


METHODS: dict[str, TrainingMethod] = {}


def register(entry: TrainingMethod) -> TrainingMethod:
    """Add a method to the registry; a duplicate name raises."""
    if entry.name in METHODS:
        raise ValueError(f"training method {entry.name!r} is already registered")
    METHODS[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a method (tests that register their own)."""
    METHODS.pop(name, None)


def load_all() -> dict[str, TrainingMethod]:
    """Import every module of :mod:`prunus.training.methods` once, so that all have registered."""
    discover("prunus.training.methods")
    return METHODS


def get(name: str) -> TrainingMethod:
    """The method registered as ``name``; an unknown name lists the registered ones."""
    load_all()
    return lookup(METHODS, name, "training method")


def build(name: str, model, optimizer, spec, *, total_steps: int, **kwargs) -> Any:
    """Build the sparsifier of the method called ``name`` (strings resolved here, at the edge)."""
    return get(name).factory(model, optimizer, spec, total_steps=total_steps, **kwargs)
