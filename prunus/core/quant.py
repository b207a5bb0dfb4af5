"""Round-to-nearest weight quantization of the kept weights, and the grid every quantizer shares.

A :class:`~prunus.core.spec.Quant` (``int8``, ``int4g64``, ``int4g128z``; see :mod:`prunus.core.spec`)
gives a weight ``W`` (out, in) one *scale* per output row and group of ``group`` consecutive inputs
(``group=None``: one per row, i.e. per output channel). Inside a group, for ``b`` bits:

    symmetric   codes q in [-2^(b-1), 2^(b-1) - 1]   scale = max|w| / (2^(b-1) - 1)   value = scale * q
    asymmetric  codes q in [0, 2^b - 1], zero z       scale = (max(w, 0) - min(w, 0)) / (2^b - 1),
                                                      z = round(-min(w, 0) / scale)   value = scale * (q - z)

The range is taken over the **kept** weights of the group only (pruned ones take no share of the
grid), and it always contains 0, so 0 is on the grid exactly. A group whose kept weights are all zero
(or that keeps nothing) gets scale 1 and codes that decode to 0. Pruned weights get the code of 0
(0, or the zero point ``z``) and, after dequantizing, the mask is applied again, so a pruned weight
is exactly 0 whatever the zero point: ``dequantize() == scale * (q - z) * keep``.

:func:`grid_values` and :func:`decode_values` are the two steps every quantizer uses (RTN here,
GPTQ / joint SparseGPT in :mod:`prunus.algorithms.sparsegpt`), so a weight a calibrated method leaves
is bit-identical to ``QuantizedWeight.dequantize()`` of the codes it returns.

Example (one row, int8 per channel: max |w| = 2.54 -> scale 0.02):
    >>> from prunus.core.spec import Quant
    >>> w = torch.tensor([[2.54, -1.26, 0.5, 0.0]])
    >>> qw = rtn(w, torch.tensor([[True, True, False, True]]), Quant(8), "demo")
    >>> qw.codes.tolist()
    [[127, -63, 0, 0]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from prunus.core.spec import Quant
from prunus.errors import SpecError


def qrange(quant: Quant) -> tuple[int, int]:
    """The smallest and largest code: (-128, 127) for int8, (0, 15) for asymmetric int4."""
    if quant.symmetric:
        return -(2 ** (quant.bits - 1)), 2 ** (quant.bits - 1) - 1
    return 0, 2 ** quant.bits - 1


def code_dtype(quant: Quant) -> torch.dtype:
    """The integer dtype codes are held in: int8 (symmetric) or uint8 (asymmetric)."""
    return torch.int8 if quant.symmetric else torch.uint8


def group_size(in_f: int, quant: Quant) -> int:
    """Inputs per scale for a layer ``in_f`` wide (the whole row when per channel)."""
    return in_f if quant.group is None else quant.group


def check_quant_shape(shape: tuple[int, ...], quant: Quant, name: str) -> None:
    """Raise a SpecError naming the layer when ``quant``'s group does not divide its input width."""
    if len(shape) != 2:
        raise SpecError(f"{name}: quantization needs a 2-D (out, in) weight, got shape {tuple(shape)}")
    in_f = int(shape[1])
    if quant.group is not None and in_f % quant.group:
        raise SpecError(f"{name}: input width {in_f} is not a multiple of the quantization group "
                        f"{quant.group} ({quant}); choose a group that divides it or exclude the layer")


def grid_params(w: Tensor, keep: Tensor, quant: Quant) -> tuple[Tensor, Optional[Tensor]]:
    """Scale (and zero point) of each row of ``w`` (out, g) over its kept weights: ``(out,)`` each.

    The zero point is returned as float32 holding an integer (None when symmetric).
    """
    w = (w.float() * keep).detach()
    lo, hi = qrange(quant)
    if quant.symmetric:
        scale = w.abs().amax(dim=1) / hi
        return half_up(torch.where(scale > 0, scale, torch.ones_like(scale))), None
    big = torch.finfo(torch.float32).max
    wmax = torch.where(keep, w, -big).amax(dim=1).clamp(min=0)
    wmin = torch.where(keep, w, big).amin(dim=1).clamp(max=0)
    scale = (wmax - wmin) / hi
    scale = half_up(torch.where(scale > 0, scale, torch.ones_like(scale)))
    zero = torch.round(-wmin / scale).clamp(lo, hi)
    return scale, zero


_HALF_TINY = float(torch.finfo(torch.float16).tiny)  # the smallest normal float16
_HALF_MAX = float(torch.finfo(torch.float16).max)


