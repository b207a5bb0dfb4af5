"""The checkpoint folder and its manifest: ``prunus.json``, provenance, the size record, pickle refusal.

Shared by every format in :mod:`prunus.export.formats`: what a ``save`` returns
(:class:`ExportInfo`), how ``prunus.json`` is written and read, and the check that refuses pickle
before anything is opened.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from prunus.errors import CheckpointError

MANIFEST = "prunus.json"
FORMAT_VERSION = 3  # 2: floating-point values may be coded (prunus.export.floatcode); 3: quantized
# weights (prunus.export.qcodec).
WEIGHTS = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class ExportInfo:
    """What a ``save`` wrote.

    Attributes:
        path: the checkpoint folder.
        format: ``"compressed"`` or ``"dense"``.
        bytes: bytes of the weight files (``*.safetensors``, masks included) on disk.
        dense_bytes: bytes a dense safetensors of the same (untied) state would take.
        total_bytes: bytes of the whole folder (config, tokenizer, ``prunus.json`` included).
        encodings: how each masked weight is stored, by state-dict key (``bitmask``/``csr``/``dense``).
    """

    path: Path
    format: str
    bytes: int
    dense_bytes: int
    total_bytes: int
    encodings: dict[str, str] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``bytes / dense_bytes``: below 1 means the checkpoint is smaller than a dense one."""
        return self.bytes / max(1, self.dense_bytes)


def error_line(e: BaseException) -> str:
    """One line saying what ``e`` says: its first line, or the first two when the first is only a
    heading ending in ``:`` (validation errors), without a leading ``ValueError:``-style name."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return re.sub(r"\b[A-Z]\w*(Error|Exception): ", "", text).rstrip(".")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_bytes(path: Path, pattern: str = "*") -> int:
    """Total size of the files directly in ``path`` matching ``pattern``."""
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


def with_provenance(metadata: Mapping[str, Any] | None, model: nn.Module) -> dict[str, Any]:
    """A JSON-checked copy of ``metadata`` with ``prunus_version``, ``created`` and ``source_model``
    filled in where missing."""
    from prunus import __version__

    meta = dict(metadata or {})
    meta.setdefault("prunus_version", __version__)
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    if source:
        meta.setdefault("source_model", str(source))
    try:
        json.dumps(meta)  # NaN (a diverged perplexity) is allowed: failing after hours would be worse
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"metadata is not JSON-serialisable ({e}); use str, int, float, bool, list and dict values"
        ) from None
    return meta


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``prunus.json`` (sorted keys, indented: it is read by people too)."""
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole ``prunus.json`` of a checkpoint folder ({} for a plain transformers folder).

    Raises:
        CheckpointError: the path is missing, refused (pickle), or ``prunus.json`` is not valid JSON.
    """
    folder = check_checkpoint_path(path)
    f = folder / MANIFEST
    if not f.exists():
        return {}
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f} is corrupt: {e}; re-export the checkpoint") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{f} is corrupt: expected a JSON object; re-export the checkpoint")
    if "format_version" in doc:
        check_format_version(doc["format_version"], f)
    return doc


def check_format_version(version: Any, where: Any) -> None:
    """A format version must be a positive integer this prunus reads (up to :data:`FORMAT_VERSION`).

    Raises:
        CheckpointError: a malformed version (``"2"``, ``2.0``, ``true``, ``-1``), or a newer one.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where} has a malformed format_version {version!r} (expected a positive "
                              f"integer); the file was edited or damaged: re-export the checkpoint")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where} was written by a newer prunus (format version {version}; this "
                              f"one reads up to {FORMAT_VERSION}); upgrade prunus to load it")


def _looks_like_pickle(path: Path) -> bool:
    """torch.save writes a zip (``PK``) around a pickle; a bare pickle starts with ``\\x80``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickle file; prunus refuses pickle because loading it can run arbitrary code. "
        f"Convert it to safetensors where you trust it (safetensors.torch.save_file) and load that"
    )


def check_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as a folder that may hold a checkpoint, or raise a CheckpointError.

    Refuses a missing path, a pickle file, any other single file, and a folder whose only weights
    are pickle files. Never opens a pickle.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; give a folder written by prunus export or save_pretrained")
    if p.is_file():
        sniff = p.suffix.lower() not in (".safetensors", ".json", ".gguf")  # their first bytes vary
        if p.suffix.lower() in PICKLE_SUFFIXES or (sniff and _looks_like_pickle(p)):
            raise _refuse_pickle(p)
        raise CheckpointError(f"{p} is a file; give the checkpoint folder (config.json + *.safetensors)")
    has_safetensors = any(p.glob("*.safetensors")) or (p / f"{WEIGHTS}.index.json").exists()
    if not has_safetensors:
        pickles = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise _refuse_pickle(p / pickles[0])
    return p
