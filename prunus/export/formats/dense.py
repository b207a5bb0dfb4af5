"""The dense format: an ordinary ``save_pretrained`` folder, plus masks and provenance.

Any tool that reads transformers checkpoints loads it (``AutoModelForCausalLM.from_pretrained``, or
the class its ``config.json`` names, such as ``BertModel``); the zeros are simply stored. prunus adds
two files that other tools ignore::

    prunus.json          metadata, the masks' layout, and a SHA-256 of every ``*.safetensors`` file
    masks.safetensors    each mask as packed bits (uint8), keyed by its weight's state-dict key

A model loaded from GGUF refuses ``save_pretrained`` ("quantized with gguf and is not
serializable") although its weights are plain dequantized tensors; it is saved through a fresh
model built from its config without the ``quantization_config``, sharing the same tensors.

Example:
    >>> import tempfile, pathlib, torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "dense"
    >>> save(model, out, masks={}, metadata={"method": "magnitude"}).format
    'dense'
    >>> plain = AutoModelForCausalLM.from_pretrained(out)
    >>> torch.equal(plain.lm_head.weight, model.lm_head.weight)
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from prunus.core.units import layer_widths
from prunus.errors import CheckpointError
from prunus.export import arch
from prunus.export.manifest import (FORMAT_VERSION, WEIGHTS, ExportInfo, check_checkpoint_path, error_line,
                                    folder_bytes, read_manifest, sha256_file, with_provenance,
                                    write_manifest)
from prunus.export.tensors import (dense_safetensors_bytes, dtype_name, main_dtype, masks_by_module,
                                   plain_config, resolve_masks, unique_state)
from prunus.io.checks import quiet_loading
from prunus.io.fsutil import atomic_dir, check_out_dir
from prunus.core.masks import pack, unpack

NAME = "dense"
PRIORITY = 0  # sniffed last: any transformers safetensors folder is dense
MASKS_FILE = "masks.safetensors"


def _serialisable(model: nn.Module) -> nn.Module:
    """``model`` itself, or for a quantizer-loaded (GGUF) model a plain twin sharing its tensors."""
    quantized = getattr(model, "hf_quantizer", None) is not None or \
        getattr(getattr(model, "config", None), "quantization_config", None) is not None
    if not quantized:
        return model
    state, _ = unique_state(model)
    cfg = plain_config(model, main_dtype(state))
    with torch.device("meta"):  # no second copy of the weights: they are assigned below
        twin = type(model)._from_config(cfg)
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    twin.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        twin.generation_config = model.generation_config
    return twin


def save(model: nn.Module, path: str | os.PathLike[str], *, masks: Mapping[str, Tensor] | None = None,
         metadata: Mapping[str, Any] | None = None, tokenizer: Any | None = None,
         overwrite: bool = False, quant: Mapping[str, Any] | None = None) -> ExportInfo:
    """Save ``model`` as a ``save_pretrained`` folder with ``prunus.json`` and packed masks, atomically.

    A quantized model (``quant``, from ``PruneResult.quant``) is saved as its dequantized float
    weights, which it already holds; only the compressed format stores the codes.

    Args:
        model: a transformers model (it needs ``save_pretrained``), masks applied.
        path: the output folder; it must not exist unless ``overwrite``.
        masks: module fqn -> bool keep mask shaped like its ``.weight``.
        metadata: JSON-serialisable provenance, stored in ``prunus.json``.
        tokenizer: saved beside the weights when given.
        overwrite: replace an existing folder, only once the new one is complete.

    Returns:
        :class:`~prunus.export.ExportInfo`; ``bytes`` counts the weights and the masks file.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False (before any work).
        CheckpointError: not a transformers model, a mask that does not fit, or metadata not JSON.
    """
    out = check_out_dir(path, overwrite)
    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise CheckpointError(
            f"the dense format needs a transformers model (with save_pretrained), got "
            f"{type(model).__name__}; use format='compressed' for other modules"
        )
    if layer_widths(model.config):
        raise CheckpointError(
            "this model's layers have different widths (structured pruning, recorded in the config's "
            "per_layer_config), which stock transformers ignores: it builds every layer at the global "
            "width, so a plain save_pretrained folder would not load; save it with format='compressed' "
            "(--format compressed; prunus.load rebuilds the layers), or prune with uniform widths "
            "(--structure-allocation uniform; for BERT, no heads@)")
    state, tied = unique_state(model)
    key_masks = resolve_masks(model, state, tied, masks)
    meta = with_provenance(metadata, model)
    dtype = main_dtype(state)
    packed = {key: pack(m.mask) for key, m in key_masks.items()}
    layout = {key: {"shape": list(m.mask.shape), **m.layout()} for key, m in key_masks.items()}
    target = _serialisable(model)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        target.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if packed:
            save_file(packed, str(tmp / MASKS_FILE), metadata={"format": "pt", "prunus.format": "masks"})
        write_manifest(tmp, {
            "format": NAME, "format_version": FORMAT_VERSION, "architecture": type(model).__name__,
            "dtype": dtype_name(dtype) if dtype is not None else None, "metadata": meta,
            "masks": layout, "tied": tied,
            "sha256": {f.name: sha256_file(f) for f in sorted(tmp.glob("*.safetensors"))},
        })
    return ExportInfo(path=out, format=NAME, bytes=folder_bytes(out, "*.safetensors"),
                      dense_bytes=dense_safetensors_bytes(state), total_bytes=folder_bytes(out),
                      encodings={key: "dense" for key in key_masks})


def _verify(folder: Path, manifest: Mapping[str, Any], only: str | None = None) -> None:
    """Check the files listed in ``prunus.json`` against their SHA-256 (all, or just ``only``)."""
    for name, digest in manifest.get("sha256", {}).items():
        if only is not None and name != only:
            continue
        f = folder / name
        if not f.exists():
            raise CheckpointError(f"{f} is missing; re-export the checkpoint or restore the file")
        if sha256_file(f) != digest:
            raise CheckpointError(
                f"{f} is corrupt: its SHA-256 differs from prunus.json (the file was modified or "
                f"damaged); re-export it or restore a good copy"
            )


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> nn.Module:
    """Load a dense (or plain transformers safetensors) folder in eval mode.

    Files listed in ``prunus.json`` are checked against their SHA-256 first; a plain transformers
    folder (no ``prunus.json``) is loaded as it is.

    Raises:
        CheckpointError: missing, pickle-only, corrupt, or not loadable by transformers.
    """
    import transformers

    folder = check_checkpoint_path(path)
    manifest = read_manifest(folder)
    _verify(folder, manifest)
    cls = arch.named_class(str(manifest.get("architecture") or ""))
    if cls is None:  # a plain folder: the class its config.json names (BertModel), else a causal LM
        try:
            cls = arch.model_class(transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True))
        except Exception as e:  # transformers raises many types (config validation among them)
            raise CheckpointError(f"{folder / 'config.json'} cannot be used: {error_line(e)}") from None
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        with quiet_loading():
            model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    except Exception as e:  # transformers raises many types (config validation among them)
        raise CheckpointError(f"{folder} could not be loaded: {error_line(e)}") from None
    missing = sorted(set(info.get("missing_keys") or ()) | {str(k[0]) if isinstance(k, tuple) else str(k)
                                                            for k in info.get("mismatched_keys") or ()})
    if missing:  # transformers initialised them at random: never a silent wrong model
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{folder} lacks {len(missing)} tensor(s) the model needs "
                              f"({', '.join(missing[:3])}{more}); restore the files or re-export")
    return model.to(torch.device(device)).eval()


def load_masks(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The stored keep masks: module fqn -> bool tensor ({} when none were saved)."""
    folder = check_checkpoint_path(path)
    manifest = read_manifest(folder)
    layout: dict[str, Any] = manifest.get("masks", {})
    if not layout:
        return {}
    _verify(folder, manifest, only=MASKS_FILE)
    masks: dict[str, Tensor] = {}
    try:
        with safe_open(str(folder / MASKS_FILE), framework="pt", device="cpu") as fh:
            for key, info in layout.items():
                mask = unpack(fh.get_tensor(key), tuple(int(s) for s in info["shape"]))
                masks.update(masks_by_module(mask, info))
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder / MASKS_FILE} is corrupt: {e}; re-export the checkpoint") from None
    return masks


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata given to :func:`save` ({} for a plain transformers folder)."""
    meta = read_manifest(path).get("metadata", {})
    return dict(meta) if isinstance(meta, dict) else {}


def sniff(folder: Path) -> bool:
    """Whether a folder without ``prunus.json`` is a plain transformers safetensors folder."""
    has_weights = (folder / WEIGHTS).exists() or (folder / f"{WEIGHTS}.index.json").exists()
    return has_weights and (folder / "config.json").exists()


__all__ = ["NAME", "PRIORITY", "sniff", "MASKS_FILE", "save", "load", "load_masks", "read_metadata"]
