"""Checks at the loading edge: a device that is there, and a model whose weights all came from the files.

Both raise a one-line :class:`~prunus.errors.ModelError` before any work, instead of a late
``AssertionError`` (``--device cuda`` without CUDA) or a silently random model (a tensor missing
from the files, which transformers would initialise at random).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

from prunus.errors import ModelError


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No transformers progress bar or load report while loading when progress is off (``--quiet``,
    ``TQDM_DISABLE``): missing tensors are an error of ours, one line."""
    if not os.environ.get("TQDM_DISABLE"):
        yield
        return
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_device(device: str | torch.device) -> torch.device:
    """``device`` parsed and present, before any work: ``cuda`` without CUDA, ``tpu9`` or ``cuda:7``
    on a one-GPU machine is a one-line ModelError, not a late AssertionError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelError(f"invalid device {str(device)!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(f"unsupported device {str(device)!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {str(device)!r} requested but CUDA is not available on this "
                             f"machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")
    return dev


def check_loaded(info: Any, where: Any) -> None:
    """Every weight came from the files: transformers' loading info lists no missing (randomly
    initialised) or mismatched tensor; tied weights (lm_head tied to the embedding) are not missing."""
    missing = sorted(set(info.get("missing_keys") or ()) | {str(k[0]) if isinstance(k, tuple) else str(k)
                                                            for k in info.get("mismatched_keys") or ()})
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelError(f"{where} lacks {len(missing)} tensor(s) the model needs ({', '.join(missing[:3])}"
                         f"{more}); they would be random: restore the files or re-save the model")
