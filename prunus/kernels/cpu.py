"""CPU sparse kernels: compiled CSR and BSR (C++, built on first use) and PyTorch fallbacks.

Registered kernels:

- ``cpu_csr``: CSR with uint16 column indices (int32 past 65536 inputs) and rows padded to a multiple
  of 8 non-zeros; a C++ SpMV for one token and a token-tiled SpMM for several. Any pattern.
- ``cpu_bitmap``: one bit per weight plus the kept values, expanded 8 at a time with an AVX2
  permute; reads less than dense or CSR at 50-80% sparsity. Any pattern.
- ``cpu_bsr``: blocks of R x C weights with register blocking over the block's rows. Block patterns.
- ``torch_csr`` / ``torch_bsr``: ``torch.sparse`` CSR/BSR matmul; always available, usually slower.

The C++ source (``csrc/cpu_sparse.cpp``) is compiled by ``torch.utils.cpp_extension.load`` (needs
``ninja`` and a C++ compiler) into torch's extension cache, once per machine and source version:
``bash scripts/build_kernels.sh`` does it ahead of time. It is
built for AVX2+FMA where torch reports that the CPU has them (``-mavx2 -mfma``, not
``-march=native``), and for the baseline ISA elsewhere. If the build fails, importing still works,
the compiled kernels report themselves unavailable, and ``auto`` picks the fallback.

Set ``PRUNUS_NO_COMPILE=1`` to never build or load the extension.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from prunus.kernels import (ALL_PATTERNS, KernelError, KernelSpec, SparseLinear, register_kernel)
from prunus.core.spec import Block, Pattern

SOURCE = Path(__file__).parent / "csrc" / "cpu_sparse.cpp"
COMPILED = ("cpu_csr", "cpu_bitmap", "cpu_bsr")
ROW_PAD = 8  # the C++ SpMV reads rows in steps of 8 non-zeros

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": None, "error": None, "seconds": None, "isa": None}


# ------------------------------------------------------------------------------------------------
# Building and loading the extension


def isa() -> tuple[str, list[str]]:
    """The build variant for this CPU: ``("avx2", ["-mavx2", "-mfma", "-mpopcnt"])`` or
    ``("base", [])``."""
    cap = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64") and cap in ("AVX2", "AVX512"):
        return "avx2", ["-mavx2", "-mfma", "-mpopcnt"]
    return "base", []


def _with_ninja_on_path() -> None:
    # cpp_extension runs `ninja` from PATH; the PyPI package puts it next to the interpreter,
    # which is not on PATH when .venv/bin/python is called directly.
    dirs = [str(Path(sys.executable).parent)]
    try:
        import ninja  # type: ignore[import-not-found]

        dirs.insert(0, str(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([d for d in dirs if d not in path] + path)


def load_extension(verbose: bool = False) -> bool:
    """Build (if needed) and load the compiled kernels; True when ``torch.ops.prunus_cpu`` works.

    Tried once per process; a failure is remembered (see :func:`unavailable_reason`) and warned
    about once. Thread-safe; concurrent processes share torch's build lock.
    """
    with _lock:
        if _state["loaded"] is not None:
            return bool(_state["loaded"])
        if os.environ.get("PRUNUS_NO_COMPILE", "") not in ("", "0"):
            _state.update(loaded=False, error="disabled by PRUNUS_NO_COMPILE")
            return False
        variant, flags = isa()
        start = time.perf_counter()
        try:
            from torch.utils import cpp_extension

            _with_ninja_on_path()
            cpp_extension.load(
                name=f"prunus_cpu_{variant}",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", *flags, "-ffp-contract=fast", "-fopenmp"],
                extra_ldflags=["-fopenmp"],  # torch's own libgomp is already loaded: one pool
                is_python_module=False,
                verbose=verbose,
            )
            torch.ops.prunus_cpu.isa()
        except Exception as e:  # noqa: BLE001  (any build failure means: use the fallback)
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            msg = f"{type(e).__name__}: {lines[-1] if lines else ''}".strip()
            _state.update(loaded=False, error=msg)
            warnings.warn(f"prunus: compiled CPU kernels unavailable ({msg}); using the PyTorch "
                          f"sparse fallback", RuntimeWarning, stacklevel=2)
            return False
        _state.update(loaded=True, error=None, seconds=time.perf_counter() - start,
                      isa=str(torch.ops.prunus_cpu.isa()))
        return True


def compiled_available() -> bool:
    """Whether the compiled CPU kernels can run here (builds them on the first call)."""
    return load_extension()


def unavailable_reason() -> str:
    """Why the compiled kernels are unavailable ('' when they are loaded)."""
    load_extension()
    return str(_state["error"] or "")


def build_info() -> dict[str, object]:
    """Build status: loaded, error, seconds (build or cache load), isa (e.g. ``avx2+fma``)."""
    load_extension()
    return dict(_state)


# ------------------------------------------------------------------------------------------------
# Formats


def _check_weight(weight: Tensor, name: str) -> None:
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
    column order, then 8 zeros (the kernel always loads 8 values per group).
    """
    out_f, in_f = weight.shape
    groups = (in_f + 7) // 8
    m = torch.zeros(out_f, groups * 8, dtype=torch.bool)
    m[:, :in_f] = mask.bool()
    weights = (1 << torch.arange(8, dtype=torch.int32))  # little bit order
    bits = (m.reshape(out_f, groups, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)
    ptr = torch.zeros(out_f + 1, dtype=torch.int64)
    ptr[1:] = mask.sum(dim=1).cumsum(0)
    if int(ptr[-1]) + 8 >= 2**31:
        raise KernelError(f"{out_f}x{in_f} weight has too many non-zeros for the bitmap kernel")
    vals = torch.cat([weight.detach().float()[mask.bool()], torch.zeros(8)])
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


# ------------------------------------------------------------------------------------------------
# Modules


_CSR_ARGS = ("row_ptr", "col", "val", "bias")
_BITMAP_ARGS = ("val_ptr", "bits", "val", "bias")
_BSR_ARGS = ("block_ptr", "block_col", "val", "bias")


class CSRLinear(SparseLinear):
    """Compiled CSR kernel (``cpu_csr``)."""

    kernel = "cpu_csr"

    def __init__(self, weight: Tensor, mask: Tensor, bias: Optional[Tensor]) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        ptr, col, val = csr_arrays(weight, mask)
        self.register_buffer("row_ptr", ptr, persistent=False)
        self.register_buffer("col", col, persistent=False)
        self.register_buffer("val", val, persistent=False)

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
        self.register_buffer("val_ptr", ptr, persistent=False)
        self.register_buffer("bits", bits, persistent=False)
        self.register_buffer("val", vals, persistent=False)

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
        self.register_buffer("block_ptr", ptr, persistent=False)
        self.register_buffer("block_col", col, persistent=False)
        self.register_buffer("val", val, persistent=False)

    def matmul(self, x: Tensor) -> Tensor:
        return torch.ops.prunus_cpu.bsr_linear(x, *self.cached(_BSR_ARGS), self.out_features,
                                               self.in_features)

    @property
    def nnz(self) -> int:
        return int(self.val.numel())

    def dense_weight(self) -> Tensor:
        return _bsr_dense(self.block_ptr, self.block_col, self.val, self.out_features,
                          self.in_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block={self.block.rows}x{self.block.cols}"


def _bsr_dense(ptr: Tensor, col: Tensor, val: Tensor, out_f: int, in_f: int) -> Tensor:
    r, c = val.shape[1], val.shape[2]
    rows = torch.repeat_interleave(torch.arange(out_f // r), ptr.diff().long())
    tiles = torch.zeros(out_f // r, in_f // c, r, c, dtype=val.dtype)
    tiles[rows, col.long()] = val
    return tiles.permute(0, 2, 1, 3).reshape(out_f, in_f)


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


# ------------------------------------------------------------------------------------------------
# Registration


def _block_of(pattern: Optional[Pattern], name: str, kernel: str) -> Block:
    if not isinstance(pattern, Block):
        raise KernelError(f"{name}: kernel {kernel!r} needs a block pattern (e.g. 4x4), and this "
                          f"layer's mask is not block-structured")
    return pattern


def _build_csr(weight: Tensor, mask: Tensor, bias: Optional[Tensor], pattern: Optional[Pattern],
               name: str) -> SparseLinear:
    _check_weight(weight, name)
    return CSRLinear(weight, mask, bias)


def _build_bitmap(weight: Tensor, mask: Tensor, bias: Optional[Tensor],
                  pattern: Optional[Pattern], name: str) -> SparseLinear:
    _check_weight(weight, name)
    return BitmapLinear(weight, mask, bias)


def _build_bsr(weight: Tensor, mask: Tensor, bias: Optional[Tensor], pattern: Optional[Pattern],
               name: str) -> SparseLinear:
    _check_weight(weight, name)
    block = _block_of(pattern, name, "cpu_bsr")
    if weight.shape[0] % block.rows or weight.shape[1] % block.cols:
        raise KernelError(f"{name}: {weight.shape[0]}x{weight.shape[1]} weight is not divisible "
                          f"into {block.rows}x{block.cols} blocks")
    return BSRLinear(weight, mask, bias, block)


def _build_torch_csr(weight: Tensor, mask: Tensor, bias: Optional[Tensor],
                     pattern: Optional[Pattern], name: str) -> SparseLinear:
    _check_weight(weight, name)
    return TorchCSRLinear(weight, mask, bias)


def _build_torch_bsr(weight: Tensor, mask: Tensor, bias: Optional[Tensor],
                     pattern: Optional[Pattern], name: str) -> SparseLinear:
    _check_weight(weight, name)
    block = _block_of(pattern, name, "torch_bsr")
    if block.rows != block.cols:
        raise KernelError(f"{name}: kernel 'torch_bsr' needs square blocks (MKL), got "
                          f"{block.rows}x{block.cols}; use cpu_bsr or a CSR kernel")
    if weight.shape[0] % block.rows or weight.shape[1] % block.cols:
        raise KernelError(f"{name}: {weight.shape[0]}x{weight.shape[1]} weight is not divisible "
                          f"into {block.rows}x{block.cols} blocks")
    return TorchBSRLinear(weight, mask, bias, block)


F32 = (torch.float32,)
register_kernel(KernelSpec("cpu_csr", "cpu", F32, ALL_PATTERNS, _build_csr, compiled_available,
                           priority=20, description="compiled CSR SpMV/SpMM (uint16 indices)"))
register_kernel(KernelSpec("cpu_bitmap", "cpu", F32, ALL_PATTERNS, _build_bitmap,
                           compiled_available, priority=10,
                           description="compiled bitmap + packed values (moderate sparsity)"))
register_kernel(KernelSpec("cpu_bsr", "cpu", F32, (Block,), _build_bsr, compiled_available,
                           priority=15, needs_pattern=True,  # below cpu_csr: slower at 1 token
                           description="compiled block-sparse (BSR) SpMM, best at 4+ tokens"))
register_kernel(KernelSpec("torch_csr", "cpu", F32, ALL_PATTERNS, _build_torch_csr, priority=0,
                           description="torch.sparse CSR matmul (fallback)"))
register_kernel(KernelSpec("torch_bsr", "cpu", F32, (Block,), _build_torch_bsr, priority=1,
                           needs_pattern=True,
                           accepts=lambda shape, p: isinstance(p, Block) and p.rows == p.cols,
                           description="torch.sparse BSR matmul, square blocks (fallback)"))


def main(argv: Optional[list[str]] = None) -> int:
    """Build the extension now and say how it went; 1 if it cannot (``scripts/build_kernels.sh``)."""
    argv = sys.argv[1:] if argv is None else argv
    ok = load_extension(verbose="-v" in argv or "--verbose" in argv)
    info = dict(_state)
    if ok:
        print(f"prunus: compiled CPU kernels ready ({info['isa']}, {info['seconds']:.1f} s)")
        return 0
    print(f"prunus: compiled CPU kernels unavailable: {info['error']}", file=sys.stderr)
    return 1

