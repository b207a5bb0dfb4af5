"""Building the kernel module a plan names for one layer, and putting it in the model.

:func:`build_module` is what :func:`prunus.kernels.plans.apply_plan` and
:func:`prunus.kernels.tune.tune_plan` both call, so the two agree on the details:

- the layer's activation gate (if any) moves to the new module (:func:`prunus.kernels.gating.carry_gate`);
- a kernel that skips zero inputs (``input_sparse``) gets its *prefill delegate*: for calls of more
  than ``max_tokens`` tokens it runs the kernel the plan chose for the layer on dense inputs
  (``LayerPlan.prefill``), when that is a float sparse kernel (CSR, bitmap, BSR: their own formats,
  a second copy of the weights that makes prefill faster than the dense product). When that choice
  is ``dense`` or an integer kernel, no delegate is built: the skip kernel's own dense product
  (float32 GEMM on its input-major weight, integer codes decoded first, which is what the integer
  kernels do from 16 tokens) is that path, without a second copy of the weights;
- a kernel that skips zero inputs takes the layer's gate hook into itself
  (:meth:`~prunus.kernels.backends.cpu_actskip.SkipLinear.fuse_gate`): at decode the compiled
  kernel compares the scores with the threshold while it gathers the non-zero inputs.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from prunus.core.spec import Pattern
from prunus.kernels.base import SparseLinear
from prunus.kernels.gating import carry_gate
from prunus.kernels.registry import KERNELS, get_kernel


def uses_delegate(prefill: str) -> bool:
    """Whether a skip kernel hands prefill to a separate module of kernel ``prefill``."""
    spec = KERNELS.get(prefill)
    return (spec is not None and spec.quant is None and not spec.input_sparse
            and bool(spec.available()))


def build_module(module: nn.Module, kernel: str, *, name: str, mask: Optional[Tensor] = None,
                 pattern: Optional[Pattern] = None, qweight: Optional[Any] = None,
                 prefill: str = "") -> SparseLinear:
    """The ``kernel`` module replacing ``module`` (an ``nn.Linear``), its gate carried over.

    ``qweight`` goes to the integer kernels only; ``prefill`` is the plan's kernel for the layer on
    dense inputs, used by a kernel that skips zero inputs for long calls (see the module's doc).
    """
    spec = get_kernel(kernel)
    sparse = SparseLinear.from_dense(module, mask, kernel, pattern=pattern, name=name,
                                     qweight=qweight if spec.quant is not None else None)
    if spec.input_sparse and uses_delegate(prefill):
        sparse.set_prefill(SparseLinear.from_dense(module, mask, prefill, pattern=pattern,
                                                   name=name))
    carry_gate(module, sparse)
    if spec.input_sparse:
        sparse.fuse_gate()  # the compiled kernel applies the gate in its own pass over x
    return sparse


def put(model: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule ``name`` of ``model`` to ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


__all__ = ["build_module", "put", "uses_delegate"]
