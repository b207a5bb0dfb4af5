"""The kernel registry: :class:`KernelSpec`, :data:`KERNELS`, and choosing a kernel for a layer.

A kernel is one :class:`KernelSpec` in :data:`KERNELS`: a name, the device and dtypes it runs on,
the sparsity patterns it can serve, a ``build`` factory ``(weight, mask, bias, pattern, name) ->
SparseLinear`` and an ``available()`` check (a compiled extension that built, CUDA that is present).
Adding a kernel is one new module in :mod:`prunus.kernels.backends` that calls
:func:`register_kernel` at import time; :func:`load_backends` imports every module there
(``pkgutil``), so nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from prunus.errors import PrunusError
from prunus.core.spec import NM, Block, Pattern, Quant, Unstructured
from prunus.kernels.patterns import mask_satisfies


class KernelError(PrunusError, ValueError):
    """A kernel that cannot serve a layer, a device that is absent, or a plan that does not fit."""


# (weight, mask, bias, pattern, name) -> a prunus.kernels.base.SparseLinear
Builder = Callable[[Tensor, Tensor, Optional[Tensor], Optional[Pattern], str], nn.Module]


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
        unavailable_reason: why :attr:`available` is False here ('' when it is not known).
        quant: for a kernel that computes with integer codes, ``(quant, (out, in)) -> bool``: the
            grids it serves. It then applies only to layers stored quantized, and ``build`` is
            called with ``qweight=`` (the stored :class:`~prunus.core.quant.QuantizedWeight`).
            ``None``: a float kernel (it also serves a quantized layer, from the decoded floats).
        exact: computes ``x @ W.T`` of the stored weight up to float summation order. ``False``
            (the W8A8 kernels, which round the activation to int8 too): left out of
            :func:`kernels_for` and plans unless ``approximate=True`` asks for them.
        input_sparse: reads only the weights of the non-zero inputs (activation sparsity, the
            ``cpu_skip_*`` kernels). Left out of :func:`kernels_for` unless ``input_sparse=True``
            asks for them (``kernel="auto"`` does not time, so it never picks them). Plans time them
            for every layer (``plan_model(input_major=True)``, the default): a gated layer
            (:mod:`prunus.kernels.gating`) on inputs with the gate's fraction of zeros, any other
            on inputs without zeros, as a dense-weight kernel.
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
    unavailable_reason: Callable[[], str] = field(repr=False, default=lambda: "not available here")
    quant: Optional[Callable[[Quant, tuple[int, int]], bool]] = field(repr=False, default=None)
    exact: bool = True
    input_sparse: bool = False

    def applicable(self, weight_shape: Sequence[int], pattern: Pattern, device: str | torch.device,
                   dtype: torch.dtype, quant: Optional[Quant] = None) -> bool:
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
        if self.quant is not None and (quant is None or not self.quant(quant, (out_f, in_f))):
            return False
        if isinstance(pattern, Block) and (out_f % pattern.rows or in_f % pattern.cols):
            return False
        if isinstance(pattern, NM) and in_f % pattern.m:
            return False
        return self.accepts is None or self.accepts((out_f, in_f), pattern)


KERNELS: dict[str, KernelSpec] = {}
BACKENDS = "prunus.kernels.backends"  # the package whose modules register the built-in kernels
_loaded = False


def register_kernel(spec: KernelSpec) -> KernelSpec:
    """Add ``spec`` to :data:`KERNELS`; a duplicate name raises. A module in
    :mod:`prunus.kernels.backends` calls it at import time."""
    if spec.name in KERNELS or spec.name in ("auto", "dense"):
        raise KernelError(f"kernel {spec.name!r} is already registered (or reserved)")
    KERNELS[spec.name] = spec
    return spec


def unregister_kernel(name: str) -> None:
    """Remove the kernel ``name`` (a test's own kernel, once the test is done); unknown: no-op."""
    KERNELS.pop(name, None)


def load_backends() -> dict[str, KernelSpec]:
    """Import every module of :mod:`prunus.kernels.backends` once, so that each has registered
    its kernels; returns :data:`KERNELS`."""
    global _loaded
    if not _loaded:
        _loaded = True
        pkg = importlib.import_module(BACKENDS)
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{BACKENDS}.{mod.name}")
    return KERNELS


def get_kernel(name: str) -> KernelSpec:
    """The registered kernel ``name``; an unknown name raises with the list of names."""
    load_backends()
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
                dtype: torch.dtype, *, available_only: bool = True,
                quant: Optional[Quant] = None, approximate: bool = False,
                input_sparse: bool = False) -> list[KernelSpec]:
    """Kernels applicable to this layer, highest priority first (only available ones by default);
    ``quant``: the layer's stored grid, which admits the integer kernels that serve it;
    ``approximate``: include the kernels that also round the activation (W8A8);
    ``input_sparse``: include the kernels that skip zero inputs (a layer with an activation gate)."""
    load_backends()
    out = [k for k in KERNELS.values() if k.applicable(weight_shape, pattern, device, dtype, quant)
           and (k.exact or approximate) and (input_sparse or not k.input_sparse)
           and (not available_only or k.available())]
    return sorted(out, key=lambda k: -k.priority)


def available_kernels() -> dict[str, bool]:
    """Every registered kernel name -> whether it can run here."""
    load_backends()
    return {name: bool(k.available()) for name, k in KERNELS.items()}


def select_kernel(kernel: str, weight: Tensor, mask: Tensor, pattern: Optional[Pattern],
                  name: str, quant: Optional[Quant] = None) -> KernelSpec:
    """Resolve ``kernel`` ("auto" or a name) for one layer, or raise a KernelError naming it;
    ``quant`` is the layer's stored grid (None: a float layer)."""
    device, dtype, shape = weight.device, weight.dtype, tuple(weight.shape)
    if kernel == "auto":
        found = kernels_for(shape, pattern or Unstructured(), device, dtype, quant=quant)
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
    if spec.quant is not None and quant is None:
        raise KernelError(f"{name}: kernel {spec.name!r} computes with stored integer weights, and "
                          f"this layer is not stored quantized (prune with a spec such as "
                          f"50%+int8, or choose a float kernel)")
    if spec.quant is not None and not spec.quant(quant, (shape[0], shape[1])):
        raise KernelError(f"{name}: kernel {spec.name!r} cannot serve {quant} on a "
                          f"{shape[0]}x{shape[1]} weight")
    if spec.requires is not None and not mask_satisfies(mask, spec.requires):
        raise KernelError(f"{name}: kernel {spec.name!r} needs a {spec.requires} mask, but this "
                          f"layer's mask is not {spec.requires}")
    if pattern is not None and not spec.applicable(shape, pattern, device, dtype, quant):
        raise KernelError(f"{name}: kernel {spec.name!r} cannot serve pattern {pattern} on a "
                          f"{shape[0]}x{shape[1]} weight")
    if not spec.available():
        why = spec.unavailable_reason() or "not available here"
        raise KernelError(f"{name}: kernel {spec.name!r} is unavailable: {why}")
    return spec
