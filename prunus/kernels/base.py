"""The base class of the sparse kernels: :class:`SparseLinear`, a drop-in ``nn.Linear`` replacement.

Every kernel module is a :class:`SparseLinear`, whose one hook is ``matmul(x2d) -> y2d`` (bias
included). They are for inference: no gradients flow through them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunus.core.spec import Pattern
from prunus.kernels.patterns import infer_pattern
from prunus.kernels.registry import KernelError, select_kernel


class SparseLinear(nn.Module):
    """Base class of the sparse ``nn.Linear`` replacements: ``y = x @ W.T + bias`` with W sparse.

    Subclasses store the weight in their own format and implement :meth:`matmul` on a 2-D input.
    ``forward`` accepts ``(..., in_features)`` like ``nn.Linear``.
    """

    kernel: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int, bias: Optional[Tensor]) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=False)

    def hold(self, **arrays: Optional[Tensor]) -> None:
        """Register ``arrays`` as non-persistent buffers (the kernel's own format: it moves with the
        module, and is rebuilt from the checkpoint rather than saved)."""
        for name, t in arrays.items():
            self.register_buffer(name, t, persistent=False)

    def matmul(self, x: Tensor) -> Tensor:
        """(N, in) -> (N, out), bias included. The one hook a kernel implements."""
        raise NotImplementedError

    def cached(self, names: tuple[str, ...]) -> tuple:
        """``tuple(getattr(self, n) for n in names)``, kept in ``__dict__`` between calls.

        ``nn.Module.__getattr__`` costs about a microsecond per buffer; a decode step calls
        hundreds of small layers. The cache is dropped by ``.to()``-style moves and attribute sets.
        """
        args = self.__dict__.get("_cached_args")
        if args is None or args[0] != names:
            args = (names, tuple(getattr(self, n) for n in names))
            self.__dict__["_cached_args"] = args
        return args[1]

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        self.__dict__.pop("_cached_args", None)
        return super()._apply(fn, recurse)

    def __setattr__(self, name: str, value: object) -> None:
        self.__dict__.pop("_cached_args", None)
        super().__setattr__(name, value)

    def dense_weight(self) -> Tensor:
        """The (out, in) weight with pruned entries zero, rebuilt from the sparse format."""
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """The dense (out, in) reference weight, rebuilt on each access: read-only.

        This is what makes a kernel module look like an ``nn.Linear`` to everything that reads
        weights (:func:`prunus.core.targets.select`, zero counts, benchmarks, re-planning). It is
        never used by :meth:`forward`, so decode speed is unchanged; writing to it changes nothing
        (:meth:`prunus.core.targets.Target.set` refuses). To prune again, load the checkpoint with
        ``runtime="dense"`` (the CLI does).
        """
        w = self.dense_weight()
        ref = next((b for b in self.buffers() if b.is_floating_point()), None)
        if ref is not None and not ref.is_sparse:
            w = w.to(device=ref.device, dtype=ref.dtype)
        return w.detach()

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        if x.dim() == 2:
            return self.matmul(x)
        lead = x.shape[:-1]
        return self.matmul(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)

    @property
    def nnz(self) -> int:
        """Stored non-zeros (padding included)."""
        return 0

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")

    @staticmethod
    def from_dense(linear: nn.Linear, mask: Optional[Tensor] = None, kernel: str = "auto", *,
                   pattern: Optional[Pattern] = None, name: str = "layer",
                   qweight: Optional[Any] = None) -> "SparseLinear":
        """Build the sparse replacement of ``linear`` keeping the weights where ``mask`` is True.

        Args:
            linear: the dense layer; its weight (out, in) and bias are copied.
            mask: (out, in) bool keep-mask; ``None`` keeps the non-zero weights.
            kernel: a registered kernel name, or ``"auto"`` for the highest-priority available
                kernel on the weight's device that serves ``pattern``. ``"auto"`` does not measure:
                use :func:`prunus.kernels.plans.plan_model` to keep only kernels that pay.
            pattern: the mask's pattern, if known; inferred from the mask when a kernel needs it.
            name: the layer's name, used in error messages.
            qweight: the layer's stored :class:`~prunus.core.quant.QuantizedWeight`, for the
                kernels that compute with integer codes (``cpu_int8``, ...); its keep mask is the
                layer's mask. ``linear.weight`` must be its dequantized value.

        Raises:
            KernelError: unknown kernel, absent device, unavailable build, or a mask the kernel
                cannot serve (e.g. a 2:4 kernel on a mask that is not 2:4).
        """
        weight = linear.weight.detach()
        if mask is None:
            mask = weight != 0
        if tuple(mask.shape) != tuple(weight.shape):
            raise KernelError(f"{name}: mask shape {tuple(mask.shape)} does not match weight "
                              f"shape {tuple(weight.shape)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
        bias = None if linear.bias is None else linear.bias.detach()
        quant = None if qweight is None else qweight.quant
        if qweight is not None and tuple(qweight.codes.shape) != tuple(weight.shape):
            raise KernelError(f"{name}: quantized weight is {tuple(qweight.codes.shape)} but the layer "
                              f"is {tuple(weight.shape)}")
        spec = select_kernel(kernel, weight, mask, pattern, name, quant)
        if spec.needs_pattern and pattern is None:
            pattern = infer_pattern(mask)
        if spec.quant is not None:
            return spec.build(weight, mask, bias, pattern, name, qweight=qweight)
        return spec.build(weight, mask, bias, pattern, name)


def dense_reference(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The masked dense product every kernel must match: ``F.linear(x, weight * mask, bias)``."""
    return F.linear(x, weight * mask, bias)
