"""Achieved activation sparsity: the zeros that reach the gated layers while the model runs.

:func:`count_inputs` counts, for every gated layer, the exact zeros among the inputs it receives
(after its gate) during a block of code, such as an evaluation; :func:`summarize` turns the counts
into what ``prunus prune`` and ``prunus eval`` report: the fraction per layer, per layer type (the
last part of the name: ``q_proj``, ``down_proj``), and over the model weighted by each layer's
weight count (the fraction of weight reads a kernel that skips zero inputs can save).

Example:
    >>> with count_inputs(model) as counts:                  # doctest: +SKIP
    ...     perplexity(model, windows)
    >>> summarize(counts, model)["achieved"]                 # doctest: +SKIP
    0.2493
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

from torch import nn

from prunus.activation.gate import gates_of


@contextlib.contextmanager
def count_inputs(model: nn.Module) -> Iterator[dict[str, list[int]]]:
    """Within the block, ``counts[layer] = [zeros, entries]`` of every gated layer's gated input.

    The counting hooks run after the gates (they are registered later), so they see what the
    layer computes with.
    """
    counts: dict[str, list[int]] = {}
    handles = []
    modules = dict(model.named_modules())
    for name in gates_of(model):
        counts[name] = [0, 0]

        def hook(module: nn.Module, args: tuple, kwargs: dict, c: list[int] = counts[name]) -> None:
            x = args[0] if args else kwargs.get("input")
            if x is not None:
                c[0] += int((x == 0).sum())
                c[1] += x.numel()

        handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def layer_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj``."""
    return name.rsplit(".", 1)[-1]


def summarize(counts: dict[str, list[int]], model: nn.Module) -> dict[str, Any]:
    """``{"achieved", "per_type", "per_layer"}`` from :func:`count_inputs`' counts."""
    modules = dict(model.named_modules())
    per_layer = {n: (z / t if t else 0.0) for n, (z, t) in counts.items()}
    by_type: dict[str, list[int]] = {}
    weighted = total = 0.0
    for n, (z, t) in counts.items():
        acc = by_type.setdefault(layer_type(n), [0, 0])
        acc[0] += z
        acc[1] += t
        w = modules[n].weight
        weighted += per_layer[n] * w.numel()
        total += w.numel()
    return {"achieved": round(weighted / total, 6) if total else 0.0,
            "per_type": {k: round(z / t, 6) if t else 0.0 for k, (z, t) in by_type.items()},
            "per_layer": {n: round(v, 6) for n, v in per_layer.items()}}


def measured(model: nn.Module, run: Callable[[], Any]) -> tuple[Any, Optional[dict[str, Any]]]:
    """``run()``'s result, and the activation sparsity it met (:func:`summarize`; None when the
    model has no gates or ``run`` sent nothing through them)."""
    if not gates_of(model):
        return run(), None
    with count_inputs(model) as counts:
        out = run()
    return out, (summarize(counts, model) if any(t for _, t in counts.values()) else None)
