"""The input-major array formats of the kernels that skip zero inputs
(:mod:`prunus.kernels.backends.cpu_actskip`; the C++ is ``csrc/cpu_actskip.cpp``).

A layer ``y = x @ W.T + b`` with ``W`` (out, in) is stored transposed, ``Wt`` (in, ldw): row ``j``
holds input ``j``'s weights for every output, contiguous, so a zero input skips one contiguous row.
Rows are padded to ``ldw`` = ``out`` rounded up to a multiple of 64 (:func:`padded`); the padding
holds zeros and is never written to the output. The integer formats are built from the stored
:class:`~prunus.core.quant.QuantizedWeight` (its codes, not floats re-quantized) and decode to
``QuantizedWeight.dequantize()`` exactly, ``W[o, j] = s[g, o] * (q[j, o] - z[g, o])`` with
``g = j // group``; their scales and zero points are transposed too, (G, ldw):

- :func:`f32_t`: float32 (in, ldw) of ``weight * mask``.
- :func:`q8_t`: int8 codes (in, ldw); an asymmetric (uint8) grid shifted by 128, codes and zero
  points alike (as :func:`prunus.kernels.quant_formats.q8_arrays`).
- :func:`q4_t`: unsigned 4-bit codes two per byte, (in, ldw / 2): the 32 outputs of block ``b`` of
  a row are its bytes ``16 b .. 16 b + 15``, byte ``i`` holding output ``32 b + i`` in the low
  nibble and ``32 b + 16 + i`` in the high one; a symmetric code ``q`` is stored as ``q + 8`` with
  zero point 8.
- :func:`bitmap_q8_t`: the kept weights only: one bit per weight (int64 words of 64 outputs,
  (in, ldw / 64)), the values ``q - z`` as int8 in row-major order plus 64 bytes of padding, and the
  offset of each word's first value (int32, (in, ldw / 64)), so a thread starts anywhere in a row.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from prunus.core.quant import QuantizedWeight, group_size
from prunus.core.spec import Quant
from prunus.kernels.quant_formats import q8_arrays

LANES = 64  # ldw is a multiple of this


def padded(out_f: int) -> int:
    """``out_f`` rounded up to a multiple of :data:`LANES`."""
    return (out_f + LANES - 1) // LANES * LANES


def _pad_cols(t: Tensor, ldw: int, value: float = 0) -> Tensor:
    """(rows, out) -> (rows, ldw), the new columns ``value``; contiguous."""
    if t.shape[1] == ldw:
        return t.contiguous()
    out = torch.full((t.shape[0], ldw), value, dtype=t.dtype)
    out[:, : t.shape[1]] = t
    return out


def _grid_t(scales: Tensor, zeros: Optional[Tensor], ldw: int) -> tuple[Tensor, Optional[Tensor]]:
    """Per-row (out, G) scales / zero points -> (G, ldw); padding: scale 1, zero point 0."""
    s = _pad_cols(scales.float().t(), ldw, 1.0)
    return s, None if zeros is None else _pad_cols(zeros.float().t(), ldw, 0.0)


def skip_int8_serves(quant: Quant, shape: tuple[int, int]) -> bool:
    """int8, symmetric or not, per channel or in groups."""
    return quant.bits == 8


def skip_int4_serves(quant: Quant, shape: tuple[int, int]) -> bool:
    """int4, symmetric or not, per channel or in groups."""
    return quant.bits == 4


def skip_bitmap_serves(quant: Quant, shape: tuple[int, int]) -> bool:
    """Symmetric int8, or int4 (its values ``q - z`` fit int8), per channel or in groups."""
    return quant.bits == 4 or (quant.bits == 8 and quant.symmetric)


def f32_t(weight: Tensor, mask: Tensor) -> Tensor:
    """float32 (in, ldw): ``(weight * mask).T``, padded."""
    w = (weight.detach().float() * mask.to(weight.device, torch.bool)).t().cpu()
    return _pad_cols(w, padded(weight.shape[0]))


def q8_t(qw: QuantizedWeight) -> tuple[Tensor, Tensor, Optional[Tensor], int]:
    """(codes int8 (in, ldw), scales (G, ldw), zeros (G, ldw) or None, group)."""
    codes, scales, zeros, group = q8_arrays(qw)
    ldw = padded(codes.shape[0])
    s, z = _grid_t(scales, zeros, ldw)
    return _pad_cols(codes.t(), ldw), s, z, group


def _unsigned4(qw: QuantizedWeight) -> tuple[Tensor, Tensor]:
    """Codes 0..15 (out, in) int16 and zero points (out, G) float (8 for a symmetric grid)."""
    u = qw.codes.to(torch.int16)
    if qw.quant.symmetric:
        return u + 8, torch.full_like(qw.scales.float(), 8.0)
    return u, qw.zeros.float()


def q4_t(qw: QuantizedWeight) -> tuple[Tensor, Tensor, Tensor, int]:
    """(packed uint8 (in, ldw / 2), scales (G, ldw), zeros (G, ldw), group)."""
    u, zeros = _unsigned4(qw)
    in_f, ldw = u.shape[1], padded(u.shape[0])
    ut = _pad_cols(u.t(), ldw).reshape(in_f, ldw // 32, 2, 16)
    packed = (ut[:, :, 0, :] | (ut[:, :, 1, :] << 4)).to(torch.uint8).reshape(in_f, ldw // 2)
    s, z = _grid_t(qw.scales, zeros, ldw)
    return packed.contiguous(), s, z, group_size(in_f, qw.quant)


def q4_t_codes(packed: Tensor) -> Tensor:
    """Inverse of :func:`q4_t`'s packing: unsigned codes (in, ldw) int16."""
    in_f = packed.shape[0]
    b = packed.to(torch.int16).reshape(in_f, -1, 16)
    return torch.stack([b & 0xF, b >> 4], dim=2).reshape(in_f, -1)


