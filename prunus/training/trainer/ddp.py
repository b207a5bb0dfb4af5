"""Distributed data-parallel for the reference trainer: joining the group, keeping masks identical.

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) :func:`distributed` joins a gloo
process group (``env://``: ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) after
every input is validated, and destroys it at the end. The model is wrapped in DDP once the
sparsifier is built (SR-STE and PGF register parametrizations, which must exist before DDP hooks the
gradients; random search's probe training runs before the wrap and averages gradients over the ranks
by hand, :func:`average_gradients`), and every rank takes an equal, disjoint slice of every global
batch. How masks stay identical on all ranks:

1. DDP all-reduces (averages) the gradients inside ``loss.backward()``: ``backward()`` returns only
   after every bucket's all-reduce has finished. The sparsifier runs after ``optimizer.step()``, so
   RigL's grow reads the all-reduced ``w.grad``, identical on all ranks. SET's random grow draws
   from generators seeded by ``(seed, layer, step)``, the same on every rank; drops are |w| top-k of
   identical weights with stable sorts. So every rank computes the same masks by construction.
2. Belt and braces: after any update that replaced a mask, rank 0 broadcasts its masks and every
   rank adopts them before they are applied; the differing entries are counted
   (``ddp.mask_mismatches`` in the result; expected 0), and if there were any the parameters are
   re-broadcast from rank 0 too. Whether an update replaces masks is decided, in every registered
   method, from the step count and step-derived state only, so all ranks enter that broadcast at
   the same step without a per-step collective (a one-int all-reduce per step cost 30-40% of a
   LeNet-300 step on 2 shared CPU cores); the epoch check below compares the broadcast counts.
   After the sparsifier is built (random masks, random search) and after a resume, parameters and
   masks are broadcast from rank 0 once. SR-STE and PGF recompute their N:M masks from the weights
   at every forward; those need no broadcast since DDP keeps the weights identical.
3. At the end of every epoch the ranks compare digests of their masks and parameters and their
   broadcast counts (``all_gather_object``); a difference stops the run with an error instead of
   training on.

``PRUNUS_DDP_DIGESTS=DIR`` makes every rank write ``DIR/rank<r>.json`` with, per seed, the
final mask and parameter digests and, at each mask update, the digest of the rank's own masks
(before adopting rank 0's) and of the gradients the update read: the 2-rank test compares them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from prunus.errors import PrunusError
from prunus.io.fsutil import atomic_file
from prunus.training.sharding import full
from prunus.training.sparsifier import Sparsifier


def world_info() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_rank() -> int:
    """This process's rank: from the process group, else ``$RANK`` (torchrun), else 0."""
    rank, world = world_info()
    return rank if world > 1 else int(os.environ.get("RANK", "0") or 0)


