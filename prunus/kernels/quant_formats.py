"""The array formats of the quantized CPU kernels, built from a stored
:class:`~prunus.core.quant.QuantizedWeight` (its integer codes, not floats re-quantized).

Every format decodes to ``QuantizedWeight.dequantize()`` exactly: ``W[r, c] = s * (q - z)``, with
``s`` and ``z`` of the group of column ``c`` (see ``csrc/cpu_quant.cpp`` and ``csrc/cpu_csr_q8.cpp``
for the layouts):

- :func:`q8_arrays`: int8 codes (out, in); an asymmetric (uint8) grid is shifted by 128, codes and
  zero points alike, so that one signed kernel serves both.
- :func:`q4_arrays`: unsigned 4-bit codes two per byte, in blocks of 32 columns (byte ``j`` holds
  columns ``j`` and ``j + 16``); a symmetric code ``q`` in [-8, 7] is stored as ``q + 8`` with zero
  point 8.
- :func:`bitmap_q8_arrays`: one bit per weight (int64 words of 64 columns) and the kept weights'
  values ``q - z`` as int8 (an asymmetric int8 grid does not fit: :func:`bitmap_q8_serves`).
- :func:`csr_q8_arrays`: CSR of the kept weights (row pointer, ascending uint16 or int32 column
  indices) with the same int8 values ``q - z`` (:func:`csr_q8_serves`; ``csrc/cpu_csr_q8.cpp``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from prunus.core.quant import QuantizedWeight, group_size
from prunus.core.spec import Quant


def _group(qw: QuantizedWeight) -> int:
    return group_size(int(qw.codes.shape[1]), qw.quant)


def _zero_floats(qw: QuantizedWeight) -> Optional[Tensor]:
    return None if qw.zeros is None else qw.zeros.float().contiguous()


def q8_serves(quant: Quant, shape: tuple[int, int]) -> bool:
    """int8, per channel or in groups of 16 or more."""
    return quant.bits == 8 and (quant.group is None or quant.group >= 16)


def q4_serves(quant: Quant, shape: tuple[int, int]) -> bool:
    """int4 on an input width that is a multiple of 32, per channel or in groups of 32 or more."""
    return quant.bits == 4 and shape[1] % 32 == 0 and (quant.group is None or quant.group >= 32)


def bitmap_q8_serves(quant: Quant, shape: tuple[int, int]) -> bool:
    """Symmetric int8, or int4 (values ``q - z`` fit int8), per channel or in groups of 16 or more."""
    fits = quant.bits == 4 or (quant.bits == 8 and quant.symmetric)
    return fits and (quant.group is None or quant.group >= 16)


def csr_q8_serves(quant: Quant, shape: tuple[int, int]) -> bool:
    """Symmetric int8, or int4 (values ``q - z`` fit int8), per channel or in any group the grid
    allows (8 and up: the kernel finds each group's run of a row's columns, no SIMD width binds)."""
    return quant.bits == 4 or (quant.bits == 8 and quant.symmetric)


def q8_arrays(qw: QuantizedWeight) -> tuple[Tensor, Tensor, Optional[Tensor], int]:
    """(codes int8 (out, in), scales (out, G), zeros float (out, G) or None, group)."""
    codes, zeros = qw.codes, _zero_floats(qw)
    if not qw.quant.symmetric:  # uint8 codes and zero points, both shifted into int8
        codes = (codes.to(torch.int16) - 128).to(torch.int8)
        zeros = None if zeros is None else zeros - 128.0
    return codes.contiguous(), qw.scales.float().contiguous(), zeros, _group(qw)


def _nibbles(qw: QuantizedWeight, block: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Unsigned 4-bit codes two per byte in blocks of ``block`` columns (byte ``j`` of a block holds
    columns ``j`` and ``j + block / 2``), scales, zero points (8 for a symmetric grid), group."""
    out_f, in_f = qw.codes.shape
    u = qw.codes.to(torch.int16)
    if qw.quant.symmetric:
        u = u + 8
        zeros = torch.full_like(qw.scales.float(), 8.0)
    else:
        zeros = qw.zeros.float()
    blocks = u.reshape(out_f, in_f // block, 2, block // 2)
    packed = (blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).to(torch.uint8)
    return packed.reshape(out_f, in_f // 2).contiguous(), qw.scales.float().contiguous(), \
        zeros.contiguous(), _group(qw)


def _nibble_codes(packed: Tensor, in_f: int, block: int) -> Tensor:
    """Inverse of :func:`_nibbles`: unsigned codes (out, in) as int16."""
    out_f = packed.shape[0]
    b = packed.to(torch.int16).reshape(out_f, in_f // block, block // 2)
    return torch.stack([b & 0xF, b >> 4], dim=2).reshape(out_f, in_f)


def q4_arrays(qw: QuantizedWeight) -> tuple[Tensor, Tensor, Tensor, int]:
    """(packed uint8 (out, in / 2) in blocks of 32 columns, scales (out, G), zeros float (out, G),
    group)."""
    return _nibbles(qw, 32)


def q4_codes(packed: Tensor, in_f: int) -> Tensor:
    """Inverse of the packing of :func:`q4_arrays`: unsigned codes (out, in) as int16."""
    return _nibble_codes(packed, in_f, 32)


def bitmap_q8_arrays(qw: QuantizedWeight) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """(vptr int32 (out + 1), bits int64 (out, ceil(in / 64)), values int8 + 64 bytes of padding,
    scales (out, G), group)."""
    out_f, in_f = qw.codes.shape
    keep = qw.keep.bool()
    v = qw.codes.to(torch.int16)
    if qw.zeros is not None:
        v = v - qw.zeros.to(torch.int16).repeat_interleave(_group(qw), dim=1)
    words = (in_f + 63) // 64
    m = torch.zeros(out_f, words * 64, dtype=torch.bool)
    m[:, :in_f] = keep
    byte_weights = 1 << torch.arange(8, dtype=torch.int32)
    bytes_ = (m.reshape(out_f, words * 8, 8).to(torch.int32) * byte_weights).sum(-1).to(torch.uint8)
    bits = bytes_.contiguous().view(torch.int64)  # little-endian: byte 0 holds columns 0..7
    ptr = torch.zeros(out_f + 1, dtype=torch.int64)
    ptr[1:] = keep.sum(dim=1).cumsum(0)
    vals = torch.cat([v[keep].to(torch.int8), torch.zeros(64, dtype=torch.int8)])
    return ptr.to(torch.int32), bits.contiguous(), vals.contiguous(), \
        qw.scales.float().contiguous(), _group(qw)


def _values(qw: QuantizedWeight) -> Tensor:
    """``q - z`` of every weight (out, in) as int16 (``q`` where the grid has no zero points)."""
    v = qw.codes.to(torch.int16)
    if qw.zeros is not None:
        v = v - qw.zeros.to(torch.int16).repeat_interleave(_group(qw), dim=1)
    return v


def csr_q8_arrays(qw: QuantizedWeight) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """(row_ptr int32 (out + 1), col (nnz) -- uint16 stored as int16 when in <= 65536, else int32 --,
    values ``q - z`` int8 (nnz), scales (out, G), group): each row's kept weights in ascending
    column order, so that ``W[r, c] = scales[r, c // group] * value``."""
    out_f, in_f = qw.codes.shape
    keep = qw.keep.bool()
    v = _values(qw)
    kept = v[keep]
    if kept.numel() and (int(kept.min()) < -128 or int(kept.max()) > 127):
        raise ValueError(f"{qw.quant}: the values q - z do not fit int8 (csr_q8_serves)")
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: columns ascend within a row
    ptr = torch.zeros(out_f + 1, dtype=torch.int64)
    ptr[1:] = keep.sum(dim=1).cumsum(0)
    col = cols.to(torch.int32)
    if in_f <= 65536:
        col = torch.where(col >= 32768, col - 65536, col).to(torch.int16)
    return ptr.to(torch.int32), col.contiguous(), kept.to(torch.int8).contiguous(), \
        qw.scales.float().contiguous(), _group(qw)


def csr_columns(col: Tensor) -> Tensor:
    """The int64 column indices of :func:`csr_q8_arrays`' ``col`` (int16 read as uint16)."""
    c = col.to(torch.int64)
    return c & 0xFFFF if col.dtype == torch.int16 else c


def bitmap_mask(bits: Tensor, in_f: int) -> Tensor:
    """The (out, in) keep mask of :func:`bitmap_q8_arrays`' bits."""
    out_f = bits.shape[0]
    b = bits.contiguous().view(torch.uint8).to(torch.int32).reshape(out_f, -1, 1)
    m = ((b >> torch.arange(8, dtype=torch.int32)) & 1).bool().reshape(out_f, -1)
    return m[:, :in_f]


def expand_groups(t: Tensor, group: int, in_f: int) -> Tensor:
    """(out, G) per-group values -> (out, in)."""
    return t.repeat_interleave(in_f if t.shape[1] == 1 else group, dim=1)[:, :in_f]


def a8_serves(quant: Quant, shape: tuple[int, int]) -> bool:
    """The W8A8 kernels: symmetric int8 with one scale per output channel (``int8``)."""
    return quant.bits == 8 and quant.symmetric and quant.group is None


def code_sums(qw: QuantizedWeight) -> Tensor:
    """int32 (out,): the sum of each row's codes (pruned ones are 0), for the W8A8 correction."""
    return qw.codes.to(torch.int32).sum(dim=1).to(torch.int32).contiguous()


def q4a8_serves(quant: Quant, shape: tuple[int, int]) -> bool:
    """The W4A8 kernel: int4 on a width that is a multiple of 64, per channel or groups of 64+."""
    return quant.bits == 4 and shape[1] % 64 == 0 and (quant.group is None or quant.group >= 64)


def q4a8_arrays(qw: QuantizedWeight) -> tuple[Tensor, Tensor, Tensor, int]:
    """(packed uint8 (out, in / 2) in blocks of 64 columns -- byte ``j`` holds columns ``j`` and
    ``j + 32`` --, scales (out, G), zeros float (out, G), group)."""
    return _nibbles(qw, 64)


def q4a8_codes(packed: Tensor, in_f: int) -> Tensor:
    """Inverse of the packing of :func:`q4a8_arrays`: unsigned codes (out, in) as int16."""
    return _nibble_codes(packed, in_f, 64)
