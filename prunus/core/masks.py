"""From scores to masks: exact-count, deterministic top-k for every pattern, plus mask checks.

A mask is a ``torch.bool`` tensor shaped like the weight, ``True`` where the weight is kept.
Scores mean "higher is more important". Ties are broken deterministically and stably: among equal
scores the one with the *lower* flat index is pruned first (``torch.sort(stable=True)``), so the
same scores always give the same mask, on every machine.

The number pruned in a group of ``n`` weights at ratio ``s`` is ``floor(s * n + 0.5)`` (nearest, half
up), so sparsity 0 keeps everything and sparsity 1 prunes everything.

Example (the Wanda test from torchao: weights 1..8 under 2:4):
    >>> w = torch.arange(1.0, 9.0).reshape(1, 8)
    >>> (w * topk(w.abs(), 0.5, NM(2, 4))).tolist()
    [[0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 7.0, 8.0]]
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from prunus.errors import SpecError
from prunus.core.spec import NM, Block, Channel, Pattern, Unstructured


def n_pruned(n: int, sparsity: float) -> int:
    """How many of ``n`` weights a ratio ``sparsity`` prunes: nearest integer, half up."""
    return min(n, max(0, int(math.floor(sparsity * n + 0.5 + 1e-9))))


def _prune_lowest(scores: Tensor, k: int) -> Tensor:
    """Keep-mask over the last dim of ``scores`` (..., n) that prunes the ``k`` lowest in each row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    idx = torch.sort(scores, dim=-1, stable=True).indices[..., :k]  # (..., k) lowest first
    return keep.scatter_(-1, idx, False)


def check_divisible(shape: tuple[int, ...], pattern: Pattern, name: str = "weight") -> None:
    """Raise a SpecError naming the layer if ``pattern`` cannot tile a weight of ``shape``."""
    if len(shape) != 2:
        raise SpecError(f"{name}: expected a 2-D (out, in) weight, got shape {tuple(shape)}")
    out_f, in_f = shape
    if isinstance(pattern, NM) and in_f % pattern.m:
        raise SpecError(
            f"{name}: input dimension {in_f} is not divisible by M={pattern.m} for {pattern}; "
            f"exclude this layer or choose another M"
        )
    if isinstance(pattern, Block) and (out_f % pattern.rows or in_f % pattern.cols):
        raise SpecError(
            f"{name}: shape {out_f}x{in_f} is not divisible into {pattern.rows}x{pattern.cols} blocks"
        )


def topk(scores: Tensor, sparsity: float, pattern: Pattern, *, per_row: bool = False,
         name: str = "weight") -> Tensor:
    """Keep-mask for an ``(out, in)`` score matrix: prune the lowest-scoring ``sparsity`` fraction.

    Args:
        scores: (out, in) importance; higher means keep. NaN is not allowed.
        sparsity: fraction to prune. Ignored for N:M, where it is fixed at 1 - N/M.
        pattern: the layout of zeros.
        per_row: compare within each output row (Wanda) instead of across the whole tensor.
            For blocks it compares within each row of blocks; channels ignore it.
        name: the layer's name, used in error messages.

    Returns:
        (out, in) bool tensor, True = keep.
    """
    check_divisible(tuple(scores.shape), pattern, name)
    if torch.isnan(scores).any():
        raise SpecError(f"{name}: scores contain NaN (are the weights or activations NaN?)")
    scores = scores.detach().float()
    out_f, in_f = scores.shape
    if isinstance(pattern, NM):
        groups = scores.reshape(out_f, in_f // pattern.m, pattern.m)  # (out, in/m, m)
        return _prune_lowest(groups, pattern.m - pattern.n).reshape(out_f, in_f)
    if isinstance(pattern, Unstructured):
        if per_row:
            return _prune_lowest(scores, n_pruned(in_f, sparsity))
        flat = scores.reshape(1, -1)
        return _prune_lowest(flat, n_pruned(flat.numel(), sparsity)).reshape(out_f, in_f)
    if isinstance(pattern, Block):
        r, c = pattern.rows, pattern.cols
        blocks = scores.reshape(out_f // r, r, in_f // c, c).sum(dim=(1, 3))  # (out/r, in/c)
        keep = topk(blocks, sparsity, Unstructured(), per_row=per_row, name=name)
        return keep.repeat_interleave(r, 0).repeat_interleave(c, 1)
    if isinstance(pattern, Channel):
        rows = scores.sum(dim=1).reshape(1, out_f)  # (1, out)
        keep = _prune_lowest(rows, n_pruned(out_f, sparsity)).reshape(out_f, 1)
        return keep.expand(out_f, in_f).clone()
    raise SpecError(f"unknown pattern {pattern!r}")


def sparsity_of(weight: Tensor) -> float:
    """Fraction of exact zeros in ``weight``."""
    return float((weight == 0).sum().item()) / max(1, weight.numel())


def pattern_violations(weight: Tensor, pattern: Pattern) -> int:
    """Number of groups that break ``pattern`` (0 means valid). Unstructured is always valid.

    N:M: groups of M along the input dim with more than N non-zeros. Block: blocks that are
    partly zero. Channel: rows that are partly zero.
    """
    nz = weight != 0
    out_f, in_f = weight.shape
    if isinstance(pattern, NM):
        if in_f % pattern.m:
            return out_f * math.ceil(in_f / pattern.m)
        return int((nz.reshape(out_f, -1, pattern.m).sum(-1) > pattern.n).sum().item())
    if isinstance(pattern, Block):
        r, c = pattern.rows, pattern.cols
        cnt = nz.reshape(out_f // r, r, in_f // c, c).sum(dim=(1, 3))
        return int(((cnt > 0) & (cnt < r * c)).sum().item())
    if isinstance(pattern, Channel):
        cnt = nz.sum(dim=1)
        return int(((cnt > 0) & (cnt < in_f)).sum().item())
    return 0


def pack(mask: Tensor) -> Tensor:
    """Pack a bool mask into uint8 bits (row-major, little bit order): 8x smaller."""
    bits = np.packbits(mask.detach().cpu().numpy().reshape(-1).astype(np.bool_), bitorder="little")
    return torch.from_numpy(bits)


def unpack(bits: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack`."""
    n = int(np.prod(shape))
    if bits.numel() != (n + 7) // 8:
        raise ValueError(f"packed mask has {bits.numel()} bytes, expected {(n + 7) // 8} for {shape}")
    flat = np.unpackbits(bits.cpu().numpy(), count=n, bitorder="little").astype(np.bool_)
    return torch.from_numpy(flat).reshape(shape)
