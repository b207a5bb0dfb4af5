"""``prunus bench`` and ``prunus export --runtime auto``: load a model, measure it, store its plan.

Making sparsity pay at run time: measure each layer, keep a sparse kernel only where it is faster.

``prunus bench`` times every prunable linear of a model, dense against each applicable kernel, and
the end-to-end prefill and decode. ``prunus export --runtime auto`` stores a compressed checkpoint
whose metadata carries a kernel :class:`~prunus.kernels.plans.Plan`, and
:func:`prunus.load` (``runtime="auto"``) swaps in exactly the planned kernels, so a layer that was
not measurably faster stays dense and the model is never made slower by its sparsity.

Example:
    >>> info, plan = export_runtime("runs/wanda80", "runs/wanda80-cpu", tokens=[1])
    >>> print(plan.table())
    >>> model = prunus.load("runs/wanda80-cpu")       # CSR kernels where they won, dense elsewhere
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from prunus import export
from prunus.errors import CheckpointError, SpecError
from prunus.core.options import build_options, option
from prunus.core.targets import select
from prunus.io.fsutil import check_out_dir
from prunus.io.models import load_checkpoint, load_model
from prunus.kernels.gating import gated_layers, gates_off
from prunus.kernels.plans import PLAN_KEY, apply_plan, plan_model
from prunus.kernels.registry import KernelError, resolve_device
from prunus.kernels.tune import tune_plan
from prunus.kernels.timing import time_generate, time_linear


ACTIVATION_KEY = "activation_sparsity"  # the checkpoint's gates (prunus prune --activation-sparsity)


def check_gates(model: nn.Module, meta: dict[str, Any], log: Callable[[str], None]) -> dict[str, float]:
    """The model's gated layers; a warning when the metadata records gates that are not attached
    (then the plan is made without activation sparsity)."""
    gates = gated_layers(model)
    if meta.get(ACTIVATION_KEY) and not gates:
        log(f"warning: the checkpoint records activation sparsity ({ACTIVATION_KEY}), but no "
            f"layer has a gate attached; the kernels are planned on dense inputs")
    return gates


@dataclass(frozen=True)
class BenchOptions:
    """The numbers of ``prunus bench``, range-checked before anything is loaded or timed."""

    prompt_tokens: int = option(128, min=1)
    new_tokens: int = option(32, min=1)
    margin: float = option(1.1, gt=0)
    threads: Optional[int] = option(None, min=1)


@dataclass(frozen=True)
class ExportOptions:
    """The numbers of ``prunus export``, range-checked before anything is loaded or measured."""

    margin: float = option(1.1, gt=0)
    threads: Optional[int] = option(None, min=1)


def check_tokens(tokens: Sequence[int], owner: str) -> list[int]:
    """Token counts: a non-empty list of positive integers, or a SpecError."""
    vals = list(tokens) if isinstance(tokens, (list, tuple)) else None
    if not vals or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in vals):
        raise SpecError(f"{owner}: tokens must be positive integers, got {tokens!r}")
    return vals


def quantized_for(source: str) -> dict[str, Any]:
    """The stored quantized weights of a prunus checkpoint ({} for any other model)."""
    if (Path(source) / "prunus.json").is_file():
        return export.load_quantized(source)
    return {}


def masks_for(source: str, model: nn.Module) -> dict[str, Tensor]:
    """The keep masks of a prunus checkpoint; for any other model, its non-zero pattern."""
    if (Path(source) / "prunus.json").is_file():
        masks = export.load_masks(source)
        if masks:
            return masks
    return {t.name: (t.get() != 0) for t in select(model) if not t.transposed}


def export_runtime(checkpoint: str, out: str, *, runtime: str = "auto", tokens: Sequence[int] = (1,),
                   margin: float = 1.1, device: str = "cpu", threads: Optional[int] = None,
                   overwrite: bool = False, log: Callable[[str], None] = print,
                   act_int8: bool = False, tune: bool = False) -> tuple[Any, Any]:
    """Plan kernels for a pruned checkpoint on this machine and save it with the plan.

    Args:
        checkpoint: a prunus checkpoint folder (it must carry masks).
        out: the output folder (compressed format, atomic).
        runtime: ``auto`` (measure and decide per layer) or ``dense`` (no sparse kernels).
        tokens: token counts the model will run at; a kernel must win at every one.
        margin: how many times faster than dense a kernel must be.
        device: where to measure; the plan only applies there.
        threads: torch threads for the measurement (default: torch's current setting).
        act_int8: let the W8A8 kernels (activation rounded to int8 per token) compete for the
            int8 layers; faster, not exact: measure the perplexity of the result.
        tune: then refine the plan by the decode time of the whole model, group by group of
            like layers (:func:`prunus.kernels.tune.tune_plan`; a few minutes for SmolLM2). Off by
            default: not yet measured at the scale of the frontier benchmark.

    The model is loaded by :func:`prunus.io.models.load_checkpoint` (``runtime="dense"``), which
    attaches the activation gates the checkpoint records: gated layers are planned on inputs with
    their fraction of zeros (:func:`~prunus.kernels.plans.plan_model`), the tuning decode runs with
    the gates, and the metadata (``activation_sparsity`` included) is copied to ``out``.

    Returns:
        ``(ExportInfo, Plan)``.

    Raises:
        CheckpointError: not a prunus checkpoint, or no masks, quantized weights or gates stored.
        KernelError: ``device="cuda"`` without CUDA.
    """
    if runtime not in ("auto", "dense"):
        raise KernelError(f"unknown runtime {runtime!r}; choose auto or dense")
    opts = build_options(ExportOptions, {"margin": margin, "threads": threads}, "prunus export")
    tokens = check_tokens(tokens, "prunus export")
    check_out_dir(out, overwrite)
    resolve_device(device)
    if not (Path(checkpoint) / "prunus.json").is_file():
        raise CheckpointError(f"{checkpoint} is not a prunus checkpoint; --runtime auto needs the masks "
                              f"that `prunus prune --out` stores")
    masks = export.load_masks(checkpoint)
    qweights = export.load_quantized(checkpoint)
    meta = dict(export.read_metadata(checkpoint))
    if not masks and not qweights and not meta.get(ACTIVATION_KEY):
        raise CheckpointError(f"{checkpoint} stores no masks nor quantized weights; --runtime auto "
                              f"needs a pruned, quantized or activation-sparse checkpoint")
    # dense: the plan stored there (if any) is not applied; the activation gates are attached
    model = load_checkpoint(checkpoint, runtime="dense")
    gates = check_gates(model, meta, log)
    if not masks and not qweights and not gates:
        raise CheckpointError(f"{checkpoint} records activation sparsity but its gates could not be "
                              f"attached, and it stores no masks nor quantized weights")
    plan = None
    if runtime == "auto":
        unpruned = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                    and n not in masks and n not in qweights]  # the tied output head, typically
        plan = plan_model(model, masks, tokens, opts.margin, device=device, threads=opts.threads,
                          progress=lambda s: log(s), qweights=qweights, approximate=act_int8,
                          also=unpruned)
        if tune and torch.device(device).type == "cpu":
            plan = tune_plan(model, plan, masks, qweights=qweights, threads=opts.threads,
                             progress=lambda s: log(s))
        meta[PLAN_KEY] = plan.to_dict()
    else:
        meta.pop(PLAN_KEY, None)
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(checkpoint)
    except Exception:  # a checkpoint saved without a tokenizer is still exportable
        tok = None
    info = export.save(model, out, format="compressed", masks=masks, metadata=meta, tokenizer=tok,
                       overwrite=overwrite, **({"quant": qweights} if qweights else {}))
    return info, plan


def bench_model(source: str, *, device: str = "cpu", tokens: Sequence[int] = (1, 16, 128),
                threads: Optional[int] = None, prompt_tokens: int = 128, new_tokens: int = 32,
                margin: float = 1.1, log: Callable[[str], None] = print,
                compile: bool = False, tune: bool = False) -> dict[str, Any]:
    """Per-layer timings (dense vs every applicable kernel) and end-to-end prefill/decode.

    The end-to-end numbers compare the dense model with the same model after a plan made for
    batch-1 decode (``tokens=[1]``) has been applied, so they show what ``--runtime auto`` gives.
    With activation gates the dense baseline runs without them (the model a user would otherwise
    run); ``end_to_end["dense_gated"]`` is the gated model on dense kernels.
    A checkpoint stored quantized has its integer kernels timed too (the dense reference is the
    decoded float32 weight). ``compile``: time the planned model once more after
    ``torch.compile`` (:mod:`prunus.kernels.compiled_model`), under ``end_to_end["compiled"]``.
    """
    opts = build_options(BenchOptions, {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                                        "margin": margin, "threads": threads}, "prunus bench")
    tokens = check_tokens(tokens, "prunus bench")
    prompt_tokens, new_tokens, margin, threads = opts.prompt_tokens, opts.new_tokens, opts.margin, opts.threads
    dev = resolve_device(device)
    model, _ = load_model(source, runtime="dense")  # every layer dense: bench times them all itself
    model.to(dev)
    masks = masks_for(source, model)
    qweights = quantized_for(source)
    meta = dict(export.read_metadata(source)) if (Path(source) / "prunus.json").is_file() else {}
    gates = check_gates(model, meta, log)
    rows, seen = [], {}
    mods = dict(model.named_modules())
    names = list(masks) + [n for n in qweights if n not in masks and isinstance(mods.get(n), nn.Linear)]
    unpruned = [n for n, m in mods.items() if isinstance(m, nn.Linear) and n not in names]
    for name in names + unpruned:
        lin, qw = mods[name], qweights.get(name)
        mask = masks[name] if name in masks else qw.keep if qw is not None else lin.weight != 0
        sp = round(1.0 - float(mask.sum()) / mask.numel(), 3)
        zeros = round(gates.get(name, 0.0), 2)
        key = (tuple(lin.weight.shape), sp, lin.bias is not None, None if qw is None else str(qw.quant),
               zeros)
        if key not in seen:  # the same shape, sparsity, grid and input sparsity is measured once
            seen[key] = time_linear(lin, mask, list(tokens), device=dev, threads=threads, name=name,
                                    qweight=qw, input_sparsity=zeros)
            log(f"measured {name} {tuple(lin.weight.shape)} at sparsity {sp}"
                f"{'' if qw is None else f' ({qw.quant})'}"
                f"{f', {zeros:.0%} zero inputs' if name in gates else ''}")
        for t in seen[key]:
            rows.append({"layer": name, **t.to_dict()})
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), device=dev)
    with gates_off(model):  # the baseline: dense kernels, no activation gates
        dense = time_generate(model, prompt, new_tokens)
    gated = time_generate(model, prompt, new_tokens) if gates else None
    plan = plan_model(model, masks, [1], margin, device=dev, threads=threads, qweights=qweights,
                      also=unpruned)
    if tune and dev.type == "cpu":
        plan = tune_plan(model, plan, masks, qweights=qweights, threads=threads, progress=log)
    applied = apply_plan(model, plan, masks, qweights=qweights)
    sparse = time_generate(model, prompt, new_tokens)
    e2e = {"dense": dense, "planned": sparse,
           "prefill_speedup": dense["prefill_s"] / sparse["prefill_s"],
           "decode_speedup": sparse["decode_tok_s"] / dense["decode_tok_s"]}
    if gated is not None:  # the gates on dense kernels: what the gates cost without skip kernels
        e2e["dense_gated"] = gated
    if compile:
        from prunus.kernels.compiled_model import compile_model

        compile_model(model)
        time_generate(model, prompt, 4, repeats=1)  # the first calls compile
        e2e["compiled"] = time_generate(model, prompt, new_tokens)
        e2e["compiled_decode_speedup"] = e2e["compiled"]["decode_tok_s"] / dense["decode_tok_s"]
    return {"model": source, "device": str(dev), "threads": threads or torch.get_num_threads(),
            "layers": rows, "plan": plan.to_dict(), "sparse_layers": len(applied),
            "quantized_layers": len(qweights), "end_to_end": e2e}
