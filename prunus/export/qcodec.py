"""How the compressed format stores a quantized weight (encoding ``quant``, format version 3).

For a weight ``W`` (key ``k``) quantized by :mod:`prunus.core.quant` (a
:class:`~prunus.core.quant.QuantizedWeight`, kept in the (out, in) orientation of the layer)::

    k.__bits__    uint8, the keep mask packed 8 per byte (absent when every weight is kept: an
                  embedding table)
    k.__codes__   the kept weights' integer codes in row-major order: int8 (symmetric int8),
                  uint8 (asymmetric int8), or two int4 codes per byte (low nibble first; a
                  symmetric code is stored as its 4-bit two's complement)
    k.__scales__  float16 (out, in / group), one scale per row and group (float32 when a scale is
                  not exactly a float16: the quantizers round scales up onto the float16 grid,
                  :func:`prunus.core.quant.half_up`, so that happens only outside its range)
    k.__zeros__   uint8 (out, in / group) zero points (asymmetric only)

The manifest entry has ``"encoding": "quant"``, ``"quant"`` (``int4g128z``), ``"masked"`` and
``"transposed"`` (True when the module stores its weight as (in, out), like GPT-2's Conv1D). On
load the weight is ``scale * (q - z) * keep`` in float32, cast to the stored dtype: exactly the
weight the pruning pipeline left in the model.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from prunus.core.masks import pack
from prunus.core.quant import QuantizedWeight, code_dtype, from_codes, group_size, qrange
from prunus.core.spec import Quant, parse_quant

ENCODING = "quant"
BITS, CODES, SCALES, ZEROS = ".__bits__", ".__codes__", ".__scales__", ".__zeros__"


def pack_codes(codes: Tensor, quant: Quant) -> Tensor:
    """1-D codes (int8/uint8) as stored: as they are for int8, two per byte for int4."""
    codes = codes.reshape(-1).contiguous()
    if quant.bits == 8:
        return codes
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if nib.numel() % 2:
        nib = torch.cat([nib, nib.new_zeros(1)])
    return (nib[0::2] | (nib[1::2] << 4)).contiguous()


def unpack_codes(stored: Tensor, quant: Quant, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``n`` codes in the quant's code dtype."""
    if quant.bits == 8:
        if stored.numel() != n:
            raise ValueError(f"{stored.numel()} codes for {n} weights")
        return stored.to(code_dtype(quant))
    if stored.numel() != (n + 1) // 2:
        raise ValueError(f"{stored.numel()} bytes of int4 codes for {n} weights")
    b = stored.to(torch.int16)
    nib = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)[:n]
    if quant.symmetric:
        nib = (nib ^ 8) - 8  # 4-bit two's complement
    return nib.to(code_dtype(quant))


def encode_quant(qw: QuantizedWeight, masked: bool) -> dict[str, Tensor]:
    """The stored tensors of a quantized weight (suffix -> tensor)."""
    keep = qw.keep.cpu()
    codes = qw.codes.cpu()
    scales = qw.scales.cpu().float().contiguous()
    half = scales.to(torch.float16)
    parts = {CODES: pack_codes(codes[keep] if masked else codes.reshape(-1), qw.quant),
             SCALES: half if torch.equal(half.float(), scales) else scales}
    if masked:
        parts[BITS] = pack(keep)
    if qw.zeros is not None:
        parts[ZEROS] = qw.zeros.cpu().to(torch.uint8).contiguous()
    return parts


def decode_quant(quant_text: str, shape: tuple[int, int], keep: Tensor, kept: int, stored: Tensor,
                 scales: Tensor, zeros: Optional[Tensor]) -> QuantizedWeight:
    """Rebuild the :class:`QuantizedWeight` of an (out, in) weight from its stored parts.

    Raises:
        ValueError: parts that do not fit the shape, the quant or each other.
    """
    quant = parse_quant(quant_text)
    out_f, in_f = shape
    if in_f % group_size(in_f, quant):
        raise ValueError(f"width {in_f} is not a multiple of the group of {quant}")
    ng = in_f // group_size(in_f, quant)
    if tuple(scales.shape) != (out_f, ng) or (zeros is None) != quant.symmetric or \
            (zeros is not None and tuple(zeros.shape) != (out_f, ng)):
        raise ValueError(f"scales or zero points do not fit a {out_f}x{in_f} {quant} weight")
    codes = unpack_codes(stored, quant, kept)
    lo, hi = qrange(quant)
    full = torch.zeros(out_f, in_f, dtype=torch.float32)
    full.masked_scatter_(keep, codes.float())
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"codes outside the {quant} range")
    return from_codes(full, scales.float(), None if zeros is None else zeros.float(), keep, quant)


def stored_bytes(shape: tuple[int, int], kept: int, quant: Quant, masked: bool) -> int:
    """Bytes a quantized weight takes on disk (for reports and tests)."""
    out_f, in_f = shape
    ng = in_f // group_size(in_f, quant)
    codes = kept if quant.bits == 8 else (kept + 1) // 2
    bits = (int(math.prod(shape)) + 7) // 8 if masked else 0
    return codes + bits + out_f * ng * (2 + (0 if quant.symmetric else 1))  # float16 scales
