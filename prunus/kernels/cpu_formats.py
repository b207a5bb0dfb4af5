"""The array formats of the CPU kernels (padded CSR, bitmap, BSR), built from a weight and its mask.

They are what the compiled kernels of :mod:`prunus.kernels.backends.cpu_compiled` read, and the
shape checks their builders share.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from prunus.core.spec import Block, Pattern
from prunus.kernels.registry import KernelError

ROW_PAD = 8  # the C++ SpMV reads rows in steps of 8 non-zeros


def check_weight(weight: Tensor, name: str) -> None:
    if weight.dim() != 2:
        raise KernelError(f"{name}: expected a 2-D (out, in) weight, got {tuple(weight.shape)}")
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise KernelError(f"{name}: CPU kernels take a float32 CPU weight, got {weight.dtype} on "
                          f"{weight.device.type}")


def csr_arrays(weight: Tensor, mask: Tensor, pad: int = ROW_PAD) -> tuple[Tensor, Tensor, Tensor]:
    """Padded CSR of ``weight`` at ``mask``: (row_ptr int32 (out+1), col (nnz), val float32 (nnz)).

    Each row holds a multiple of ``pad`` entries; padding has value 0 and repeats the row's last
    column (cache-friendly). ``col`` is int16 holding uint16 when in_features <= 65536, else int32.
    """
    out_f, in_f = weight.shape
    m = mask.bool()
    cnt = m.sum(dim=1)  # (out,)
    padded = (cnt + pad - 1) // pad * pad
    ptr = torch.zeros(out_f + 1, dtype=torch.int64)
    ptr[1:] = padded.cumsum(0)
    total = int(ptr[-1])
    if total >= 2**31:
        raise KernelError(f"{out_f}x{in_f} weight has too many non-zeros for int32 CSR")
    rows, cols = m.nonzero(as_tuple=True)  # row-major order
    first = cnt.cumsum(0) - cnt  # index of each row's first non-zero in that order
    dst = ptr[rows] + torch.arange(rows.numel()) - first[rows]
    last = torch.zeros(out_f, dtype=torch.int64)
    if rows.numel():
        last.scatter_reduce_(0, rows, cols, reduce="amax")
    col = last.repeat_interleave(padded)
    col[dst] = cols
    val = torch.zeros(total, dtype=torch.float32)
    val[dst] = weight.detach()[rows, cols].float()
    if in_f <= 65536:
        col = torch.where(col >= 32768, col - 65536, col).to(torch.int16)
    else:
        col = col.to(torch.int32)
    return ptr.to(torch.int32), col.contiguous(), val


def bitmap_arrays(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Bitmap format: (val_ptr int32 (out+1), bits uint8 (out, ceil(in/8)), vals float32).

    Bit j of ``bits[r, g]`` keeps ``W[r, 8g + j]``; ``vals`` holds the kept weights row by row in
    column order, then 16 zeros (the AVX-512 kernel loads 16 values at a time).
    """
    out_f, in_f = weight.shape
    groups = (in_f + 7) // 8
    m = torch.zeros(out_f, groups * 8, dtype=torch.bool)
    m[:, :in_f] = mask.bool()
    weights = (1 << torch.arange(8, dtype=torch.int32))  # little bit order
    bits = (m.reshape(out_f, groups, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)
    ptr = torch.zeros(out_f + 1, dtype=torch.int64)
    ptr[1:] = mask.sum(dim=1).cumsum(0)
    if int(ptr[-1]) + 16 >= 2**31:
        raise KernelError(f"{out_f}x{in_f} weight has too many non-zeros for the bitmap kernel")
    vals = torch.cat([weight.detach().float()[mask.bool()], torch.zeros(16)])
    return ptr.to(torch.int32), bits.contiguous(), vals.contiguous()


def bsr_arrays(weight: Tensor, mask: Tensor, block: Block) -> tuple[Tensor, Tensor, Tensor]:
    """BSR of ``weight * mask`` in ``block`` tiles: (block_ptr int32, block_col int32,
    values (nblocks, R, C)); a block is stored when any of its weights is kept."""
    r, c = block.rows, block.cols
    out_f, in_f = weight.shape
    br, bc = out_f // r, in_f // c
    keep = mask.bool().reshape(br, r, bc, c).any(dim=3).any(dim=1)  # (br, bc)
    tiles = (weight.detach().float() * mask).reshape(br, r, bc, c).permute(0, 2, 1, 3)
    values = tiles[keep].contiguous()  # (nblocks, r, c) in block-row-major order
    ptr = torch.zeros(br + 1, dtype=torch.int64)
    ptr[1:] = keep.sum(dim=1).cumsum(0)
    col = keep.nonzero(as_tuple=True)[1]
    return ptr.to(torch.int32), col.to(torch.int32).contiguous(), values


def bsr_dense(ptr: Tensor, col: Tensor, val: Tensor, out_f: int, in_f: int) -> Tensor:
    r, c = val.shape[1], val.shape[2]
    rows = torch.repeat_interleave(torch.arange(out_f // r), ptr.diff().long())
    tiles = torch.zeros(out_f // r, in_f // c, r, c, dtype=val.dtype)
    tiles[rows, col.long()] = val
    return tiles.permute(0, 2, 1, 3).reshape(out_f, in_f)


def block_of(pattern: Optional[Pattern], name: str, kernel: str) -> Block:
    if not isinstance(pattern, Block):
        raise KernelError(f"{name}: kernel {kernel!r} needs a block pattern (e.g. 4x4), and this "
                          f"layer's mask is not block-structured")
    return pattern
