"""Activation gates as the kernels see them: which layers have one, and moving one to the module
that replaces a layer.

A gated linear (activation sparsity: TEAL, WINA, a uniform threshold; attached by
:func:`prunus.io.models.load_checkpoint` from a checkpoint's ``activation_sparsity`` metadata)
carries the attribute :data:`GATE_ATTR` -- a frozen dataclass with ``threshold``, ``sparsity`` (the
expected fraction of zero inputs) and ``scale`` (``"none"`` or ``"colnorm"``) -- and a forward
pre-hook that zeroes the inputs whose score is below the threshold. This module names nothing of
the package that builds gates: a gate is recognised by that attribute alone.

- :func:`gated_layers`: layer name -> the gate's ``sparsity``; :func:`prunus.kernels.plans.plan_model`
  plans these layers too, and lets the kernels that skip zero inputs compete there, timed on inputs
  with that fraction of zeros.
- :func:`fuse_gates`: gates attached after a plan was applied (the loader's order) move into the
  kernels that skip zero inputs, as :func:`prunus.kernels.swap.build_module` does for a swap.
- :func:`gates_off`: the model without its gates for a while (``prunus bench`` times that dense
  baseline, what a user would otherwise run).
- :func:`carry_gate`: when a plan swaps a gated ``nn.Linear`` for a kernel module, the new module
  gets the gate: every attribute, buffer or parameter whose name starts with :data:`GATE_ATTR`
  (the gate, a ``colnorm`` scale tensor) and every forward pre-hook of the old module, re-registered
  in order, so that the new module zeroes the same inputs before its product (a kernel module that
  fused the gate into itself hands on its hook, ``gate_hook``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

from torch import nn

from prunus.kernels.base import SparseLinear

GATE_ATTR = "prunus_gate"


def gate_of(module: nn.Module) -> Optional[Any]:
    """The module's activation gate, or None."""
    return getattr(module, GATE_ATTR, None)


def gated_layers(model: nn.Module) -> dict[str, float]:
    """Name -> expected fraction of zero inputs (``gate.sparsity``) of every gated linear."""
    out = {}
    for name, m in model.named_modules():
        gate = gate_of(m)
        if gate is not None and isinstance(m, (nn.Linear, SparseLinear)):
            out[name] = min(1.0, max(0.0, float(getattr(gate, "sparsity", 0.0))))
    return out


def carry_gate(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (the module replacing ``old``) ``old``'s activation gate; no gate: nothing.

    The forward pre-hooks are re-registered on ``new`` (with their ``with_kwargs`` flag), so a
    hook reading ``module.prunus_gate`` or a scale tensor on the module finds ``new``'s copies;
    hooks already on ``new`` are not added twice. ``old`` keeps its gate (a tuning pass swaps it
    back in).
    """
    if gate_of(old) is None or old is new:
        return
    for key, value in list(old.__dict__.items()):
        if key.startswith(GATE_ATTR):
            setattr(new, key, value)
    for key, buf in old._buffers.items():
        if key.startswith(GATE_ATTR):
            new.register_buffer(key, buf, persistent=key not in old._non_persistent_buffers_set)
    for key, param in old._parameters.items():
        if key.startswith(GATE_ATTR) and param is not None:
            new.register_parameter(key, param)
    present = list(new._forward_pre_hooks.values())
    hooks = [(hook, hid in old._forward_pre_hooks_with_kwargs) for hid, hook in old._forward_pre_hooks.items()]
    fused = getattr(old, "gate_hook", None)  # a kernel that took the gate's hook into itself
    if fused is not None:
        hooks.append((fused, True))
    for hook, with_kwargs in hooks:
        if any(hook is h for h in present):
            continue
        new.register_forward_pre_hook(hook, with_kwargs=with_kwargs)


def fuse_gates(model: nn.Module) -> int:
    """Let every kernel module of ``model`` that can (the kernels that skip zero inputs) take its
    gate's hook into itself (``fuse_gate``); returns how many did. Same results, less per call."""
    return sum(bool(m.fuse_gate()) for m in model.modules()
               if gate_of(m) is not None and callable(getattr(m, "fuse_gate", None)))


@contextmanager
def gates_off(model: nn.Module) -> Iterator[int]:
    """Within the block, the gated linears of ``model`` compute on their inputs as they come (every
    forward pre-hook of theirs held back, ``prunus_gate`` hidden): the model a user would run
    without activation sparsity. Yields how many layers were gated; restored on exit."""
    held = []
    for m in model.modules():
        if gate_of(m) is not None and isinstance(m, (nn.Linear, SparseLinear)):
            hooks = dict(m._forward_pre_hooks)
            m._forward_pre_hooks.clear()
            held.append((m, hooks, m.__dict__.pop(GATE_ATTR, None)))
    try:
        yield len(held)
    finally:
        for m, hooks, gate in held:
            m._forward_pre_hooks.update(hooks)
            if gate is not None:
                m.__dict__[GATE_ATTR] = gate


__all__ = ["GATE_ATTR", "carry_gate", "fuse_gates", "gate_of", "gated_layers", "gates_off"]
