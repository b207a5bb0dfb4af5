"""Every number of a model must be a number: find parameters and buffers holding NaN or Inf.

Pruning only rewrites the targeted weights, but a NaN anywhere (a norm weight, a bias, a rotary
buffer) turns every perplexity into NaN and would be saved into a checkpoint; prunus refuses such a
model before any work, naming the tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from torch import Tensor

from prunus.errors import ModelError

CHUNK = 1 << 20  # elements checked at once


def _slices(t: Tensor, chunk: int = CHUNK):
    """``t`` as views of about ``chunk`` elements each, along dim 0 (no copy, whatever its strides)."""
    t = t.detach()
    if t.dim() == 0 or t.numel() <= chunk:
        yield t
        return
    rows = max(1, chunk // max(1, t[0].numel()))
    yield from t.split(rows, dim=0)


def count_nonfinite(t: Tensor) -> int:
    """NaN/Inf entries of ``t``, a slice at a time: ``torch.isfinite`` on a whole tensor holds about
    twice its size in temporaries (measured: +449 MB on a 256 MiB float32 Hessian), a slice's are small."""
    return sum(int((~torch.isfinite(s)).sum()) for s in _slices(t))


def all_finite(t: Tensor) -> bool:
    """``torch.isfinite(t).all()`` without its whole-tensor temporaries; stops at the first bad slice."""
    return all(bool(torch.isfinite(s).all()) for s in _slices(t))


def nonfinite_tensors(model: nn.Module) -> list[tuple[str, int]]:
    """``(name, count)`` of every floating parameter or buffer with NaN/Inf entries, in module order."""
    bad, seen = [], set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or not t.is_floating_point() or t.is_meta:
            continue
        seen.add(id(t))
        n = count_nonfinite(t)
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
