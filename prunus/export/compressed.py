"""The compressed format: pruned weights stored as packed mask bits + kept values, integrity-checked.

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
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from prunus.errors import CheckpointError
from prunus.export import (
    FORMAT_VERSION,
    WEIGHTS,
    ExportInfo,
    assign_tensor,
    check_checkpoint_path,
    dense_safetensors_bytes,
    dtype_name,
    folder_bytes,
    main_dtype,
    masks_by_module,
    parse_dtype,
    plain_config,
    resolve_masks,
    save_extras,
    sha256_tensor,
    unique_state,
    with_provenance,
    write_manifest,
)
from prunus.export import floatcode
from prunus.io.fsutil import atomic_dir, check_out_dir
from prunus.core.masks import pack, unpack

NAME = "compressed"

BITS, VALUES, COLS, ROWPTR = ".__bits__", ".__values__", ".__cols__", ".__rowptr__"
# Keys of the safetensors header metadata (all values are strings).
H_FORMAT, H_MANIFEST, H_MANIFEST_SHA, H_SHA = (
    "prunus.format", "prunus.manifest", "prunus.manifest_sha256", "prunus.sha256")


# ----------------------------------------------------------------------------------------------
# Encoding one masked weight
# ----------------------------------------------------------------------------------------------


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view a weight is indexed in: (out, everything else); a 1-D weight is one row."""
    if len(shape) >= 2:
        return int(shape[0]), int(math.prod(shape[1:]))
    return 1, int(math.prod(shape))


def _int_bytes(n: int) -> int:
    """Bytes per row pointer: the smallest of int16/int32/int64 that holds ``n``."""
    return 2 if n < 2**15 else 4 if n < 2**31 else 8


