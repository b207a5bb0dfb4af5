"""The compressed format's verbs: pruned weights stored as packed mask bits + kept values, verified.

A checkpoint is a folder::

    config.json              the transformers config (quantization_config dropped, dtype set)
    generation_config.json   when the model generates
    tokenizer files          when a tokenizer is given
    prunus.json              the manifest: metadata, and how every tensor is stored
    model.safetensors        the tensors, the manifest again and a SHA-256 per tensor in the header

Each masked weight ``W`` (key ``k``) is stored in whichever encoding is smaller on disk:

    bitmask  ``k.__bits__``   uint8, the keep mask packed 8 per byte (:func:`prunus.core.masks.pack`)
             ``k.__values__`` the kept values in row-major order, W's dtype
    csr      ``k.__values__`` the same values
             ``k.__cols__``   column index of each value: int16 if there are < 32768 columns, else int32
             ``k.__rowptr__`` (rows + 1) offsets into the values: the smallest of int16/32/64

At 50% fp32 the bitmask costs 1/8 + 2 bytes per weight against 4 (0.53x); indices win past
about 94% sparsity. Other tensors are stored as they are; tied tensors (``lm_head`` tied to the
embedding) are stored once and re-tied on load. Nothing is ever unpickled.

A weight quantized by the pipeline (a ``+int8``/``+int4`` spec; ``save(quant=PruneResult.quant)``)
is stored as mask bits + packed integer codes + scales (and zero points) instead
(``"encoding": "quant"``, :mod:`prunus.export.qcodec`); it loads as the same float weight, bit for
bit. Checkpoints now say format version 3; version-2 ones still load.

The encoding and the verified reader are in :mod:`prunus.export.codec`.

Floating-point values (the kept values of masked weights, and the dense tensors) are further coded
losslessly by :mod:`prunus.export.floatcode` when that is smaller: the exponent byte
Huffman-coded (``k.__values__.__hi__`` or ``k.__hi__``), the other bytes raw (``.__lo__``), and
the manifest entry says ``"coding": "exp-huffman-v1"``. An fp32 value then costs about 3.33 bytes,
so a 50% fp32 weight costs about 0.45x of dense, and SmolLM2-135M at 50% (whose tied 28M-parameter
embedding, a fifth of the model, stays dense) 0.53x instead of 0.63x. ``save(code_values=False)``
stores plain values.

Example:
    >>> import tempfile, pathlib, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> w = model.model.layers[0].mlp.down_proj.weight
    >>> mask = w.abs() > w.abs().quantile(0.98)          # keep the top 2%
    >>> _ = w.data.mul_(mask)
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
    >>> info = save(model, out, masks={"model.layers.0.mlp.down_proj": mask}, metadata={})
    >>> info.encodings
    {'model.layers.0.mlp.down_proj.weight': 'csr'}
    >>> torch.equal(load_masks(out)["model.layers.0.mlp.down_proj"], mask)
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from prunus.core.units import apply_layer_widths, find_blocks, layer_widths
from prunus.errors import CheckpointError
from prunus.export import arch, floatcode, qcodec
from prunus.export.codec import (decode_quantized, BITS, COLS, H_FORMAT, H_MANIFEST, H_MANIFEST_SHA, H_SHA, NAME, ROWPTR,
                                 VALUES, Reader, decode, decode_mask, encode, encoded_bytes,
                                 header_format, iter_state, weights_file)
from prunus.export.manifest import (FORMAT_VERSION, WEIGHTS, ExportInfo, error_line, folder_bytes, with_provenance,
                                    write_manifest)
from prunus.export.manifest import read_manifest as read_json
from prunus.export.tensors import (assign_tensor, dense_safetensors_bytes, dtype_name, main_dtype,
                                   masks_by_module, parse_dtype, plain_config, resolve_masks,
                                   save_extras, sha256_tensor, unique_state)
from prunus.io.fsutil import atomic_dir, check_out_dir

PRIORITY = 10  # sniffed before dense: a compressed folder also has config.json + model.safetensors


def _put(tensors: dict[str, Tensor], name: str, t: Tensor, code: bool) -> str | None:
    """Store ``t`` under ``name``, coded by :mod:`~prunus.export.floatcode` when ``code`` and that is
    smaller; returns the coding used (None: stored plain)."""
    parts = floatcode.encode(t) if code else None
    if parts is None:
        tensors[name] = t.to("cpu").contiguous()
        return None
    tensors.update({name + suffix: p for suffix, p in parts.items()})
    return floatcode.CODING


def save(model: nn.Module, path: str | os.PathLike[str], *, masks: Mapping[str, Tensor] | None = None,
         metadata: Mapping[str, Any] | None = None, tokenizer: Any | None = None,
         overwrite: bool = False, code_values: bool = True,
         quant: Mapping[str, Any] | None = None) -> ExportInfo:
    """Save ``model`` as a compressed checkpoint folder, atomically.

    Args:
        model: the pruned model, masks applied. A transformers model gets a ``config.json`` and
            loads with :func:`load`; any other module loads with :func:`load_state_dict`.
        path: the output folder; it must not exist unless ``overwrite``.
        masks: module fqn -> bool keep mask shaped like its ``.weight``.
        metadata: JSON-serialisable provenance, stored in ``prunus.json`` and the weights' header.
        tokenizer: saved beside the weights when given.
        overwrite: replace an existing folder, only once the new one is complete.
        code_values: code floating-point values losslessly (:mod:`prunus.export.floatcode`) where
            that is smaller; False stores them plain (faster to save and load, about 17% larger).
        quant: module fqn -> :class:`~prunus.core.quant.QuantizedWeight` (``PruneResult.quant``):
            those weights are stored as integer codes + scales (:mod:`prunus.export.qcodec`); each
            must dequantize to exactly the model's weight.

    Returns:
        :class:`~prunus.export.ExportInfo`; ``encodings`` says how each masked weight is stored.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False (before any work).
        CheckpointError: a mask that does not fit its weight, or metadata that is not JSON.
    """
    out = check_out_dir(path, overwrite)
    state, tied = unique_state(model)
    key_masks = resolve_masks(model, state, tied, masks)
    meta = with_provenance(metadata, model)
    dtype = main_dtype(state)

    tensors: dict[str, Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    encodings: dict[str, str] = {}
    qkeys = _quant_keys(state, tied, quant)
    for key, t in state.items():
        layout[key], enc = encode_entry(tensors, key, t, key_masks.get(key), qkeys.get(key), code_values)
        if enc != "dense":
            encodings[key] = enc

    cfg = plain_config(model, dtype)
    manifest = make_manifest(model if cfg is not None else None, dtype, meta, layout, tied)
    header = make_header(manifest, {k: sha256_tensor(v) for k, v in tensors.items()})
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata=header)
        if cfg is not None:
            cfg.save_pretrained(tmp)
        save_extras(model, tmp, tokenizer)
        write_manifest(tmp, manifest)
    return ExportInfo(path=out, format=NAME, bytes=(out / WEIGHTS).stat().st_size,
                      dense_bytes=dense_safetensors_bytes(state), total_bytes=folder_bytes(out),
                      encodings=encodings)


def encode_entry(tensors: dict[str, Tensor], key: str, t: Tensor, mask: Any, qw: Any,
                 code_values: bool) -> tuple[dict[str, Any], str]:
    """Store the state tensor ``key`` into ``tensors`` (quantized codes, a masked weight's encoding,
    or dense; floats coded where smaller); returns its manifest entry and its encoding."""
    info: dict[str, Any] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
    coding = None
    if qw is not None:
        masked = mask is not None
        transposed = t.dim() == 2 and tuple(qw.codes.shape) != tuple(t.shape)
        w = qw.dequantize().to(t.dtype)
        if not torch.equal(w.t() if transposed else w, t.detach().cpu()):
            raise CheckpointError(f"{key}: the weight is not its quantized codes dequantized "
                                  f"({qw.quant}); save the model the pipeline quantized")
        tensors.update({key + sfx: p for sfx, p in qcodec.encode_quant(qw, masked).items()})
        info.update(encoding=qcodec.ENCODING, quant=str(qw.quant), masked=masked,
                    transposed=transposed, **(mask.layout() if masked else {}))
    elif mask is not None:
        enc, parts = encode(t, mask.mask)
        coding = _put(tensors, key + VALUES, parts.pop(VALUES), code_values)
        tensors.update({key + suffix: p for suffix, p in parts.items()})
        info.update(encoding=enc, **mask.layout())
    else:
        coding = _put(tensors, key, t, code_values)
        info["encoding"] = "dense"
    if coding is not None:
        info["coding"] = coding
    return info, info["encoding"]


def make_manifest(model: nn.Module | None, dtype: torch.dtype | None, meta: Mapping[str, Any],
                  layout: Mapping[str, Any], tied: Mapping[str, str]) -> dict[str, Any]:
    """The manifest (``prunus.json``); ``model`` None: saved from a module without a config."""
    return {"format": NAME, "format_version": FORMAT_VERSION,
            "architecture": type(model).__name__ if model is not None else None,
            "dtype": dtype_name(dtype) if dtype is not None else None,
            "metadata": meta, "tensors": dict(layout), "tied": dict(tied)}


def make_header(manifest: Mapping[str, Any], hashes: Mapping[str, str]) -> dict[str, str]:
    """The safetensors header metadata: the manifest, its SHA-256 and every tensor's SHA-256."""
    text = json.dumps(manifest, sort_keys=True)
    return {"format": "pt", H_FORMAT: NAME, H_MANIFEST: text,
            H_MANIFEST_SHA: hashlib.sha256(text.encode()).hexdigest(),
            H_SHA: json.dumps(dict(hashes), sort_keys=True)}


