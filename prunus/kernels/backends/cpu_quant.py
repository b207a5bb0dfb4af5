"""Kernels for weights stored quantized (``50%+int8``, ``2:4+int4``, ``int8``...), registered on import.

They compute with the stored integer codes (:func:`prunus.export.load_quantized`), weight-only:
activations stay float32 and every weight decodes to exactly ``QuantizedWeight.dequantize()``.

- ``cpu_int8``: dense int8 codes, per channel or per group (compiled; AVX-512 where built for it).
  Reads a quarter of the bytes of float32; pruned weights are code 0, so it serves any mask.
- ``cpu_int4``: dense int4 codes, two per byte (compiled). An eighth of float32's bytes.
- ``cpu_bitmap_int8``: one bit per weight plus the kept weights as int8 (compiled, AVX-512 VBMI2
  byte expand): at 50% or 2:4, 0.625 bytes per weight against int8's 1. Symmetric int8 and int4.
- ``cpu_csr_int8``: CSR of the kept weights (uint16 column indices) with int8 values: 3 bytes per
  kept weight plus 4 per row, fewer than bitmap + int8 (1/8 byte per weight + 1 per kept one) only
  above ~94% sparsity. Symmetric int8 and int4, per channel or in groups (of 8 or more).
- ``cpu_int8_a8`` / ``cpu_bitmap_int8_a8``: W8A8, the activation rounded to int8 as well (one
  scale per token) and the products summed in int32 by AVX-512 VNNI's vpdpbusd, 64 weights per
  instruction. Not exact (``exact=False``): a plan uses them only when asked
  (``prunus export --act-int8``), and perplexity must be measured with them in place.
- ``cpu_int4_a8``: W4A8, int4 codes (groups of 64 or more) against the int8 activation.
- ``torch_int``: the pure-PyTorch fallback: it keeps the int8 codes (a quarter of the memory of
  float32) and decodes them at each call. Always available, slower than dense float32.

From 16 tokens (prefill) the compiled kernels decode the weight into a float32 scratch matrix and
call the dense product, so prefill runs at the dense path's speed plus the decoding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from prunus.core.quant import QuantizedWeight
from prunus.core.spec import Pattern, Quant
from prunus.kernels import cpu
from prunus.kernels.base import SparseLinear
from prunus.kernels.cpu_formats import check_weight
from prunus.kernels.patterns import ALL_PATTERNS
from prunus.kernels.quant_formats import (a8_serves, bitmap_mask, bitmap_q8_arrays,
                                          bitmap_q8_serves, code_sums, csr_columns, csr_q8_arrays,
                                          csr_q8_serves, expand_groups, q4_arrays,
                                          q4_codes, q4_serves, q4a8_arrays, q4a8_codes, q4a8_serves,
                                          q8_arrays, q8_serves)
from prunus.kernels.registry import KernelError, KernelSpec, register_kernel


def _decode(codes: Tensor, zeros: Optional[Tensor], scales: Tensor, group: int, in_f: int) -> Tensor:
    """``(q - z) * s`` per group: the float weight of a kernel's integer arrays."""
    q = codes.float()
    if zeros is not None:
        q = q - expand_groups(zeros, group, in_f)
    return q * expand_groups(scales, group, in_f)


class Int8Linear(SparseLinear):
    """Dense int8 codes (``cpu_int8``)."""

    kernel = "cpu_int8"

    def __init__(self, qw: QuantizedWeight, bias: Optional[Tensor]) -> None:
        super().__init__(qw.codes.shape[1], qw.codes.shape[0], bias)
        codes, scales, zeros, self.group = q8_arrays(qw)
        self.hold(codes=codes, scales=scales, zeros=zeros)

    def matmul(self, x: Tensor) -> Tensor:
        codes, scales, zeros, bias = self.cached(("codes", "scales", "zeros", "bias"))
        return torch.ops.prunus_cpu.q8_linear(x, codes, scales, zeros, bias, self.group)

    @property
    def nnz(self) -> int:
        return int(self.codes.numel())

    def dense_weight(self) -> Tensor:
        return _decode(self.codes, self.zeros, self.scales, self.group, self.in_features)


class Int4Linear(SparseLinear):
    """Dense int4 codes, two per byte (``cpu_int4``)."""

    kernel = "cpu_int4"
    pack = staticmethod(q4_arrays)  # the packing its op reads, and its inverse
    unpack = staticmethod(q4_codes)

    def __init__(self, qw: QuantizedWeight, bias: Optional[Tensor]) -> None:
        super().__init__(qw.codes.shape[1], qw.codes.shape[0], bias)
        packed, scales, zeros, self.group = self.pack(qw)
        self.hold(packed=packed, scales=scales, zeros=zeros)

    def matmul(self, x: Tensor) -> Tensor:
        packed, scales, zeros, bias = self.cached(("packed", "scales", "zeros", "bias"))
        return torch.ops.prunus_cpu.q4_linear(x, packed, scales, zeros, bias, self.group,
                                              self.in_features)

    @property
    def nnz(self) -> int:
        return int(self.packed.numel() * 2)

    def dense_weight(self) -> Tensor:
        return _decode(self.unpack(self.packed, self.in_features), self.zeros, self.scales,
                       self.group, self.in_features)


