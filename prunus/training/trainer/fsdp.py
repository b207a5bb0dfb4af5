"""FSDP2 for the reference trainer: the model, its gradients, optimizer state and masks sharded over ranks.

``torchrun --nproc_per_node N -m prunus train ... --parallel fsdp`` joins the gloo process group as
DDP does (:func:`prunus.training.trainer.ddp.distributed`); then, once the sparsifier is built on the
whole model (random masks, parametrizations, random search's probe training all happen unsharded and
identically on every rank), :func:`shard`

1. broadcasts rank 0's parameters, buffers and masks (they are equal by construction; a safety net,
   as under DDP);
2. makes every parameter contiguous (FSDP2 shards no other; the trainer keeps conv weights in
   channels-last order, which the inputs keep, so the convolutions still run in NHWC), and applies
   ``torch.distributed.fsdp.fully_shard`` to every Linear, Conv and Embedding layer (its own
   unit: gathered for its forward, resharded after) and then to the root model (the rest: norms,
   biases of other modules). Every parameter becomes a DTensor sharded on dim 0; backward
   reduce-scatters the gradients (average over the ranks), so each rank holds the gradient rows of
   the weight rows it holds;
3. rebuilds the optimizer on the sharded parameters (its state is sharded with them; it is empty at
   this point, which is checked), and puts the sparsifier in sharded mode
   (:func:`prunus.training.sharding.attach`: masks sharded like their weights, every mask decision on
   the full tensors).

Masks are identical to one process, bit for bit, when the one process computes the same gradient:
``--micro-batches 2`` in one process back-propagates the same two strided half-batches the two ranks
do and averages them the same way (gloo's reduce-scatter with AVG gives ``(g0 + g1) / 2``, which
equals the one process's ``(g0 + g1) / 2``: two addends commute and halving is exact). The forward of
a rank is the one process's forward on the same half-batch with the same (gathered) weights; the
optimizer's update is element-wise, so running it on a shard changes no bit. Every drop/grow
decision then sees the same full tensors as in one process.
Convolutions are the exception: their weights become contiguous here (step 2), and an NHWC
convolution with NCHW-ordered weights rounds differently from the one process's channels-last
weights, so conv models match one process in their masks only up to near-ties.

:class:`ShardSync` is the FSDP counterpart of :class:`~prunus.training.trainer.ddp.RankSync`. Nothing
is broadcast after an update (each rank keeps only its rows of the masks it computed itself), so a
rank that decided differently would silently hold rows of a different mask; instead every rank
hashes every mask it computed, and at the end of every epoch the ranks compare those hashes and the
digest of the whole parameters, and stop with an error if they differ. ``PRUNUS_DDP_DIGESTS=DIR``
records, per update, the digests of the whole masks and gradients the update saw, as under DDP.

Sharded checkpoints go through ``torch.distributed.checkpoint``: :mod:`.dcp`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from prunus.errors import PrunusError
from prunus.training.sharding import attach
from prunus.training.sparsifier import PRUNABLE, Sparsifier
from prunus.training.trainer.ddp import grad_digest, mask_digest, params_digest

UNITS = (*PRUNABLE, nn.Embedding)  # each its own FSDP unit; everything else is in the root's


def units(model: nn.Module) -> list[nn.Module]:
    """The layers sharded as units of their own: a parameter shared by two layers (tied embeddings)
    must be in one unit, so those layers are left to the root's."""
    mods = [m for m in model.modules() if m is not model and isinstance(m, UNITS)]
    owners: dict[int, int] = {}
    for m in mods:
        for p in m.parameters():
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [m for m in mods if all(owners[id(p)] == 1 for p in m.parameters())]


@torch.no_grad()
def _broadcast(model: nn.Module, sp: Optional[Sparsifier]) -> None:
    import torch.distributed as dist

    for v in model.state_dict().values():
        dist.broadcast(v, src=0)
    if sp is not None:
        for k in sorted(sp.masks):
            buf = sp.masks[k].to(torch.uint8)
            dist.broadcast(buf, src=0)
            sp.masks[k] = buf.to(torch.bool)
        sp.apply()


def shard(model: nn.Module, sp: Optional[Sparsifier], optimizer: torch.optim.Optimizer,
          make_optimizer: Callable[[], torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """Shard ``model`` in place over the process group (steps 1-3 above); returns the new optimizer."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if any(optimizer.state.values()):
        raise PrunusError("internal: the optimizer has state before the model is sharded")
    _broadcast(model, sp)
    with torch.no_grad():  # FSDP2 shards contiguous parameters only (the trainer makes conv weights NHWC)
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for m in units(model):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer()
    if sp is not None:
        sp.optimizer = opt
        attach(sp)
    return opt


class ShardSync:
    """Checks that every rank decided the same masks (see the module docstring)."""

    syncs = mismatches = 0  # nothing is broadcast after an update (the DDP fields, for the digests)

    def __init__(self, model: nn.Module, sp: Optional[Sparsifier], world: int, record: bool,
                 log: Callable[[str], None] = lambda s: None) -> None:
        self.model, self.sp, self.world = model, sp, world
        self.updates: list[list[Any]] = []  # [step, whole-mask digest, whole-gradient digest] per update
        if sp is not None and sp.update is not None and record:
            inner = sp.update

            def update(s: Sparsifier, step: int) -> None:
                inner(s, step)  # inside the full view: s.masks and s.targets are whole
                if getattr(s.masks, "assigned", None):
                    self.updates.append([step, mask_digest(s), grad_digest(s)])

            sp.update = update

    def start(self) -> None:
        """Nothing to do: :func:`shard` broadcast rank 0's state before sharding."""

    def report(self) -> dict[str, Any]:
        """The result's ``fsdp`` entry: how many updates replaced masks, and the hash of them all."""
        sh = self.sp.sharding if self.sp is not None else None
        return {"mask_updates": sh.updates if sh else 0, "decisions": sh.decision_digest() if sh else ""}

    def check(self, epoch: int) -> None:
        """Stop if the ranks computed different masks or hold different parameters."""
        import torch.distributed as dist

        mine = (self.report()["decisions"], mask_digest(self.sp), params_digest(self.model))
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, mine)
        if any(x != every[0] for x in every):
            raise PrunusError(f"ranks diverged after epoch {epoch}: (decisions digest, mask digest, parameter "
                              f"digest) per rank: {every}")