def _quant_keys(state: Mapping[str, Tensor], tied: Mapping[str, str],
                quant: Mapping[str, Any] | None) -> dict[str, Any]:
    """Module fqn -> quantized weight, mapped to the stored state-dict keys (tied aliases resolved)."""
    out: dict[str, Any] = {}
    for fqn, qw in (quant or {}).items():
        key = fqn if fqn.endswith(".weight") else fqn + ".weight"
        key = tied.get(key, key)
        if key not in state:
            raise CheckpointError(f"quantized weight for {fqn!r}: the model has no weight {key!r}")
        t = state[key]
        if tuple(qw.codes.shape) not in (tuple(t.shape), tuple(t.shape)[::-1]):
            raise CheckpointError(f"quantized weight for {fqn!r} is {tuple(qw.codes.shape)} but the "
                                  f"weight is {tuple(t.shape)}")
        out[key] = qw
    return out


def _no_init() -> contextlib.AbstractContextManager[Any]:
    """Skip random initialisation: every tensor is about to be replaced by a stored one."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _build(folder: Path, architecture: str | None, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An uninitialised model of the stored class, built from ``config.json`` on ``device``."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with _no_init(), device:
            model = arch.build(config, architecture, dtype=dtype)  # the stored class (BertModel too)
            if layer_widths(config):  # structured pruning with widths that differ per layer
                apply_layer_widths(model, find_blocks(model)[1], config)
            return model
    except Exception as e:  # transformers raises many types (config validation among them)
        raise CheckpointError(f"{folder / 'config.json'} cannot be used: {error_line(e)}") from None


def _tie(model: nn.Module, alias: str, source: str) -> None:
    """Make ``alias`` the very same parameter (or buffer) object as ``source``."""
    mod_name, _, leaf = alias.rpartition(".")
    mod = model.get_submodule(mod_name)
    src_mod_name, _, src_leaf = source.rpartition(".")
    src_mod = model.get_submodule(src_mod_name)
    if src_leaf in src_mod._parameters:
        mod._parameters[leaf] = src_mod._parameters[src_leaf]
    else:
        mod._buffers[leaf] = src_mod._buffers[src_leaf]


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> nn.Module:
    """Load a compressed checkpoint as a transformers model in eval mode.

    The model is built from ``config.json`` without random initialisation, then every tensor is
    decoded, checked against its SHA-256 and put in place one at a time, so peak memory stays near
    the final model's size. Tied weights are re-tied as they were saved.

    Args:
        path: the checkpoint folder.
        device: where the weights go.
        dtype: cast floating tensors to this dtype; ``None`` keeps the stored dtype.

    Raises:
        CheckpointError: missing, truncated or tampered with, or saved without a config.
    """
    file = weights_file(path)
    folder = file.parent
    if not (folder / "config.json").exists():
        raise CheckpointError(
            f"{folder} has no config.json (saved from a module without a transformers config); build "
            f"the module yourself and load prunus.export.formats.compressed.load_state_dict({str(folder)!r}) into it"
        )
    dev = torch.device(device)
    with Reader(file) as r:
        man = r.manifest
        build_dtype = dtype or (parse_dtype(man["dtype"]) if man.get("dtype") else torch.float32)
        model = _build(folder, man.get("architecture"), build_dtype, dev)
        targets = dict(model.state_dict(keep_vars=True))
        tied: dict[str, str] = man.get("tied", {})
        filled: set[int] = set()  # tensors written so far: a model that ties what was saved untied
        with torch.no_grad():
            for key, info in man["tensors"].items():
                _load_one(r, model, targets, key, info, dtype, dev, filled)
            for alias, source in tied.items():
                _tie(model, alias, source)
    missing = sorted(set(targets) - set(man["tensors"]) - set(tied))
    if missing:
        raise CheckpointError(
            f"{file} lacks {len(missing)} tensors the model needs (first: {missing[0]}); "
            f"was it saved from a different model?"
        )
    return model.eval()


def _load_one(r: Reader, model: nn.Module, targets: Mapping[str, Tensor], key: str,
              info: Mapping[str, Any], dtype: torch.dtype | None, dev: torch.device,
              filled: set[int]) -> None:
    """Decode stored ``key`` into the model: in place when the model's tensor already has the wanted
    dtype and device and is not shared with a tensor loaded before (the usual case: no second
    copy), else by replacing it."""
    if key not in targets:
        raise CheckpointError(f"{r.file} has {key!r} but the model has no such tensor; "
                              f"was it saved from a different model?")
    target = targets[key]
    shape = tuple(int(s) for s in info.get("shape", ()))
    if tuple(target.shape) != shape:
        raise CheckpointError(f"{r.file}: {key} is {shape} but the model expects {tuple(target.shape)}; "
                              f"was it saved from a different model?")
    stored = parse_dtype(info.get("dtype", "float32"))
    want = dtype if dtype is not None and stored.is_floating_point else stored
    same_device = target.device == dev or (dev.index is None and target.device.type == dev.type)
    if target.dtype == want and same_device and id(target) not in filled:
        filled.add(id(target))
        t = decode(r, key, info, out=target.data if dev.type == "cpu" else None)
        if t is not target.data:
            target.data.copy_(t)
    else:
        assign_tensor(model, key, decode(r, key, info).to(device=dev, dtype=want))


def load_state_dict(path: str | os.PathLike[str], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """All tensors of a compressed checkpoint, densified, by state-dict key (tied keys included).

    For modules that are not transformers models: ``module.load_state_dict(load_state_dict(path))``.
    """
    with Reader(weights_file(path)) as r:
        state = {}
        for key, t in iter_state(r):
            state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        for alias, source in r.manifest.get("tied", {}).items():
            state[alias] = state[source]
    return state


def load_masks(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The stored keep masks: module fqn -> bool tensor (a tied weight's mask under each name given)."""
    masks: dict[str, Tensor] = {}
    with Reader(weights_file(path)) as r:
        for key, info in r.manifest["tensors"].items():
            if info.get("encoding", "dense") != "dense" and info.get("masked", True):
                masks.update(masks_by_module(decode_mask(r, key, info)[0], info))
    return masks


