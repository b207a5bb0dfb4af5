"""Sparse linear kernels: drop-in ``nn.Linear`` replacements, and the registry that names them.

A kernel is one :class:`KernelSpec` in :data:`KERNELS`: a name, the device and dtypes it runs on,
the sparsity patterns it can serve, a ``build`` factory ``(weight, mask, bias, pattern, name) ->
SparseLinear`` and an ``available()`` check (a compiled extension that built, CUDA that is present).
Adding a kernel is one file that calls :func:`register_kernel`, imported at the bottom of this
module. A GPU 2:4 kernel, for instance::

    # prunus/kernels/cuda.py
    register_kernel(KernelSpec("cuda_2of4", "cuda", (torch.float16, torch.bfloat16), (NM,),
                               build=_build_2of4, available=torch.cuda.is_available,
                               requires=NM(2, 4), priority=20))

``requires`` makes ``from_dense`` refuse a mask that is not 2:4 (naming the layer), and
``available`` keeps it out of :func:`kernels_for` wherever CUDA is absent.

Every module is a :class:`SparseLinear`, whose one hook is ``matmul(x2d) -> y2d`` (bias included).
They are for inference: no gradients flow through them.

Whether a kernel is worth it is measured, not assumed: see :mod:`prunus.kernels.measure`.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from torch import nn
    >>> lin = nn.Linear(64, 32)
    >>> mask = torch.rand(32, 64) > 0.9
    >>> sp = SparseLinear.from_dense(lin, mask)          # the best available CPU kernel
    >>> x = torch.randn(3, 5, 64)
    >>> torch.allclose(sp(x), F.linear(x, lin.weight * mask, lin.bias), atol=1e-5)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunus.errors import PrunusError
from prunus.core.spec import NM, Block, Channel, Pattern, Unstructured

__all__ = [
    "KERNELS", "KernelError", "KernelSpec", "SparseLinear", "available_kernels", "get_kernel",
    "infer_pattern", "kernels_for", "mask_satisfies", "register_kernel", "resolve_device",
]

ALL_PATTERNS: tuple[type, ...] = (Unstructured, NM, Block, Channel)
# Block shapes that infer_pattern recognises, largest first.
BLOCK_CANDIDATES: tuple[tuple[int, int], ...] = (
    (16, 16), (8, 8), (16, 1), (1, 16), (4, 4), (8, 1), (1, 8), (2, 2), (4, 1), (1, 4),
)


class KernelError(PrunusError, ValueError):
    """A kernel that cannot serve a layer, a device that is absent, or a plan that does not fit."""


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
                   pattern: Optional[Pattern] = None, name: str = "layer") -> "SparseLinear":
        """Build the sparse replacement of ``linear`` keeping the weights where ``mask`` is True.

        Args:
            linear: the dense layer; its weight (out, in) and bias are copied.
            mask: (out, in) bool keep-mask; ``None`` keeps the non-zero weights.
            kernel: a registered kernel name, or ``"auto"`` for the highest-priority available
                kernel on the weight's device that serves ``pattern``. ``"auto"`` does not measure:
                use :func:`prunus.kernels.measure.plan_model` to keep only kernels that pay.
            pattern: the mask's pattern, if known; inferred from the mask when a kernel needs it.
            name: the layer's name, used in error messages.

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
        spec = select_kernel(kernel, weight, mask, pattern, name)
        if spec.needs_pattern and pattern is None:
            pattern = infer_pattern(mask)
        return spec.build(weight, mask, bias, pattern, name)


Builder = Callable[[Tensor, Tensor, Optional[Tensor], Optional[Pattern], str], SparseLinear]


@dataclass(frozen=True)
class KernelSpec:
    """One registered kernel.

    Attributes:
        name: registry key, used in plans and on the command line.
        device: ``"cpu"`` or ``"cuda"``.
        dtypes: weight dtypes it computes in.
        patterns: pattern types it can serve (a CSR kernel serves all of them).
        build: ``(weight, mask, bias, pattern, name) -> SparseLinear``.
        available: whether it can run here (compiled extension built, CUDA present).
        requires: a pattern the mask must satisfy exactly (``NM(2, 4)`` for 2:4 kernels).
        priority: ``kernel="auto"`` takes the highest available one.
        needs_pattern: ``build`` needs a concrete pattern (block shape); inferred if not given.
        accepts: an extra ``(weight_shape, pattern) -> bool`` test (e.g. square blocks only).
        description: one line for ``prunus list`` and tables.
    """

    name: str
    device: str
    dtypes: tuple[torch.dtype, ...]
    patterns: tuple[type, ...]
    build: Builder = field(repr=False)
    available: Callable[[], bool] = field(repr=False, default=lambda: True)
    requires: Optional[Pattern] = None
    priority: int = 0
    needs_pattern: bool = False
    accepts: Optional[Callable[[tuple[int, int], Pattern], bool]] = field(repr=False, default=None)
    description: str = ""

    def applicable(self, weight_shape: Sequence[int], pattern: Pattern, device: str | torch.device,
                   dtype: torch.dtype) -> bool:
        """Whether this kernel can serve a weight of this shape, pattern, device and dtype.

        It does not check :attr:`available` (a build or a GPU): :func:`kernels_for` does both.
        """
        if torch.device(device).type != self.device or dtype not in self.dtypes:
            return False
        if len(weight_shape) != 2 or not isinstance(pattern, self.patterns):
            return False
        if self.requires is not None and pattern != self.requires:
            return False
        out_f, in_f = weight_shape
        if isinstance(pattern, Block) and (out_f % pattern.rows or in_f % pattern.cols):
            return False
        if isinstance(pattern, NM) and in_f % pattern.m:
            return False
        return self.accepts is None or self.accepts((out_f, in_f), pattern)


