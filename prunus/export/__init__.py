"""Checkpoints: save a pruned model with its masks and provenance, load it back, refuse pickle.

This face holds the format-agnostic verbs and the format registry (:mod:`prunus.export.registry`).
Every format is a module of :mod:`prunus.export.formats`, registered by being there, with the same
verbs (the safetensors habit):

    save(model, path, *, masks, metadata, tokenizer=None, overwrite=False) -> ExportInfo
    load(path, *, device="cpu", dtype=None) -> model
    load_masks(path) -> {module fqn: bool keep mask}
    read_metadata(path) -> dict

Formats (``FORMATS``; :func:`format_names` lists the names):
    compressed  a folder with ``model.safetensors`` holding each pruned weight as packed mask bits +
                kept values (or values + column indices when that is smaller), SHA-256 checked on load.
    dense       an ordinary ``save_pretrained`` folder that plain ``from_pretrained`` loads, plus masks.

A new format is one new module in :mod:`prunus.export.formats` (or :func:`register_format`).
Both built-in ones write ``prunus.json`` (the metadata and the layout) and go through
:func:`prunus.io.fsutil.atomic_dir`, so a checkpoint is complete or absent. Nothing here unpickles:
``.bin``/``.pt``/``.pth``/``.pkl`` weights are refused with a :class:`CheckpointError`.

:func:`load` loads the weights only; the kernel plan that ``prunus export --runtime auto`` stores
in the metadata is applied by :func:`prunus.load` (:func:`prunus.io.models.load_checkpoint`).

Example:
    >>> import tempfile, pathlib, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from prunus.core.masks import topk
    >>> from prunus.core.spec import Unstructured
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> w = model.model.layers[0].mlp.up_proj.weight
    >>> mask = topk(w.abs(), 0.5, Unstructured())
    >>> _ = w.data.mul_(mask)
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
    >>> info = save(model, out, masks={"model.layers.0.mlp.up_proj": mask}, metadata={"spec": "0.5"})
    >>> info.format, detect_format(out)
    ('compressed', 'compressed')
    >>> torch.equal(load(out).model.layers[0].mlp.up_proj.weight, w)
    True
    >>> read_metadata(out)["spec"]
    '0.5'
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from prunus.export.manifest import (FORMAT_VERSION, MANIFEST, WEIGHTS, ExportInfo, check_checkpoint_path,
                                    read_manifest)
from prunus.export.registry import (FORMATS, Format, check_manifest_present, detect_format, format_names, get_format, load_formats,
                                    register_format, unregister_format)
from prunus.export.tensors import unique_state


def save(model: nn.Module, path: str | os.PathLike[str], format: str = "compressed", *,
         masks: Mapping[str, Tensor] | None = None, metadata: Mapping[str, Any] | None = None,
         tokenizer: Any | None = None, overwrite: bool = False, **options: Any) -> ExportInfo:
    """Save ``model`` to the folder ``path`` in ``format`` (see :func:`format_names`), atomically.

    Args:
        model: the pruned model (masks already applied to its weights).
        path: the output folder; it must not exist unless ``overwrite``.
        format: ``"compressed"`` (default) or ``"dense"``.
        masks: module fqn -> bool keep mask shaped like that module's ``.weight``.
        metadata: JSON-serialisable provenance (spec, method, per-layer sparsity, ...); prunus fills
            in ``prunus_version``, ``created`` and ``source_model`` where missing.
        tokenizer: saved beside the weights when given.
        overwrite: replace an existing folder (only once the new one is complete).
        options: format-specific; ``compressed`` takes ``code_values`` (default True).

    Returns:
        :class:`ExportInfo` with the bytes on disk and the dense-equivalent bytes.
    """
    return get_format(format).save(model, path, masks=masks, metadata=metadata, tokenizer=tokenizer,
                                overwrite=overwrite, **options)


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> nn.Module:
    """Load a checkpoint folder of any format (detected), in eval mode, with dense layers.

    A kernel plan stored in the metadata (``read_metadata(path)["kernel_plan"]``) is not applied
    here: :func:`prunus.load` does that.

    Args:
        path: a folder written by :func:`save` or by transformers' ``save_pretrained``.
        device: where the weights go.
        dtype: cast floating weights to this dtype; ``None`` keeps the stored dtype.

    Raises:
        CheckpointError: missing, not a checkpoint, pickle, truncated or tampered with.
    """
    return get_format(detect_format(path)).load(path, device=device, dtype=dtype)


def load_masks(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The keep masks stored with a checkpoint: module fqn -> bool tensor ({} if none)."""
    return get_format(detect_format(path)).load_masks(path)


def load_quantized(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The quantized weights stored with a checkpoint: module fqn ->
    :class:`~prunus.core.quant.QuantizedWeight` ({} if none, or if the format stores none)."""
    verb = getattr(get_format(detect_format(path)).module, "load_quantized", None)
    return verb(path) if callable(verb) else {}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata given to :func:`save` (plus provenance); {} for a plain transformers folder."""
    return get_format(detect_format(path)).read_metadata(path)


__all__ = [
    "ExportInfo", "Format", "FORMATS", "FORMAT_VERSION", "MANIFEST", "WEIGHTS", "save", "load",
    "load_masks", "load_quantized", "read_metadata", "read_manifest", "detect_format", "check_manifest_present", "check_checkpoint_path",
    "format_names", "get_format", "register_format", "unregister_format", "unique_state",
]

load_formats()  # the built-in formats in prunus/export/formats/ register themselves
