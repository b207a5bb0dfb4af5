"""Pure step -> value schedules used by the sparse-training methods. No state, no torch.

Each function maps a training step (and the run's length) to a number, so it can be tested with
hand-computed values and plotted on its own.

Example:
    >>> cubic(50, 100, final=0.9)          # halfway through the default 0..100% window
    0.7875
    >>> cosine_decay(0, 100, alpha=0.3)
    0.3
"""

from __future__ import annotations

import math


def cubic(step: int, total: int, final: float, *, initial: float = 0.0, start: float = 0.0,
          end: float = 1.0) -> float:
    """Gradual-pruning sparsity of Zhu & Gupta 2017 ("To prune, or not to prune", eq. 1).

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` for ``t0 <= t <= t1``, where
    ``t0 = start * total`` and ``t1 = end * total`` (fractions of training, e.g. the 25%-75% window
    of "The Journey Matters"). Before ``t0`` the value is ``initial``, after ``t1`` it is ``final``.

    Args:
        step: the current optimizer step (0-based).
        total: the number of steps in the run.
        final: the sparsity reached at ``end``.
        initial: the sparsity at ``start`` (0: the network starts dense).
        start, end: the pruning window as fractions of ``total``, ``0 <= start <= end <= 1``.
    """
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"cubic schedule needs 0 <= start <= end <= 1, got {start}, {end}")
    t0, t1 = start * total, end * total
    if step < t0:
        return initial
    if step >= t1 or t1 <= t0:
        return final
    frac = (step - t0) / (t1 - t0)
    return final + (initial - final) * (1.0 - frac) ** 3


def cosine_decay(step: int, end_step: float, alpha: float) -> float:
    """RigL/SET update fraction (Evci et al. 2020, "Rigging the Lottery", sec. 3).

    ``f(t) = alpha / 2 * (1 + cos(pi * t / T_end))`` for ``t < T_end`` and 0 after: the share of
    each layer's active weights that is dropped and regrown at an update.
    """
    if end_step <= 0 or step >= end_step:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / end_step))


def geometric_rate(final: float, rounds: int) -> float:
    """Per-round pruning rate p with ``(1 - p) ** rounds == 1 - final`` (iterative magnitude pruning)."""
    if rounds <= 0:
        raise ValueError("rounds must be positive")
    return 1.0 - (1.0 - final) ** (1.0 / rounds)


def pgf(step: int, total: int, n: int, m: int, *, decay: str = "linear", dense: float = 0.0,
        finetune: float = 0.2, coef: float | None = None) -> tuple[int, float]:
    """Progressive Gradient Flow schedule (Bambhaniya et al. 2024, "Progressive Gradient Flow for
    Robust N:M Sparsity Training in Transformers", sec. 4).

    Training is split into a dense phase ``[0, dense)``, a decay phase, and a fine-tune phase
    ``[1 - finetune, 1]`` (fractions of ``total``). Returns ``(n_t, beta_t)``: keep ``n_t`` of every
    ``m`` weights, and scale the pruned ones by ``beta_t`` in the forward pass
    (``W * (mask + beta * (1 - mask))``), so the gradient reaching them is scaled by ``beta_t`` too.

    - ``linear`` (MDGF-linear): ``beta = max(0, 1 - coef * (t - t_d))``, ``n_t = n``.
    - ``exponential`` (MDGF-exponential): ``beta = exp(-coef * (t - t_d))``, ``n_t = n``.
    - ``structure`` (SDGF-stepwise): ``beta = 0``; the decay phase is cut into
      ``log2(m / n) + 1`` equal frames keeping ``m-1, m/2, m/4, ..., n`` of ``m`` (1:16 goes
      15:16, 8:16, 4:16, 2:16, 1:16).

    ``coef`` defaults to reaching 0 (linear) or 0.01 (exponential) at the end of the decay phase.
    In the dense phase ``n_t == m`` (no mask); in the fine-tune phase ``(n, 0.0)``.
    """
    if decay not in ("linear", "exponential", "structure"):
        raise ValueError(f"unknown PGF decay {decay!r}; choose linear, exponential or structure")
    if not 0.0 <= dense <= 1.0 - finetune <= 1.0:
        raise ValueError(f"PGF needs 0 <= dense <= 1 - finetune <= 1, got dense={dense}, finetune={finetune}")
    t_d, t_f = dense * total, (1.0 - finetune) * total
    if step < t_d:
        return m, 1.0
    if step >= t_f:
        return n, 0.0
    width = max(t_f - t_d, 1e-9)
    if decay == "structure":
        frames = max(1, int(round(math.log2(m / n))) + 1)
        i = min(frames - 1, int((step - t_d) / width * frames))
        n_i = m - 1 if i == 0 else max(n, m // 2 ** i)
        return (n if i == frames - 1 else n_i), 0.0
    if decay == "linear":
        c = coef if coef is not None else 1.0 / width
        return n, max(0.0, 1.0 - c * (step - t_d))
    c = coef if coef is not None else math.log(100.0) / width
    return n, math.exp(-c * (step - t_d))
