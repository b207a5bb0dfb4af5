"""Sparse training: keep your own loop, add three lines.

    sparsifier = prunus.training.rigl(model, optimizer, "90%", total_steps=10_000)
    ...
    loss.backward(); optimizer.step(); sparsifier.step()

Every method is a factory ``(model, optimizer, spec, *, total_steps, seed, include, exclude,
**options) -> Sparsifier`` registered in :data:`METHODS` with a typed, frozen options dataclass; an
option that is not a field of it is an error. ``spec`` is a :class:`prunus.core.spec.SparsitySpec` or a
sparsity string (``"90%"``, ``"2:4"``); ``allocation=`` picks the layer budget (``uniform``, ``erk``).

Methods (paper in each factory's docstring): static, gmp, lth, lth_reinit, set, rigl, srste, pgf,
spdf, sparse_ift, random_search. ``prunus list`` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from prunus.errors import SpecError
from prunus.training.sparsifier import Sparsifier, Target, find_targets


@dataclass(frozen=True)
class TrainingMethod:
    """A registered sparse-training method.

    Attributes:
        name: registry key (``prunus train --method``).
        factory: ``(model, optimizer, spec, *, total_steps, ...) -> Sparsifier``.
        options: the frozen dataclass of its options.
        paper: citation shown by ``prunus list``.
        rounds: how many times the run repeats training (LTH trains ``rounds + 1`` times); a
            function of the options.
        dense_backward: True when the backward pass uses dense weights (SR-STE, PGF), for FLOPs.
        needs_score: True when the factory needs a ``score_fn`` (random search).
    """

    name: str
    factory: Callable[..., Sparsifier]
    options: type
    paper: str
    rounds: Callable[[Any], int] = lambda o: 1
    dense_backward: bool = False
    needs_score: bool = False


METHODS: dict[str, TrainingMethod] = {}


def register(entry: TrainingMethod) -> None:
    """Add a method to the registry; a duplicate name raises."""
    if entry.name in METHODS:
        raise ValueError(f"training method {entry.name!r} is already registered")
    METHODS[entry.name] = entry


def get(name: str) -> TrainingMethod:
    """The method registered as ``name``; an unknown name lists the registered ones."""
    if name not in METHODS:
        raise SpecError(f"unknown training method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build(name: str, model, optimizer, spec, *, total_steps: int, **kwargs) -> Sparsifier:
    """Build the sparsifier of the method called ``name`` (strings resolved here, at the edge)."""
    return get(name).factory(model, optimizer, spec, total_steps=total_steps, **kwargs)


# The factories; importing them registers them. A factory shares its module's name on purpose:
# ``prunus.training.gmp`` is the function users call.
from prunus.training.static import static  # noqa: E402
from prunus.training.gmp import gmp  # noqa: E402
from prunus.training.dst import rigl, set_ as set  # noqa: E402,A001
from prunus.training.lth import lth, lth_reinit  # noqa: E402
from prunus.training.srste import srste  # noqa: E402
from prunus.training.pgf import pgf  # noqa: E402
from prunus.training.spdf import spdf  # noqa: E402
from prunus.training.sparse_ift import sparse_ift  # noqa: E402
from prunus.training.random_search import random_search  # noqa: E402

__all__ = ["METHODS", "TrainingMethod", "Sparsifier", "Target", "find_targets", "get", "build",
           "register", "static", "gmp", "set", "rigl", "lth", "lth_reinit", "srste", "pgf", "spdf",
           "sparse_ift", "random_search"]
