"""FLOP counts of the bundled models, dense and with sparsity counted.

Per-sample forward FLOPs of every Linear/Conv layer are measured once with forward hooks
(2 FLOPs per multiply-add); a layer's sparse cost is its dense cost times its density. Training
follows the convention of Evci et al. 2020 (RigL, appendix H): a training step costs 3x the
forward pass (forward, gradient of the input, gradient of the weights); methods that need a dense
backward (SR-STE, PGF) pay ``f_sparse + 2 f_dense``, and a RigL update step adds ``f_dense - f_sparse``
for its dense gradient.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from prunus.training.sparsifier import PRUNABLE, unwrap


def layer_flops(model: nn.Module, example: Tensor) -> dict[str, float]:
    """Forward FLOPs per sample of each Linear/Conv layer, by FQN, measured on ``example[:1]``."""
    costs: dict[str, float] = {}
    hooks = []
    for name, mod in unwrap(model).named_modules():
        if isinstance(mod, PRUNABLE):
            def hook(m, inp, out, name=name):
                w = m.weight
                if isinstance(m, nn.Linear):
                    costs[name] = 2.0 * out.numel() * w.shape[1]
                else:  # conv: every output element costs in/groups * kernel multiply-adds
                    costs[name] = 2.0 * out.numel() * w[0].numel()
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            unwrap(model)(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return costs


def forward_flops(costs: Mapping[str, float], densities: Mapping[str, float] | None = None,
                  extra: float = 0.0) -> float:
    """Forward FLOPs per sample; layers absent from ``densities`` count dense. ``extra``: attention."""
    d = densities or {}
    return sum(c * d.get(n, 1.0) for n, c in costs.items()) + extra


def train_step_flops(f_sparse: float, f_dense: float, *, dense_backward: bool = False) -> float:
    """FLOPs of one training example: ``3 f_sparse``, or ``f_sparse + 2 f_dense`` with a dense backward."""
    return f_sparse + 2.0 * (f_dense if dense_backward else f_sparse)
