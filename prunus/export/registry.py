"""The format registry: every module of :mod:`prunus.export.formats` is a format, found by being there.

A format is a module (or any object) with a ``NAME`` and the verbs ``save``, ``load``,
``load_masks`` and ``read_metadata`` (see :mod:`prunus.export`), and optionally ``sniff(folder) ->
bool`` (whether a folder without ``prunus.json`` is in this format) and ``PRIORITY`` (sniffed
highest first). :func:`load_formats` imports every module of :mod:`prunus.export.formats`
(``pkgutil``) and registers it; :func:`register_format` adds one defined elsewhere (a test's).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

from torch import Tensor, nn

from prunus.errors import CheckpointError
from prunus.export.manifest import MANIFEST, ExportInfo, check_checkpoint_path, read_manifest

PACKAGE = "prunus.export.formats"  # every module there is a format


@dataclass(frozen=True)
class Format:
    """One checkpoint format: a name and its verbs."""

    name: str
    module: ModuleType | Any
    save: Callable[..., ExportInfo]
    load: Callable[..., nn.Module]
    load_masks: Callable[..., dict[str, Tensor]]
    read_metadata: Callable[..., dict[str, Any]]
    sniff: Optional[Callable[[Path], bool]] = None
    priority: int = 0


FORMATS: dict[str, Format] = {}
_loaded = False


def register_format(module: ModuleType | Any) -> Format:
    """Register ``module`` (anything with ``NAME``, ``save``, ``load``, ``load_masks`` and
    ``read_metadata``) as a format; a duplicate name raises."""
    name = str(getattr(module, "NAME", "") or "")
    missing = [v for v in ("save", "load", "load_masks", "read_metadata")
               if not callable(getattr(module, v, None))]
    if not name or missing:
        raise CheckpointError(f"format {name or module!r} lacks {'NAME' if not name else ', '.join(missing)}")
    if name in FORMATS and FORMATS[name].module is not module:
        raise CheckpointError(f"export format {name!r} is already registered")
    fmt = Format(name, module, module.save, module.load, module.load_masks, module.read_metadata,
                 getattr(module, "sniff", None), int(getattr(module, "PRIORITY", 0)))
    FORMATS[name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    """Remove the format ``name`` (a test's own, once the test is done); unknown: no-op."""
    FORMATS.pop(name, None)


def load_formats() -> dict[str, Format]:
    """Import and register every module of :mod:`prunus.export.formats` once; returns :data:`FORMATS`."""
    global _loaded
    if not _loaded:
        _loaded = True
        pkg = importlib.import_module(PACKAGE)
        for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            register_format(importlib.import_module(f"{PACKAGE}.{mod.name}"))
    return FORMATS


def format_names() -> tuple[str, ...]:
    """The registered format names, ``compressed`` (the default) first: for ``--format`` choices."""
    names = sorted(load_formats())
    return tuple(sorted(names, key=lambda n: n != "compressed"))


def get_format(name: str) -> Format:
    """The format ``name``; an unknown name raises with the list of names."""
    if name not in load_formats():
        raise CheckpointError(f"unknown export format {name!r}; choose one of {', '.join(format_names())}")
    return FORMATS[name]


def check_manifest_present(path: str | os.PathLike[str]) -> None:
    """A folder that prunus wrote (a masks file, or a compressed ``model.safetensors``) must still
    have its ``prunus.json``: without it, it is not a plain transformers folder either.

    Raises:
        CheckpointError: ``prunus.json`` is missing from a prunus checkpoint folder.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir() or (folder / MANIFEST).exists():
        return
    compressed = FORMATS.get("compressed")
    marks = [n for n in ("masks.safetensors",) if (folder / n).exists()]
    if marks or (compressed is not None and compressed.sniff is not None and compressed.sniff(folder)):
        raise CheckpointError(f"{folder} is a prunus checkpoint but its {MANIFEST} is missing; restore it "
                              f"from a backup or re-export the checkpoint")


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format name of a checkpoint folder: from ``prunus.json``, else the first format (highest
    ``PRIORITY``) whose ``sniff`` recognises the folder (a plain transformers safetensors folder
    is ``"dense"``).

    Raises:
        CheckpointError: not a checkpoint (see :func:`check_checkpoint_path`), or an unknown format.
    """
    folder = check_checkpoint_path(path)
    manifest = read_manifest(folder)
    load_formats()
    if not manifest:
        check_manifest_present(folder)
    if manifest:
        fmt = manifest.get("format")
        if fmt not in FORMATS:
            raise CheckpointError(
                f"{folder / MANIFEST} names format {fmt!r}; this prunus reads {', '.join(format_names())}"
            )
        return str(fmt)
    for f in sorted(FORMATS.values(), key=lambda f: -f.priority):
        if f.sniff is not None and f.sniff(folder):
            return f.name
    raise CheckpointError(
        f"{folder} is not a prunus or transformers checkpoint (no prunus.json, config.json or "
        f"model.safetensors); give the folder that prunus export or save_pretrained wrote"
    )


__all__ = ["FORMATS", "Format", "check_manifest_present", "detect_format", "format_names", "get_format", "load_formats",
           "register_format", "unregister_format"]
