"""Layer budgets: how a model-wide sparsity is split into per-layer sparsities.

Each allocation is a pure function ``(layers, sparsity, options) -> {name: sparsity}`` registered
in :data:`ALLOCATIONS`. The parameter-weighted mean of the result equals the requested sparsity (up to
rounding of one weight per layer), and no layer leaves [0, 1].

- ``uniform``: every layer at the target.
- ``global``: one magnitude threshold across all layers (Han et al. 2015; See et al. 2016). The
  budgets come from |W| even when the method that then prunes each layer is Wanda or SparseGPT:
  a global ranking of calibrated scores would need every layer's statistics at once, which the
  block-by-block runner deliberately never holds.
- ``erk``: Erdos-Renyi-Kernel (Evci et al. 2020, "Rigging the Lottery", sec. 3; Mocanu et al. 2018):
  density proportional to sum(shape) / prod(shape), layers that would exceed density 1 kept dense.
- ``owl``: Outlier-Weighted Layerwise sparsity (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity
  (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024, eq. 2-3): blocks
  with more activation outliers (Wanda scores above M times their mean) keep more weights; the
  per-block sparsities lie within ``target +- lam``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from prunus.errors import SpecError
from prunus.core.masks import n_pruned


@dataclass(frozen=True)
class LayerInfo:
    """What an allocation may look at for one targeted layer.

    Attributes:
        name: fully-qualified parameter owner name (``model.layers.0.mlp.up_proj``).
        shape: the weight's shape, (out, in) or (out, in, kh, kw).
        weight: the weight itself; only ``global`` reads it.
        block: index of the decoder block the layer belongs to (``owl`` groups by it), or None.
        outlier_ratio: OWL's layerwise outlier fraction, filled in by a calibration pass.
    """

    name: str
    shape: tuple[int, ...]
    weight: Optional[Tensor] = None
    block: Optional[int] = None
    outlier_ratio: Optional[float] = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class NoAllocOptions:
    """An allocation without options."""


@dataclass(frozen=True)
class OWLOptions:
    """OWL's two hyper-parameters (the paper's lambda and M; defaults from its LLaMA runs)."""

    lam: float = 0.08
    m: float = 5.0


AllocFn = Callable[[Sequence[LayerInfo], float, object], dict[str, float]]


@dataclass(frozen=True)
class Allocation:
    name: str
    fn: AllocFn
    options: type
    needs_outliers: bool
    paper: str


ALLOCATIONS: dict[str, Allocation] = {}


def _register(name: str, options: type = NoAllocOptions, needs_outliers: bool = False,
              paper: str = "") -> Callable[[AllocFn], AllocFn]:
    def deco(fn: AllocFn) -> AllocFn:
        ALLOCATIONS[name] = Allocation(name, fn, options, needs_outliers, paper)
        return fn

    return deco


def allocate(layers: Sequence[LayerInfo], sparsity: float, allocation: str = "uniform",
             options: object | None = None) -> dict[str, float]:
    """Per-layer sparsities for ``layers`` under the named allocation.

    Example:
        >>> allocate([LayerInfo("a", (4, 4)), LayerInfo("b", (4, 8))], 0.5)
        {'a': 0.5, 'b': 0.5}
    """
    if allocation not in ALLOCATIONS:
        raise SpecError(f"unknown allocation {allocation!r}; choose one of {', '.join(sorted(ALLOCATIONS))}")
    alloc = ALLOCATIONS[allocation]
    if not layers:
        return {}
    return alloc.fn(layers, sparsity, options if options is not None else alloc.options())


@_register("uniform", paper="every layer at the target")
def uniform(layers: Sequence[LayerInfo], sparsity: float, options: object) -> dict[str, float]:
    return {l.name: sparsity for l in layers}


@_register("global", paper="Han et al. 2015; one |W| threshold across layers")
def global_magnitude(layers: Sequence[LayerInfo], sparsity: float, options: object) -> dict[str, float]:
    """One threshold on |W| over all layers; each layer's sparsity is the share of it below."""
    for l in layers:
        if l.weight is None:
            raise ValueError(f"global allocation needs the weight of {l.name}")
    total = sum(l.numel for l in layers)
    k = n_pruned(total, sparsity)
    if k == 0:
        return {l.name: 0.0 for l in layers}
    if k == total:
        return {l.name: 1.0 for l in layers}
    # k-th smallest |w| over all layers, without concatenating every weight in memory twice.
    flat = torch.cat([l.weight.detach().abs().float().reshape(-1) for l in layers])
    thr = torch.kthvalue(flat, k).values.item()
    del flat
    below = [int((l.weight.detach().abs() < thr).sum()) for l in layers]
    ties = [int((l.weight.detach().abs() == thr).sum()) for l in layers]
    rest = k - sum(below)  # weights equal to the threshold, pruned in layer order
    out = {}
    for l, b, t in zip(layers, below, ties):
        take = min(t, max(0, rest))
        rest -= take
        out[l.name] = (b + take) / l.numel
    return out


