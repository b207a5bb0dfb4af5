"""Score functions: pure ``(weight, stats) -> scores`` with higher meaning keep.

A criterion never sorts, selects or touches a model: :func:`prunus.core.masks.topk` turns scores into a
mask for any pattern, and the calibration runner supplies the statistics named in ``needs``.
Adding one is one file in this package::

    @criterion("wanda", needs={"input_sq_norm"}, per_row=True, paper="Sun et al. 2023")
    def wanda(weight, stats):
        return weight.abs() * stats.input_norm.unsqueeze(0)   # (out, in) * (1, in)

A criterion with knobs names a frozen options dataclass; its function then takes the built options
as a third argument (built once at the edge by :func:`prunus.core.options.build_options`)::

    @dataclass(frozen=True)
    class RIAOptions:
        a: float = 0.5

    @criterion("ria", needs={"input_sq_norm"}, per_row=True, options=RIAOptions, paper="Zhang et al. 2024")
    def ria(weight, stats, options):
        ...

Every module in this package is imported on first use, so the decorator is the registration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from torch import Tensor

from prunus.core.options import NoOptions
from prunus.core.registry import discover, lookup
from prunus.core.stats import STAT_NAMES, LayerStats

ScoreFn = Callable[..., Tensor]  # (weight, stats) -> scores, or (weight, stats, options) -> scores


@dataclass(frozen=True)
class Criterion:
    """A registered score function.

    Attributes:
        name: registry key (CLI ``--method`` value).
        fn: ``(weight (out, in), stats) -> scores (out, in)``; higher means keep.
        needs: calibration statistics the function reads (subset of ``prunus.core.stats.STAT_NAMES``).
        per_row: compare scores within each output row (Wanda) rather than across the layer.
        paper: the citation shown by ``prunus list``.
        options: frozen dataclass of the criterion's options; :class:`NoOptions` (the default) means
            ``fn`` takes ``(weight, stats)``, anything else means ``fn`` takes ``(weight, stats, options)``.
    """

    name: str
    fn: ScoreFn
    needs: frozenset[str]
    per_row: bool
    paper: str
    options: type = NoOptions

    def __call__(self, weight: Tensor, stats: LayerStats, options: Any = None) -> Tensor:
        """Scores of ``weight``; ``options`` is an instance of :attr:`options` (None: its defaults)."""
        if self.options is NoOptions:
            return self.fn(weight, stats)
        if options is None:
            options = self.options()
        elif not isinstance(options, self.options):
            raise TypeError(f"criterion {self.name!r} takes {self.options.__name__}, "
                            f"got {type(options).__name__} (build it with prunus.core.options.build_options)")
        return self.fn(weight, stats, options)


CRITERIA: dict[str, Criterion] = {}


def criterion(name: str, *, needs: Iterable[str] = (), per_row: bool = False, paper: str = "",
              options: type = NoOptions) -> Callable[[ScoreFn], ScoreFn]:
    """Register a score function under ``name``. A duplicate name raises.

    ``options``: a frozen dataclass whose instance ``fn`` receives as its third argument; the method
    generated for the criterion (:mod:`prunus.algorithms.oneshot`) takes it as its method options.
    """
    needs = frozenset(needs)
    if unknown := needs - STAT_NAMES:
        raise ValueError(f"criterion {name!r} needs unknown statistics {sorted(unknown)}")
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise ValueError(f"criterion {name!r}: options must be a dataclass type, got {options!r}")

    def deco(fn: ScoreFn) -> ScoreFn:
        if name in CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered")
        CRITERIA[name] = Criterion(name, fn, needs, per_row, paper, options)
        return fn

    return deco


def load_all() -> dict[str, Criterion]:
    """Import every module of this package once, so that all decorators have run."""
    discover(__name__)
    return CRITERIA


def get(name: str) -> Criterion:
    """The criterion registered as ``name``; an unknown name lists the registered ones."""
    load_all()
    return lookup(CRITERIA, name, "criterion")
