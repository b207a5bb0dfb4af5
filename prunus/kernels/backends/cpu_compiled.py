"""The compiled CPU kernels ``cpu_csr``, ``cpu_bitmap`` and ``cpu_bsr`` (C++), registered on import.

- ``cpu_csr``: CSR with uint16 column indices (int32 past 65536 inputs) and rows padded to a multiple
  of 8 non-zeros; a C++ SpMV for one token and a token-tiled SpMM for several. Any pattern.
- ``cpu_bitmap``: one bit per weight plus the kept values, expanded 8 at a time with an AVX2
  permute; reads less than dense or CSR at 50-80% sparsity. Any pattern.
- ``cpu_bsr``: blocks of R x C weights with register blocking over the block's rows. Block patterns.

The extension is built and loaded by :mod:`prunus.kernels.cpu`; where it cannot be, these kernels
report themselves unavailable and ``auto`` picks a :mod:`~prunus.kernels.backends.torch_sparse`
fallback.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from prunus.core.spec import Block, Pattern
from prunus.kernels import cpu
from prunus.kernels.base import SparseLinear
from prunus.kernels.cpu_formats import (bitmap_arrays, block_of, bsr_arrays, bsr_dense, check_weight,
                                        csr_arrays)
from prunus.kernels.patterns import ALL_PATTERNS
from prunus.kernels.registry import KernelError, KernelSpec, register_kernel


_CSR_ARGS = ("row_ptr", "col", "val", "bias")
_BITMAP_ARGS = ("val_ptr", "bits", "val", "bias")
_BSR_ARGS = ("block_ptr", "block_col", "val", "bias")


class CSRLinear(SparseLinear):
    """Compiled CSR kernel (``cpu_csr``)."""

    kernel = "cpu_csr"

    def __init__(self, weight: Tensor, mask: Tensor, bias: Optional[Tensor]) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        ptr, col, val = csr_arrays(weight, mask)
        self.hold(row_ptr=ptr, col=col, val=val)

    def matmul(self, x: Tensor) -> Tensor:
        return torch.ops.prunus_cpu.csr_linear(x, *self.cached(_CSR_ARGS), self.out_features,
                                               self.in_features)

    @property
    def nnz(self) -> int:
        return int(self.val.numel())

    def dense_weight(self) -> Tensor:
        rows = torch.repeat_interleave(torch.arange(self.out_features),
                                       self.row_ptr.diff().long())
        cols = self.col.long() & 0xFFFF if self.col.dtype == torch.int16 else self.col.long()
        w = torch.zeros(self.out_features, self.in_features)
        return w.index_put_((rows, cols), self.val, accumulate=True)


class BitmapLinear(SparseLinear):
    """Compiled bitmap kernel (``cpu_bitmap``): 1 bit per weight plus the kept values; for
    moderate sparsity (about 50-80%), where a CSR index per weight costs more than it saves."""

    kernel = "cpu_bitmap"

    def __init__(self, weight: Tensor, mask: Tensor, bias: Optional[Tensor]) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        ptr, bits, vals = bitmap_arrays(weight, mask)
        self.hold(val_ptr=ptr, bits=bits, val=vals)

    def matmul(self, x: Tensor) -> Tensor:
        return torch.ops.prunus_cpu.bitmap_linear(x, *self.cached(_BITMAP_ARGS),
                                                  self.out_features, self.in_features)

    @property
    def nnz(self) -> int:
        return int(self.val_ptr[-1])

    def dense_weight(self) -> Tensor:
        groups = self.bits.shape[1]
        shifts = torch.arange(8, dtype=torch.int32)
        m = ((self.bits.to(torch.int32).unsqueeze(-1) >> shifts) & 1).bool()
        m = m.reshape(self.out_features, groups * 8)[:, :self.in_features]
        w = torch.zeros(self.out_features, self.in_features)
        w[m] = self.val[:self.nnz]
        return w


class BSRLinear(SparseLinear):
    """Compiled block-sparse kernel (``cpu_bsr``)."""

    kernel = "cpu_bsr"

    def __init__(self, weight: Tensor, mask: Tensor, bias: Optional[Tensor], block: Block) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.block = block
        ptr, col, val = bsr_arrays(weight, mask, block)
        self.hold(block_ptr=ptr, block_col=col, val=val)

    def matmul(self, x: Tensor) -> Tensor:
        return torch.ops.prunus_cpu.bsr_linear(x, *self.cached(_BSR_ARGS), self.out_features,
                                               self.in_features)

    @property
    def nnz(self) -> int:
        return int(self.val.numel())

    def dense_weight(self) -> Tensor:
        return bsr_dense(self.block_ptr, self.block_col, self.val, self.out_features,
                          self.in_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block={self.block.rows}x{self.block.cols}"


def _build_csr(weight: Tensor, mask: Tensor, bias: Optional[Tensor], pattern: Optional[Pattern],
               name: str) -> SparseLinear:
    check_weight(weight, name)
    return CSRLinear(weight, mask, bias)


def _build_bitmap(weight: Tensor, mask: Tensor, bias: Optional[Tensor],
                  pattern: Optional[Pattern], name: str) -> SparseLinear:
    check_weight(weight, name)
    return BitmapLinear(weight, mask, bias)


def _build_bsr(weight: Tensor, mask: Tensor, bias: Optional[Tensor], pattern: Optional[Pattern],
               name: str) -> SparseLinear:
    check_weight(weight, name)
    block = block_of(pattern, name, "cpu_bsr")
    if weight.shape[0] % block.rows or weight.shape[1] % block.cols:
        raise KernelError(f"{name}: {weight.shape[0]}x{weight.shape[1]} weight is not divisible "
                          f"into {block.rows}x{block.cols} blocks")
    return BSRLinear(weight, mask, bias, block)


F32 = (torch.float32,)
register_kernel(KernelSpec("cpu_csr", "cpu", F32, ALL_PATTERNS, _build_csr, cpu.compiled_available,
                           priority=20, description="compiled CSR SpMV/SpMM (uint16 indices)",
                           unavailable_reason=cpu.unavailable_reason))
register_kernel(KernelSpec("cpu_bitmap", "cpu", F32, ALL_PATTERNS, _build_bitmap,
                           cpu.compiled_available, priority=10,
                           description="compiled bitmap + packed values (moderate sparsity)",
                           unavailable_reason=cpu.unavailable_reason))
register_kernel(KernelSpec("cpu_bsr", "cpu", F32, (Block,), _build_bsr, cpu.compiled_available,
                           priority=15, needs_pattern=True,  # below cpu_csr: slower at 1 token
                           description="compiled block-sparse (BSR) SpMM, best at 4+ tokens",
                           unavailable_reason=cpu.unavailable_reason))
