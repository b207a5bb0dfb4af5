"""The files a training run writes: resumable checkpoints and the JSON summary, each atomically.

A checkpoint holds tensors and plain data only (read back with ``weights_only=True``) and the
config's fingerprint, so a checkpoint of another run is refused instead of resumed. Writes go
through :func:`prunus.io.fsutil.atomic_file`: a reader sees the old file or the new one, never half
of one, even when the run is killed with SIGKILL mid-write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from prunus.errors import CheckpointError
from prunus.io.fsutil import atomic_file
from prunus.training.trainer.config import TrainConfig

FORMAT = "prunus-train-v1"


def checkpoint_path(config: TrainConfig, seed: int) -> Path:
    """Where the checkpoint of ``seed`` goes: ``<checkpoint_dir>/seed<S>.pt``."""
    return Path(config.checkpoint_dir) / f"seed{seed}.pt"


def load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    """Read a checkpoint (tensors and plain data only) and check it belongs to ``config``."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, tampered, pickled objects
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a prunus training checkpoint")
    want, got = config.fingerprint(), ck.get("fingerprint", {})
    diff = [k for k in want if want[k] != got.get(k)]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {got.get(k)!r} vs run {want[k]!r}" for k in diff[:4])
        raise CheckpointError(f"checkpoint {path} was written for another run ({detail}); "
                              f"use another --checkpoint-dir or drop --resume")
    return ck


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write: a reader sees the old checkpoint or the new one, never half of one."""
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def write_json(path: str, doc: dict[str, Any]) -> None:
    """The ``--json`` summary, written atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
