"""Sparse linear kernels: the face of the package (drop-in ``nn.Linear`` replacements and their registry).

A kernel is one :class:`KernelSpec` in :data:`KERNELS`: a name, the device and dtypes it runs on,
the sparsity patterns it can serve, a ``build`` factory ``(weight, mask, bias, pattern, name) ->
SparseLinear`` and an ``available()`` check (a compiled extension that built, CUDA that is present).
Adding a kernel is one new module in :mod:`prunus.kernels.backends` that calls
:func:`register_kernel` when imported; :func:`load_backends` finds it there (``pkgutil``), so no
other file names it. A GPU 2:4 kernel, for instance::

    # prunus/kernels/backends/cuda.py
    register_kernel(KernelSpec("cuda_2of4", "cuda", (torch.float16, torch.bfloat16), (NM,),
                               build=_build_2of4, available=torch.cuda.is_available,
                               requires=NM(2, 4), priority=20))

``requires`` makes ``from_dense`` refuse a mask that is not 2:4 (naming the layer), and
``available`` keeps it out of :func:`kernels_for` wherever CUDA is absent.

Every module is a :class:`SparseLinear`, whose one hook is ``matmul(x2d) -> y2d`` (bias included).
They are for inference: no gradients flow through them.

Whether a kernel is worth it is measured, not assumed: see :mod:`prunus.kernels.timing` and
:mod:`prunus.kernels.plans`.

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

from prunus.kernels.base import SparseLinear, dense_reference
from prunus.kernels.patterns import ALL_PATTERNS, BLOCK_CANDIDATES, infer_pattern, mask_satisfies
from prunus.kernels.registry import (KERNELS, KernelError, KernelSpec, available_kernels, get_kernel,
                                     kernels_for, load_backends, register_kernel, resolve_device,
                                     select_kernel, unregister_kernel)

__all__ = [
    "ALL_PATTERNS", "BLOCK_CANDIDATES", "KERNELS", "KernelError", "KernelSpec", "SparseLinear",
    "available_kernels", "dense_reference", "get_kernel", "infer_pattern", "kernels_for",
    "load_backends", "mask_satisfies", "register_kernel", "resolve_device", "select_kernel",
    "unregister_kernel",
]

load_backends()  # the built-in kernels in prunus/kernels/backends/ register themselves
