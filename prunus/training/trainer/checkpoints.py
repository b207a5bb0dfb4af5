"""The files a training run writes: resumable checkpoints and the JSON summary, each atomically.

A checkpoint holds tensors and plain data only (read back with ``weights_only=True``) and the
config's fingerprint, so a checkpoint of another run is refused instead of resumed. Its first line is
``prunus-train-checkpoint sha256=<hex>``, the digest of the rest of the file (the ``torch.save``
payload), verified before anything is read: a flipped byte is a CheckpointError ("corrupt"), never a
silent resume to other masks. Writes go
through :func:`prunus.io.fsutil.atomic_file`: a reader sees the old file or the new one, never half
of one, even when the run is killed with SIGKILL mid-write.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from prunus.errors import CheckpointError
from prunus.io.fsutil import atomic_file
from prunus.training.trainer.config import TrainConfig

FORMAT = "prunus-train-v2"
MAGIC = b"prunus-train-checkpoint sha256="  # the first line of every checkpoint: the digest of the rest


def checkpoint_path(config: TrainConfig, seed: int) -> Path:
    """Where the checkpoint of ``seed`` goes: ``<checkpoint_dir>/seed<S>.pt``."""
    return Path(config.checkpoint_dir) / f"seed{seed}.pt"


def _verified_payload(path: Path) -> bytes:
    """The checkpoint's payload after its SHA-256 header, or a CheckpointError if it does not match."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    head, nl, payload = raw.partition(b"\n")
    if not head.startswith(MAGIC) or not nl:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a prunus training checkpoint (no integrity "
                              f"header); delete it or use another --checkpoint-dir")
    want = head[len(MAGIC):].decode("ascii", "replace")
    if hashlib.sha256(payload).hexdigest() != want:
        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 does not match the one written with it; "
                              f"delete it (or use another --checkpoint-dir) and train again")
    return payload


def load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    """Read a checkpoint (verified, tensors and plain data only) and check it belongs to ``config``."""
    payload = _verified_payload(path)
    try:
        ck = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # pickled objects, or a file written by something else with our header
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a prunus training checkpoint")
    check_fingerprint(path, ck.get("fingerprint", {}), config)
    return ck


def check_fingerprint(path: Path, got: Any, config: TrainConfig) -> None:
    """A CheckpointError naming the first differences if the checkpoint at ``path`` is another run's."""
    want = config.fingerprint()
    got = got if isinstance(got, dict) else {}
    diff = [k for k in want if want[k] != got.get(k)] + [k for k in got if k not in want]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {got.get(k)!r} vs run {want.get(k)!r}" for k in diff[:4])
        raise CheckpointError(f"checkpoint {path} was written for another run ({detail}); "
                              f"use another --checkpoint-dir or drop --resume")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write: a reader sees the old checkpoint or the new one, never half of one."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    with atomic_file(path) as tmp:  # header and payload in one file: one atomic rename, no torn pair
        tmp.write_bytes(MAGIC + hashlib.sha256(data).hexdigest().encode("ascii") + b"\n" + data)


def write_json(path: str, doc: dict[str, Any]) -> None:
    """The ``--json`` summary, written atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
