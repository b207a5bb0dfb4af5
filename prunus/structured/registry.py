"""Unit criteria: pure functions scoring whole structural units (channels, heads), higher = keep.

A unit criterion sees a :class:`UnitView` of one layer's units and returns one score per unit. It
never selects or removes: :mod:`prunus.structured.allocate` turns scores into counts and kept
indices. Adding one is one file in :mod:`prunus.structured.criteria`::

    @unit_criterion("norm1", paper="...")
    def norm1(view: UnitView, options) -> Tensor:
        return view.consumer.abs().sum(dim=(0, 2))      # (units,)

``blocks`` says how the criterion scores whole blocks for ``blocks@K``: ``influence`` (ShortGPT's
block influence, from calibration), ``magnitude`` (mean squared weight) or ``random``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from prunus.core.options import NoOptions
from prunus.core.registry import discover, lookup
from prunus.core.stats import LayerStats

BLOCK_SCORES = ("influence", "magnitude", "random")


@dataclass(frozen=True)
class UnitView:
    """One layer's units, as a criterion sees them.

    Attributes:
        producers: per producing linear, its rows grouped by unit: (units, rows per unit, in).
            MLP: gate and up; attention: the query rows (and key/value rows when a unit is a KV group).
        consumer: the consuming linear's columns grouped by unit: (out, units, columns per unit).
            MLP: down_proj; attention: o_proj.
        stats: statistics of the consumer's input (its ``in`` = units x columns per unit), or None.
        seed: a per-layer seed for randomised criteria.
    """

    producers: tuple[Tensor, ...]
    consumer: Tensor
    stats: Optional[LayerStats]
    seed: int = 0

    @property
    def units(self) -> int:
        return self.consumer.shape[1]

    def per_unit(self, channel_values: Tensor) -> Tensor:
        """(in,) consumer-input values -> (units, columns per unit)."""
        return channel_values.reshape(self.units, -1)

    def need(self) -> LayerStats:
        if self.stats is None:
            raise ValueError("this criterion needs calibration statistics")
        return self.stats


ScoreFn = Callable[[UnitView, Any], Tensor]


@dataclass(frozen=True)
class UnitCriterion:
    """A registered unit criterion (``--structure-method NAME``)."""

    name: str
    score: ScoreFn
    needs: frozenset[str]
    blocks: str
    options: type
    paper: str


UNIT_CRITERIA: dict[str, UnitCriterion] = {}


def unit_criterion(name: str, *, needs: frozenset[str] | set[str] = frozenset(), blocks: str = "influence",
                   options: type = NoOptions, paper: str = "") -> Callable[[ScoreFn], ScoreFn]:
    """Register a unit criterion; a duplicate name raises."""
    if blocks not in BLOCK_SCORES:
        raise ValueError(f"blocks must be one of {BLOCK_SCORES}, got {blocks!r}")

    def deco(fn: ScoreFn) -> ScoreFn:
        if name in UNIT_CRITERIA:
            raise ValueError(f"unit criterion {name!r} is already registered")
        UNIT_CRITERIA[name] = UnitCriterion(name, fn, frozenset(needs), blocks, options, paper)
        return fn

    return deco


def load_all() -> dict[str, UnitCriterion]:
    discover("prunus.structured.criteria")
    return UNIT_CRITERIA


def get(name: str) -> UnitCriterion:
    """The unit criterion ``name``; an unknown one lists the registered ones."""
    load_all()
    return lookup(UNIT_CRITERIA, name, "structure method")


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g