@contextlib.contextmanager
def distributed() -> Iterator[tuple[int, int]]:
    """Join a gloo process group when launched by torchrun (``WORLD_SIZE > 1``); leave it at the end.

    A group that already exists (the caller made it) is used and left alone. Yields (rank, world).
    ``PRUNUS_DIST_TIMEOUT`` (seconds, default 1800) bounds how long a collective waits for a peer.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    own = False
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise PrunusError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise PrunusError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
                              f"torchrun --nproc_per_node {world} -m prunus train ...")
        timeout = timedelta(seconds=float(os.environ.get("PRUNUS_DIST_TIMEOUT", "1800")))
        dist.init_process_group("gloo", init_method="env://", timeout=timeout)  # CPU: gloo
        own = True
    try:
        yield world_info()
        if own:
            dist.barrier()  # success: no rank closes its connections while a peer still talks
    finally:
        if own and dist.is_initialized():
            dist.destroy_process_group()


def _digest(tensors: Iterator[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for k, v in tensors:
        h.update(k.encode())
        v = full(v).detach().contiguous().reshape(-1)  # a sharded tensor (FSDP2) is hashed whole
        h.update((v.to(torch.uint8) if v.dtype == torch.bool else v).view(torch.uint8).numpy().tobytes()
                 if v.numel() else b"")
    return h.hexdigest()[:16]


def params_digest(model: nn.Module) -> str:
    """A short hash of every parameter and buffer (bitwise, whole when sharded): equal on all ranks."""
    return _digest(sorted(model.state_dict().items()))


def mask_digest(sp: Optional[Sparsifier]) -> str:
    """A short hash of all masks: equal digests mean identical masks (resume and DDP checks)."""
    if sp is None:
        return ""
    h = hashlib.sha256()
    for k in sorted(sp.masks):
        h.update(k.encode())
        h.update(sp.full_mask(k).to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def grad_digest(sp: Sparsifier) -> str:
    """A short hash of the targets' gradients (whole ones inside a sharded sparsifier's update)."""
    return _digest((t.name, t.weight.grad) for t in sp.targets if t.weight.grad is not None)


@torch.no_grad()
def average_gradients(model: nn.Module, world: int) -> None:
    """Average every gradient over the ranks (what DDP does inside backward), for un-wrapped steps."""
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        off = 0
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()


class RankSync:
    """Keeps the sparsifier's masks identical on every rank (see the module docstring, 1-3)."""

    def __init__(self, model: nn.Module, sp: Optional[Sparsifier], world: int, record: bool,
                 log: Callable[[str], None] = lambda s: None) -> None:
        self.model, self.sp, self.world, self.record, self.log = model, sp, world, record, log
        self.syncs = self.mismatches = 0
        self.updates: list[list[Any]] = []  # [step, own mask digest, gradient digest] per mask update
        if sp is not None and sp.update is not None and sp.apply_to_weights and world > 1:
            inner = sp.update

            def update(s: Sparsifier, step: int) -> None:
                before = dict(s.masks)
                inner(s, step)
                changed = any(s.masks[k] is not before[k] for k in before)
                self._after_update(s, step, changed)

            sp.update = update  # runs before Sparsifier.apply(): rank 0's masks are the ones applied
        elif sp is not None and sp.update is not None and record:
            inner = sp.update

            def update(s: Sparsifier, step: int) -> None:
                before = dict(s.masks)
                inner(s, step)
                if any(s.masks[k] is not before[k] for k in before):
                    self.updates.append([step, mask_digest(s), grad_digest(s)])

            sp.update = update

    def _after_update(self, s: Sparsifier, step: int, changed: bool) -> None:
        if not changed:  # a function of the step on every rank (module docstring, 2)
            return
        if self.record:
            self.updates.append([step, mask_digest(s), grad_digest(s)])
        n = self.broadcast_masks(s)
        if n:
            self.log(f"warning: step {step}: {n} mask entries differed across ranks; "
                     f"rank 0's masks and parameters adopted")

    @torch.no_grad()
    def broadcast_masks(self, s: Sparsifier) -> int:
        """Every rank adopts rank 0's masks; differing entries are counted, then weights re-synced."""
        import torch.distributed as dist

        keys = sorted(s.masks)
        own = torch.cat([s.masks[k].reshape(-1).to(torch.uint8) for k in keys])
        buf = own.clone()
        dist.broadcast(buf, src=0)
        diff = torch.tensor([int((buf != own).sum())], dtype=torch.int64)
        dist.all_reduce(diff)
        self.syncs += 1
        self.mismatches += int(diff.item())
        off = 0
        for k in keys:
            m = s.masks[k]
            s.masks[k] = buf[off:off + m.numel()].reshape(m.shape).to(dtype=torch.bool, device=m.device)
            off += m.numel()
        if diff.item():
            self.broadcast_params()
        return int(diff.item())

    @torch.no_grad()
    def broadcast_params(self) -> None:
        import torch.distributed as dist

        for v in self.model.state_dict().values():
            dist.broadcast(v, src=0)

    def start(self) -> None:
        """After the sparsifier is built or a checkpoint loaded: rank 0's weights and masks for all."""
        if self.world > 1:
            self.broadcast_params()
            if self.sp is not None and self.sp.apply_to_weights:
                self.broadcast_masks(self.sp)
                self.sp.apply()

    def report(self) -> dict[str, int]:
        """The result's ``ddp`` entry."""
        return {"mask_syncs": self.syncs, "mask_mismatches": self.mismatches}

    def check(self, epoch: int) -> None:
        """Stop if ranks disagree on masks or weights (they never should)."""
        import torch.distributed as dist

        if self.world == 1:
            return
        mine = (mask_digest(self.sp), params_digest(self.model), self.syncs)
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, mine)
        if any(x != every[0] for x in every):
            raise PrunusError(f"ranks diverged after epoch {epoch}: (mask digest, parameter digest, "
                              f"mask broadcasts) per rank: {every}")


def dump_digests(seed: int, rank: int, world: int, result: dict[str, Any], model: nn.Module,
                  sync: Any) -> None:
    """``PRUNUS_DDP_DIGESTS=DIR``: this rank's digests into ``DIR/rank<r>.json`` (tests compare them)."""
    folder = os.environ.get("PRUNUS_DDP_DIGESTS")
    if not folder:
        return
    p = Path(folder) / f"rank{rank}.json"
    doc = json.loads(p.read_text()) if p.exists() else {"rank": rank, "world_size": world, "runs": []}
    doc["runs"] = [r for r in doc["runs"] if r["seed"] != seed] + [{
        "seed": seed, "masks_sha": result["masks_sha"], "params_sha": params_digest(model),
        "updates": sync.updates, "mask_syncs": sync.syncs, "mask_mismatches": sync.mismatches,
        "report": sync.report(), "metric": result["metric"]}]
    with atomic_file(p) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
