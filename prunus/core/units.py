"""The structural units of a transformer block, and the surgery that removes them.

A *unit* is what structured pruning removes whole: one MLP intermediate channel (a row of the
gate and up projections and the matching column of the down projection), or one attention head (its
rows of the query projection, with its key/value rows when a whole KV group goes, and its columns of
the output projection). :func:`layout_of` finds them by the module names of the two families
transformers uses:

    decoders (Llama, Mistral, Qwen2, ...)  self_attn.{q,k,v,o}_proj   mlp.{gate,up,down}_proj
    encoders (BERT, MiniLM, RoBERTa, ...)  attention.self.{query,key,value}, attention.output.dense
                                           intermediate.dense, output.dense

The surgery replaces linears by smaller ones (``keep`` indices, in order), updates the attributes
the attention forward reads (``num_key_value_groups``; BERT's ``num_attention_heads`` and
``all_head_size``), and can fold a bias into the consumer (FLAP's compensation). It works on the
live model and on a fresh one being rebuilt to stored widths (:func:`resize_block`), so a checkpoint
with different widths per layer loads back (:func:`apply_layer_widths`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from prunus.errors import ModelError

#: per-layer config keys that :func:`apply_layer_widths` understands
WIDTH_KEYS = ("intermediate_size", "num_attention_heads", "num_key_value_heads")

_DECODER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "attn": "self_attn", "producers": ("mlp.gate_proj", "mlp.up_proj"), "consumer": "mlp.down_proj",
            "mlp": "mlp"}
_ENCODER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
            "o": "attention.output.dense", "attn": "attention.self", "producers": ("intermediate.dense",),
            "consumer": "output.dense", "mlp": "intermediate"}


@dataclass(frozen=True)
class Layout:
    """Where a block keeps its units (module paths relative to the block) and how many it has."""

    family: str  # "decoder" or "encoder"
    q: str
    k: str
    v: str
    o: str
    attn: str
    producers: tuple[str, ...]
    consumer: str
    mlp: str
    head_dim: int
    heads: int
    kv_heads: int
    width: int  # MLP intermediate channels

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList with the most parameters whose children share one class."""
    best: tuple[int, str, Optional[nn.ModuleList]] = (0, "", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(c) for c in mod}) != 1:
                continue
            n = sum(p.numel() for p in mod.parameters())
            if n > best[0]:
                best = (n, name, mod)
    if best[2] is None:
        raise ModelError(f"{type(model).__name__}: found no list of transformer blocks to calibrate")
    return best[1], best[2]


def _get(block: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def layout_of(block: nn.Module) -> Layout:
    """The :class:`Layout` of a decoder or encoder block; a ModelError for anything else."""
    for family, names in (("decoder", _DECODER), ("encoder", _ENCODER)):
        mods = {k: _get(block, names[k]) for k in ("q", "k", "v", "o")}
        prods = [_get(block, p) for p in names["producers"]]
        cons = _get(block, names["consumer"])
        if all(isinstance(m, nn.Linear) for m in [*mods.values(), *prods, cons]):
            attn = block.get_submodule(names["attn"])
            if family == "decoder":
                hd = int(getattr(attn, "head_dim"))
            else:
                hd = int(getattr(attn, "attention_head_size"))
            heads, kv = mods["q"].out_features // hd, mods["k"].out_features // hd  # type: ignore[union-attr]
            if heads * hd != mods["q"].out_features or kv == 0 or heads % kv:  # type: ignore[union-attr]
                raise ModelError(f"{type(block).__name__}: {heads} query and {kv} key/value heads of "
                                 f"{hd} dims do not fit its projections")
            return Layout(family, names["q"], names["k"], names["v"], names["o"], names["attn"],
                          tuple(names["producers"]), names["consumer"], names["mlp"], hd, heads, kv,
                          cons.in_features)  # type: ignore[union-attr]
    raise ModelError(f"{type(block).__name__}: structured pruning knows Llama-family decoder blocks "
                     f"(self_attn.q_proj ... mlp.down_proj) and BERT-family encoder blocks; this has neither")


def _set(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, leaf, module)


def _linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    """A linear holding copies of ``weight`` and ``bias`` (normal tensors, even when made under
    inference mode, so the block can still be tuned by reconstruction)."""
    with torch.inference_mode(False):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(weight.clone(memory_format=torch.contiguous_format), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.clone(memory_format=torch.contiguous_format), requires_grad=False)
    return lin


def keep_rows(lin: nn.Linear, keep: Tensor) -> nn.Linear:
    """A linear computing only the outputs ``keep`` of ``lin``."""
    b = None if lin.bias is None else lin.bias.detach()[keep]
    return _linear(lin.weight.detach()[keep], b)


def keep_cols(lin: nn.Linear, keep: Tensor, add_bias: Optional[Tensor] = None) -> nn.Linear:
    """A linear reading only the inputs ``keep`` of ``lin``; ``add_bias`` (out,) is folded into its bias
    (one is created when ``lin`` has none)."""
    w = lin.weight.detach()[:, keep]
    b = None if lin.bias is None else lin.bias.detach().clone()
    if add_bias is not None:
        add = add_bias.to(w.dtype)
        b = add.clone() if b is None else b + add
    return _linear(w, b)


def with_zero_bias(lin: nn.Linear) -> nn.Linear:
    """``lin`` with a bias (zeros where it had none): a config flag such as ``mlp_bias`` gives every
    projection of a kind a bias, so the others get zero ones for the checkpoint to load."""
    if lin.bias is not None:
        return lin
    return _linear(lin.weight.detach(), torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                    device=lin.weight.device))


