"""Score functions: pure ``(weight, stats) -> scores`` with higher meaning keep.

A criterion never sorts, selects or touches a model: :func:`prunus.core.masks.topk` turns scores into a
mask for any pattern, and the calibration runner supplies the statistics named in ``needs``.
Adding one is one file in this package::

    @criterion("wanda", needs={"input_sq_norm"}, per_row=True, paper="Sun et al. 2023")
    def wanda(weight, stats):
        return weight.abs() * stats.input_norm.unsqueeze(0)   # (out, in) * (1, in)

Every module in this package is imported on first use, so the decorator is the registration.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Iterable

from torch import Tensor

from prunus.errors import SpecError
from prunus.core.stats import STAT_NAMES, LayerStats

ScoreFn = Callable[[Tensor, LayerStats], Tensor]


@dataclass(frozen=True)
class Criterion:
    """A registered score function.

    Attributes:
        name: registry key (CLI ``--method`` value).
        fn: ``(weight (out, in), stats) -> scores (out, in)``; higher means keep.
        needs: calibration statistics the function reads (subset of ``prunus.core.stats.STAT_NAMES``).
        per_row: compare scores within each output row (Wanda) rather than across the layer.
        paper: the citation shown by ``prunus list``.
    """

    name: str
    fn: ScoreFn
    needs: frozenset[str]
    per_row: bool
    paper: str

    def __call__(self, weight: Tensor, stats: LayerStats) -> Tensor:
        return self.fn(weight, stats)


CRITERIA: dict[str, Criterion] = {}


def criterion(name: str, *, needs: Iterable[str] = (), per_row: bool = False,
              paper: str = "") -> Callable[[ScoreFn], ScoreFn]:
    """Register a score function under ``name``. A duplicate name raises."""
    needs = frozenset(needs)
    if unknown := needs - STAT_NAMES:
        raise ValueError(f"criterion {name!r} needs unknown statistics {sorted(unknown)}")

    def deco(fn: ScoreFn) -> ScoreFn:
        if name in CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered")
        CRITERIA[name] = Criterion(name, fn, needs, per_row, paper)
        return fn

    return deco


_loaded = False


def load_all() -> dict[str, Criterion]:
    """Import every module of this package once, so that all decorators have run."""
    global _loaded
    if not _loaded:
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
        _loaded = True
    return CRITERIA


def get(name: str) -> Criterion:
    """The criterion registered as ``name``; an unknown name lists the registered ones."""
    load_all()
    if name not in CRITERIA:
        raise SpecError(f"unknown criterion {name!r}; registered: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]
