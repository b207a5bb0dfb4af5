"""Every number of a model must be a number: find parameters and buffers holding NaN or Inf.

Pruning only rewrites the targeted weights, but a NaN anywhere (a norm weight, a bias, a rotary
buffer) turns every perplexity into NaN and would be saved into a checkpoint; prunus refuses such a
model before any work, naming the tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from prunus.errors import ModelError


def nonfinite_tensors(model: nn.Module) -> list[tuple[str, int]]:
    """``(name, count)`` of every floating parameter or buffer with NaN/Inf entries, in module order."""
    bad, seen = [], set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or not t.is_floating_point() or t.is_meta:
            continue
        seen.add(id(t))
        n = int((~torch.isfinite(t.detach())).sum())
        if n:
            bad.append((name, n))
    return bad


def check_finite(model: nn.Module, what: str = "the model") -> None:
    """Raise a one-line :class:`ModelError` naming the tensors of ``model`` that hold NaN or Inf."""
    refuse_nonfinite(nonfinite_tensors(model), what)


def refuse_nonfinite(bad: list[tuple[str, int]], what: str) -> None:
    """The ModelError of :func:`check_finite` for ``(name, count)`` pairs (nothing when empty)."""
    if bad:
        names = ", ".join(f"{n} ({c})" for n, c in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise ModelError(f"{what}: {names} hold(s) NaN/Inf values; prunus will not prune or evaluate it")