def half_up(scale: Tensor) -> Tensor:
    """``scale`` rounded *up* onto the float16 grid (float32 result), so the checkpoint stores scales
    in 2 bytes without loss, and no weight of the group falls outside the code range. Scales outside
    float16's normal range stay as they are (the checkpoint then stores float32)."""
    s16 = scale.to(torch.float16)
    below = s16.float() < scale
    s16 = torch.where(below, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    ok = (scale >= _HALF_TINY) & (scale <= _HALF_MAX) & torch.isfinite(s16)
    return torch.where(ok, s16.float(), scale)


def grid_values(w: Tensor, scale: Tensor, zero: Optional[Tensor], quant: Quant) -> Tensor:
    """Round-to-nearest codes (float tensor of integers) of ``w`` (out, k) on a ``(out,)`` or
    ``(out, k)`` scale (and zero), clamped to the code range."""
    lo, hi = qrange(quant)
    if scale.dim() == 1 and w.dim() == 2:
        scale = scale.unsqueeze(1)
        zero = None if zero is None else zero.unsqueeze(1)
    q = torch.round(w / scale)
    if zero is not None:
        q = q + zero
    return q.clamp(lo, hi)


def decode_values(codes: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
    """``scale * (q - z)`` (``scale * q`` without a zero point), float32; shapes as :func:`grid_values`."""
    if scale.dim() == 1 and codes.dim() == 2:
        scale = scale.unsqueeze(1)
        zero = None if zero is None else zero.unsqueeze(1)
    q = codes.float()
    return scale * (q - zero if zero is not None else q)


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized (out, in) weight: integer codes, per-group scales (and zeros), and the keep mask.

    Attributes:
        quant: the grid.
        codes: (out, in) int8 (symmetric) or uint8 (asymmetric); a pruned weight holds the code of 0.
        scales: (out, in // group) float32 (one column when per channel).
        zeros: (out, in // group) uint8 zero points, or None when symmetric.
        keep: (out, in) bool, True = kept.
    """

    quant: Quant
    codes: Tensor
    scales: Tensor
    zeros: Optional[Tensor]
    keep: Tensor

    @property
    def group(self) -> int:
        return group_size(int(self.codes.shape[1]), self.quant)

    def dequantize(self) -> Tensor:
        """The float32 weight: ``scale * (q - z) * keep`` (pruned weights exactly 0)."""
        g = self.group
        scale = self.scales.float().repeat_interleave(g, dim=1)
        zero = None if self.zeros is None else self.zeros.float().repeat_interleave(g, dim=1)
        return decode_values(self.codes, scale, zero) * self.keep


def from_codes(codes: Tensor, scales: Tensor, zeros: Optional[Tensor], keep: Tensor,
               quant: Quant) -> QuantizedWeight:
    """Build a :class:`QuantizedWeight` from float codes: pruned places get the code of 0."""
    keep = keep.bool()
    zero_code = torch.zeros_like(codes) if zeros is None else \
        zeros.float().repeat_interleave(group_size(int(codes.shape[1]), quant), dim=1)
    codes = torch.where(keep, codes, zero_code)
    return QuantizedWeight(quant, codes.to(code_dtype(quant)), scales.float().contiguous(),
                           None if zeros is None else zeros.to(torch.uint8), keep)


def rtn(weight: Tensor, keep: Tensor, quant: Quant, name: str) -> QuantizedWeight:
    """Round-to-nearest quantization of the kept weights of ``weight`` (out, in), group by group.

    Args:
        weight: (out, in) float weight (pruned places may hold anything; they are ignored).
        keep: (out, in) bool mask, True = kept.
        quant: the grid.
        name: layer name for errors.

    Raises:
        SpecError: the group does not divide the input width (naming the layer).
    """
    check_quant_shape(tuple(weight.shape), quant, name)
    out_f, in_f = weight.shape
    g = group_size(in_f, quant)
    w = weight.detach().float().reshape(out_f * (in_f // g), g)
    k = keep.bool().reshape(out_f * (in_f // g), g)
    scale, zero = grid_params(w, k, quant)  # (out * groups,)
    codes = grid_values(w, scale, zero, quant).reshape(out_f, in_f)
    scales = scale.reshape(out_f, in_f // g)
    zeros = None if zero is None else zero.reshape(out_f, in_f // g)
    return from_codes(codes, scales, zeros, keep, quant)


def off_grid(weight: Tensor, qw: QuantizedWeight) -> int:
    """How many entries of ``weight`` differ from ``qw.dequantize()`` (0: exactly on the grid)."""
    lo, hi = qrange(qw.quant)
    codes = qw.codes.long()
    if codes.numel() and (codes.min() < lo or codes.max() > hi):
        return int(((codes < lo) | (codes > hi)).sum())
    ref = qw.dequantize().to(device=weight.device, dtype=weight.dtype)
    return int((ref != weight.detach()).sum())
