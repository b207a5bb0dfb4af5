"""Layer budgets: how a model-wide sparsity is split into per-layer sparsities.

Each budget (an *allocation*) is a pure function ``(layers, sparsity, options) -> {name: sparsity}``
in its own file of this package, registered with :func:`budget` by being there. The parameter-weighted
mean of the result equals the requested sparsity (up to rounding of one weight per layer), and no
layer leaves [0, 1]. Budgets: ``uniform``, ``global`` (one |W| threshold), ``erk`` (Erdos-Renyi-Kernel),
``owl`` (outlier-weighted, calibrated); each file cites its paper.

A budget that looks at calibration statistics declares them (``needs={"input_sq_norm"}``) with an
``observe(weight, stats, options)`` function: the one-shot pipeline then runs a statistics pass of
the one calibration loop on the dense model first and hands each layer's observation to the
budget in :attr:`LayerInfo.observed`. Adding one is one file::

    @budget("half", paper="every layer at half the target")
    def half(layers, sparsity, options):
        return {l.name: sparsity / 2 for l in layers}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from torch import Tensor

from prunus.core.options import NoOptions
from prunus.core.registry import discover, lookup
from prunus.core.stats import STAT_NAMES, LayerStats


@dataclass(frozen=True)
class LayerInfo:
    """What a budget may look at for one targeted layer.

    Attributes:
        name: fully-qualified parameter owner name (``model.layers.0.mlp.up_proj``).
        shape: the weight's shape, (out, in) or (out, in, kh, kw).
        weight: the weight itself, for budgets with ``reads_weights`` (``global``).
        block: index of the decoder block the layer belongs to (``owl`` groups by it), or None.
        observed: what the budget's ``observe`` returned for this layer in the statistics pass.
    """

    name: str
    shape: tuple[int, ...]
    weight: Optional[Tensor] = None
    block: Optional[int] = None
    observed: Any = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


AllocFn = Callable[[Sequence[LayerInfo], float, Any], dict[str, float]]
ObserveFn = Callable[[Tensor, LayerStats, Any], Any]


@dataclass(frozen=True)
class Allocation:
    """A registered layer budget.

    Attributes:
        name: registry key (``--allocation``).
        fn: ``(layers, sparsity, options) -> {name: sparsity}``.
        options: frozen dataclass of its options.
        paper: citation shown by ``prunus list``.
        reads_weights: ``fn`` reads :attr:`LayerInfo.weight`.
        needs: calibration statistics ``observe`` reads (empty: no statistics pass).
        observe: ``(weight (out, in), stats, options) -> observation`` per layer, in the pass.
        patterns: ``"all"`` or ``"all but N:M"`` (N:M fixes every layer's sparsity).
    """

    name: str
    fn: AllocFn
    options: type
    paper: str
    reads_weights: bool = False
    needs: frozenset[str] = frozenset()
    observe: Optional[ObserveFn] = None

    @property
    def needs_calibration(self) -> bool:
        return bool(self.needs)


ALLOCATIONS: dict[str, Allocation] = {}


def budget(name: str, *, options: type = NoOptions, paper: str = "", reads_weights: bool = False,
           needs: Iterable[str] = (), observe: Optional[ObserveFn] = None) -> Callable[[AllocFn], AllocFn]:
    """Register a layer budget under ``name``. A duplicate name raises."""
    needs = frozenset(needs)
    if unknown := needs - STAT_NAMES:
        raise ValueError(f"budget {name!r} needs unknown statistics {sorted(unknown)}")
    if needs and observe is None:
        raise ValueError(f"budget {name!r} needs statistics but has no observe function")

    def deco(fn: AllocFn) -> AllocFn:
        if name in ALLOCATIONS:
            raise ValueError(f"budget {name!r} is already registered")
        ALLOCATIONS[name] = Allocation(name, fn, options, paper, reads_weights, needs, observe)
        return fn

    return deco


def load_all() -> dict[str, Allocation]:
    """Import every module of this package once, so that all registrations have run."""
    discover(__name__)
    return ALLOCATIONS


def get(name: str) -> Allocation:
    """The budget registered as ``name``; an unknown name lists the registered ones."""
    load_all()
    return lookup(ALLOCATIONS, name, "allocation", "choose one of")


def allocate(layers: Sequence[LayerInfo], sparsity: float, allocation: str = "uniform",
             options: object | None = None) -> dict[str, float]:
    """Per-layer sparsities for ``layers`` under the named allocation.

    Example:
        >>> allocate([LayerInfo("a", (4, 4)), LayerInfo("b", (4, 8))], 0.5)
        {'a': 0.5, 'b': 0.5}
    """
    alloc = get(allocation)
    if not layers:
        return {}
    return alloc.fn(layers, sparsity, options if options is not None else alloc.options())
