"""The config of a structurally pruned model: what a loader needs to build it at its new size.

Uniform widths (every block alike) are plain config fields (``num_hidden_layers``,
``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, an explicit ``head_dim``),
so the folder loads with ``AutoModelForCausalLM.from_pretrained`` and no prunus import. Widths that
differ per block are recorded in transformers' own ``per_layer_config`` (layer index -> the fields
that differ). Stock Llama and BERT read that field but build every layer at the global width; a
plain ``from_pretrained`` then stops at the first weight of the wrong shape, and :func:`prunus.load`
rebuilds the layers at their recorded widths (:func:`prunus.core.units.apply_layer_widths`).

BERT computes its head size as ``hidden_size / num_attention_heads``, so removed heads are always
per-layer entries (the global count, and with it the head size, stays).

Bias compensation gives a consumer a bias; Llama's config switches biases on per kind
(``mlp_bias``, ``attention_bias``), so every projection of that kind gets one (zeros where none was
computed) and the checkpoint loads without a missing tensor.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from torch import nn

from prunus.core.units import Layout, layout_of, with_zero_bias


def _widths(lay: Layout) -> dict[str, int]:
    out = {"intermediate_size": lay.width, "num_attention_heads": lay.heads}
    if lay.family == "decoder":
        out["num_key_value_heads"] = lay.kv_heads
    return out


def _bias_flags(blocks: nn.ModuleList, lays: Sequence[Layout], config: Any) -> None:
    for flag, paths in (("mlp_bias", lambda l: (*l.producers, l.consumer)),
                        ("attention_bias", lambda l: (l.q, l.k, l.v, l.o))):
        if not hasattr(config, flag) or getattr(config, flag):
            continue
        if not any(b.get_submodule(p).bias is not None for b, l in zip(blocks, lays) for p in paths(l)):
            continue
        for b, l in zip(blocks, lays):
            for p in paths(l):
                parent, _, leaf = p.rpartition(".")
                owner = b.get_submodule(parent) if parent else b
                setattr(owner, leaf, with_zero_bias(getattr(owner, leaf)))
        setattr(config, flag, True)


def record_structure(model: nn.Module, blocks: nn.ModuleList, removed: Sequence[int],
                     original: Layout) -> list[dict[str, int]]:
    """Write the pruned model's shape into its config; return each block's widths."""
    lays = [layout_of(b) for b in blocks]
    widths = [_widths(l) for l in lays]
    config = getattr(model, "config", None)
    if config is None:
        return widths
    _bias_flags(blocks, lays, config)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == len(blocks) + len(removed):
        config.layer_types = [t for i, t in enumerate(types) if i not in set(removed)]
    config.num_hidden_layers = len(blocks)
    keys = list(widths[0])
    if original.family == "encoder":
        glob = {"intermediate_size": Counter(w["intermediate_size"] for w in widths).most_common(1)[0][0],
                "num_attention_heads": original.heads}
    else:
        glob = {k: Counter(w[k] for w in widths).most_common(1)[0][0] for k in keys}
        config.head_dim = original.head_dim  # explicit: hidden / heads no longer gives it
    for k, v in glob.items():
        setattr(config, k, v)
    per = {i: {k: w[k] for k in keys if w[k] != glob[k]} for i, w in enumerate(widths)}
    per = {i: d for i, d in per.items() if d}
    if per:
        config.allow_global_per_layer_attribute_access = True
        config.per_layer_config = per
    return widths
