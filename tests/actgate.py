"""A test stand-in for an activation gate (the contract of ``prunus.activation``, which these tests
do not import): the attribute ``prunus_gate`` and a forward pre-hook that zeroes the inputs whose
score is below the threshold -- ``|x_j|``, or ``|x_j| * ||W[:, j]||`` for ``colnorm`` (the column
norms held in the buffer ``prunus_gate_scale``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Gate:
    threshold: float
    sparsity: float
    scale: str = "none"


def gate_hook(module: nn.Module, args: tuple) -> tuple:
    (x, *rest) = args
    g = module.prunus_gate
    score = x.abs() if g.scale == "none" else x.abs() * module.prunus_gate_scale
    return (torch.where(score < g.threshold, torch.zeros_like(x), x), *rest)


def attach(module: nn.Module, threshold: float, sparsity: float, scale: str = "none") -> nn.Module:
    """Gate ``module`` (an nn.Linear) in place; returns it."""
    module.prunus_gate = Gate(threshold, sparsity, scale)
    if scale == "colnorm":
        module.register_buffer("prunus_gate_scale", module.weight.detach().norm(dim=0), persistent=False)
    module.register_forward_pre_hook(gate_hook)
    return module


def gated_reference(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """The gate, then the dense product: what a gated layer must compute on any kernel."""
    (xg,) = gate_hook(lin, (x,))
    return nn.functional.linear(xg, lin.weight, lin.bias)
