"""The tensors of a sharded safetensors checkpoint, read one at a time, without loading the model.

A ``save_pretrained`` folder holds ``model.safetensors``, or shards ``model-0000k-of-0000n.safetensors``
with ``model.safetensors.index.json`` naming the shard of every tensor. :class:`ShardIndex` reads only
the headers up front; :meth:`ShardIndex.read` then reads one tensor's bytes with plain file reads
straight into a new tensor (no memory map, so pages read do not stay resident), which is what lets
streaming (:mod:`prunus.io.lazy`) hold one block at a time.

A shard the index names but the folder lacks is a one-line ModelError naming the tensors it holds,
raised when the index is opened, before any work.

Example:
    >>> index = ShardIndex(folder)                         # doctest: +SKIP
    >>> index.read("model.layers.0.mlp.up_proj.weight").shape   # doctest: +SKIP
    torch.Size([1536, 576])
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from prunus.errors import ModelError
from prunus.io.dtypes import safetensors_header

INDEX = "model.safetensors.index.json"
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _names(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class ShardIndex:
    """Where every tensor of a safetensors folder lives: file, dtype, shape and byte range.

    Raises:
        ModelError: a shard named by the index is missing or unreadable, or the index names a tensor
            its shard does not hold.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.entries: dict[str, tuple[Path, dict[str, Any], int]] = {}  # key -> (file, info, data start)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelError(f"{index} is not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            weight_map = {}
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{self.folder} has no *.safetensors weights")
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            lost = sorted(k for k, f in weight_map.items() if f in missing)
            raise ModelError(f"{self.folder} lacks shard(s) {_names(missing, 2)}, holding {len(lost)} tensor(s) "
                             f"({_names(lost)}): restore the files or download the model again")
        for name in files:
            file = self.folder / name
            try:
                header = safetensors_header(file)
                with open(file, "rb") as fh:
                    start = 8 + int.from_bytes(fh.read(8), "little")
            except (OSError, ValueError) as e:
                raise ModelError(f"cannot read the safetensors header of {file}: {e}") from None
            for key, info in header.items():
                if key != "__metadata__":
                    self.entries[key] = (file, info, start)
        absent = sorted(k for k, f in weight_map.items() if k not in self.entries)
        if absent:
            raise ModelError(f"{index} names {len(absent)} tensor(s) its shards do not hold ({_names(absent)}): "
                             f"restore the files or download the model again")

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def files(self) -> list[Path]:
        return sorted({f for f, _, _ in self.entries.values()})

    def dtype(self, key: str) -> torch.dtype:
        return ST_DTYPES[self.entries[key][1]["dtype"]]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.entries[key][1]["shape"])

    def nbytes(self, key: str) -> int:
        begin, end = self.entries[key][1]["data_offsets"]
        return int(end) - int(begin)

    def total_bytes(self, keys: Optional[Iterable[str]] = None) -> int:
        return sum(self.nbytes(k) for k in (self.entries if keys is None else keys))

    def read(self, key: str) -> Tensor:
        """The tensor ``key`` as stored (its own dtype), read from its shard into fresh memory."""
        file, info, start = self.entries[key]
        dtype = ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelError(f"{file}: {key} has dtype {info['dtype']}, which prunus cannot stream")
        shape = self.shape(key)
        begin, end = (int(x) for x in info["data_offsets"])
        out = torch.empty(shape, dtype=dtype)
        if end - begin != math.prod(shape) * out.element_size():
            raise ModelError(f"{file}: {key} holds {end - begin} bytes for shape {list(shape)}; the file is corrupt")
        if out.numel():
            buf = out.reshape(-1).view(torch.uint8).numpy()
            with open(file, "rb") as fh:
                fh.seek(start + begin)
                if fh.readinto(memoryview(buf)) != end - begin:
                    raise ModelError(f"{file} is truncated (reading {key}); restore the file")
        return out