def load_quantized(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The stored quantized weights as :class:`~prunus.core.quant.QuantizedWeight` (codes, scales,
    zero points, keep mask; (out, in) layout), by module fqn: a tied weight under every module that
    shares it (an int8 embedding also under the ``lm_head`` tied to it). {} when none is quantized.

    This is what the quantized kernels are built from, so they compute with the stored integers,
    not with integers recovered from the dequantized floats.
    """
    out: dict[str, Any] = {}
    with Reader(weights_file(path)) as r:
        man = r.manifest
        aliases: dict[str, list[str]] = {}
        for alias, source in man.get("tied", {}).items():
            aliases.setdefault(source, []).append(alias)
        for key, info in man["tensors"].items():
            if info.get("encoding") != qcodec.ENCODING or info.get("transposed"):
                continue
            qw = decode_quantized(r, key, info)
            for k in [key, *aliases.get(key, [])]:
                if k.endswith(".weight"):
                    out[k[: -len(".weight")]] = qw
    return out


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest: ``prunus.json``, or the copy in the weights' header if that file is gone."""
    doc = read_json(path)
    if doc:
        return doc
    with Reader(weights_file(path)) as r:
        return r.manifest


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata given to :func:`save`, with the provenance prunus added."""
    meta = read_manifest(path).get("metadata", {})
    return dict(meta) if isinstance(meta, dict) else {}


def sniff(folder: Path) -> bool:
    """Whether a folder without ``prunus.json`` holds a compressed ``model.safetensors`` (by its header)."""
    return (folder / WEIGHTS).exists() and header_format(folder / WEIGHTS) == NAME


__all__ = ["NAME", "PRIORITY", "sniff", "save", "load", "load_masks", "load_state_dict", "read_metadata",
           "read_manifest", "encode", "encoded_bytes", "BITS", "VALUES", "COLS", "ROWPTR"]
