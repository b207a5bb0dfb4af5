"""End-to-end tuning of a kernel plan: the per-layer choice checked against the decode time of the
whole model.

A per-layer measurement (:func:`prunus.kernels.plans.plan_model`) times one layer in isolation,
its weights flushed from the cache. At batch-1 decode of a small model that misleads in both
directions: a layer of 110k weights costs tens of microseconds, about what the flush and the call
around it cost, so its timings are mostly noise; and what a layer costs inside the model depends on
its neighbours (what they leave in the cache, the threads they wake). So :func:`tune_plan` takes
the layers in groups that share a shape, pattern, sparsity and grid (``q_proj`` of every block is
one group), and for each group, largest first, runs the whole model's decode with each of the
group's best few kernels by the per-layer timing, and with dense, and keeps the fastest. The
decision is made by measuring what the user will run; the layer-level timings only choose which
candidates to try.

Example:
    >>> plan = plan_model(model, masks, [1], qweights=qweights)
    >>> plan = tune_plan(model, plan, masks, qweights=qweights)     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from prunus.kernels.decide import prefill_choice
from prunus.kernels.plans import LayerPlan, Plan
from prunus.kernels.registry import KERNELS
from prunus.kernels.swap import build_module, put as _put
from prunus.kernels.timing import num_threads, time_generate


def _groups(plan: Plan) -> dict[tuple, list[LayerPlan]]:
    out: dict[tuple, list[LayerPlan]] = {}
    for layer in plan.layers:
        key = (layer.out_features, layer.in_features, layer.pattern.split("@")[0],
               round(layer.sparsity, 2), layer.quant, round(layer.input_sparsity, 2))
        out.setdefault(key, []).append(layer)
    return out


def _candidates(layer: LayerPlan, k: int) -> list[str]:
    """The ``k`` kernels with the best per-layer speedup (worst over token counts), then dense."""
    best: dict[str, float] = {}
    for t in layer.timings:
        best[t.kernel] = min(best.get(t.kernel, float("inf")), t.speedup)
    ranked = sorted(best, key=lambda name: -best[name])
    return [name for name in ranked if name in KERNELS and KERNELS[name].available()][:k] + ["dense"]


def tune_plan(model: nn.Module, plan: Plan, masks: Optional[Mapping[str, Tensor]] = None, *,
              qweights: Optional[Mapping[str, Any]] = None, candidates: int = 3,
              prompt_tokens: int = 32, new_tokens: int = 8, repeats: int = 3,
              threads: Optional[int] = None, min_gain: float = 0.03, rounds: int = 5,
              progress: Optional[Callable[[str], None]] = None) -> Plan:
    """Refine ``plan`` group by group by the decode time of the whole model; returns the new plan.

    Args:
        model: the model the plan was made for, every planned layer still an ``nn.Linear``; it is
            left as it was given (kernel modules are swapped in only while timing).
        plan: from :func:`~prunus.kernels.plans.plan_model`, with its per-layer timings.
        masks, qweights: as given to ``plan_model``.
        candidates: how many kernels per group to try (by per-layer speedup), besides dense.
        prompt_tokens, new_tokens, repeats: the decode that is timed (random token ids; the
            speed does not depend on them).
        min_gain: another choice must be this much faster (fraction of a decode step) to replace
            the per-layer plan's, so that noise does not flip decisions.

    Layers with an activation gate keep it whatever module they run on (the decode is timed
    with the gates attached, as the model will run), and a kernel that skips zero inputs gets
    the layer's choice among the other kernels for prefill (:mod:`prunus.kernels.swap`).
        rounds: each option is timed this many times, in interleaved rounds (median kept). On a
            shared virtual machine two timings of the same model seconds apart differed by up to
            20% here; one sample per option chose on that noise.
    """
    masks, qweights = dict(masks or {}), dict(qweights or {})
    dense = {layer.name: model.get_submodule(layer.name) for layer in plan.layers}
    by_name = {layer.name: layer for layer in plan.layers}

    def prefill(name: str, kernel: str) -> str:
        lay = by_name[name]
        return prefill_choice(kernel, lay.timings, plan.tokens, plan.margin)
    built: dict[tuple[str, str], nn.Module] = {}

    def module(name: str, kernel: str) -> nn.Module:
        if kernel == "dense":
            return dense[name]
        if (name, kernel) not in built:
            mask = masks.get(name)
            if mask is None and name in qweights:
                mask = qweights[name].keep
            built[(name, kernel)] = build_module(dense[name], kernel, name=name, mask=mask,
                                                 qweight=qweights.get(name),
                                                 prefill=prefill(name, kernel))
        return built[(name, kernel)]

    def put(name: str, mod: nn.Module) -> None:
        _put(model, name, mod)

    chosen = {layer.name: layer.kernel for layer in plan.layers}
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, int(getattr(model.config, "vocab_size", 100)), (1, prompt_tokens),
                           generator=gen)

    def decode_ms() -> float:
        return 1e3 / time_generate(model, prompt, new_tokens, repeats=repeats)["decode_tok_s"]

    notes: dict[str, str] = {}
    try:
        with num_threads(threads), torch.inference_mode():
            for name, kernel in chosen.items():
                put(name, module(name, kernel))
            groups = sorted(_groups(plan).values(),
                            key=lambda g: -sum(lay.out_features * lay.in_features for lay in g))
            for group in groups:
                options = list(dict.fromkeys([chosen[group[0].name]] + _candidates(group[0], candidates)))
                samples: dict[str, list[float]] = {k: [] for k in options}
                for _ in range(rounds):  # interleaved, so that a slow spell hits every option
                    for kernel in options:
                        for layer in group:
                            put(layer.name, module(layer.name, kernel))
                        samples[kernel].append(decode_ms())
                times = {k: statistics.median(v) for k, v in samples.items()}
                first = options[0]
                best = min(times, key=lambda k: times[k])
                if times[best] > times[first] * (1 - min_gain):
                    best = first
                for layer in group:
                    put(layer.name, module(layer.name, best))
                    chosen[layer.name] = best
                    for kernel in options:  # free the variants not kept
                        if kernel != best:
                            built.pop((layer.name, kernel), None)
                    notes[layer.name] = ("end to end: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in sorted(times.items(), key=lambda kv: kv[1]))
                        + " ms/token")
                if progress is not None:
                    progress(f"{group[0].out_features}x{group[0].in_features} "
                             f"{group[0].pattern} {group[0].quant or 'float'} "
                             f"({len(group)} layers): {best}; {notes[group[0].name]}")
    finally:
        for name, mod in dense.items():
            put(name, mod)
    layers = tuple(dataclasses.replace(layer, kernel=chosen[layer.name],
                                       prefill=prefill(layer.name, chosen[layer.name]),
                                       reason=f"{layer.reason}; {notes.get(layer.name, '')}".rstrip("; "))
                   for layer in plan.layers)
    return dataclasses.replace(plan, layers=layers)


__all__ = ["tune_plan"]
