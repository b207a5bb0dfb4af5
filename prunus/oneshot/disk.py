"""Is there room for the output? Its size estimated before any pruning, against the free disk space.

The estimate is an upper bound of what the format writes: a pruned weight at sparsity ``s`` costs
``(1 - s)`` of its values plus one mask bit per weight in the compressed format (the exponent coding
of :mod:`prunus.export.floatcode` only makes it smaller), its dense values plus the packed mask in the
dense format; every other tensor its dense bytes; plus room for the config and tokenizer files.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import torch

from prunus.io.fsutil import WriteError

EXTRA_BYTES = 64 * 2**20  # config, tokenizer, manifest, safetensors headers


def estimate_bytes(tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]], targets: Mapping[str, float],
                   fmt: str) -> int:
    """Bytes the checkpoint of ``tensors`` (stored key, shape, dtype) will take; ``targets`` maps the
    pruned weights' keys to their sparsity."""
    total = EXTRA_BYTES
    for key, shape, dtype in tensors:
        n = math.prod(shape)
        item = torch.empty((), dtype=dtype).element_size()
        if key in targets:
            kept = n if fmt == "dense" else math.ceil(n * (1.0 - targets[key])) + 1
            total += kept * item + (n + 7) // 8
        else:
            total += n * item
    return total


def _existing(path: Path) -> Path:
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_disk(out: str | Path, need: int, what: str = "the checkpoint") -> None:
    """A one-line WriteError, before any work, when ``out``'s file system has less than ``need`` free."""
    free = shutil.disk_usage(_existing(Path(out))).free
    if free < need:
        raise WriteError(f"not enough disk space for {out}: {what} needs about {need / 2**30:.2f} GiB and "
                         f"{free / 2**30:.2f} GiB are free; free some space or choose another --out")