def _head_index(heads: Tensor, head_dim: int) -> Tensor:
    """Channel indices of the heads ``heads``: each head is ``head_dim`` consecutive channels."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


def remove_mlp(block: nn.Module, layout: Layout, keep: Tensor, add_bias: Optional[Tensor] = None) -> Layout:
    """Keep the MLP channels ``keep`` (sorted indices); returns the new layout."""
    keep = keep.sort().values
    for p in layout.producers:
        _set(block, p, keep_rows(block.get_submodule(p), keep))  # type: ignore[arg-type]
    _set(block, layout.consumer, keep_cols(block.get_submodule(layout.consumer), keep, add_bias))  # type: ignore[arg-type]
    mlp = block.get_submodule(layout.mlp)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(keep.numel())
    return _replace(layout, width=int(keep.numel()))


def remove_heads(block: nn.Module, layout: Layout, keep_q: Tensor, keep_kv: Tensor,
                 add_bias: Optional[Tensor] = None) -> Layout:
    """Keep query heads ``keep_q`` and key/value heads ``keep_kv`` (indices); every kept KV head must
    keep the same number of query heads of its group, so the block stays a valid GQA block."""
    keep_q, keep_kv = keep_q.sort().values, keep_kv.sort().values
    groups = keep_q // layout.group
    per = torch.bincount(groups, minlength=layout.kv_heads)
    if set(groups.tolist()) != set(keep_kv.tolist()) or len(set(per[keep_kv].tolist())) != 1:
        raise ModelError("kept query heads must come in equal numbers from each kept key/value group")
    q_idx, kv_idx = _head_index(keep_q, layout.head_dim), _head_index(keep_kv, layout.head_dim)
    _set(block, layout.q, keep_rows(block.get_submodule(layout.q), q_idx))  # type: ignore[arg-type]
    for name in (layout.k, layout.v):
        _set(block, name, keep_rows(block.get_submodule(name), kv_idx))  # type: ignore[arg-type]
    _set(block, layout.o, keep_cols(block.get_submodule(layout.o), q_idx, add_bias))  # type: ignore[arg-type]
    heads, kv = int(keep_q.numel()), int(keep_kv.numel())
    _set_head_attrs(block.get_submodule(layout.attn), layout, heads, kv)
    return _replace(layout, heads=heads, kv_heads=kv)


def _set_head_attrs(attn: nn.Module, layout: Layout, heads: int, kv: int) -> None:
    if layout.family == "decoder":
        attn.num_key_value_groups = heads // kv
        for name, value in (("num_heads", heads), ("num_key_value_heads", kv)):
            if hasattr(attn, name):
                setattr(attn, name, value)
    else:
        attn.num_attention_heads = heads
        attn.all_head_size = heads * layout.head_dim


def _replace(layout: Layout, **kw: Any) -> Layout:
    from dataclasses import replace

    return replace(layout, **kw)


def _fresh(lin: nn.Linear, out_f: int, in_f: int, bias: bool) -> nn.Linear:
    """An uninitialised linear of the given shape, on ``lin``'s device and dtype (weights come next)."""
    w = lin.weight
    return nn.Linear(in_f, out_f, bias=bias, device=w.device, dtype=w.dtype)


def resize_block(block: nn.Module, widths: Mapping[str, Any]) -> None:
    """Give a freshly built block the widths of a stored one (``intermediate_size``,
    ``num_attention_heads``, ``num_key_value_heads``); its weights are loaded afterwards."""
    lay = layout_of(block)
    width = int(widths.get("intermediate_size", lay.width))
    if width != lay.width:
        for p in lay.producers:
            lin = block.get_submodule(p)
            _set(block, p, _fresh(lin, width, lin.in_features, lin.bias is not None))  # type: ignore[arg-type]
        lin = block.get_submodule(lay.consumer)
        _set(block, lay.consumer, _fresh(lin, lin.out_features, width, lin.bias is not None))  # type: ignore[arg-type]
        mlp = block.get_submodule(lay.mlp)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width
    heads = int(widths.get("num_attention_heads", lay.heads))
    kv = int(widths.get("num_key_value_heads", lay.kv_heads if lay.family == "decoder" else heads))
    if (heads, kv) != (lay.heads, lay.kv_heads):
        hd = lay.head_dim
        for name, n in ((lay.q, heads), (lay.k, kv), (lay.v, kv)):
            lin = block.get_submodule(name)
            _set(block, name, _fresh(lin, n * hd, lin.in_features, lin.bias is not None))  # type: ignore[arg-type]
        lin = block.get_submodule(lay.o)
        _set(block, lay.o, _fresh(lin, lin.out_features, heads * hd, lin.bias is not None))  # type: ignore[arg-type]
        _set_head_attrs(block.get_submodule(lay.attn), lay, heads, kv)


def layer_widths(config: Any) -> dict[int, dict[str, Any]]:
    """The per-layer widths a config records (``per_layer_config``), {} when it records none."""
    raw = config.to_dict().get("per_layer_config") if hasattr(config, "to_dict") else None
    out: dict[int, dict[str, Any]] = {}
    for k, d in (raw or {}).items():
        got = {key: d[key] for key in WIDTH_KEYS if isinstance(d, Mapping) and key in d}
        if got:
            out[int(k)] = got
    return out


def apply_layer_widths(model: nn.Module, blocks: nn.ModuleList, config: Any) -> None:
    """Resize the blocks of a model built from ``config`` to the widths its ``per_layer_config``
    records (transformers builds every layer at the global width and ignores them)."""
    widths = layer_widths(config)
    for i, w in widths.items():
        if i >= len(blocks):
            raise ModelError(f"per_layer_config names layer {i} but the model has {len(blocks)} blocks")
        resize_block(blocks[i], w)
