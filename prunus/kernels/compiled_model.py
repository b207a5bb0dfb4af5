"""``torch.compile`` for decode: what removes the framework's per-token overhead on CPU.

At batch-1 decode a small model spends much of each step outside its linears: on SmolLM2-135M
(210 linears, 30 blocks) eager PyTorch costs about 14 ms per token in norms, rotary embeddings,
attention, cache updates and Python dispatch, measured with every linear made free (``bench/
frontier.py``). ``torch.compile`` (inductor, which generates C++ on CPU) fuses those into a few
kernels. The prunus kernels are custom ops with shape functions (:mod:`prunus.kernels.cpu`), so
a model with planned kernels compiles whole.

The first calls compile (minutes on a 2-core machine); later calls of any length reuse the graphs
(``dynamic=True``), so it pays for long generation and serving, not for one short prompt.

Example:
    >>> model = prunus.load("runs/q8-cpu")                     # doctest: +SKIP
    >>> compile_model(model)                                    # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn

from prunus.errors import PrunusError


def compile_model(model: nn.Module, *, dynamic: bool = True) -> nn.Module:
    """Wrap ``model.forward`` in ``torch.compile`` in place and return the model.

    Raises:
        PrunusError: this torch has no ``torch.compile`` (or no working inductor backend).
    """
    import torch

    if not hasattr(torch, "compile"):
        raise PrunusError(f"torch {torch.__version__} has no torch.compile")
    if getattr(model, "_prunus_compiled", False):
        return model
    model.forward = torch.compile(model.forward, dynamic=dynamic)  # type: ignore[method-assign]
    model._prunus_compiled = True  # type: ignore[assignment]
    return model


__all__ = ["compile_model"]
