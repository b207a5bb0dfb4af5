"""How many units each layer loses, and which: uniform, global (FLAP) and coarse-to-fine (CFSP).

Counts come from a ratio per kind (``mlp@0.3``: 30% of MLP channels). A layer always keeps at least
one unit (one channel, one head per kept group). Query-head units of a GQA layer are removed in
equal numbers from every key/value group (``groups`` > 1), so each layer stays a valid GQA layer.

- ``uniform``: every layer loses ``round(ratio * units)``.
- ``global``: FLAP's adaptive structure search (An et al. 2024): each layer's scores are
  standardised (zero mean, unit variance within the layer), pooled over the layers of a kind, and the
  ``round(ratio * total)`` lowest are removed wherever they are.
- ``cfsp``: CFSP's coarse step (Wang et al. 2025, "CFSP: An Efficient Structured Pruning Framework
  for LLMs with Coarse-to-Fine Activation Information"): block importance is the angular distance
  between a block's input and output, squashed by a sigmoid of its standardised value; a block keeps
  ``(1 - ratio) * s_l / mean(s)`` of its units (deviations shrunk when that would exceed 1, as in
  CFSP's code), and the fine step (which units) uses the unit criterion within the block.

Ties in :func:`choose` go by index: among equal scores the lower index is removed first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

ALLOCATIONS = ("uniform", "global", "cfsp")


@dataclass(frozen=True)
class LayerUnits:
    """One layer's units of one kind."""

    block: int
    kind: str  # "mlp" or "heads"
    units: int
    groups: int = 1  # > 1: query-head units, removed in equal numbers from each of these groups

    @property
    def key(self) -> tuple[int, str]:
        return self.block, self.kind


def _cap(layer: LayerUnits, n: int) -> int:
    """``n`` rounded to a whole number per group and kept below the layer's size."""
    per = layer.units // layer.groups
    k = min(max(0, round(n / layer.groups)), per - 1)
    return k * layer.groups


def uniform_counts(layers: Sequence[LayerUnits], ratio: Mapping[str, float]) -> dict[tuple[int, str], int]:
    return {l.key: _cap(l, round(ratio[l.kind] * l.units / l.groups) * l.groups) for l in layers}


def global_counts(layers: Sequence[LayerUnits], ratio: Mapping[str, float],
                  scores: Mapping[tuple[int, str], Tensor]) -> dict[tuple[int, str], int]:
    """FLAP's global ranking of standardised scores, per kind."""
    out: dict[tuple[int, str], int] = {}
    for kind in sorted({l.kind for l in layers}):
        mine = [l for l in layers if l.kind == kind]
        pooled = []
        for l in mine:
            s = scores[l.key].double()
            sd = s.std() if s.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
            z = (s - s.mean()) / sd if float(sd) > 0 else torch.zeros_like(s)
            pooled += [(float(v), l.block, i) for i, v in enumerate(z.tolist())]
        pooled.sort()
        want = round(ratio[kind] * sum(l.units for l in mine))
        taken = {l.key: 0 for l in mine}
        limit = {l.key: l.units - l.groups for l in mine}
        n = 0
        for _, b, _ in pooled:
            if n >= want:
                break
            if taken[(b, kind)] < limit[(b, kind)]:
                taken[(b, kind)] += 1
                n += 1
        out.update({l.key: _cap(l, taken[l.key]) for l in mine})
    return out


def cfsp_keep(importance: Sequence[float], ratio: float, a: float = 1.0) -> list[float]:
    """CFSP's per-block fraction of units kept, from block importances (higher: keep more)."""
    imp = torch.tensor(importance, dtype=torch.float64)
    sd = float(imp.std()) if imp.numel() > 1 else 0.0
    z = (imp - imp.mean()) / sd if sd > 0 else torch.zeros_like(imp)
    s = torch.sigmoid(a * z)
    avg, top = float(s.mean()), float(s.max())
    if ratio < 1 and top / avg * (1 - ratio) >= 1 and top > avg:
        scale = (avg * (1 / (1 - ratio) - 1)) / (top - avg) / 1.05
        s = avg + (s - avg) * scale
        avg = float(s.mean())
    return [min(1.0, float(v) / avg * (1 - ratio)) for v in s]


def cfsp_counts(layers: Sequence[LayerUnits], ratio: Mapping[str, float], importance: Sequence[float],
                a: float = 1.0) -> dict[tuple[int, str], int]:
    out = {}
    for kind in sorted({l.kind for l in layers}):
        keep = cfsp_keep(importance, ratio[kind], a)
        for l in layers:
            if l.kind == kind:
                out[l.key] = _cap(l, round((1 - keep[l.block]) * l.units / l.groups) * l.groups)
    return out


def round_kept(counts: dict[tuple[int, str], int], layers: Sequence[LayerUnits], kind: str,
               multiple: int) -> dict[tuple[int, str], int]:
    """Counts adjusted so that every layer of ``kind`` keeps a multiple of ``multiple`` units (CFSP's
    dimension adjustment; an N:M or int4 group spec after the structure needs it)."""
    if multiple <= 1:
        return counts
    out = dict(counts)
    for l in layers:
        if l.kind != kind or l.groups != 1:
            continue
        kept = l.units - counts[l.key]
        r = max(multiple, int(round(kept / multiple)) * multiple)
        out[l.key] = max(0, l.units - min(r, l.units))
    return out


def choose(scores: Tensor, remove: int, groups: int = 1) -> Tensor:
    """Indices of the units kept (ascending) when the ``remove`` lowest-scoring go, in equal numbers
    from each of ``groups`` consecutive groups. Ties: the lower index goes first."""
    n = scores.numel()
    if remove % groups or n % groups:
        raise ValueError(f"cannot remove {remove} of {n} units in {groups} equal groups")
    if remove >= n:
        raise ValueError(f"cannot remove all {n} units of a layer")
    per = n // groups
    rows = scores.reshape(groups, per)
    order = torch.sort(rows, dim=1, stable=True).indices  # ascending: the first ones go
    gone = order[:, :remove // groups] + torch.arange(groups)[:, None] * per
    keep = torch.ones(n, dtype=torch.bool)
    keep[gone.reshape(-1)] = False
    return keep.nonzero().reshape(-1)


def angular(x: Tensor, y: Tensor) -> Tensor:
    """Per token, the angular distance arccos(cos(x, y)) / pi, in [0, 1]."""
    c = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).clamp(-1, 1)
    return torch.arccos(c) / math.pi


def influence(x: Tensor, y: Tensor) -> Tensor:
    """ShortGPT's block influence per token: 1 - cos(x, y) (Men et al. 2024)."""
    return 1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
