"""The PyTorch fallback kernels ``torch_csr`` and ``torch_bsr`` (``torch.sparse``), registered on import.

Always available (no build needed), usually slower than the compiled kernels.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from prunus.core.spec import Block, Pattern
from prunus.kernels.base import SparseLinear
from prunus.kernels.cpu_formats import block_of, check_weight
from prunus.kernels.patterns import ALL_PATTERNS
from prunus.kernels.registry import KernelError, KernelSpec, register_kernel


class TorchCSRLinear(SparseLinear):
    """PyTorch fallback (``torch_csr``): ``torch.sparse`` CSR matmul, no build needed."""

    kernel = "torch_csr"

    def __init__(self, weight: Tensor, mask: Tensor, bias: Optional[Tensor]) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight_sparse", self._to_sparse(weight.detach() * mask),
                             persistent=False)

    def _to_sparse(self, masked: Tensor) -> Tensor:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return masked.to_sparse_csr()

    def matmul(self, x: Tensor) -> Tensor:
        y = torch.sparse.mm(self.weight_sparse, x.t()).t()  # (out, N) -> (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.contiguous()

    @property
    def nnz(self) -> int:
        return int(self.weight_sparse.values().numel())

    def dense_weight(self) -> Tensor:
        return self.weight_sparse.to_dense()


class TorchBSRLinear(TorchCSRLinear):
    """PyTorch fallback (``torch_bsr``): ``torch.sparse`` BSR matmul in ``block`` tiles."""

    kernel = "torch_bsr"

    def __init__(self, weight: Tensor, mask: Tensor, bias: Optional[Tensor], block: Block) -> None:
        self.block = block
        super().__init__(weight, mask, bias)

    def _to_sparse(self, masked: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return masked.to_sparse_bsr((self.block.rows, self.block.cols))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block={self.block.rows}x{self.block.cols}"


def _build_torch_csr(weight: Tensor, mask: Tensor, bias: Optional[Tensor],
                     pattern: Optional[Pattern], name: str) -> SparseLinear:
    check_weight(weight, name)
    return TorchCSRLinear(weight, mask, bias)


def _build_torch_bsr(weight: Tensor, mask: Tensor, bias: Optional[Tensor],
                     pattern: Optional[Pattern], name: str) -> SparseLinear:
    check_weight(weight, name)
    block = block_of(pattern, name, "torch_bsr")
    if block.rows != block.cols:
        raise KernelError(f"{name}: kernel 'torch_bsr' needs square blocks (MKL), got "
                          f"{block.rows}x{block.cols}; use cpu_bsr or a CSR kernel")
    if weight.shape[0] % block.rows or weight.shape[1] % block.cols:
        raise KernelError(f"{name}: {weight.shape[0]}x{weight.shape[1]} weight is not divisible "
                          f"into {block.rows}x{block.cols} blocks")
    return TorchBSRLinear(weight, mask, bias, block)


F32 = (torch.float32,)
register_kernel(KernelSpec("torch_csr", "cpu", F32, ALL_PATTERNS, _build_torch_csr, priority=0,
                           description="torch.sparse CSR matmul (fallback)"))
register_kernel(KernelSpec("torch_bsr", "cpu", F32, (Block,), _build_torch_bsr, priority=1,
                           needs_pattern=True,
                           accepts=lambda shape, p: isinstance(p, Block) and p.rows == p.cols,
                           description="torch.sparse BSR matmul, square blocks (fallback)"))
