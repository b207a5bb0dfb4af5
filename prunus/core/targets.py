"""Which tensors to prune: linear layers chosen by fully-qualified-name globs.

A :class:`Target` names a module by its FQN (``model.layers.3.mlp.up_proj``), as torch.ao.pruning
does. ``lm_head``, embeddings and an encoder's pooler and MLM head are excluded by default, and a
weight shared by two modules (tied embeddings) is targeted once, under the first name that owns it.

GPT-2's ``Conv1D`` stores its weight as (in, out); :meth:`Target.get` and :meth:`Target.set` always
speak (out, in), so algorithms never see the difference.

One-shot pruning selects linear layers (the default ``kinds``); sparse training also selects
convolutions (``kinds=TRAINABLE``) and reads :attr:`Target.weight`, the trained parameter (the
original one when the weight is parametrized, as SR-STE and PGF do). The tied-weight rule is the same
for both.

Example:
    >>> ts = select(model, include=["*.mlp.*"], exclude=["lm_head"])
    >>> ts[0].name, ts[0].get().shape
    ('model.layers.0.mlp.gate_proj', torch.Size([1536, 576]))
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from prunus.errors import SpecError

#: the output heads and embeddings: a decoder's lm_head, a BERT-family encoder's pooler and its
#: MLM/NSP heads (``cls.*``, whose decoder is tied to the word embeddings), outside the blocks
DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head", "*.lm_head", "*embed*", "*wte*", "*wpe*", "pooler.*",
                                    "*.pooler.*", "cls.*")
LINEAR: tuple[type, ...] = (nn.Linear,)  # plus GPT-2's Conv1D, recognised by name
TRAINABLE: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)  # what sparse training sparsifies


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D without importing transformers here
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def read_only_weight(module: nn.Module) -> bool:
    """A linear whose ``weight`` is a computed, read-only dense view (a sparse kernel module,
    :class:`prunus.kernels.SparseLinear`): it is read like an nn.Linear, but cannot be pruned in place."""
    return (isinstance(getattr(type(module), "weight", None), property) and callable(getattr(module, "dense_weight", None))
            and not hasattr(module, "parametrizations"))


def is_prunable(module: nn.Module, kinds: tuple[type, ...] = LINEAR) -> bool:
    """Modules of ``kinds`` (default: nn.Linear), GPT-2's Conv1D or (for linears) a sparse kernel
    module with a read-only dense ``weight``."""
    kind = isinstance(module, kinds) or _is_conv1d(module) or (nn.Linear in kinds and read_only_weight(module))
    return kind and getattr(module, "weight", None) is not None


def _identity(module: nn.Module) -> int:
    """What tied weights share: the parameter; for a computed weight (rebuilt on each access), the module."""
    return id(module) if read_only_weight(module) else id(parameter(module))


def parameter(module: nn.Module) -> Tensor:
    """The module's weight parameter: the original one when the weight is parametrized."""
    if hasattr(module, "parametrizations") and "weight" in module.parametrizations:
        return module.parametrizations.weight.original
    return module.weight


@dataclass(eq=False)
class Target:
    """One prunable weight. ``get`` / ``set`` use the (out, in) convention."""

    name: str
    module: nn.Module = field(repr=False)
    transposed: bool = False

    @property
    def weight(self) -> Tensor:
        """The trained parameter in the module's own layout (the original one when parametrized)."""
        return parameter(self.module)

    @property
    def shape(self) -> tuple[int, int]:
        w = self.module.weight
        return (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])

    def get(self) -> Tensor:
        """The weight as (out, in); a view, not a copy."""
        w = self.module.weight.data
        return w.t() if self.transposed else w

    @torch.no_grad()
    def set(self, weight: Tensor) -> None:
        """Write an (out, in) weight back in place, in the module's dtype and layout."""
        if read_only_weight(self.module):
            raise SpecError(f"{self.name} runs on a sparse kernel and its weight is read-only; load the "
                            f"checkpoint with runtime='dense' (prunus.load(path, runtime='dense')) to prune it")
        w = self.module.weight.data
        w.copy_(weight.t() if self.transposed else weight)


def _match(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select(model: nn.Module, include: Iterable[str] = ("*",),
           exclude: Iterable[str] = DEFAULT_EXCLUDE, *, kinds: tuple[type, ...] = LINEAR,
           root: bool = False) -> list[Target]:
    """Prunable layers of ``model`` whose FQN matches an ``include`` glob and no ``exclude`` glob.

    Args:
        model: any nn.Module.
        include: fnmatch globs over module names; ``*`` matches dots too.
        exclude: globs removed after inclusion; the default drops lm_head, embeddings and encoder heads.
        kinds: module classes to select (GPT-2's Conv1D always); :data:`TRAINABLE` adds convolutions.
        root: also consider ``model`` itself (name ``""``), e.g. a bare ``nn.Linear``.

    Returns:
        Targets in module order, each weight once (tied weights keep the first owner).

    Raises:
        SpecError: if nothing matches, naming the patterns.
    """
    include, exclude = tuple(include), tuple(exclude)
    seen: set[int] = set()
    # weights tied to an excluded module (lm_head tied to the embedding) stay excluded everywhere
    for name, module in model.named_modules():
        if _match(name, exclude) and getattr(module, "weight", None) is not None:
            seen.add(_identity(module))
    out = []
    for name, module in model.named_modules():
        if (not name and not root) or not is_prunable(module, kinds):
            continue
        if not _match(name, include) or _match(name, exclude) or _identity(module) in seen:
            continue
        seen.add(_identity(module))
        out.append(Target(name, module, transposed=_is_conv1d(module)))
    if not out:
        raise SpecError(f"no prunable layers match include={list(include)} exclude={list(exclude)}")
    return out
