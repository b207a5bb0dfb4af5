"""Sparse iso-FLOP transformations: Sparse Wide.

Saxena, Thangarasa et al. 2023, "Sparse-IFT: Sparse Iso-FLOP Transformations for Maximizing
Training Efficiency" (ICML 2024). A layer is widened so that, at sparsity ``s``, its sparse FLOPs
equal the dense original's; the widened network is then trained sparse (the paper's best results
use dynamic sparse training, RigL, which is the default here).

Widening needs a model builder with a width knob, so this module gives two pieces:
:func:`iso_flop_width` finds the width multiplier, :func:`sparse_ift` sparsifies the widened model.
For a hidden layer widened on both sides by ``k``, FLOPs scale by ``k**2 (1 - s)``, hence the
paper's ``k = 1 / sqrt(1 - s)``; layers widened on one side only (first, last) need the search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from torch import nn

from prunus.errors import SpecError
from prunus.core.spec import SparsitySpec, Unstructured
from prunus.core.options import build_options, option
from prunus.training.registry import TrainingMethod, WidthProblem, get, register
from prunus.training.sparsifier import Sparsifier, as_spec, option_values


def sparse_wide_factor(sparsity: float) -> float:
    """Width factor for a layer widened on both sides: ``1 / sqrt(1 - s)``."""
    if not 0.0 <= sparsity < 1.0:
        raise SpecError(f"Sparse Wide needs a sparsity in [0, 1), got {sparsity:g}")
    return 1.0 / math.sqrt(1.0 - sparsity)


def iso_flop_width(sparse_flops: Callable[[float], float], dense_flops: float, hi: float,
                   iters: int = 30) -> float:
    """The largest width multiplier ``w`` in [1, hi] with ``sparse_flops(w) <= dense_flops``.

    Args:
        sparse_flops: forward FLOPs of the widened model at multiplier ``w``, sparsity counted.
        dense_flops: forward FLOPs of the original dense model.
        hi: an upper bound (``1 / (1 - s)`` always suffices).
    """
    lo = 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sparse_flops(mid) <= dense_flops else (lo, mid)
    return lo


@dataclass(frozen=True)
class SparseIFTOptions:
    """Args:
        inner: the sparse-training method run on the widened model (``rigl``, ``set``, ``static``).
        delta_t, alpha, end: passed to RigL/SET.
    """

    inner: str = "rigl"
    delta_t: int = option(100, min=1)
    alpha: float = option(0.3, min=0, max=1)
    end: float = option(0.75, min=0, max=1)


def sparse_ift(model: nn.Module, optimizer, spec: SparsitySpec | str | float, *, total_steps: int,
               seed: int = 0, allocation: Optional[str] = None, include: Optional[Sequence[str]] = None,
               exclude: Sequence[str] = (), options: Any = None, **kwargs) -> Sparsifier:
    """Sparse Wide training (Saxena et al. 2023) of a model already widened by :func:`iso_flop_width`.

    The reference trainer builds the widened model itself (``prunus train --method sparse_ift``).

    Example:
        >>> k = sparse_wide_factor(0.75)                      # 2.0
        >>> model = build(width=k); opt = ...
        >>> sp = prunus.training.sparse_ift(model, opt, "75%", total_steps=5000)
    """
    opts = build_options(SparseIFTOptions, option_values(options, kwargs), "training method 'sparse_ift'")
    spec = as_spec(spec, allocation)
    if not isinstance(spec.pattern, Unstructured):
        raise SpecError(f"training method 'sparse_ift' supports unstructured sparsity, not {spec.pattern}")
    if opts.inner not in ("rigl", "set", "static"):
        raise SpecError(f"sparse_ift: inner method must be rigl, set or static, got {opts.inner!r}")
    entry = get(opts.inner)
    inner = {} if opts.inner == "static" else {"delta_t": opts.delta_t, "alpha": opts.alpha, "end": opts.end}
    sp = entry.factory(model, optimizer, spec, total_steps=total_steps, seed=seed, include=include,
                       exclude=exclude, options=build_options(entry.options, inner, f"sparse_ift {opts.inner}"))
    sp.method = "sparse_ift"
    return sp


def _width(problem: WidthProblem) -> float:
    """Sparse Wide: the multiplier making the widened sparse model's forward FLOPs the dense one's."""
    hi = 1.0 / (1.0 - problem.spec.sparsity)
    return round(iso_flop_width(problem.sparse_flops, problem.dense_flops, hi=hi, iters=12), 3)


register(TrainingMethod("sparse_ift", sparse_ift, SparseIFTOptions,
                        "Saxena et al. 2023, Sparse-IFT: Sparse Iso-FLOP Transformations (ICML 2024)",
                        width=_width))
