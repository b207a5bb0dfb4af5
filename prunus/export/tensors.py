"""Tensors of a model as checkpoints store them: the untied state, masks checked against it, dtypes.

Shared by every format in :mod:`prunus.export.formats`: :func:`unique_state` (tied tensors once),
:func:`resolve_masks` / :class:`StoredMask` (masks by stored key, and back by module), hashing,
sizing, and putting a loaded tensor in place.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from prunus.errors import CheckpointError

# safetensors' dtype names, to size a dense file without writing one.
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def sha256_tensor(t: Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (row-major, native byte order)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()  # no copy: a buffer view


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; a CheckpointError for names torch does not know."""
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in checkpoint metadata")
    return dt


def weight_key(fqn: str) -> str:
    """State-dict key of a module's weight: ``"model.layers.0.mlp.up_proj"`` -> ``"...up_proj.weight"``."""
    return f"{fqn}.weight" if fqn else "weight"


def dense_safetensors_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Size of a dense safetensors file of ``tensors`` (header with ``{"format": "pt"}`` included)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES.get(t.dtype, "F32"), "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    head = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + head + (-head % 8) + offset


def unique_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The model's state dict with tied tensors kept once.

    Returns:
        ``(tensors, tied)``: ``tensors`` maps each stored key to a detached tensor; ``tied`` maps each
        dropped key (``lm_head.weight``) to the stored key it aliases (``model.embed_tokens.weight``).
        A tensor that overlaps another's storage without being the same view is copied instead.
    """
    for name, mod in model.named_modules():
        if getattr(mod, "parametrizations", None):
            raise CheckpointError(
                f"{name or 'model'} is parametrized; squash the masks into the weights first "
                f"(torch.nn.utils.parametrize.remove_parametrizations) and save again"
            )
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple[str, int]] = set()
    for key, t in model.state_dict().items():
        t = t.detach()
        if t.device.type == "meta":
            raise CheckpointError(f"{key} is on the meta device (not loaded); load the model fully first")
        if t.numel() == 0:
            tensors[key] = t
            continue
        store = (t.device.type, t.untyped_storage().data_ptr())
        view = (*store, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            tied[key] = views[view]
            continue
        if store in storages:
            t = t.clone()  # a different view of shared memory: store its own copy
        else:
            storages.add(store)
        views[view] = key
        tensors[key] = t
    return tensors, tied


@dataclass
class StoredMask:
    """A mask as it is stored: in its weight's layout, with the names it was given under."""

    mask: Tensor  # bool, shaped like the weight, on CPU
    modules: list[str]  # module fqns the mask was given for (two for a tied weight)
    transposed: list[str] = field(default_factory=list)  # of those, given (out, in) for a Conv1D

    def layout(self) -> dict[str, Any]:
        """The manifest entries that let :func:`masks_by_module` hand the masks back as given."""
        nnz = int(torch.count_nonzero(self.mask))
        return {"modules": self.modules, "transposed_modules": self.transposed, "nnz": nnz,
                "sparsity": round(1.0 - nnz / max(1, self.mask.numel()), 6)}


def masks_by_module(mask: Tensor, info: Mapping[str, Any]) -> dict[str, Tensor]:
    """Inverse of :class:`StoredMask`: module fqn -> mask, in the layout each was given in."""
    flipped = set(info.get("transposed_modules", []))
    return {fqn: mask.t().contiguous() if fqn in flipped else mask for fqn in info.get("modules", [])}


