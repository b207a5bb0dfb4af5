"""Checkpoints written piece by piece, for streaming: a block's tensors are written as soon as it is
pruned, and the block's memory can go.

:class:`SafetensorsWriter` appends tensors to one ``.safetensors`` file and writes the header last,
into room reserved at the front (a header that outgrows its room is moved, by copying the data once).
On it, :func:`stream_writer` gives the writer of a format, with the same layout as the format's
``save`` (:mod:`prunus.export.formats.compressed`, :mod:`prunus.export.formats.dense`), so
:func:`prunus.load`, ``load_masks`` and, for dense, plain ``from_pretrained`` read the result:

    compressed  every tensor encoded as ``compressed.save`` encodes it, into one ``model.safetensors``
    dense       ``model.safetensors`` (shards ``model-0000k-of-0000n.safetensors`` and their index past
                5 GiB, as ``save_pretrained``), the packed masks in ``masks.safetensors``

A writer writes into a folder it is given: the caller wraps the whole streamed run in
:func:`prunus.io.fsutil.atomic_dir`, so the checkpoint is complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from prunus.core.masks import pack
from prunus.export.manifest import FORMAT_VERSION, WEIGHTS, sha256_file, with_provenance, write_manifest
from prunus.export.tensors import (_ST_DTYPES, dense_safetensors_bytes, dtype_name, plain_config, resolve_masks,
                                   save_extras, sha256_tensor)

FORMATS = ("compressed", "dense")
DENSE_SHARD_BYTES = 5 * 2**30  # save_pretrained's default shard size


class SafetensorsWriter:
    """One ``.safetensors`` file written tensor by tensor; :meth:`close` writes the header."""

    def __init__(self, file: Path, reserve: int = 1 << 20) -> None:
        self.file, self.reserve = Path(file), int(reserve)
        self.entries: dict[str, dict[str, Any]] = {}
        self.offset = 0
        self.fh = open(self.file, "w+b")  # read back when the header is moved
        self.fh.seek(8 + self.reserve)

    def add(self, name: str, t: Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        if n:
            self.fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.offset, self.offset + n]}
        self.offset += n

    def close(self, metadata: Mapping[str, str]) -> None:
        head = json.dumps({"__metadata__": dict(metadata), **self.entries}, separators=(",", ":")).encode()
        # in place when it fits with little room to spare (a big file: always), else moved
        if len(head) <= self.reserve and self.reserve - len(head) <= max(4096, self.offset // 1000):
            self.fh.seek(0)
            self.fh.write(struct.pack("<Q", self.reserve) + head + b" " * (self.reserve - len(head)))
            self.fh.close()
            return
        head += b" " * (-len(head) % 8)  # a new file with the exact header, the data copied after it
        moved = self.file.with_name(self.file.name + ".moving")
        with open(moved, "wb") as out:
            out.write(struct.pack("<Q", len(head)) + head)
            self.fh.seek(8 + self.reserve)
            shutil.copyfileobj(self.fh, out, 1 << 24)
        self.fh.close()
        os.replace(moved, self.file)


class CompressedWriter:
    """The compressed format, streamed: ``add`` each part's state as it is ready, then ``finish``."""

    NAME = "compressed"

    def __init__(self, folder: Path, n_keys: int, code_values: bool = True) -> None:
        self.folder, self.code_values = Path(folder), code_values
        self.st = SafetensorsWriter(self.folder / WEIGHTS, reserve=(1 << 13) + 1536 * n_keys)
        self.layout: dict[str, Any] = {}
        self.hashes: dict[str, str] = {}
        self.encodings: dict[str, str] = {}
        self.dense = {}  # key -> an empty tensor of the stored shape and dtype (for dense_bytes)
        self.counts: dict[torch.dtype, int] = {}

    def add(self, model: nn.Module, state: Mapping[str, Tensor], masks: Mapping[str, Tensor],
            tied: Mapping[str, str]) -> None:
        from prunus.export.formats.compressed import encode_entry

        key_masks = resolve_masks(model, state, tied, masks)
        for key, t in state.items():
            parts: dict[str, Tensor] = {}
            self.layout[key], enc = encode_entry(parts, key, t, key_masks.get(key), None, self.code_values)
            if enc != "dense":
                self.encodings[key] = enc
            for name, p in parts.items():
                self.hashes[name] = sha256_tensor(p)
                self.st.add(name, p)
            self.dense[key] = torch.empty(t.shape, dtype=t.dtype, device="meta")
            if t.is_floating_point():
                self.counts[t.dtype] = self.counts.get(t.dtype, 0) + t.numel()

    def finish(self, model: nn.Module, metadata: Mapping[str, Any], tokenizer: Any, tied: Mapping[str, str]) -> int:
        """Header, config, tokenizer and ``prunus.json``; returns the dense-equivalent bytes."""
        from prunus.export.formats.compressed import make_header, make_manifest

        dtype = max(self.counts, key=self.counts.__getitem__) if self.counts else None
        manifest = make_manifest(model, dtype, with_provenance(metadata, model), self.layout, tied)
        self.st.close(make_header(manifest, self.hashes))
        plain_config(model, dtype).save_pretrained(self.folder)
        save_extras(model, self.folder, tokenizer)
        write_manifest(self.folder, manifest)
        return dense_safetensors_bytes(self.dense)


