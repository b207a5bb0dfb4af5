"""A sparsifier on a model sharded by FSDP2: masks sharded like the weights, decisions on full tensors.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a DTensor sharded on dim 0: each rank
holds some rows of each weight. :func:`attach` makes a built
:class:`~prunus.training.sparsifier.Sparsifier` work on such a model, with no per-method code:

- every mask becomes a DTensor with its weight's placement (a rank holds the mask rows of the weight
  rows it holds), so ``apply()`` (``w *= mask``, and the optimizer state likewise) is a local
  multiplication on every rank, with no communication;
- a method's ``update`` hook runs inside a *full view* (:class:`View`): ``sp.targets`` and
  ``sp.masks`` are swapped for stand-ins that hand out full tensors, all-gathered on first use
  (``DTensor.full_tensor()``; a weight comes with its full gradient, the reduce-scattered one gathered
  back). So top-k drops, RigL's growth where the full |grad| is largest and SET's seeded random growth
  are decided on the full tensor, exactly as in one process. On leaving the view every mask the hook
  assigned is re-sharded locally (each rank keeps its own rows of the mask it computed; no
  communication), and every gathered weight the hook changed in place (grown weights zeroed, LTH's
  rewind) is written back to the shards; a weight whose version counter did not move is not;
- :meth:`Sharding.full_params` shows a module's parameters whole, for hooks that reset or rewind the
  whole model (LTH): ``reset_parameters`` then draws the same numbers as in one process;
- reports (``sparsity()``, ``densities()``, digests) read full tensors.

Every rank runs the same hooks in the same order on the same full tensors (gathered from the same
shards), so the gathers happen in the same order everywhere and every rank computes the same full
masks. Each rank hashes the masks it computed (:attr:`Sharding.decisions`); the trainer compares the
hashes across ranks at the end of every epoch, since a disagreement would leave every rank with its
own rows of a different mask.

Example (inside a ``torchrun`` process with a process group):
    >>> sp = prunus.training.rigl(model, opt, "90%", total_steps=1000)   # before sharding
    >>> for m in layers: fully_shard(m)
    >>> fully_shard(model); opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> sp.optimizer = opt; attach(sp)
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from prunus.core.targets import Target, parameter
from prunus.errors import PrunusError

Sparsifier = Any  # prunus.training.sparsifier.Sparsifier (which imports this module)


def is_sharded(x: Any) -> bool:
    """True for a DTensor (an FSDP2 parameter, its gradient and optimizer state, a sharded mask)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        return False
    return isinstance(x, DTensor)


def full(x: Tensor) -> Tensor:
    """The whole tensor: a DTensor all-gathered (every rank gets every row); anything else as it is."""
    return x.detach().full_tensor() if is_sharded(x) else x


def shard_like(x: Tensor, like: Tensor) -> Tensor:
    """The full tensor ``x`` with ``like``'s placement: this rank's rows, cut locally (no communication).

    ``x`` must be the same on every rank (it is: every rank computed it from the same full tensors).
    """
    if not is_sharded(like) or is_sharded(x):
        return x
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(x.detach().to(like.device), like.device_mesh, like.placements, src_data_rank=None)


@dataclass(eq=False)
class FullTarget(Target):
    """A target whose ``weight`` is the full tensor (with its full ``grad``), inside a :class:`View`."""

    view: Any = field(default=None, repr=False)

    @property
    def weight(self) -> Tensor:
        return self.view.full_param(parameter(self.module))


class FullMasks(MutableMapping):
    """``name -> full mask`` inside a view: gathered from the sharded masks on first read."""

    def __init__(self, sharded: dict[str, Tensor]) -> None:
        self.sharded, self.full, self.assigned = sharded, {}, []

    def __getitem__(self, k: str) -> Tensor:
        if k not in self.full:
            self.full[k] = full(self.sharded[k])
        return self.full[k]

    def __setitem__(self, k: str, v: Tensor) -> None:
        if k not in self.sharded:
            raise KeyError(f"no mask {k!r}: a method cannot add layers while training")
        self.full[k] = v
        if k not in self.assigned:
            self.assigned.append(k)

    def __delitem__(self, k: str) -> None:
        raise KeyError(f"mask {k!r} cannot be removed while training")

    def __iter__(self) -> Iterator[str]:
        return iter(self.sharded)

    def __len__(self) -> int:
        return len(self.sharded)


