"""The working dtype of a ``prunus prune`` job (``--dtype``, :mod:`prunus.io.dtypes`), resolved.

``auto`` keeps the checkpoint's dtype, except under an ``+int8``/``+int4`` spec: the quantized grid
(codes times float16 scales) is not representable in bfloat16 or float16, so a half-precision model
is then pruned in float32 (and said so); an explicit ``--dtype bfloat16`` with a quant spec is
refused by the job (:func:`prunus.oneshot.job.job_from_mapping`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from prunus.io.dtypes import parse_dtype_name, short_name

HALF = (torch.bfloat16, torch.float16)


def working_dtype(job) -> Optional[torch.dtype]:  # noqa: ANN001  (a PruneJob)
    """The dtype to load the model in; None keeps the checkpoint's (``--dtype auto``)."""
    return parse_dtype_name(job.dtype)


def model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The most common floating dtype of the model's parameters, by element count."""
    count: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return max(count, key=count.__getitem__) if count else None


def describe_dtype(model: nn.Module) -> str:
    return short_name(model_dtype(model))


def needs_float32(job, dtype: Optional[torch.dtype]) -> bool:  # noqa: ANN001
    """Whether an ``auto`` job on a ``dtype`` checkpoint must work in float32 (a quant spec on half)."""
    return job.dtype == "auto" and dtype in HALF and any(s.quant is not None for s in job.specs)


def quant_dtype(job, model: nn.Module, log: Callable[[str], None]) -> nn.Module:  # noqa: ANN001
    """``model`` in float32 when :func:`needs_float32`, with a note; else as it is."""
    dt = model_dtype(model)
    if needs_float32(job, dt):
        log(f"note: the checkpoint is {short_name(dt)}, but +int8/+int4 weights need float32: working "
            f"in float32 (pass --dtype float32 to say so)")
        return model.float()
    return model
