"""Per-layer calibration statistics: what the hooks accumulate, and the dataclass criteria read.

A criterion or algorithm declares the statistics it ``needs`` (a set of field names below); the
calibration runner collects exactly those, so magnitude pruning costs no X^T X.

Shapes, for a linear layer with weight (out, in) and calibration inputs X of shape (tokens, in):
    input_sq_norm  (in,)     sum_t X[t, j]^2           Wanda's ||X_j||_2^2
    input_sum      (in,)     sum_t X[t, j]             DSnoT's E[X_j] * tokens
    hessian        (in, in)  sum_t X[t]^T X[t]          SparseGPT's H / 2 (unscaled)
    cross          (in, in)  sum_t D[t]^T X[t]          D: the same layer's input in the *dense*
                                                         model on the same tokens (asymmetric
                                                         calibration; costs a dense forward per block)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

STAT_NAMES = frozenset({"input_sq_norm", "input_sum", "hessian", "cross"})
DENSE_STATS = frozenset({"cross"})  # statistics that need the dense model's inputs beside the pruned ones


@dataclass
class LayerStats:
    """Statistics of one linear layer's inputs over the calibration tokens.

    Attributes:
        tokens: number of input rows (tokens) accumulated.
        input_sq_norm: (in,) sum over tokens of x_j^2, or None if not collected.
        input_sum: (in,) sum over tokens of x_j, or None.
        hessian: (in, in) sum over tokens of x x^T (float32, or float64 when asked), or None.
        cross: (in, in) sum over tokens of d x^T, d the dense model's input on the same token.
        seed: a per-layer seed for randomised criteria, derived from the run's seed and the name.
    """

    tokens: int = 0
    input_sq_norm: Optional[Tensor] = None
    input_sum: Optional[Tensor] = None
    hessian: Optional[Tensor] = None
    cross: Optional[Tensor] = None
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, x: Tensor, needs: frozenset[str], dense: Optional[Tensor] = None) -> None:
        """Accumulate a batch of inputs ``x`` (..., in) into the requested statistics.

        ``dense`` is the dense model's input on the same tokens, shaped like ``x``; ``cross`` needs it.
        """
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.tokens += x.shape[0]
        if "input_sq_norm" in needs:
            s = torch.linalg.vector_norm(x, dim=0).pow_(2)  # no (tokens, in) temporary
            self.input_sq_norm = s if self.input_sq_norm is None else self.input_sq_norm + s
        if "input_sum" in needs:
            s = x.sum(0)
            self.input_sum = s if self.input_sum is None else self.input_sum + s
        if "hessian" in needs:
            h = x.t() @ x  # (in, in)
            self.hessian = h if self.hessian is None else self.hessian.add_(h)
        if "cross" in needs:
            if dense is None or dense.numel() != x.numel():
                raise ValueError("cross needs the dense model's inputs on the same tokens")
            c = dense.detach().reshape(-1, x.shape[1]).float().t() @ x  # (in, in)
            self.cross = c if self.cross is None else self.cross.add_(c)

    @property
    def input_norm(self) -> Tensor:
        """(in,) ||X_j||_2 over the calibration tokens."""
        if self.input_sq_norm is None:
            raise ValueError("input_sq_norm was not collected")
        return self.input_sq_norm.sqrt()

    @property
    def input_mean(self) -> Tensor:
        """(in,) E[X_j] over the calibration tokens."""
        if self.input_sum is None:
            raise ValueError("input_sum was not collected")
        return self.input_sum / max(1, self.tokens)


def layer_seed(seed: int, name: str) -> int:
    """A stable per-layer seed: the same (seed, name) gives the same number in every process."""
    h = 1469598103934665603
    for ch in f"{seed}:{name}".encode():
        h = ((h ^ ch) * 1099511628211) & 0xFFFFFFFFFFFF
    return h


def weight_only_stats(name: str, seed: int) -> LayerStats:
    """Stats for criteria that need no calibration data (magnitude, random)."""
    return LayerStats(seed=layer_seed(seed, name))


def as_generator(stats: LayerStats, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(stats.seed)
    return g