KERNELS: dict[str, KernelSpec] = {}


def register_kernel(spec: KernelSpec) -> KernelSpec:
    """Add ``spec`` to :data:`KERNELS`; a duplicate name raises."""
    if spec.name in KERNELS or spec.name in ("auto", "dense"):
        raise KernelError(f"kernel {spec.name!r} is already registered (or reserved)")
    KERNELS[spec.name] = spec
    return spec


def get_kernel(name: str) -> KernelSpec:
    """The registered kernel ``name``; an unknown name raises with the list of names."""
    try:
        return KERNELS[name]
    except KeyError:
        raise KernelError(f"unknown kernel {name!r}; choose one of "
                          f"{', '.join(sorted(KERNELS))} (or 'auto')") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse ``device``; ``cuda`` where CUDA is absent is a KernelError, not a late crash."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise KernelError(f"invalid device {device!r}: expected 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KernelError(f"device {str(device)!r} requested but CUDA is not available on this "
                          f"machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise KernelError(f"unsupported device {str(device)!r}: expected 'cpu' or 'cuda'")
    return dev


def kernels_for(weight_shape: Sequence[int], pattern: Pattern, device: str | torch.device,
                dtype: torch.dtype, *, available_only: bool = True) -> list[KernelSpec]:
    """Kernels applicable to this layer, highest priority first (only available ones by default)."""
    out = [k for k in KERNELS.values() if k.applicable(weight_shape, pattern, device, dtype)
           and (not available_only or k.available())]
    return sorted(out, key=lambda k: -k.priority)


def available_kernels() -> dict[str, bool]:
    """Every registered kernel name -> whether it can run here."""
    return {name: bool(k.available()) for name, k in KERNELS.items()}


def mask_satisfies(mask: Tensor, pattern: Pattern) -> bool:
    """Whether a keep-mask (out, in) fits ``pattern`` (N:M: at most N kept per group of M)."""
    out_f, in_f = mask.shape
    if isinstance(pattern, Unstructured):
        return True
    if isinstance(pattern, NM):
        return in_f % pattern.m == 0 and bool(
            (mask.reshape(out_f, -1, pattern.m).sum(-1) <= pattern.n).all())
    if isinstance(pattern, Block):
        r, c = pattern.rows, pattern.cols
        if out_f % r or in_f % c:
            return False
        cnt = mask.reshape(out_f // r, r, in_f // c, c).sum(dim=(1, 3))
        return bool(((cnt == 0) | (cnt == r * c)).all())
    if isinstance(pattern, Channel):
        cnt = mask.sum(dim=1)
        return bool(((cnt == 0) | (cnt == in_f)).all())
    return False


def infer_pattern(mask: Tensor) -> Pattern:
    """The most structured pattern a keep-mask satisfies: a block shape from
    :data:`BLOCK_CANDIDATES` (largest first), else 2:4, else unstructured.
    A fully kept or fully pruned mask is unstructured."""
    mask = mask.bool()
    if bool(mask.all()) or not bool(mask.any()):
        return Unstructured()
    for r, c in BLOCK_CANDIDATES:
        if mask_satisfies(mask, Block(r, c)):
            return Block(r, c)
    if mask_satisfies(mask, NM(2, 4)):
        return NM(2, 4)
    return Unstructured()


def select_kernel(kernel: str, weight: Tensor, mask: Tensor, pattern: Optional[Pattern],
                  name: str) -> KernelSpec:
    """Resolve ``kernel`` ("auto" or a name) for one layer, or raise a KernelError naming it."""
    device, dtype, shape = weight.device, weight.dtype, tuple(weight.shape)
    if kernel == "auto":
        found = kernels_for(shape, pattern or Unstructured(), device, dtype)
        if not found:
            raise KernelError(f"{name}: no available sparse kernel for a {dtype} weight on "
                              f"{device.type}; registered: {', '.join(sorted(KERNELS))}")
        return found[0]
    spec = get_kernel(kernel)
    if spec.device == "cuda":
        resolve_device("cuda")
    if device.type != spec.device:
        raise KernelError(f"{name}: kernel {spec.name!r} runs on {spec.device}, but the weight "
                          f"is on {device.type}")
    if dtype not in spec.dtypes:
        raise KernelError(f"{name}: kernel {spec.name!r} takes "
                          f"{', '.join(str(d).replace('torch.', '') for d in spec.dtypes)}, "
                          f"not {str(dtype).replace('torch.', '')}")
    if spec.requires is not None and not mask_satisfies(mask, spec.requires):
        raise KernelError(f"{name}: kernel {spec.name!r} needs a {spec.requires} mask, but this "
                          f"layer's mask is not {spec.requires}")
    if pattern is not None and not spec.applicable(shape, pattern, device, dtype):
        raise KernelError(f"{name}: kernel {spec.name!r} cannot serve pattern {pattern} on a "
                          f"{shape[0]}x{shape[1]} weight")
    if not spec.available():
        from prunus.kernels import cpu  # noqa: F401  (the reason lives there for CPU builds)

        why = cpu.unavailable_reason() if spec.name in cpu.COMPILED else "not available here"
        raise KernelError(f"{name}: kernel {spec.name!r} is unavailable: {why}")
    return spec


def dense_reference(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The masked dense product every kernel must match: ``F.linear(x, weight * mask, bias)``."""
    return F.linear(x, weight * mask, bias)


# Built-in kernels register themselves on import.
from prunus.kernels import cpu as _cpu  # noqa: E402,F401