class DenseWriter:
    """The dense format, streamed: ``model.safetensors`` as ``save_pretrained`` writes it (shards of
    ``max_shard`` bytes and their index past that size), plus the packed masks."""

    NAME = "dense"

    def __init__(self, folder: Path, n_keys: int, max_shard: int | None = None) -> None:
        self.folder, self.n_keys = Path(folder), n_keys
        self.max_shard = DENSE_SHARD_BYTES if max_shard is None else max_shard
        self.shards: list[SafetensorsWriter] = []
        self.masks_layout: dict[str, Any] = {}
        self.masks = SafetensorsWriter(self.folder / "masks.safetensors.part", reserve=(1 << 13) + 256 * n_keys)
        self.dense: dict[str, Tensor] = {}
        self.counts: dict[torch.dtype, int] = {}

    def add(self, model: nn.Module, state: Mapping[str, Tensor], masks: Mapping[str, Tensor],
            tied: Mapping[str, str]) -> None:
        for key, t in state.items():
            if not self.shards or self.shards[-1].offset >= self.max_shard:
                part = self.folder / f"shard-{len(self.shards) + 1}.safetensors.part"
                self.shards.append(SafetensorsWriter(part, reserve=(1 << 13) + 256 * self.n_keys))
            self.shards[-1].add(key, t)
            self.dense[key] = torch.empty(t.shape, dtype=t.dtype, device="meta")
            if t.is_floating_point():
                self.counts[t.dtype] = self.counts.get(t.dtype, 0) + t.numel()
        for key, m in resolve_masks(model, state, tied, masks).items():
            self.masks.add(key, pack(m.mask))
            self.masks_layout[key] = {"shape": list(m.mask.shape), **m.layout()}

    def finish(self, model: nn.Module, metadata: Mapping[str, Any], tokenizer: Any, tied: Mapping[str, str]) -> int:
        from prunus.export.formats.dense import MASKS_FILE

        dtype = max(self.counts, key=self.counts.__getitem__) if self.counts else None
        n, weight_map = len(self.shards), {}
        for i, w in enumerate(self.shards, 1):
            w.close({"format": "pt"})
            name = WEIGHTS if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(w.file, self.folder / name)
            weight_map.update({k: name for k in w.entries})
        if n > 1:
            total = sum(w.offset for w in self.shards)
            (self.folder / f"{WEIGHTS}.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
        self.masks.close({"format": "pt", "prunus.format": "masks"})
        part = self.folder / "masks.safetensors.part"
        if self.masks_layout:
            os.replace(part, self.folder / MASKS_FILE)
        else:
            part.unlink()
        plain_config(model, dtype).save_pretrained(self.folder)
        save_extras(model, self.folder, tokenizer)
        write_manifest(self.folder, {
            "format": self.NAME, "format_version": FORMAT_VERSION, "architecture": type(model).__name__,
            "dtype": dtype_name(dtype) if dtype is not None else None,
            "metadata": with_provenance(metadata, model), "masks": self.masks_layout, "tied": dict(tied),
            "sha256": {f.name: sha256_file(f) for f in sorted(self.folder.glob("*.safetensors"))}})
        return dense_safetensors_bytes(self.dense)


def stream_writer(fmt: str, folder: Path, *, n_keys: int) -> Any:
    """The streaming writer of format ``fmt`` (one of :data:`FORMATS`) into ``folder``."""
    if fmt == "compressed":
        return CompressedWriter(folder, n_keys)
    if fmt == "dense":
        return DenseWriter(folder, n_keys)
    raise ValueError(f"format {fmt!r} cannot be streamed; stream formats: {', '.join(FORMATS)}")
