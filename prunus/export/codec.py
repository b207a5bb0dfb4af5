"""How the compressed format lays tensors out in ``model.safetensors``: encode a masked weight, and
read one back with every tensor checked against its SHA-256.

The layout (``bitmask``/``csr``/``dense`` encodings, the header keys) is described in
:mod:`prunus.export.formats.compressed`, whose verbs use these.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from prunus.errors import CheckpointError
from prunus.export import floatcode, qcodec
from prunus.export.manifest import FORMAT_VERSION, WEIGHTS, check_checkpoint_path, check_format_version
from prunus.export.tensors import parse_dtype, sha256_tensor
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


class Reader:
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
        check_format_version(self.manifest.get("format_version", 1), file)

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

    def __enter__(self) -> "Reader":
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


def _quant_shape(info: Mapping[str, Any]) -> tuple[int, int]:
    """The (out, in) shape a quantized weight's codes are laid out in."""
    shape = tuple(int(s) for s in info["shape"])
    if len(shape) != 2:
        raise ValueError(f"a quantized weight must be 2-D, got {shape}")
    return (shape[1], shape[0]) if info.get("transposed") else (shape[0], shape[1])


def _quant_mask(r: Reader, key: str, info: Mapping[str, Any]) -> tuple[Tensor, int]:
    """``(keep mask (out, in), number kept)`` of a quantized weight, in its codes' layout."""
    try:
        qshape = _quant_shape(info)
        if not info.get("masked"):
            return torch.ones(qshape, dtype=torch.bool), int(math.prod(qshape))
        bits = r.get(key + qcodec.BITS)
        return unpack(bits, qshape), _popcount(bits, int(math.prod(qshape)))
    except (ValueError, IndexError) as e:
        raise r.corrupt(f"{key}: {e}") from None


def decode_quantized(r: Reader, key: str, info: Mapping[str, Any]) -> qcodec.QuantizedWeight:
    """The stored quantized weight ``key`` (codes, scales, zeros, keep), in its codes' layout."""
    keep, kept = _quant_mask(r, key, info)
    zeros = r.get(key + qcodec.ZEROS) if key + qcodec.ZEROS in r.hashes else None
    try:
        qw = qcodec.decode_quant(str(info.get("quant")), _quant_shape(info), keep, kept,
                                 r.get(key + qcodec.CODES), r.get(key + qcodec.SCALES), zeros)
    except (ValueError, IndexError, RuntimeError) as e:
        raise r.corrupt(f"{key}: {e}") from None
    except CheckpointError:
        raise
    except Exception as e:  # a quant text that does not parse (SpecError)
        raise r.corrupt(f"{key}: {e}") from None
    return qw


def _decode_quant(r: Reader, key: str, info: Mapping[str, Any]) -> Tensor:
    """The dense weight of a quantized ``key``: ``scale * (q - z) * keep``, in the stored dtype."""
    w = decode_quantized(r, key, info).dequantize().to(parse_dtype(info.get("dtype", "float32")))
    return w.t().contiguous() if info.get("transposed") else w


def decode_mask(r: Reader, key: str, info: Mapping[str, Any]) -> tuple[Tensor, int]:
    """``(bool keep mask, number kept)`` of masked weight ``key``."""
    shape = tuple(int(s) for s in info["shape"])
    n = int(math.prod(shape))
    if info["encoding"] == qcodec.ENCODING:
        keep, kept = _quant_mask(r, key, info)
        return (keep.t().contiguous() if info.get("transposed") else keep), kept
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


def decode(r: Reader, key: str, info: Mapping[str, Any], out: Tensor | None = None) -> Tensor:
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
    if enc == qcodec.ENCODING:
        t = _decode_quant(r, key, info)
        if out is not None and out.device.type == "cpu" and out.dtype == t.dtype and out.shape == t.shape:
            return out.copy_(t)
        return t
    if enc not in ("bitmask", "csr"):
        raise r.corrupt(f"{key}: unknown encoding {enc!r}")
    mask, kept = decode_mask(r, key, info)
    values = r.get_floats(key + VALUES, info, kept)
    if values.numel() != kept or values.dim() != 1:
        raise r.corrupt(f"{key}: {values.numel()} values for {kept} kept weights")
    if out is not None and out.device.type == "cpu" and out.dtype == values.dtype and out.shape == mask.shape:
        dense = out.zero_()
    else:
        dense = torch.zeros(mask.shape, dtype=values.dtype)
    return dense.masked_scatter_(mask, values)  # fills the kept places in row-major order, as written


def iter_state(r: Reader) -> Iterator[tuple[str, Tensor]]:
    for key, info in r.manifest["tensors"].items():
        yield key, decode(r, key, info)


def weights_file(path: str | os.PathLike[str]) -> Path:
    folder = check_checkpoint_path(path)
    file = folder / WEIGHTS
    if not file.exists():
        raise CheckpointError(f"{folder} has no {WEIGHTS}; give a folder written by prunus export")
    return file
