"""Sparse training: keep your own loop, add three lines.

    sparsifier = prunus.training.rigl(model, optimizer, "90%", total_steps=10_000)
    ...
    loss.backward(); optimizer.step(); sparsifier.step()

Every method is a factory ``(model, optimizer, spec, *, total_steps, seed, include, exclude,
**options) -> Sparsifier``, one file in :mod:`prunus.training.methods`, registered in :data:`METHODS`
(:mod:`prunus.training.registry`) with a typed, frozen options dataclass; an
option that is not a field of it is an error. ``spec`` is a :class:`prunus.core.spec.SparsitySpec` or a
sparsity string (``"90%"``, ``"2:4"``); ``allocation=`` picks the layer budget (``uniform``, ``erk``).

Methods (paper in each factory's docstring): static, gmp, lth, lth_reinit, set, rigl, srste, pgf,
spdf, sparse_ift, random_search. ``prunus list`` prints them.
"""

from __future__ import annotations

from typing import Any

from prunus.training.registry import METHODS, TrainingMethod, build, get, load_all, register, unregister
from prunus.training.sparsifier import Sparsifier, Target, find_targets

load_all()  # every module of prunus.training.methods registers its factories


def __getattr__(name: str) -> Any:
    """``prunus.training.rigl`` and friends: the factory registered under that name."""
    if name in METHODS:
        return METHODS[name].factory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "TrainingMethod", "Sparsifier", "Target", "find_targets", "get", "build",
           "register", "unregister", "static", "gmp", "set", "rigl", "lth", "lth_reinit", "srste", "pgf",
           "spdf", "sparse_ift", "random_search"]