class BitmapInt8Linear(SparseLinear):
    """Bitmap of the kept weights plus their int8 values (``cpu_bitmap_int8``)."""

    kernel = "cpu_bitmap_int8"

    def __init__(self, qw: QuantizedWeight, bias: Optional[Tensor]) -> None:
        super().__init__(qw.codes.shape[1], qw.codes.shape[0], bias)
        ptr, bits, vals, scales, self.group = bitmap_q8_arrays(qw)
        self.hold(val_ptr=ptr, bits=bits, val=vals, scales=scales)

    def matmul(self, x: Tensor) -> Tensor:
        ptr, bits, val, scales, bias = self.cached(("val_ptr", "bits", "val", "scales", "bias"))
        return torch.ops.prunus_cpu.bitmap_q8_linear(x, ptr, bits, val, scales, bias, self.group,
                                                     self.in_features)

    @property
    def nnz(self) -> int:
        return int(self.val_ptr[-1])

    def dense_weight(self) -> Tensor:
        m = bitmap_mask(self.bits, self.in_features)
        w = torch.zeros(self.out_features, self.in_features)
        w[m] = self.val[: self.nnz].float()
        return w * expand_groups(self.scales, self.group, self.in_features)


class CsrInt8Linear(SparseLinear):
    """CSR of the kept weights with their int8 values (``cpu_csr_int8``)."""

    kernel = "cpu_csr_int8"

    def __init__(self, qw: QuantizedWeight, bias: Optional[Tensor]) -> None:
        super().__init__(qw.codes.shape[1], qw.codes.shape[0], bias)
        ptr, col, vals, scales, self.group = csr_q8_arrays(qw)
        self.hold(row_ptr=ptr, col=col, val=vals, scales=scales)

    def matmul(self, x: Tensor) -> Tensor:
        """(N, in) -> (N, out) by ``prunus_cpu::csr_q8_linear``."""
        ptr, col, val, scales, bias = self.cached(("row_ptr", "col", "val", "scales", "bias"))
        return torch.ops.prunus_cpu.csr_q8_linear(x, ptr, col, val, scales, bias, self.group,
                                                  self.in_features)

    @property
    def nnz(self) -> int:
        """The kept weights (no padding)."""
        return int(self.row_ptr[-1])

    def dense_weight(self) -> Tensor:
        """The decoded float32 (out, in) weight: ``scale * value`` at each kept place, else 0."""
        rows = torch.repeat_interleave(torch.arange(self.out_features),
                                       torch.diff(self.row_ptr.to(torch.int64)))
        w = torch.zeros(self.out_features, self.in_features)
        w[rows, csr_columns(self.col)] = self.val.float()
        return w * expand_groups(self.scales, self.group, self.in_features)