def encoded_bytes(shape: tuple[int, ...], nnz: int, itemsize: int) -> dict[str, int]:
    """Bytes on disk of each encoding of a weight of ``shape`` with ``nnz`` kept values.

    Example:
        >>> encoded_bytes((128, 64), 4096, 4)        # 50% of fp32: bits win
        {'bitmask': 17408, 'csr': 24834}
        >>> encoded_bytes((1536, 576), 44237, 4)     # 95%: indices win
        {'bitmask': 287540, 'csr': 271570}
    """
    n = int(math.prod(shape))
    rows, cols = _rows_cols(shape)
    idx = 2 if cols < 32768 else 4
    ptr = _int_bytes(nnz)
    return {"bitmask": (n + 7) // 8 + nnz * itemsize, "csr": nnz * (itemsize + idx) + (rows + 1) * ptr}


def encode(weight: Tensor, mask: Tensor) -> tuple[str, dict[str, Tensor]]:
    """Encode a masked weight in the smaller of the two encodings.

    Args:
        weight: any shape, zero where ``mask`` is False.
        mask: bool, same shape, True = keep.

    Returns:
        ``(encoding, {suffix: tensor})`` with ``encoding`` in ``{"bitmask", "csr"}`` and the
        suffixes :data:`BITS`/:data:`VALUES` or :data:`VALUES`/:data:`COLS`/:data:`ROWPTR`.
    """
    weight, mask = weight.detach().to("cpu"), mask.to("cpu")
    values = weight[mask].contiguous()  # (nnz,) row-major
    nnz = values.numel()
    sizes = encoded_bytes(tuple(weight.shape), nnz, weight.element_size())
    if sizes["csr"] >= sizes["bitmask"]:
        return "bitmask", {BITS: pack(mask), VALUES: values}
    rows, cols = _rows_cols(tuple(weight.shape))
    m2 = mask.reshape(rows, cols)
    col = torch.nonzero(m2, as_tuple=True)[1]  # (nnz,) sorted by row, then column
    ptr_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[_int_bytes(nnz)]
    rowptr = torch.zeros(rows + 1, dtype=ptr_dtype)
    rowptr[1:] = m2.sum(dim=1).cumsum(0)
    return "csr", {VALUES: values, COLS: col.to(torch.int16 if cols < 32768 else torch.int32),
                   ROWPTR: rowptr}


# ----------------------------------------------------------------------------------------------
# Reading, with every tensor checked against its SHA-256
# ----------------------------------------------------------------------------------------------


class _Reader:
    """An open ``model.safetensors`` whose manifest and tensors are verified as they are read.

    Any failure (truncation, a flipped byte, a bad header) is a CheckpointError naming the file.
    """

    # Pages read through the memory map count as resident until it is closed: reopen it after
    # this many bytes, so loading stays near the model's own size.
    REMAP_BYTES = 1 << 28

    def __init__(self, file: Path) -> None:
        self.file = file
        self._mapped = 0
        self._open()
        try:
            header = self._fh.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise self.corrupt(e) from None
        if header.get(H_FORMAT) != NAME:
            raise CheckpointError(f"{file} is not a prunus compressed file (no {H_FORMAT!r} in its header)")
        try:
            text = header[H_MANIFEST]
            if hashlib.sha256(text.encode()).hexdigest() != header[H_MANIFEST_SHA]:
                raise ValueError("the manifest in the header fails its SHA-256 check")
            self.manifest: dict[str, Any] = json.loads(text)
            self.hashes: dict[str, str] = json.loads(header[H_SHA])
            if not isinstance(self.manifest.get("tensors"), dict):
                raise ValueError("the manifest lists no tensors")
        except (KeyError, ValueError) as e:
            raise self.corrupt(e) from None
        version = self.manifest.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{file} was written by a newer prunus (format version {version}; this "
                                  f"one reads up to {FORMAT_VERSION}); upgrade prunus to load it")

    def _open(self) -> None:
        try:
            self._cm = safe_open(str(self.file), framework="pt", device="cpu")
            self._fh = self._cm.__enter__()
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise self.corrupt(e) from None

    def corrupt(self, why: object) -> CheckpointError:
        text = str(why).strip().splitlines()[0] if str(why).strip() else type(why).__name__
        return CheckpointError(f"{self.file} is corrupt: {text}; re-export it or restore a good copy")

    def get(self, name: str) -> Tensor:
        """The stored tensor ``name``, after checking it against its recorded SHA-256."""
        if name not in self.hashes:
            raise self.corrupt(f"tensor {name!r} has no recorded SHA-256")
        try:
            t = self._fh.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise self.corrupt(f"tensor {name!r}: {e}") from None
        if sha256_tensor(t) != self.hashes[name]:
            raise self.corrupt(f"tensor {name!r} fails its SHA-256 check (the file was modified or damaged)")
        self._mapped += t.numel() * t.element_size()
        if self._mapped > self.REMAP_BYTES:
            self.close()
            self._open()
            self._mapped = 0
        return t

    def get_floats(self, name: str, info: Mapping[str, Any], n: int) -> Tensor:
        """The (n,) float tensor stored under ``name``, plain or coded as the manifest ``info`` says."""
        coding = info.get("coding")
        if coding is None:
            return self.get(name)
        if coding != floatcode.CODING:
            raise self.corrupt(f"{name}: unknown value coding {coding!r}")
        dtype = parse_dtype(info.get("dtype", "float32"))
        hi, lo = self.get(name + floatcode.HI), self.get(name + floatcode.LO)
        try:
            return floatcode.decode(hi, lo, dtype, n)
        except ValueError as e:
            raise self.corrupt(f"{name}: {e}") from None

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def header_format(file: Path) -> str | None:
    """The ``prunus.format`` recorded in a safetensors header, or None (also for unreadable files)."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            return (fh.metadata() or {}).get(H_FORMAT)
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


def _popcount(bits: Tensor, n: int) -> int:
    """Number of set bits among the first ``n`` of a little-endian packed mask (8x less work than
    counting the unpacked mask)."""
    a = bits.numpy()
    full, rest = divmod(n, 8)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        count = int(np.bitwise_count(a[:full]).sum(dtype=np.int64))
    else:
        count = int(np.unpackbits(a[:full]).sum(dtype=np.int64))
    if rest:
        count += bin(int(a[full]) & ((1 << rest) - 1)).count("1")
    return count


def _decode_mask(r: _Reader, key: str, info: Mapping[str, Any]) -> tuple[Tensor, int]:
    """``(bool keep mask, number kept)`` of masked weight ``key``."""
    shape = tuple(int(s) for s in info["shape"])
    n = int(math.prod(shape))
    if info["encoding"] == "bitmask":
        bits = r.get(key + BITS)
        try:
            return unpack(bits, shape), _popcount(bits, n)
        except (ValueError, IndexError) as e:
            raise r.corrupt(f"{key}: {e}") from None
    rows, cols = _rows_cols(shape)
    c, ptr = r.get(key + COLS).long(), r.get(key + ROWPTR).long()
    counts = ptr.diff()
    if ptr.numel() != rows + 1 or ptr[0] != 0 or ptr[-1] != c.numel() or (counts < 0).any() \
            or (c.numel() and (c.min() < 0 or c.max() >= cols)):
        raise r.corrupt(f"{key}: inconsistent column indices or row pointers")
    flat = torch.repeat_interleave(torch.arange(rows), counts) * cols + c  # (nnz,) row-major index
    if flat.numel() > 1 and not bool((flat.diff() > 0).all()):
        raise r.corrupt(f"{key}: column indices are repeated or out of order")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[flat] = True
    return mask.reshape(shape), c.numel()


def _decode(r: _Reader, key: str, info: Mapping[str, Any], out: Tensor | None = None) -> Tensor:
    """The dense tensor stored under ``key``, decoded into ``out`` when it is a CPU tensor of the
    stored shape and dtype (so loading needs no second copy), else into a new tensor."""
    enc = info.get("encoding")
    if enc == "dense":
        shape = tuple(int(s) for s in info.get("shape", ()))
        t = r.get_floats(key, info, math.prod(shape))
        if info.get("coding") is not None:
            t = t.reshape(shape)
        if out is not None and out.device.type == "cpu" and out.dtype == t.dtype and out.shape == t.shape:
            return out.copy_(t)
        return t
    if enc not in ("bitmask", "csr"):
        raise r.corrupt(f"{key}: unknown encoding {enc!r}")
    mask, kept = _decode_mask(r, key, info)
    values = r.get_floats(key + VALUES, info, kept)
    if values.numel() != kept or values.dim() != 1:
        raise r.corrupt(f"{key}: {values.numel()} values for {kept} kept weights")
    if out is not None and out.device.type == "cpu" and out.dtype == values.dtype and out.shape == mask.shape:
        dense = out.zero_()
    else:
        dense = torch.zeros(mask.shape, dtype=values.dtype)
    return dense.masked_scatter_(mask, values)  # fills the kept places in row-major order, as written


def _iter_state(r: _Reader) -> Iterator[tuple[str, Tensor]]:
    for key, info in r.manifest["tensors"].items():
        yield key, _decode(r, key, info)


def _weights_file(path: str | os.PathLike[str]) -> Path:
    folder = check_checkpoint_path(path)
    file = folder / WEIGHTS
    if not file.exists():
        raise CheckpointError(f"{folder} has no {WEIGHTS}; give a folder written by prunus export")
    return file


# ----------------------------------------------------------------------------------------------
# The verbs
# ----------------------------------------------------------------------------------------------


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
         overwrite: bool = False, code_values: bool = True) -> ExportInfo:
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
    for key, t in state.items():
        info: dict[str, Any] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
        if key in key_masks:
            enc, parts = encode(t, key_masks[key].mask)
            coding = _put(tensors, key + VALUES, parts.pop(VALUES), code_values)
            tensors.update({key + suffix: p for suffix, p in parts.items()})
            info.update(encoding=enc, **key_masks[key].layout())
            encodings[key] = enc
        else:
            coding = _put(tensors, key, t, code_values)
            info["encoding"] = "dense"
        if coding is not None:
            info["coding"] = coding
        layout[key] = info

    cfg = plain_config(model, dtype)
    manifest = {
        "format": NAME, "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__ if cfg is not None else None,
        "dtype": dtype_name(dtype) if dtype is not None else None,
        "metadata": meta, "tensors": layout, "tied": tied,
    }
    text = json.dumps(manifest, sort_keys=True)
    header = {
        "format": "pt", H_FORMAT: NAME, H_MANIFEST: text,
        H_MANIFEST_SHA: hashlib.sha256(text.encode()).hexdigest(),
        H_SHA: json.dumps({k: sha256_tensor(v) for k, v in tensors.items()}, sort_keys=True),
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata=header)
        if cfg is not None:
            cfg.save_pretrained(tmp)
        save_extras(model, tmp, tokenizer)
        write_manifest(tmp, manifest)
    return ExportInfo(path=out, format=NAME, bytes=(out / WEIGHTS).stat().st_size,
                      dense_bytes=dense_safetensors_bytes(state), total_bytes=folder_bytes(out),
                      encodings=encodings)


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
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder / 'config.json'} cannot be read: {str(e).splitlines()[0]}") from None
    cls = getattr(transformers, architecture or "", None)
    with _no_init(), device:
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls._from_config(config, dtype=dtype)
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


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
    file = _weights_file(path)
    folder = file.parent
    if not (folder / "config.json").exists():
        raise CheckpointError(
            f"{folder} has no config.json (saved from a module without a transformers config); build "
            f"the module yourself and load prunus.export.compressed.load_state_dict({str(folder)!r}) into it"
        )
    dev = torch.device(device)
    with _Reader(file) as r:
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


def _load_one(r: _Reader, model: nn.Module, targets: Mapping[str, Tensor], key: str,
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
        t = _decode(r, key, info, out=target.data if dev.type == "cpu" else None)
        if t is not target.data:
            target.data.copy_(t)
    else:
        assign_tensor(model, key, _decode(r, key, info).to(device=dev, dtype=want))


def load_state_dict(path: str | os.PathLike[str], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """All tensors of a compressed checkpoint, densified, by state-dict key (tied keys included).

    For modules that are not transformers models: ``module.load_state_dict(load_state_dict(path))``.
    """
    with _Reader(_weights_file(path)) as r:
        state = {}
        for key, t in _iter_state(r):
            state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        for alias, source in r.manifest.get("tied", {}).items():
            state[alias] = state[source]
    return state


def load_masks(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The stored keep masks: module fqn -> bool tensor (a tied weight's mask under each name given)."""
    masks: dict[str, Tensor] = {}
    with _Reader(_weights_file(path)) as r:
        for key, info in r.manifest["tensors"].items():
            if info.get("encoding", "dense") != "dense":
                masks.update(masks_by_module(_decode_mask(r, key, info)[0], info))
    return masks


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest: ``prunus.json``, or the copy in the weights' header if that file is gone."""
    from prunus.export import read_manifest as read_json

    doc = read_json(path)
    if doc:
        return doc
    with _Reader(_weights_file(path)) as r:
        return r.manifest


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata given to :func:`save`, with the provenance prunus added."""
    meta = read_manifest(path).get("metadata", {})
    return dict(meta) if isinstance(meta, dict) else {}


__all__ = ["NAME", "save", "load", "load_masks", "load_state_dict", "read_metadata", "read_manifest",
           "encode", "encoded_bytes"]
