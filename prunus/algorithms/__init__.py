"""How a layer's weight becomes sparse: the method and refiner registries.

A *method* turns one layer's weight plus its calibration statistics into a pruned weight and a mask::

    prune(weight (out, in) float32, stats, sparsity, pattern, options, name) -> (weight, keep_mask)

Score-based methods (magnitude, random, wanda, and any new criterion file) are generated from the
criteria registry by :mod:`prunus.algorithms.oneshot`; methods that also update the remaining
weights (SparseGPT) register themselves with :func:`method`. A *refiner* (DSnoT) takes a pruned layer
and returns a better mask at the same sparsity.

Options are typed: each method or refiner names a frozen dataclass, and
:func:`prunus.core.options.build_options` turns a recipe's mapping into it at the edge, rejecting unknown keys.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from torch import Tensor

from prunus.core.options import NoOptions, build_options  # noqa: F401  (NoOptions: the default)
from prunus.errors import SpecError
from prunus.core.spec import Pattern, Unstructured, NM, Block, Channel
from prunus.core.stats import STAT_NAMES, LayerStats

ALL_PATTERNS: tuple[type, ...] = (Unstructured, NM, Block, Channel)


PruneFn = Callable[[Tensor, LayerStats, float, Pattern, Any, str], "tuple[Tensor, Tensor]"]
RefineFn = Callable[[Tensor, Tensor, Tensor, LayerStats, Pattern, Any, str], "tuple[Tensor, Tensor]"]


@dataclass(frozen=True)
class Method:
    """A registered one-shot pruning method.

    Attributes:
        name: registry key, the CLI's ``--method``.
        prune: ``(weight, stats, sparsity, pattern, options, name) -> (pruned weight, keep mask)``.
        needs: calibration statistics read (empty: no calibration data needed).
        options: frozen dataclass type of the method's options.
        patterns: pattern types supported.
        paper: citation.
        quantizes: the method quantizes the kept weights itself when given ``quant=`` (a
            :class:`~prunus.core.spec.Quant`) and then returns ``(weight, keep, QuantizedWeight)``;
            otherwise the pipeline rounds its result to nearest (:func:`prunus.core.quant.rtn`).
    """

    name: str
    prune: PruneFn
    needs: frozenset[str]
    options: type
    patterns: tuple[type, ...]
    paper: str
    quantizes: bool = False

    def check_pattern(self, pattern: Pattern) -> None:
        if not isinstance(pattern, self.patterns):
            kinds = ", ".join(p.__name__ for p in self.patterns)
            raise SpecError(f"method {self.name!r} does not support {pattern}; it supports {kinds}")


@dataclass(frozen=True)
class Refiner:
    """A registered mask refiner: ``(dense w, pruned w, mask, stats, pattern, options, name) -> (w, mask)``.

    The refined mask has the same number of kept weights per comparison group as the input mask.
    """

    name: str
    refine: RefineFn
    needs: frozenset[str]
    options: type
    patterns: tuple[type, ...]
    paper: str


METHODS: dict[str, Method] = {}
REFINERS: dict[str, Refiner] = {}


def _check_needs(name: str, needs: Iterable[str]) -> frozenset[str]:
    needs = frozenset(needs)
    if unknown := needs - STAT_NAMES:
        raise ValueError(f"{name!r} needs unknown statistics {sorted(unknown)}")
    return needs


def method(name: str, *, needs: Iterable[str] = (), options: type = NoOptions,
           patterns: tuple[type, ...] = ALL_PATTERNS, paper: str = "",
           quantizes: bool = False) -> Callable[[PruneFn], PruneFn]:
    """Register a pruning method. A duplicate name raises."""
    needs = _check_needs(name, needs)

    def deco(fn: PruneFn) -> PruneFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = Method(name, fn, needs, options, patterns, paper, quantizes)
        return fn

    return deco


def refiner(name: str, *, needs: Iterable[str] = (), options: type = NoOptions,
            patterns: tuple[type, ...] = ALL_PATTERNS, paper: str = "") -> Callable[[RefineFn], RefineFn]:
    """Register a mask refiner. A duplicate name raises."""
    needs = _check_needs(name, needs)

    def deco(fn: RefineFn) -> RefineFn:
        if name in REFINERS:
            raise ValueError(f"refiner {name!r} is already registered")
        REFINERS[name] = Refiner(name, fn, needs, options, patterns, paper)
        return fn

    return deco


_loaded = False
_PROVIDERS: list[Callable[[], None]] = []


def add_provider(fn: Callable[[], None]) -> None:
    """Run ``fn`` on every :func:`load_all`: it registers methods made from another registry
    (:mod:`prunus.algorithms.oneshot` turns criteria registered at any time into methods)."""
    _PROVIDERS.append(fn)


def load_all() -> None:
    """Import every module of this package once so that all registrations have run, then let the
    providers add methods for anything registered since (a criterion defined in a test or plugin)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
    for provide in _PROVIDERS:
        provide()


def get_method(name: str) -> Method:
    """The method registered as ``name``; unknown names list what is registered."""
    load_all()
    if name not in METHODS:
        raise SpecError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def get_refiner(name: str) -> Refiner:
    """The refiner registered as ``name``; unknown names list what is registered."""
    load_all()
    if name not in REFINERS:
        raise SpecError(f"unknown refiner {name!r}; registered: {', '.join(sorted(REFINERS))}")
    return REFINERS[name]