class View:
    """Full tensors for one update hook; :meth:`commit` re-shards what the hook changed."""

    def __init__(self, sharding: "Sharding") -> None:
        self.sharding, self.sp = sharding, sharding.sp
        self.gathered: dict[int, tuple[Tensor, Tensor, int]] = {}  # id(param) -> (param, full, version)
        self.owner: dict[int, Tensor] = {}  # id(full) -> its sharded parameter
        self.targets, self.masks = self.sp.targets, FullMasks(self.sp.masks)

    def full_param(self, p: Tensor) -> Tensor:
        """The whole of parameter ``p`` (gathered once per view), with ``.grad`` the whole gradient."""
        if not is_sharded(p):
            return p
        hit = self.gathered.get(id(p))
        if hit is None:
            f = full(p).requires_grad_(p.requires_grad)
            if p.grad is not None:
                f.grad = full(p.grad)
            hit = self.gathered[id(p)] = (p, f, f._version)
            self.owner[id(f)] = p
        return hit[1]

    def enter(self) -> None:
        self.sp.targets = [FullTarget(t.name, t.module, t.transposed, view=self) for t in self.targets]
        self.sp.masks = self.masks

    @torch.no_grad()
    def commit(self, step: int) -> None:
        """Write changed weights back to their shards, re-shard assigned masks; restore the sparsifier."""
        sp = self.sp
        sp.targets = self.targets
        for p, f, version in self.gathered.values():
            if f._version != version:
                p.copy_(shard_like(f, p))
        masks = dict(self.masks.sharded)
        for k in self.masks.assigned:
            m = self.masks.full[k].to(torch.bool)
            self.sharding.decisions.update(f"{step}:{k}:".encode())
            self.sharding.decisions.update(m.to(torch.uint8).contiguous().numpy().tobytes())
            masks[k] = shard_like(m, sp._target(k).weight)
            self.sharding.nnz[k] = (masks[k], int(m.sum()))
        if self.masks.assigned:
            self.sharding.updates += 1
        sp.masks = masks

    def abandon(self) -> None:
        self.sp.targets, self.sp.masks = self.targets, self.masks.sharded


class Sharding:
    """The sharded mode of one sparsifier (``sp.sharding``); see the module docstring."""

    def __init__(self, sp: Sparsifier) -> None:
        self.sp = sp
        self.active: Optional[View] = None
        self.decisions = hashlib.sha256()  # every mask this rank computed, in order
        self.updates = 0  # updates that assigned masks
        self.nnz: dict[str, tuple[Tensor, int]] = {}  # name -> (the mask counted, its kept entries)

    @contextlib.contextmanager
    def view(self, step: int) -> Iterator[View]:
        """Full targets and masks for an update hook (nested calls share the outer view)."""
        if self.active is not None:
            yield self.active
            return
        v = self.active = View(self)
        v.enter()
        try:
            yield v
        except BaseException:
            v.abandon()
            raise
        else:
            v.commit(step)
        finally:
            self.active = None

    @contextlib.contextmanager
    def full_params(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` with every sharded parameter swapped for its full tensor within the block.

        For whole-model operations of a hook (``reset_parameters``, copying a rewind snapshot into the
        parameters); changes are written back to the shards when the view ends. Do not call the
        module's ``state_dict`` / ``load_state_dict`` inside: FSDP's hooks put the shards back.
        """
        with self.view(self.sp.step_count) as v:
            swapped = []
            for mod in module.modules():
                for name, p in list(mod._parameters.items()):
                    if p is not None and is_sharded(p):
                        mod._parameters[name] = v.full_param(p)
                        swapped.append((mod, name, p))
            try:
                yield module
            finally:
                for mod, name, p in swapped:
                    mod._parameters[name] = p

    def localize(self, param: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """The sharded parameter behind ``param`` (a full stand-in inside a view) and ``keep`` sharded like it."""
        if not is_sharded(param):
            owner = self.active.owner.get(id(param)) if self.active is not None else None
            if owner is None:
                return param, keep
            param = owner
        return param, shard_like(keep, param)

    def effective_weight(self, t: Target) -> Tensor:
        """The full weight the forward pass uses (through the parametrization for SR-STE and PGF)."""
        from torch.nn.utils import parametrize

        p = parameter(t.module)
        w = (self.active.full_param(p) if self.active is not None else full(p)).detach()
        if parametrize.is_parametrized(t.module, "weight"):
            for fn in t.module.parametrizations.weight:
                w = fn(w)
        return w.detach()

    def densities(self) -> dict[str, float]:
        """Kept share of each mask; counted once per mask (a gather only when a mask was replaced)."""
        out = {}
        for k, m in self.sp.masks.items():
            hit = self.nnz.get(k)
            if hit is None or hit[0] is not m:
                hit = self.nnz[k] = (m, int(full(m).sum()))
            out[k] = hit[1] / m.numel()
        return out

    def decision_digest(self) -> str:
        return self.decisions.hexdigest()[:16]


def attach(sp: Sparsifier) -> Sharding:
    """Put ``sp`` in sharded mode once its model is sharded: masks become DTensors like their weights."""
    for t in sp.targets:
        if not is_sharded(t.weight):
            raise PrunusError(f"layer {t.name} is not sharded: call fully_shard on the model before attach()")
    sp.masks = {k: shard_like(v, sp._target(k).weight) for k, v in sp.masks.items()}
    sp.sharding = Sharding(sp)
    return sp.sharding
