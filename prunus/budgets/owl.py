"""``owl``: Outlier-Weighted Layerwise sparsity (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity
(OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024, eq. 2-3).

Blocks with more activation outliers (Wanda scores above M times their mean) keep more weights; the
per-block sparsities lie within ``target +- lam``. The outliers are observed in a statistics pass of
the one calibration loop on the dense model (``needs={"input_sq_norm"}``), before anything is pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from prunus import criteria
from prunus.budgets import LayerInfo, budget
from prunus.core.stats import LayerStats


@dataclass(frozen=True)
class OWLOptions:
    """OWL's two hyper-parameters (the paper's lambda and M; defaults from its LLaMA runs)."""

    lam: float = 0.08
    m: float = 5.0


def owl_outlier_ratio(scores: Sequence[Tensor], m: float) -> float:
    """OWL's layerwise outlier distribution: the share of scores above ``m`` times their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > flat.mean() * m).float().mean())


def observe(weight: Tensor, stats: LayerStats, options: OWLOptions) -> Tensor:
    """A layer's Wanda scores |W_ij| ||X_j|| on the dense model (the paper's outlier measure)."""
    return criteria.get("wanda")(weight, stats)


def owl_block_sparsities(ratios: Sequence[float], sizes: Sequence[float], sparsity: float,
                         lam: float) -> list[float]:
    """density_b = (1 - S) + lam * (2 (D_b - min D) / (max D - min D) - mean), per block.

    ``ratios`` are the blocks' outlier ratios ``D_b`` and ``sizes`` their weight counts; the densities
    are shifted so that the parameter-weighted mean sparsity is exactly ``sparsity``.
    """
    d = torch.tensor(list(ratios), dtype=torch.float64)
    size = torch.tensor(list(sizes), dtype=torch.float64)
    spread = d.max() - d.min()
    ratio = (d - d.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(d)
    dens = ratio - (ratio * size).sum() / size.sum() + (1 - sparsity)  # weighted mean density = 1 - S
    return [float(1 - x) for x in dens.clamp(0.0, 1.0)]


@budget("owl", options=OWLOptions, needs={"input_sq_norm"}, observe=observe,
        paper="Yin et al. 2023, Outlier Weighed Layerwise Sparsity (ICML 2024)")
def owl(layers: Sequence[LayerInfo], sparsity: float, options: OWLOptions) -> dict[str, float]:
    """OWL budgets from each layer's observed Wanda scores, one sparsity per decoder block."""
    blocks: dict[int, list[LayerInfo]] = {}
    for l in layers:
        if l.observed is None or l.block is None:
            raise ValueError(f"owl allocation needs the observed scores and block of {l.name}")
        blocks.setdefault(l.block, []).append(l)
    ids = sorted(blocks)
    ratios = [owl_outlier_ratio([l.observed for l in blocks[b]], options.m) for b in ids]
    sizes = [sum(l.numel for l in blocks[b]) for b in ids]
    per_block = dict(zip(ids, owl_block_sparsities(ratios, sizes, sparsity, options.lam)))
    return {l.name: per_block[l.block] for l in layers}
