"""Embedding tables under a quant spec: their grid, and how they are rounded.

With a quant spec (``2:4+int4g64``) an ``nn.Embedding`` table that is not a pruning target would stay
float and dominate a small model's checkpoint (a fifth of SmolLM2-135M), so it is rounded too:
int8 with one scale per row (token), or the spec's int4 groups when the width divides into them.

A table *tied* to the output head (SmolLM2's ``lm_head`` is its ``embed_tokens``) is also the last
linear layer, and int4 round-to-nearest of the head costs a small model much of its quality. When
the method quantizes by calibration (SparseGPT's GPTQ path, ``quantizes=True``), the tied table is
quantized the same way as a dense layer: GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR) on the head's inputs over the
calibration windows, run through the pruned model. Methods that round to nearest keep rounding the
table to nearest (the baseline, reported beside).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from prunus.core.capture import inputs_of
from prunus.core.quant import QuantizedWeight, rtn
from prunus.core.spec import Quant
from prunus.core.stats import LayerStats
from prunus.core.targets import Target

EMBEDDING_QUANT = Quant(8)  # nn.Embedding tables outside the targets, with an int8 spec (or a fallback)

# (weight (out, in) float32, stats with a hessian, quant, name) -> QuantizedWeight
Solver = Callable[[Tensor, LayerStats, Quant, str], QuantizedWeight]


def embedding_quant(quant: Optional[Quant], dim: int) -> Quant:
    """The grid of an embedding table under a quant spec: the spec's own int4 groups when the table's
    width divides into them (int4 everywhere, as llama.cpp's Q4 formats do), else int8 per row."""
    if quant is not None and quant.bits == 4 and (quant.group is None or dim % quant.group == 0):
        return quant
    return EMBEDDING_QUANT


def tied_head(model: nn.Module, table: nn.Embedding) -> Optional[nn.Linear]:
    """The ``nn.Linear`` whose weight *is* ``table``'s weight (a tied output head), or None."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and mod.weight is table.weight:
            return mod
    return None


def head_stats(model: nn.Module, head: nn.Module, calib: Tensor, *, batch_size: Optional[int] = None,
               device: str | torch.device = "cpu") -> LayerStats:
    """X^T X of ``head``'s inputs over ``calib`` (n, seqlen) token ids, the model as it is now.

    The forward stops at the head (:func:`~prunus.core.capture.inputs_of`), so no logits over the
    vocabulary are computed.
    """
    stats = LayerStats()
    extra: dict[str, Any] = {"use_cache": False} if _takes_cache(model) else {}
    step = batch_size or calib.shape[0]
    with torch.no_grad():
        for start in range(0, calib.shape[0], step):
            ids = calib[start:start + step].to(device)
            got = inputs_of(head, lambda: model(input_ids=ids, **extra))
            if got is not None:
                stats.add(got[0][0], frozenset({"hessian"}))
    return stats


def _takes_cache(model: nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def quantize_embeddings(model: nn.Module, targets: Sequence[Target], quant: Optional[Quant] = None, *,
                        solver: Optional[Solver] = None, calib: Optional[Tensor] = None,
                        batch_size: Optional[int] = None,
                        device: str | torch.device = "cpu") -> dict[str, QuantizedWeight]:
    """Round every ``nn.Embedding`` table that is not a target to :func:`embedding_quant`'s grid.

    ``solver`` (with ``calib``): a table tied to an output head is quantized by ``solver`` on the
    head's input statistics (:func:`head_stats`) instead of to nearest. A tied ``lm_head`` shares the
    result either way. Returns the codes per table name.
    """
    names = {t.name for t in targets}
    out: dict[str, QuantizedWeight] = {}
    seen: set[int] = set()
    with torch.no_grad():
        for fqn, mod in model.named_modules():
            if not isinstance(mod, nn.Embedding) or fqn in names or id(mod.weight) in seen:
                continue
            seen.add(id(mod.weight))
            w = mod.weight
            grid = embedding_quant(quant, w.shape[1])
            head = tied_head(model, mod) if solver is not None and calib is not None else None
            if head is not None:
                stats = head_stats(model, head, calib, batch_size=batch_size, device=device)
                qw = solver(w.float(), stats, grid, fqn)
            else:
                qw = rtn(w.float(), torch.ones(w.shape, dtype=torch.bool, device=w.device), grid, fqn)
            w.copy_(qw.dequantize().to(w.dtype))
            out[fqn] = qw
    return out