def erk_densities(shapes: Mapping[str, tuple[int, ...]], density: float,
                  power: float = 1.0) -> dict[str, float]:
    """ERK densities (Evci et al. 2020): eps * sum(shape)/prod(shape), capped at 1, meeting the budget.

    Layers whose density would exceed 1 are made dense and the rest rescaled, repeatedly, as in the
    RigL reference implementation (``sparse_utils.get_sparsities``).
    """
    dense: set[str] = set()
    numel = {n: float(torch.tensor(s).prod()) for n, s in shapes.items()}
    while True:
        rhs, divisor, raw = 0.0, 0.0, {}
        for n, s in shapes.items():
            if n in dense:
                rhs -= numel[n] * (1 - density)
            else:
                rhs += numel[n] * density
                raw[n] = (sum(s) / numel[n]) ** power
                divisor += raw[n] * numel[n]
        if not raw:
            return {n: 1.0 for n in shapes}
        eps = rhs / divisor if divisor else 0.0
        top = max(raw.values())
        if top * eps > 1.0:
            dense |= {n for n, r in raw.items() if r == top}
            continue
        return {n: (1.0 if n in dense else max(0.0, eps * raw[n])) for n in shapes}


@_register("erk", paper="Evci et al. 2020, Rigging the Lottery (ICML), Erdos-Renyi-Kernel")
def erk(layers: Sequence[LayerInfo], sparsity: float, options: object) -> dict[str, float]:
    dens = erk_densities({l.name: tuple(l.shape) for l in layers}, 1.0 - sparsity)
    return {n: min(1.0, max(0.0, 1.0 - d)) for n, d in dens.items()}


def owl_outlier_ratio(scores: Sequence[Tensor], m: float) -> float:
    """OWL's layerwise outlier distribution: the share of scores above ``m`` times their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > flat.mean() * m).float().mean())


@_register("owl", options=OWLOptions, needs_outliers=True,
           paper="Yin et al. 2023, Outlier Weighed Layerwise Sparsity (ICML 2024)")
def owl(layers: Sequence[LayerInfo], sparsity: float, options: OWLOptions) -> dict[str, float]:
    """OWL: density_b = (1 - S) + lam * (2 (D_b - min D) / (max D - min D) - mean), per decoder block.

    ``D_b`` is the outlier ratio of block ``b`` (the layers' ``outlier_ratio``, one value per block).
    The densities are shifted so that the parameter-weighted mean sparsity is exactly ``sparsity``.
    """
    blocks: dict[int, list[LayerInfo]] = {}
    for l in layers:
        if l.outlier_ratio is None or l.block is None:
            raise ValueError(f"owl allocation needs the outlier ratio and block of {l.name}")
        blocks.setdefault(l.block, []).append(l)
    ids = sorted(blocks)
    d = torch.tensor([blocks[b][0].outlier_ratio for b in ids], dtype=torch.float64)
    size = torch.tensor([sum(l.numel for l in blocks[b]) for b in ids], dtype=torch.float64)
    spread = d.max() - d.min()
    ratio = (d - d.min()) / spread * (2 * options.lam) if spread > 0 else torch.zeros_like(d)
    dens = ratio - (ratio * size).sum() / size.sum() + (1 - sparsity)  # weighted mean density = 1 - S
    dens = dens.clamp(0.0, 1.0)
    per_block = {b: float(1 - x) for b, x in zip(ids, dens)}
    return {l.name: per_block[l.block] for l in layers}