def bitmap_q8_t(qw: QuantizedWeight) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """(word offsets int32 (in, W), bits int64 (in, W), values int8 + 64 bytes of padding,
    scales (G, ldw), group), W = ldw / 64."""
    out_f, in_f = qw.codes.shape
    ldw, group = padded(out_f), group_size(in_f, qw.quant)
    v = qw.codes.to(torch.int16)
    if qw.zeros is not None:
        v = v - qw.zeros.to(torch.int16).repeat_interleave(group, dim=1)
    keep = _pad_cols(qw.keep.bool().t(), ldw, False)  # (in, ldw)
    vt = _pad_cols(v.t(), ldw)
    words = ldw // 64
    byte_weights = 1 << torch.arange(8, dtype=torch.int32)
    bytes_ = (keep.reshape(in_f, words * 8, 8).to(torch.int32) * byte_weights).sum(-1).to(torch.uint8)
    bits = bytes_.contiguous().view(torch.int64)  # little-endian: byte 0 holds outputs 0..7
    counts = keep.reshape(in_f, words, 64).sum(-1).reshape(-1)
    wptr = torch.zeros(in_f * words, dtype=torch.int64)
    wptr[1:] = counts.cumsum(0)[:-1]
    vals = torch.cat([vt[keep].to(torch.int8), torch.zeros(64, dtype=torch.int8)])
    s, _ = _grid_t(qw.scales, None, ldw)
    return wptr.to(torch.int32).reshape(in_f, words), bits.contiguous(), vals.contiguous(), s, group


def bitmap_t_mask(bits: Tensor) -> Tensor:
    """The (in, ldw) keep mask of :func:`bitmap_q8_t`'s bits."""
    in_f = bits.shape[0]
    b = bits.contiguous().view(torch.uint8).to(torch.int32).reshape(in_f, -1, 1)
    return ((b >> torch.arange(8, dtype=torch.int32)) & 1).bool().reshape(in_f, -1)


def decode_t(codes: Tensor, scales: Tensor, zeros: Optional[Tensor], group: int, out_f: int) -> Tensor:
    """``s * (q - z)`` of input-major codes (in, ldw) -> the (out, in) float32 weight."""
    in_f = codes.shape[0]
    rep = in_f if scales.shape[0] == 1 else group
    q = codes.float()
    if zeros is not None:
        q = q - zeros.repeat_interleave(rep, dim=0)[:in_f]
    return (q * scales.repeat_interleave(rep, dim=0)[:in_f])[:, :out_f].t().contiguous()


__all__ = ["LANES", "bitmap_q8_t", "bitmap_t_mask", "decode_t", "f32_t", "padded", "q4_t",
           "q4_t_codes", "q8_t", "skip_bitmap_serves", "skip_int4_serves", "skip_int8_serves"]
