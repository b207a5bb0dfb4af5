"""Activation distributions and their inverse CDFs, as TEAL and WINA calibrate thresholds.

- :meth:`Distribution.binned` is TEAL's histogram (Liu et al. 2024, arXiv 2408.14690; reference
  ``utils/utils.py`` of FasterDecoding/TEAL): of the *signed* values, ``bins`` bins, ``bins - 2`` of
  them evenly between the ``outliers`` and ``1 - outliers`` quantiles and one bin each for the tails
  out to the minimum and the maximum. TEAL's threshold for sparsity ``s`` is ``icdf(0.5 + s / 2)``,
  which zeroes a fraction ``s`` of a zero-mean symmetric distribution.
- :meth:`Distribution.exact` is WINA's (Chen et al. 2025, arXiv 2505.19427; microsoft/wina): every
  distinct value with its count, here of the non-negative scores; the threshold is ``icdf(s)``.

``icdf`` is the reference's: the first bin whose cumulative count reaches ``q * total``, linearly
interpolated from the previous bin's centre (float32 counts, as in the references; exact below
2^24 values, and :func:`subsample` keeps calibration well below that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


def subsample(values: Tensor, limit: int, seed: int) -> Tensor:
    """``values`` flattened, or ``limit`` of them drawn uniformly (with replacement, seeded) when there
    are more; ``limit <= 0`` keeps all. A distribution's quantiles from 2^21 draws are within about
    3e-4 of the full data's."""
    flat = values.reshape(-1)
    if limit <= 0 or flat.numel() <= limit:
        return flat
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, flat.numel(), (limit,), generator=g)
    return flat[idx.to(flat.device)]


@dataclass(frozen=True)
class Distribution:
    """Bin centres (ascending) and their counts (float32)."""

    centers: Tensor
    counts: Tensor

    def __post_init__(self) -> None:  # computed once: icdf is called for many levels
        object.__setattr__(self, "_total", self.counts.sum())
        object.__setattr__(self, "_cumulative", torch.cumsum(self.counts, dim=0))

    @classmethod
    def binned(cls, values: Tensor, bins: int = 10000, outliers: float = 0.01) -> "Distribution":
        """TEAL's histogram of ``values`` (any shape, signed)."""
        acts = values.detach().reshape(-1).float().cpu()
        n = acts.numel()
        k = int(outliers * n)
        lower = torch.kthvalue(acts, k + 1).values
        upper = torch.kthvalue(acts, n - k + 1).values if k > 0 else acts.max()
        main = torch.linspace(lower, upper, bins - 1)
        edges = torch.cat([acts.min().reshape(1), main, acts.max().reshape(1)])
        counts, _ = torch.histogram(acts, bins=edges)
        return cls((edges[:-1] + edges[1:]) / 2, counts.float())

    @classmethod
    def exact(cls, values: Tensor) -> "Distribution":
        """Every distinct value of ``values`` with its count."""
        centers, counts = torch.unique(values.detach().reshape(-1).float().cpu(), sorted=True,
                                       return_counts=True)
        return cls(centers, counts.float())

    def icdf(self, q: float) -> float:
        """The value below which a fraction ``q`` of the mass lies (interpolated between centres)."""
        cumulative = self._cumulative
        target = q * self._total
        idx = int(torch.searchsorted(cumulative, target))
        if idx == 0:
            return float(self.centers[0])
        if idx >= len(self.centers):
            return float(self.centers[-1])
        lo_count, hi_count = cumulative[idx - 1], cumulative[idx]
        lo, hi = self.centers[idx - 1], self.centers[idx]
        fraction = (target - lo_count) / (hi_count - lo_count)
        return float(lo + fraction * (hi - lo))


def teal_threshold(dist: Distribution, sparsity: float) -> float:
    """TEAL's magnitude threshold for ``sparsity`` on a signed histogram (0 at sparsity 0)."""
    return dist.icdf(0.5 + sparsity / 2) if sparsity != 0.0 else 0.0


def score_threshold(dist: Optional[Distribution], sparsity: float) -> float:
    """The ``sparsity`` quantile of a distribution of non-negative scores (0 at sparsity 0)."""
    return dist.icdf(sparsity) if (sparsity != 0.0 and dist is not None) else 0.0