def _is_transposed(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2) keeps its weight as (in, out); prunus masks are (out, in)."""
    return type(module).__name__ == "Conv1D"


def resolve_masks(model: nn.Module, tensors: Mapping[str, Tensor], tied: Mapping[str, str],
                  masks: Mapping[str, Tensor] | None) -> dict[str, StoredMask]:
    """Check the masks against the model and map them to stored state-dict keys.

    Args:
        model: the pruned model.
        tensors, tied: from :func:`unique_state`.
        masks: module fqn (or ``fqn.weight``) -> bool keep mask shaped like the module's weight.
            For a transposed ``Conv1D`` weight (in, out) the (out, in) mask that
            :mod:`prunus.core.targets` works with is expected (a weight-shaped one is taken too when the
            weight is not square); it is handed back by ``load_masks`` in the layout given.

    Returns:
        stored key -> :class:`StoredMask`. A mask given for a tied alias (``lm_head``) lands on the
        stored key (``model.embed_tokens.weight``).

    Raises:
        CheckpointError: unknown module, wrong shape or dtype, two different masks on one tied
            weight, or a weight that is non-zero where its mask prunes (masks not applied).
    """
    out: dict[str, StoredMask] = {}
    for name, mask in (masks or {}).items():
        fqn = name
        if weight_key(name) not in tensors and weight_key(name) not in tied and name.endswith(".weight"):
            fqn = name[: -len(".weight")]
        key = weight_key(fqn)
        key = tied.get(key, key)
        if key not in tensors:
            raise CheckpointError(
                f"mask for {name!r}: the model has no weight {weight_key(fqn)!r}; "
                f"masks are keyed by module name, e.g. 'model.layers.0.mlp.up_proj'"
            )
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise CheckpointError(f"mask for {name!r} must be a torch.bool tensor (True = keep)")
        weight = tensors[key]
        mask = mask.detach().to("cpu")
        shape, wshape = tuple(mask.shape), tuple(weight.shape)
        transposed = (weight.dim() == 2 and shape == wshape[::-1] and _is_transposed(model.get_submodule(fqn))
                      and (shape != wshape or wshape[0] == wshape[1]))
        if transposed:
            mask = mask.t().contiguous()
        elif shape != wshape:
            raise CheckpointError(f"mask for {name!r} has shape {shape} but the weight is {wshape}")
        pruned_nonzero = torch.gt(weight.to("cpu") != 0, mask)  # non-zero and not kept
        if bool(pruned_nonzero.any()):
            bad = int(torch.count_nonzero(pruned_nonzero))
            raise CheckpointError(
                f"{name}: {bad} weights are non-zero where the mask prunes them; "
                f"apply the masks to the weights before saving"
            )
        if key in out:
            if not torch.equal(out[key].mask, mask):
                raise CheckpointError(
                    f"masks for {out[key].modules[0]!r} and {name!r} differ but the weights are tied; "
                    f"give one mask for the shared weight"
                )
        else:
            out[key] = StoredMask(mask, [])
        out[key].modules.append(fqn)
        if transposed:
            out[key].transposed.append(fqn)
    return out


def plain_config(model: nn.Module, dtype: torch.dtype | None) -> Any:
    """A copy of ``model.config`` without ``quantization_config`` (a GGUF model's config carries one,
    and the saved weights are plain dequantized tensors), with ``dtype`` set to the stored dtype."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "save_pretrained"):
        return None
    cfg = copy.deepcopy(cfg)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    if dtype is not None:
        cfg.dtype = dtype
    return cfg


def main_dtype(tensors: Mapping[str, Tensor]) -> torch.dtype | None:
    """The most common floating dtype by element count, or None without floating tensors."""
    count: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=count.__getitem__) if count else None


def save_extras(model: nn.Module, folder: Path, tokenizer: Any | None) -> None:
    """Write the generation config (when the model has one) and the tokenizer files."""
    gen = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if gen is not None and can_generate():
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def assign_tensor(model: nn.Module, key: str, value: Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``key`` (no copy; keeps requires_grad)."""
    mod_name, _, leaf = key.rpartition(".")
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        raise CheckpointError(f"the checkpoint has {key!r} but the model has no module {mod_name!r}") from None
    if leaf in mod._parameters and mod._parameters[leaf] is not None:
        old = mod._parameters[leaf]
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=bool(old.requires_grad))
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        raise CheckpointError(f"the checkpoint has {key!r} but the model has no such parameter or buffer")
