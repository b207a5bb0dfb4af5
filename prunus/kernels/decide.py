"""The rule that turns one layer's timings into its kernel (:func:`decide`), and the prefill
choice of a kernel that skips zero inputs (:func:`prefill_choice`); used by plans and tuning."""

from __future__ import annotations

from typing import Sequence

from prunus.kernels.registry import KERNELS
from prunus.kernels.timing import Timing


def decide(timings: Sequence[Timing], tokens: Sequence[int], margin: float) -> tuple[str, str]:
    """(kernel or "dense", reason) from one layer's timings."""
    if not timings:
        return "dense", "no available sparse kernel applies"
    by_kernel: dict[str, dict[int, float]] = {}
    for t in timings:
        by_kernel.setdefault(t.kernel, {})[t.tokens] = t.speedup
    worst = {k: min(s.get(n, 0.0) for n in tokens) for k, s in by_kernel.items()}
    best = max(worst, key=lambda k: worst[k])
    ts = "/".join(str(n) for n in tokens)
    ss = "/".join(f"{by_kernel[best].get(n, 0.0):.2f}x" for n in tokens)
    if worst[best] >= margin:
        return best, f"{best} {ss} at {ts} tokens, all >= {margin:g}x"
    return "dense", f"best {best} {ss} at {ts} tokens, below {margin:g}x"


def is_input_sparse(kernel: str) -> bool:
    """Whether ``kernel`` is a registered kernel that skips zero inputs."""
    spec = KERNELS.get(kernel)
    return spec is not None and spec.input_sparse


SKIP_TOKENS = 4  # a kernel that skips zero inputs runs calls of at most this many tokens


def prefill_choice(kernel: str, timings: Sequence[Timing], tokens: Sequence[int],
                   margin: float) -> str:
    """For ``kernel`` skipping zero inputs: what its calls of more than :data:`SKIP_TOKENS` tokens
    run, ``""`` for any other kernel. That is the layer's choice by :func:`decide` among the other
    kernels (the same timings; theirs do not depend on the zeros), judged at the planned token
    counts above :data:`SKIP_TOKENS` only: a kernel that wins at decode may lose at prefill (the
    float bitmap kernel on an unpruned weight does), so with no such count measured (a decode plan,
    ``tokens=[1]``) it is ``"dense"``: the skip kernel's own dense product."""
    if not is_input_sparse(kernel):
        return ""
    long = [n for n in tokens if n > SKIP_TOKENS]
    if not long:
        return "dense"
    return decide([t for t in timings if not is_input_sparse(t.kernel) and t.tokens in long], long, margin)[0]


__all__ = ["SKIP_TOKENS", "decide", "is_input_sparse", "prefill_choice"]
