"""Sparsity patterns of keep-masks: whether a mask fits a pattern, and the most structured one it fits."""

from __future__ import annotations

from torch import Tensor

from prunus.core.spec import NM, Block, Channel, Pattern, Unstructured

ALL_PATTERNS: tuple[type, ...] = (Unstructured, NM, Block, Channel)
# Block shapes that infer_pattern recognises, largest first.
BLOCK_CANDIDATES: tuple[tuple[int, int], ...] = (
    (16, 16), (8, 8), (16, 1), (1, 16), (4, 4), (8, 1), (1, 8), (2, 2), (4, 1), (1, 4),
)


def mask_satisfies(mask: Tensor, pattern: Pattern) -> bool:
    """Whether a keep-mask (out, in) fits ``pattern`` (N:M: at most N kept per group of M)."""
    out_f, in_f = mask.shape
    if isinstance(pattern, Unstructured):
        return True
    if isinstance(pattern, NM):
        return in_f % pattern.m == 0 and bool(
            (mask.reshape(out_f, -1, pattern.m).sum(-1) <= pattern.n).all())
    if isinstance(pattern, Block):
        r, c = pattern.rows, pattern.cols
        if out_f % r or in_f % c:
            return False
        cnt = mask.reshape(out_f // r, r, in_f // c, c).sum(dim=(1, 3))
        return bool(((cnt == 0) | (cnt == r * c)).all())
    if isinstance(pattern, Channel):
        cnt = mask.sum(dim=1)
        return bool(((cnt == 0) | (cnt == in_f)).all())
    return False


def infer_pattern(mask: Tensor) -> Pattern:
    """The most structured pattern a keep-mask satisfies: a block shape from
    :data:`BLOCK_CANDIDATES` (largest first), else 2:4, else unstructured.
    A fully kept or fully pruned mask is unstructured."""
    mask = mask.bool()
    if bool(mask.all()) or not bool(mask.any()):
        return Unstructured()
    for r, c in BLOCK_CANDIDATES:
        if mask_satisfies(mask, Block(r, c)):
            return Block(r, c)
    if mask_satisfies(mask, NM(2, 4)):
        return NM(2, 4)
    return Unstructured()
