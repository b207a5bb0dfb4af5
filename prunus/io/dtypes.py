"""The working dtype of a model: ``--dtype auto|float32|bfloat16|float16``, and the checks it needs.

``auto`` keeps the checkpoint's own dtype (a bf16 checkpoint is pruned, evaluated and saved in bf16;
a GGUF file is dequantized to float32). Whatever the working dtype, calibration statistics (X^T X,
input norms) accumulate in float32 (:class:`prunus.core.stats.LayerStats`) and the methods score and
solve in float32 (:func:`prunus.oneshot.pipeline.prune_targets` hands them ``weight.float()``); the
result is written back in the working dtype.

float16 holds magnitudes up to 65504 only: weights beyond that would become ``inf``, so casting a
model to float16 is refused naming the layer (:func:`check_half_range`), before any work.

Example:
    >>> parse_dtype_name("auto") is None, parse_dtype_name("bf16")
    (True, torch.bfloat16)
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import Tensor

from prunus.errors import ModelError, SpecError

#: ``--dtype`` choices; ``auto`` (None) keeps the checkpoint's dtype
DTYPES: dict[str, Optional[torch.dtype]] = {"auto": None, "float32": torch.float32,
                                            "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
HALF_MAX = float(torch.finfo(torch.float16).max)  # 65504

# safetensors' dtype names of floating tensors
_ST_FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def dtype_choice(name: str) -> str:
    """The canonical ``--dtype`` name (``bf16`` -> ``bfloat16``); a SpecError for anything else."""
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in DTYPES:
        raise SpecError(f"unknown dtype {name!r}; choose {' | '.join(DTYPES)}")
    return key


def parse_dtype_name(name: str) -> Optional[torch.dtype]:
    """``auto`` -> None (the checkpoint's dtype), ``bfloat16``/``bf16`` -> torch.bfloat16, ..."""
    return DTYPES[dtype_choice(name)]


def short_name(dtype: Optional[torch.dtype]) -> str:
    """``torch.bfloat16`` -> ``bfloat16``; None -> ``auto``."""
    return "auto" if dtype is None else str(dtype).removeprefix("torch.")


def out_of_half_range(named: Iterable[tuple[str, Tensor]]) -> Optional[tuple[str, float]]:
    """The first finite floating tensor whose largest magnitude exceeds float16's range, and that
    magnitude; None when every one fits."""
    for name, t in named:
        if not t.is_floating_point() or t.is_meta or t.dtype == torch.float16 or t.numel() == 0:
            continue
        a = t.detach().abs()
        a = a[torch.isfinite(a)]  # NaN/Inf are check_finite's to report
        peak = float(a.max()) if a.numel() else 0.0
        if peak > HALF_MAX:
            return name, peak
    return None


def check_half_range(named: Iterable[tuple[str, Tensor]], where: str) -> None:
    """Refuse casting to float16 when a weight would overflow: a one-line ModelError naming it."""
    bad = out_of_half_range(named)
    if bad is not None:
        name, peak = bad
        raise ModelError(f"{where}: {name} holds |w| up to {peak:.4g}, beyond float16's {HALF_MAX:.0f}, so "
                         f"--dtype float16 would turn it into inf; use --dtype bfloat16 or float32")


def safetensors_header(file: Path) -> dict:
    """The JSON header of a ``.safetensors`` file (tensor names -> dtype, shape, offsets)."""
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{file} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise ValueError(f"{file}: a {n}-byte header is not a safetensors header")
        return json.loads(fh.read(n))


def stored_dtype(files: Iterable[Path]) -> Optional[torch.dtype]:
    """The most common floating dtype, by element count, of the tensors in ``files`` (None: none)."""
    count: dict[torch.dtype, int] = {}
    for f in files:
        for key, info in safetensors_header(f).items():
            if key == "__metadata__" or info.get("dtype") not in _ST_FLOATS:
                continue
            n = 1
            for s in info.get("shape", ()):
                n *= int(s)
            dt = _ST_FLOATS[info["dtype"]]
            count[dt] = count.get(dt, 0) + n
    return max(count, key=count.__getitem__) if count else None


def cast_model(model, dtype: Optional[torch.dtype]) -> None:  # noqa: ANN001  (an nn.Module)
    """Cast ``model``'s floating parameters and persistent buffers to ``dtype`` in place, as
    ``from_pretrained(dtype=...)`` does: buffers a model computes itself (rotary frequencies) keep
    their own dtype (``model.to(dtype)`` would round them to bf16, and change the model). None: as is."""
    if dtype is None:
        return
    persistent = set(model.state_dict().keys())
    for fqn, mod in model.named_modules():
        for name, p in mod._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)  # the same Parameter: tied weights stay tied
        for name, b in mod._buffers.items():
            key = f"{fqn}.{name}" if fqn else name
            if b is not None and b.is_floating_point() and b.dtype != dtype and key in persistent:
                mod._buffers[name] = b.to(dtype)