class TorchIntLinear(SparseLinear):
    """Pure-PyTorch fallback (``torch_int``): int8-held codes, decoded at every call."""

    kernel = "torch_int"

    def __init__(self, qw: QuantizedWeight, bias: Optional[Tensor]) -> None:
        super().__init__(qw.codes.shape[1], qw.codes.shape[0], bias)
        codes, scales, zeros, self.group = q8_arrays(qw) if qw.quant.bits == 8 else \
            ((qw.codes.to(torch.int16) - (0 if qw.quant.symmetric else 8)).to(torch.int8),
             qw.scales.float(), None if qw.zeros is None else qw.zeros.float() - 8.0, qw.group)
        self.hold(codes=codes.contiguous(), scales=scales.contiguous(),
                  zeros=None if zeros is None else zeros.contiguous())

    def dense_weight(self) -> Tensor:
        return _decode(self.codes, self.zeros, self.scales, self.group, self.in_features)

    def matmul(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    @property
    def nnz(self) -> int:
        return int(self.codes.numel())


def _builder(cls: type, serves):  # type: ignore[no-untyped-def]
    def build(weight: Tensor, mask: Tensor, bias: Optional[Tensor], pattern: Optional[Pattern],
              name: str, *, qweight: Optional[QuantizedWeight] = None) -> SparseLinear:
        check_weight(weight, name)
        if qweight is None:
            raise KernelError(f"{name}: kernel {cls.kernel!r} needs the layer's stored quantized "
                              f"weight")
        if not serves(qweight.quant, tuple(weight.shape)):
            raise KernelError(f"{name}: kernel {cls.kernel!r} cannot serve {qweight.quant} on a "
                              f"{weight.shape[0]}x{weight.shape[1]} weight")
        return cls(qweight, bias)
    return build


def _any(quant: Quant, shape: tuple[int, int]) -> bool:
    return True


F32 = (torch.float32,)
for _name, _cls, _serves, _prio, _avail, _desc in (
        ("cpu_int8", Int8Linear, q8_serves, 30, cpu.compiled_available,
         "compiled int8 weights (per channel or group), float32 activations"),
        ("cpu_int4", Int4Linear, q4_serves, 32, cpu.compiled_available,
         "compiled int4 weights (groups), float32 activations"),
        ("cpu_bitmap_int8", BitmapInt8Linear, bitmap_q8_serves, 31, cpu.compiled_available,
         "compiled bitmap + int8 values (sparse and quantized)"),
        # below cpu_bitmap_int8; ties cpu_int8, registered after it, so auto keeps cpu_int8 first
        ("cpu_csr_int8", CsrInt8Linear, csr_q8_serves, 30, cpu.compiled_available,
         "compiled CSR + int8 values (high sparsity)"),
        ("torch_int", TorchIntLinear, _any, 1, lambda: True,
         "PyTorch fallback: integer codes decoded at each call")):
    register_kernel(KernelSpec(_name, "cpu", F32, ALL_PATTERNS, _builder(_cls, _serves), _avail,
                               priority=_prio, description=_desc, quant=_serves,
                               unavailable_reason=cpu.unavailable_reason))


def _vnni() -> bool:
    return cpu.compiled_available() and bool(torch.ops.prunus_cpu.vnni())


def _vnni_reason() -> str:
    return cpu.unavailable_reason() or "the build has no AVX-512 VNNI (the CPU lacks it)"


class Int8A8Linear(Int8Linear):
    """W8A8 (``cpu_int8_a8``): int8 codes and an int8 activation (one scale per token), summed in
    int32 with vpdpbusd. Approximate: the activation's rounding changes the result."""

    kernel = "cpu_int8_a8"

    def __init__(self, qw: QuantizedWeight, bias: Optional[Tensor]) -> None:
        super().__init__(qw, bias)
        self.hold(scale_rows=self.scales.reshape(-1).contiguous(), wsum=code_sums(qw))

    def matmul(self, x: Tensor) -> Tensor:
        codes, scales, wsum, bias = self.cached(("codes", "scale_rows", "wsum", "bias"))
        return torch.ops.prunus_cpu.q8a8_linear(x, codes, scales, wsum, bias)


class BitmapInt8A8Linear(BitmapInt8Linear):
    """W8A8 on the bitmap format (``cpu_bitmap_int8_a8``): expanded codes into vpdpbusd."""

    kernel = "cpu_bitmap_int8_a8"

    def __init__(self, qw: QuantizedWeight, bias: Optional[Tensor]) -> None:
        super().__init__(qw, bias)
        self.hold(scale_rows=self.scales.reshape(-1).contiguous(), wsum=code_sums(qw))

    def matmul(self, x: Tensor) -> Tensor:
        ptr, bits, val, scales, wsum, bias = self.cached(("val_ptr", "bits", "val", "scale_rows",
                                                          "wsum", "bias"))
        return torch.ops.prunus_cpu.bitmap_q8a8_linear(x, ptr, bits, val, scales, wsum, bias,
                                                       self.in_features)


class Int4A8Linear(Int4Linear):
    """W4A8 (``cpu_int4_a8``): int4 codes and an int8 activation (one scale per token)."""

    kernel = "cpu_int4_a8"
    pack = staticmethod(q4a8_arrays)  # blocks of 64 columns, for vpdpbusd
    unpack = staticmethod(q4a8_codes)

    def matmul(self, x: Tensor) -> Tensor:
        packed, scales, zeros, bias = self.cached(("packed", "scales", "zeros", "bias"))
        return torch.ops.prunus_cpu.q4a8_linear(x, packed, scales, zeros, bias, self.group,
                                                self.in_features)


for _name, _cls, _serves, _prio, _desc in (
        ("cpu_int8_a8", Int8A8Linear, a8_serves, 40,
         "compiled W8A8: int8 weights and activations (VNNI)"),
        ("cpu_bitmap_int8_a8", BitmapInt8A8Linear, a8_serves, 41,
         "compiled W8A8 on bitmap + int8 values (VNNI)"),
        ("cpu_int4_a8", Int4A8Linear, q4a8_serves, 42,
         "compiled W4A8: int4 weights, int8 activations (VNNI)")):
    register_kernel(KernelSpec(_name, "cpu", F32, ALL_PATTERNS, _builder(_cls, _serves), _vnni,
                               priority=_prio, description=_desc, quant=_serves, exact=False,
                               unavailable_reason=_vnni_reason))
