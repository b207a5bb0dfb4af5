"""Decode kernels that skip zero inputs (activation sparsity), registered on import.

A gate such as TEAL's (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language
Models", arXiv:2408.14690) or WINA's (Chen et al. 2025, arXiv:2505.19427) zeroes the inputs of a
linear whose score is below a threshold; at batch-1 decode the product then only needs the weight
columns ``W[:, j]`` of the non-zero inputs ``j``. As in TEAL's GEMV kernel, the weight is stored
input-major (``W.T``, :mod:`prunus.kernels.actskip_formats`), so those columns are contiguous rows,
and only they are read: at 40% zero inputs, 60% of the weight bytes. The kernels:

- ``cpu_skip_f32``: float32 weights (any layer, a quantized one from its decoded floats).
- ``cpu_skip_int8``: int8 codes, per channel or groups, symmetric or not (stored quantized layers).
- ``cpu_skip_int4``: int4 codes two per byte along the outputs, groups along the input, zero points.
- ``cpu_skip_bitmap_int8``: the kept weights only (one bit per weight, the values as int8), input
  by input: a 2:4 or 50% int8 layer reads 0.69 bytes per weight of each non-zero input.
- ``torch_skip``: the pure-PyTorch fallback (``index_select`` of the non-zero rows, then a matmul).

All compose with the weight mask (a pruned weight is a stored zero, or not stored at all by the
bitmap one) and are exact up to float summation order. They are ``input_sparse``: a plan considers
them only for a layer with an activation gate (:mod:`prunus.kernels.gating`), timed against every
other kernel on inputs with the gate's fraction of zeros.

Only decode runs on them: a call of at most :attr:`SkipLinear.max_tokens` tokens (4; several
tokens read the union of their non-zero inputs, so the saving fades with more). A longer call
(prefill) runs the best path without activation sparsity: the *prefill delegate*, the float sparse
kernel the plan chose for the layer on dense inputs (:func:`prunus.kernels.swap.build_module`),
or, where that choice is dense or an integer kernel, the dense product on this module's own
storage (``torch.addmm`` with the input-major float32 weight; the integer codes decoded to float32
first, as the integer kernels themselves do from 16 tokens). So no second copy of the weights is
kept unless a sparse float kernel makes prefill faster than the dense product.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from prunus.core.quant import QuantizedWeight
from prunus.core.spec import Pattern
from prunus.kernels import cpu
from prunus.kernels.actskip_formats import (bitmap_q8_t, bitmap_t_mask, decode_t, f32_t, q4_t,
                                            q4_t_codes, q8_t, skip_bitmap_serves, skip_int4_serves,
                                            skip_int8_serves)
from prunus.kernels.base import SparseLinear
from prunus.kernels.cpu_formats import check_weight
from prunus.kernels.patterns import ALL_PATTERNS
from prunus.kernels.decide import SKIP_TOKENS
from prunus.kernels.registry import KernelError, KernelSpec, register_kernel


class SkipLinear(SparseLinear):
    """Base of the kernels that skip zero inputs: :meth:`skip` for decode, the prefill path else."""

    max_tokens: ClassVar[int] = SKIP_TOKENS  # calls of at most this many tokens skip zero inputs

    fused_gate: ClassVar[bool] = True  # skip() applies a fused gate's threshold itself

    def __init__(self, in_features: int, out_features: int, bias: Optional[Tensor]) -> None:
        super().__init__(in_features, out_features, bias)
        self.__dict__["_prefill"] = None  # not a child module: it is not a layer of the model
        self.__dict__["_gate"] = None  # (hook, threshold, scale) of a fused gate

    def fuse_gate(self) -> bool:
        """Take the layer's activation-gate pre-hook into the kernel; whether there was one.

        A gate hook is a forward pre-hook with ``threshold`` and ``scale`` attributes (a float and
        None or the ``(in,)`` column norms; :class:`prunus.activation.gate.GateHook`). It is removed
        from the module: decode calls pass the threshold to the compiled kernel, which treats the
        inputs scoring below it as zeros in the same pass that finds the non-zero inputs; longer
        calls run the hook itself on the input, then the prefill path. The result is the same as
        hook then kernel; a decode step saves the hook's call and its three tensor ops per layer.
        """
        for hid, hook in list(self._forward_pre_hooks.items()):
            thr, scale = getattr(hook, "threshold", None), getattr(hook, "scale", None)
            if isinstance(thr, float) and (scale is None or isinstance(scale, Tensor)):
                del self._forward_pre_hooks[hid]
                self._forward_pre_hooks_with_kwargs.pop(hid, None)
                sc = None if scale is None else scale.detach().float().contiguous()
                self.__dict__["_gate"] = (hook, thr, sc)
                return True
        return False

    @property
    def gate_hook(self) -> Optional[Any]:
        """The fused gate's hook (None: not fused), for a module that replaces this one."""
        g = self._fused()
        return None if g is None else g[0]

    def _fused(self) -> Optional[tuple]:
        # a gate removed from the module (detach_gates deletes ``prunus_gate``) no longer applies
        return self.__dict__["_gate"] if "prunus_gate" in self.__dict__ else None

    def gated(self, x: Tensor) -> Tensor:
        """``x`` through the fused gate (itself when there is none)."""
        g = self._fused()
        if g is None:
            return x
        out = g[0](self, (x,), {})
        return x if out is None else out[0][0]

    def set_prefill(self, module: Optional[SparseLinear]) -> None:
        """The kernel module for calls of more than :attr:`max_tokens` tokens (None: the dense
        product on this module's storage)."""
        if module is not None and (module.in_features, module.out_features) != \
                (self.in_features, self.out_features):
            raise KernelError(f"prefill kernel {module.kernel!r} is {module.out_features}x"
                              f"{module.in_features}, the layer {self.out_features}x{self.in_features}")
        self.__dict__["_prefill"] = module

    @property
    def prefill_kernel(self) -> str:
        """The kernel prefill runs on ("dense": this module's own dense product)."""
        p = self.__dict__["_prefill"]
        return "dense" if p is None else p.kernel

    def skip(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decoded_t(self) -> Tensor:
        """The float32 weight input-major (in, out), for the dense product."""
        raise NotImplementedError

    def dense_product(self, x: Tensor) -> Tensor:
        wt = self.decoded_t()
        return torch.mm(x, wt) if self.bias is None else torch.addmm(self.bias, x, wt)

    def gate_args(self) -> tuple[float, Optional[Tensor]]:
        """(threshold, scale) for the compiled kernels: (0.0, None) without a fused gate."""
        g = self._fused()
        return (0.0, None) if g is None else (g[1], g[2])

    def matmul(self, x: Tensor) -> Tensor:
        if x.shape[0] <= self.max_tokens:
            return self.skip(x if self.fused_gate else self.gated(x))
        x = self.gated(x)
        p = self.__dict__["_prefill"]
        return p.matmul(x) if p is not None else self.dense_product(x)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        p = self.__dict__.get("_prefill")
        if p is not None:
            p._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", prefill={self.prefill_kernel}"


class SkipF32Linear(SkipLinear):
    """float32, input-major (``cpu_skip_f32``)."""

    kernel = "cpu_skip_f32"

    def __init__(self, weight: Tensor, mask: Tensor, bias: Optional[Tensor]) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.hold(wt=f32_t(weight, mask))

    def skip(self, x: Tensor) -> Tensor:
        wt, bias = self.cached(("wt", "bias"))
        return torch.ops.prunus_cpu.skip_f32_linear(x, wt, bias, self.out_features, *self.gate_args())

    def decoded_t(self) -> Tensor:
        return self.wt[:, : self.out_features]  # a view: no copy, BLAS reads the row stride

    @property
    def nnz(self) -> int:
        return self.in_features * self.out_features

    def dense_weight(self) -> Tensor:
        return self.decoded_t().t().contiguous()


class SkipInt8Linear(SkipLinear):
    """int8 codes, input-major (``cpu_skip_int8``)."""

    kernel = "cpu_skip_int8"

    def __init__(self, qw: QuantizedWeight, bias: Optional[Tensor]) -> None:
        super().__init__(qw.codes.shape[1], qw.codes.shape[0], bias)
        codes, scales, zeros, self.group = q8_t(qw)
        self.hold(codes_t=codes, scales_t=scales, zeros_t=zeros)

    def skip(self, x: Tensor) -> Tensor:
        c, s, z, b = self.cached(("codes_t", "scales_t", "zeros_t", "bias"))
        return torch.ops.prunus_cpu.skip_q8_linear(x, c, s, z, b, self.group, self.out_features,
                                                  *self.gate_args())

    def decoded_t(self) -> Tensor:
        return torch.ops.prunus_cpu.skip_q8_dense(self.codes_t, self.scales_t, self.zeros_t,
                                                  self.group)[:, : self.out_features]

    @property
    def nnz(self) -> int:
        return self.in_features * self.out_features

    def dense_weight(self) -> Tensor:
        return decode_t(self.codes_t, self.scales_t, self.zeros_t, self.group, self.out_features)


class SkipInt4Linear(SkipLinear):
    """int4 codes two per byte along the outputs, input-major (``cpu_skip_int4``)."""

    kernel = "cpu_skip_int4"

    def __init__(self, qw: QuantizedWeight, bias: Optional[Tensor]) -> None:
        super().__init__(qw.codes.shape[1], qw.codes.shape[0], bias)
        packed, scales, zeros, self.group = q4_t(qw)
        self.hold(packed_t=packed, scales_t=scales, zeros_t=zeros)

    def skip(self, x: Tensor) -> Tensor:
        p, s, z, b = self.cached(("packed_t", "scales_t", "zeros_t", "bias"))
        return torch.ops.prunus_cpu.skip_q4_linear(x, p, s, z, b, self.group, self.out_features,
                                                  *self.gate_args())

    def decoded_t(self) -> Tensor:
        return torch.ops.prunus_cpu.skip_q4_dense(self.packed_t, self.scales_t, self.zeros_t,
                                                  self.group)[:, : self.out_features]

    @property
    def nnz(self) -> int:
        return self.in_features * self.out_features

    def dense_weight(self) -> Tensor:
        return decode_t(q4_t_codes(self.packed_t), self.scales_t, self.zeros_t, self.group,
                        self.out_features)


class SkipBitmapInt8Linear(SkipLinear):
    """The kept weights as int8 with one bit per weight, input-major (``cpu_skip_bitmap_int8``)."""

    kernel = "cpu_skip_bitmap_int8"

    def __init__(self, qw: QuantizedWeight, bias: Optional[Tensor]) -> None:
        super().__init__(qw.codes.shape[1], qw.codes.shape[0], bias)
        wptr, bits, vals, scales, self.group = bitmap_q8_t(qw)
        self.hold(wptr=wptr, bits=bits, vals=vals, scales_t=scales)

    def skip(self, x: Tensor) -> Tensor:
        args = self.cached(("wptr", "bits", "vals", "scales_t", "bias"))
        return torch.ops.prunus_cpu.skip_bitmap_q8_linear(x, *args, self.group, self.out_features,
                                                         *self.gate_args())

    def decoded_t(self) -> Tensor:
        return torch.ops.prunus_cpu.skip_bitmap_q8_dense(self.wptr, self.bits, self.vals,
                                                         self.scales_t, self.group)[:, : self.out_features]

    @property
    def nnz(self) -> int:
        return int(self.vals.numel() - 64)

    def dense_weight(self) -> Tensor:
        m = bitmap_t_mask(self.bits)
        v = torch.zeros(m.shape, dtype=torch.float32)
        v[m] = self.vals[: self.nnz].float()
        return decode_t(v, self.scales_t, None, self.group, self.out_features)


class TorchSkipLinear(SkipLinear):
    """Pure-PyTorch fallback (``torch_skip``): the rows of the non-zero inputs, then a matmul."""

    kernel = "torch_skip"
    fused_gate = False  # the fused gate's hook runs on the input first

    def __init__(self, weight: Tensor, mask: Tensor, bias: Optional[Tensor]) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        wt = (weight.detach().float() * mask.to(weight.device, torch.bool)).t().contiguous()
        self.hold(wt=wt)

    def skip(self, x: Tensor) -> Tensor:
        wt, bias = self.cached(("wt", "bias"))
        nz = (x != 0).any(dim=0).nonzero().squeeze(1)
        y = x.index_select(1, nz) @ wt.index_select(0, nz)
        return y if bias is None else y + bias

    def decoded_t(self) -> Tensor:
        return self.wt

    @property
    def nnz(self) -> int:
        return int(self.wt.numel())

    def dense_weight(self) -> Tensor:
        return self.wt.t().contiguous()


def _float_builder(cls: type):  # type: ignore[no-untyped-def]
    def build(weight: Tensor, mask: Tensor, bias: Optional[Tensor], pattern: Optional[Pattern],
              name: str) -> SparseLinear:
        check_weight(weight, name)
        return cls(weight, mask, bias)
    return build


def _quant_builder(cls: type, serves):  # type: ignore[no-untyped-def]
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


F32 = (torch.float32,)
_SKIP = dict(device="cpu", dtypes=F32, patterns=ALL_PATTERNS, input_sparse=True)
register_kernel(KernelSpec(name="cpu_skip_f32", build=_float_builder(SkipF32Linear),
                           available=cpu.compiled_available, priority=6,
                           description="compiled float32 input-major, skips zero inputs (decode)",
                           unavailable_reason=cpu.unavailable_reason, **_SKIP))
for _name, _cls, _serves, _prio, _desc in (
        ("cpu_skip_int8", SkipInt8Linear, skip_int8_serves, 7, "int8"),
        ("cpu_skip_int4", SkipInt4Linear, skip_int4_serves, 8, "int4"),
        ("cpu_skip_bitmap_int8", SkipBitmapInt8Linear, skip_bitmap_serves, 9, "bitmap + int8")):
    register_kernel(KernelSpec(name=_name, build=_quant_builder(_cls, _serves),
                               available=cpu.compiled_available, priority=_prio, quant=_serves,
                               description=f"compiled {_desc} input-major, skips zero inputs (decode)",
                               unavailable_reason=cpu.unavailable_reason, **_SKIP))
register_kernel(KernelSpec(name="torch_skip", build=_float_builder(TorchSkipLinear), priority=2,
                           description="PyTorch fallback: the rows of the non-zero inputs (decode)",
                           **_SKIP))

__all__ = ["SkipLinear"]
