"""The reference trainer behind ``prunus train``: one task, one model, one method, N seeds.

It is an ordinary PyTorch loop with the three sparse-training lines in it; everything it knows comes
from a frozen :class:`TrainConfig` built at the CLI edge. It is deterministic on CPU: data order,
initialisation and every random mask update derive from the seed and the step, so a run killed
(even with SIGKILL) and resumed from its last checkpoint ends with the same masks and metrics as an
uninterrupted one. Checkpoints are written atomically (temporary file, then ``os.replace``).

Two data phases (text only): ``finetune_book``/``finetune_text_file`` with ``finetune_epochs``
continue training on a second corpus after ``epochs`` on the first; the learning-rate cosine
restarts there, and SPDF releases its mask exactly at the switch (sparse pre-training on one book,
dense fine-tuning on another; Thangarasa et al. 2023).

Distributed: under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) :func:`run` joins a gloo
process group itself (``env://``: ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) after
every input is validated, and destroys it at the end. The model is wrapped in DDP once the
sparsifier is built (SR-STE and PGF register parametrizations, which must exist before DDP hooks the
gradients; random search's probe training runs before the wrap and averages gradients over the ranks
by hand), and every rank takes an equal, disjoint slice of every global batch. How masks stay
identical on all ranks:

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

Only rank 0 logs, shows progress bars and writes checkpoints (and, in the CLI, the table, JSON and
plot). ``PRUNUS_DDP_DIGESTS=DIR`` makes every rank write ``DIR/rank<r>.json`` with, per seed, the
final mask and parameter digests and, at each mask update, the digest of the rank's own masks
(before adopting rank 0's) and of the gradients the update read: the 2-rank test compares them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from prunus.errors import CheckpointError, PrunusError, SpecError
from prunus.core.spec import SparsitySpec
from prunus.training import flops as fl
from prunus.training import get as get_method
from prunus.training.sparsifier import Sparsifier, find_targets, layer_budgets
from prunus.training.tasks import Dataset, build_model, default_exclude, load_task

FORMAT = "prunus-train-v1"


@dataclass(frozen=True)
class TrainConfig:
    """Everything one run depends on.

    Attributes:
        task, model: names from ``prunus.training.tasks``.
        method: a registered training method, or ``dense``.
        sparsity: a sparsity string (``"90%"``, ``"2:4"``); ignored for ``dense``.
        allocation: layer budgets, ``uniform`` or ``erk``.
        epochs: epochs per training phase (LTH trains ``rounds + 1`` phases).
        seed: the run's seed.
        batch_size, lr, optimizer, momentum, weight_decay: the optimizer (``sgd`` with Nesterov
            momentum for images, ``adamw`` for text); ``lr=None`` picks 0.05 (sgd) or 3e-3 (adamw).
            The learning rate follows a cosine decay within each phase.
        options: the method's options as ``(name, value)`` pairs.
        text_file, book: the text task's source.
        finetune_book, finetune_text_file, finetune_epochs: a second text corpus trained on for
            ``finetune_epochs`` after the ``epochs`` on the first (the cosine learning rate restarts;
            SPDF releases its mask there). Validation metrics of those epochs are on the second corpus.
        train_subset: use only the first N training examples (0: all); for quick runs.
        probe_epochs: random search's short training per candidate.
        checkpoint_every: write a checkpoint every N optimizer steps (0: never).
        checkpoint_dir: where checkpoints go (``seed<S>.pt``).
    """

    task: str = "digits"
    model: str = "mlp"
    method: str = "dense"
    sparsity: str = "0.9"
    allocation: str = "uniform"
    epochs: int = 10
    seed: int = 0
    batch_size: int = 128
    lr: Optional[float] = None
    optimizer: Optional[str] = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    options: tuple[tuple[str, Any], ...] = ()
    text_file: Optional[str] = None
    book: str = "emma"
    finetune_book: Optional[str] = None
    finetune_text_file: Optional[str] = None
    finetune_epochs: int = 0
    train_subset: int = 0
    probe_epochs: float = 1.0
    checkpoint_every: int = 0
    checkpoint_dir: str = "prunus-checkpoints"

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (everything but where checkpoints go)."""
        d = dataclasses.asdict(self)
        for k in ("checkpoint_every", "checkpoint_dir", "seed"):
            d.pop(k)
        if not self.finetune_epochs and self.finetune_book is None and self.finetune_text_file is None:
            for k in ("finetune_book", "finetune_text_file", "finetune_epochs"):
                d.pop(k)  # single-phase runs: the same fingerprint as before two-phase runs existed
        d["options"] = [list(x) for x in self.options]
        return d


@dataclass
class Prepared:
    """A validated config: data loaded, spec parsed, method resolved; nothing written yet."""

    config: TrainConfig
    data: Dataset
    spec: Optional[SparsitySpec]
    rounds: int
    dense_backward: bool
    width: float = 1.0
    finetune: Optional[Dataset] = None  # the second corpus of a two-phase (text) run


def prepare(config: TrainConfig, data: Optional[Dataset] = None) -> Prepared:
    """Check every user input before anything runs or is written; load the data."""
    if config.epochs < 1 or config.batch_size < 1:
        raise SpecError("epochs and batch size must be positive")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if config.batch_size % world:
        raise SpecError(f"batch size {config.batch_size} must divide evenly over {world} ranks")
    two_phase = config.finetune_book is not None or config.finetune_text_file is not None
    if config.finetune_epochs < 0 or two_phase != (config.finetune_epochs > 0):
        raise SpecError("fine-tuning needs both a second corpus (finetune_book or finetune_text_file) "
                        "and finetune_epochs >= 1")
    if two_phase and config.task != "text":
        raise SpecError(f"a fine-tuning corpus is for the text task, not {config.task!r}")
    spec, rounds, dense_backward = None, 1, False
    if config.method != "dense":
        entry = get_method(config.method)
        spec = SparsitySpec.parse(config.sparsity, config.allocation)
        from prunus.core.options import build_options

        opts = build_options(entry.options, dict(config.options), f"training method {config.method!r}")
        rounds, dense_backward = entry.rounds(opts), entry.dense_backward
        if two_phase and rounds > 1:
            raise SpecError(f"training method {config.method!r} trains {rounds} phases of its own; "
                            f"it cannot be combined with a fine-tuning corpus")
        if two_phase and config.method == "spdf" and "dense_from" in dict(config.options):
            raise SpecError("spdf with a fine-tuning corpus releases its mask at the corpus switch; "
                            "drop the dense_from option")
    data = data or load_task(config.task, text_file=config.text_file, book=config.book)
    finetune = load_task(config.task, text_file=config.finetune_text_file,
                         book=config.finetune_book or "") if two_phase else None
    with torch.random.fork_rng(devices=[]):
        probe = build_model(config.model, data)  # model/task mismatch fails here
    prep = Prepared(config, data, spec, rounds, dense_backward, finetune=finetune)
    if spec is not None:
        targets = find_targets(probe, exclude=default_exclude(config.model))
        layer_budgets(targets, spec)  # sparsity 1.0 on a layer, N:M divisibility of shapes
        if config.method == "sparse_ift":
            prep.width = _iso_flop_width(prep, probe)
    return prep


def _iso_flop_width(prep: Prepared, base: nn.Module) -> float:
    """Sparse Wide multiplier making the widened sparse model's forward FLOPs equal the dense one's."""
    from prunus.training.sparse_ift import iso_flop_width

    ex = _example(prep.data)
    dense = fl.forward_flops(fl.layer_flops(base, ex))
    excl = default_exclude(prep.config.model)

    def sparse(w: float) -> float:
        with torch.random.fork_rng(devices=[]):
            m = build_model(prep.config.model, prep.data, width=w)
        budgets = layer_budgets(find_targets(m, exclude=excl), prep.spec)
        return fl.forward_flops(fl.layer_flops(m, ex), {k: 1 - v for k, v in budgets.items()})

    return round(iso_flop_width(sparse, dense, hi=1.0 / (1.0 - prep.spec.sparsity), iters=12), 3)


def _example(data: Dataset) -> torch.Tensor:
    return data.x_train[:1, :-1] if data.kind == "text" else data.x_train[:1]


def checkpoint_path(config: TrainConfig, seed: int) -> Path:
    return Path(config.checkpoint_dir) / f"seed{seed}.pt"


def load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    """Read a checkpoint (tensors and plain data only) and check it belongs to ``config``."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, tampered, pickled objects
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a prunus training checkpoint")
    want, got = config.fingerprint(), ck.get("fingerprint", {})
    diff = [k for k in want if want[k] != got.get(k)]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {got.get(k)!r} vs run {want[k]!r}" for k in diff[:4])
        raise CheckpointError(f"checkpoint {path} was written for another run ({detail}); "
                              f"use another --checkpoint-dir or drop --resume")
    return ck


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write: a reader sees the old checkpoint or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _loss(model: nn.Module, data: Dataset, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    if data.kind == "text":
        logits = model(xb[:, :-1])  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1))
    return F.cross_entropy(model(xb), yb)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Accuracy in % (classification) or perplexity (text, per byte) on ``x``."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        if data.kind == "text":
            total += float(_loss(model, data, xb, y)) * len(xb)
        else:
            total += float((model(xb).argmax(1) == y[i:i + batch]).sum())
        n += len(xb)
    model.train()
    return math.exp(total / n) if data.kind == "text" else 100.0 * total / n


def _lr(base: float, step: int, phases: list[int]) -> float:
    """Cosine decay within the phase containing ``step`` (LTH restarts it at every rewind)."""
    for a, b in zip(phases, phases[1:]):
        if a <= step < b:
            return base * 0.5 * (1 + math.cos(math.pi * (step - a) / max(1, b - a)))
    return 0.0


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_rank() -> int:
    """This process's rank: from the process group, else ``$RANK`` (torchrun), else 0."""
    rank, world = _world()
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
        yield _world()
        if own:
            dist.barrier()  # success: no rank closes its connections while a peer still talks
    finally:
        if own and dist.is_initialized():
            dist.destroy_process_group()


def _digest(tensors: Iterator[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for k, v in tensors:
        h.update(k.encode())
        v = v.detach().contiguous().reshape(-1)
        h.update((v.to(torch.uint8) if v.dtype == torch.bool else v).view(torch.uint8).numpy().tobytes()
                 if v.numel() else b"")
    return h.hexdigest()[:16]


def _params_digest(model: nn.Module) -> str:
    """A short hash of every parameter and buffer (bitwise): equal on all DDP ranks."""
    return _digest(sorted(model.state_dict().items()))


@torch.no_grad()
def _average_gradients(model: nn.Module, world: int) -> None:
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


class _RankSync:
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
                    self.updates.append([step, _mask_digest(s), self._grad_digest(s)])

            sp.update = update

    def _grad_digest(self, s: Sparsifier) -> str:
        return _digest((t.name, t.weight.grad) for t in s.targets if t.weight.grad is not None)

    def _after_update(self, s: Sparsifier, step: int, changed: bool) -> None:
        if not changed:  # a function of the step on every rank (module docstring, 2)
            return
        if self.record:
            self.updates.append([step, _mask_digest(s), self._grad_digest(s)])
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

    def check(self, epoch: int) -> None:
        """Stop if ranks disagree on masks or weights (they never should)."""
        import torch.distributed as dist

        if self.world == 1:
            return
        mine = (_mask_digest(self.sp), _params_digest(self.model), self.syncs)
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, mine)
        if any(x != every[0] for x in every):
            raise PrunusError(f"ranks diverged after epoch {epoch}: (mask digest, parameter digest, "
                              f"mask broadcasts) per rank: {every}")


def train_one(prep: Prepared, seed: int, *, resume: bool = False, progress: bool = True,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Train one seed; returns its result (metric, sparsity, FLOPs, per-epoch history)."""
    cfg, data = prep.config, prep.data
    rank, world = _world()
    text = data.kind == "text"
    bs = cfg.batch_size
    if bs % world:
        raise SpecError(f"batch size {bs} must divide evenly over {world} ranks")

    def segment(d: Dataset, epochs: int, name: str) -> dict[str, Any]:
        x, y = d.x_train, d.y_train
        if cfg.train_subset:
            x, y = x[:cfg.train_subset], y[:cfg.train_subset]
        spe = len(x) // bs  # steps per epoch (the last partial batch is dropped: equal DDP shards)
        if spe < 1:
            raise SpecError(f"batch size {bs} is larger than the {len(x)} training examples")
        return dict(data=d, x=x, y=y, n=len(x), spe=spe, epochs=epochs, name=name)

    segs = [segment(data, cfg.epochs * prep.rounds, "pretrain" if prep.finetune is not None else "train")]
    if prep.finetune is not None:
        segs.append(segment(prep.finetune, cfg.finetune_epochs, "finetune"))
    plan = []  # one entry per epoch: (segment, first global step)
    first = 0
    for sg in segs:
        for _ in range(sg["epochs"]):
            plan.append((sg, first))
            first += sg["spe"]
    total = first
    pre_steps = segs[0]["spe"] * segs[0]["epochs"]
    n, spe = segs[0]["n"], segs[0]["spe"]
    torch.manual_seed(seed)
    model = build_model(cfg.model, data, width=prep.width)
    if len(data.input_shape) == 3:
        # NHWC: PyTorch's CPU convolutions and pooling are ~1.5x faster than in NCHW (measured on
        # LeNet-5, batch 128, 2 threads); the parameters are the same, only their strides differ.
        model = model.to(memory_format=torch.channels_last)
    opt_name = cfg.optimizer or ("adamw" if text else "sgd")
    lr = cfg.lr or (3e-3 if opt_name == "adamw" else 0.05)
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                              weight_decay=cfg.weight_decay)
    elif opt_name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    else:
        raise SpecError(f"unknown optimizer {opt_name!r}; choose sgd or adamw")
    # DDP wraps the model after the sparsifier is built: SR-STE/PGF register parametrizations, which
    # DDP's gradient hooks must see. Random search short-trains inside the factory, before the wrap;
    # there the gradients are averaged over the ranks by hand, exactly as DDP would.
    net: nn.Module = model

    perms: dict[tuple[int, int, int], torch.Tensor] = {}  # one shuffle per epoch, not one per step

    def batch(epoch: int, b: int, order_seed: int = seed, sg: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
        sg = sg or segs[0]
        key = (order_seed, epoch, sg["n"])
        if key not in perms:
            if len(perms) > 4:
                perms.clear()
            perms[key] = torch.randperm(sg["n"], generator=torch.Generator().manual_seed(order_seed * 100003 + epoch))
        idx = perms[key][b * bs:(b + 1) * bs][rank::world]
        xb = sg["x"][idx]
        if xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)  # ~1.5x faster convolutions on CPU
        return xb, (sg["y"][idx] if not text else sg["y"])

    def one_step(sp: Optional[Sparsifier], xb, yb, step_lr: float) -> float:
        for g in opt.param_groups:
            g["lr"] = step_lr
        opt.zero_grad(set_to_none=True)
        loss = _loss(net, data, xb, yb)
        loss.backward()  # under DDP, returns once the gradient all-reduce is complete
        if world > 1 and net is model:
            _average_gradients(model, world)
        opt.step()
        if sp is not None:
            sp.step()  # reads the all-reduced gradients (RigL)
        return loss.item()

    sp: Optional[Sparsifier] = None
    if prep.spec is not None:
        kwargs: dict[str, Any] = dict(dict(cfg.options))
        if get_method(cfg.method).needs_score:
            kwargs["score_fn"] = _search_scorer(prep, seed, n, spe, one_step, batch, lr, model)
        if cfg.method == "spdf" and prep.finetune is not None:
            kwargs["release_step"] = pre_steps  # dense fine-tuning on the second corpus
        sp = get_method(cfg.method).factory(model, opt, prep.spec, total_steps=total, seed=seed,
                                            exclude=default_exclude(cfg.model), **kwargs)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's parameters
    phases = sp.phases if sp is not None else [0, total]
    if prep.finetune is not None:
        phases = [0, pre_steps, total]  # the cosine restarts for fine-tuning
    sync = _RankSync(model, sp, world, record=bool(os.environ.get("PRUNUS_DDP_DIGESTS")), log=log)

    ex = _example(data)
    costs = fl.layer_flops(model, ex)
    attn = model.attention_flops(data.x_train.shape[1] - 1) if hasattr(model, "attention_flops") else 0.0
    f_dense = fl.forward_flops(costs, extra=attn)
    with torch.random.fork_rng(devices=[]):
        base = build_model(cfg.model, data)  # the un-widened dense model: the "dense-equivalent"
    f_base = fl.forward_flops(fl.layer_flops(base, ex), extra=attn)

    step, history, train_flops = 0, [], 0.0
    path = checkpoint_path(cfg, seed)
    if resume and path.exists():
        ck = load_checkpoint(path, cfg)
        if ck.get("done"):
            log(f"seed {seed}: finished run found in {path}")
            return ck["result"]
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if sp is not None:
            sp.load_state_dict(ck["sparsifier"])
        step, history, train_flops = int(ck["step"]), list(ck["history"]), float(ck["train_flops"])
        torch.set_rng_state(ck["rng"])
        log(f"seed {seed}: resumed from {path} at step {step}")
    sync.start()

    def snapshot(done: bool = False, result: Optional[dict] = None) -> None:
        if rank == 0:
            save_checkpoint(path, {
                "format": FORMAT, "fingerprint": cfg.fingerprint(), "seed": seed, "step": step,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "sparsifier": sp.state_dict() if sp is not None else None, "history": history,
                "train_flops": train_flops, "rng": torch.get_rng_state(), "done": done, "result": result})

    from tqdm import tqdm

    n_epochs = len(plan)
    t0 = time.time()
    for epoch, (sg, start) in enumerate(plan):
        if len(history) > epoch:
            continue  # finished before the resume
        bar = tqdm(range(sg["spe"]), desc=f"seed {seed} epoch {epoch + 1}/{n_epochs}", leave=False,
                   disable=not progress or rank != 0, file=sys.stderr)
        losses = []
        for b in bar:
            if start + b < step:
                continue  # done before the resume
            xb, yb = batch(epoch, b, sg=sg)
            # FLOPs of this step: the masks it runs under (before sparsifier.step() updates them)
            f_s = fl.forward_flops(costs, sp.densities(), extra=attn) if sp is not None else f_dense
            loss = one_step(sp, xb, yb, _lr(lr, step, phases))
            step += 1
            losses.append(loss)
            train_flops += bs * fl.train_step_flops(f_s, f_dense, dense_backward=prep.dense_backward)
            bar.set_postfix(loss=f"{loss:.3f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                snapshot()
        d = sg["data"]
        metric = evaluate(model, d, d.x_test, d.y_test)
        sync.check(epoch + 1)
        rec = {"epoch": epoch + 1, "step": step, "loss": sum(losses) / max(1, len(losses)) if losses else None,
               "metric": metric, "sparsity": sp.sparsity() if sp is not None else 0.0}
        if prep.finetune is not None:
            rec["phase"] = sg["name"]
        history.append(rec)
        name = "ppl" if text else "acc"
        loss_s = f"{rec['loss']:.4f}" if rec["loss"] is not None else "-"
        where = f" [{sg['name']}]" if prep.finetune is not None else ""
        log(f"seed {seed} epoch {epoch + 1}/{n_epochs}{where} step {step} loss {loss_s} "
            f"{name} {metric:.2f}{'' if text else '%'} sparsity {rec['sparsity']:.4f} "
            f"lr {_lr(lr, max(0, step - 1), phases):.4g} ({time.time() - t0:.1f}s)")
    densities = sp.densities() if sp is not None else {}
    f_inf = fl.forward_flops(costs, densities, extra=attn)
    # RigL's dense gradient at each update step adds f_dense - f_sparse (Evci et al. 2020, app. H).
    dense_steps = sp.dense_grad_steps if sp is not None else 0
    result = {
        "seed": seed, "metric": history[-1]["metric"],
        "sparsity": sp.sparsity() if sp is not None else 0.0,
        "layer_sparsity": sp.layer_sparsity() if sp is not None else {},
        "masks_sha": _mask_digest(sp),
        "train_flops": train_flops + dense_steps * bs * (f_dense - (f_inf if sp is not None else f_dense)),
        "train_flops_dense": 3.0 * f_base * bs * total,
        "inference_flops": f_inf, "inference_flops_dense": f_base,
        "width": prep.width, "steps": total, "history": history, "world_size": world,
    }
    if prep.finetune is not None:
        pre = [h for h in history if h.get("phase") == "pretrain"]
        result["pretrain_metric"] = pre[-1]["metric"] if pre else None
        result["pretrain_steps"] = pre_steps
    if world > 1:
        result["ddp"] = {"mask_syncs": sync.syncs, "mask_mismatches": sync.mismatches}
    _dump_digests(seed, rank, world, result, model, sync)
    if cfg.checkpoint_every:
        snapshot(done=True, result=result)
    return result


def _dump_digests(seed: int, rank: int, world: int, result: dict[str, Any], model: nn.Module,
                  sync: _RankSync) -> None:
    """``PRUNUS_DDP_DIGESTS=DIR``: this rank's digests into ``DIR/rank<r>.json`` (tests compare them)."""
    folder = os.environ.get("PRUNUS_DDP_DIGESTS")
    if not folder:
        return
    p = Path(folder) / f"rank{rank}.json"
    doc = json.loads(p.read_text()) if p.exists() else {"rank": rank, "world_size": world, "runs": []}
    doc["runs"] = [r for r in doc["runs"] if r["seed"] != seed] + [{
        "seed": seed, "masks_sha": result["masks_sha"], "params_sha": _params_digest(model),
        "updates": sync.updates, "mask_syncs": sync.syncs, "mask_mismatches": sync.mismatches,
        "metric": result["metric"]}]
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, p)


def _mask_digest(sp: Optional[Sparsifier]) -> str:
    """A short hash of all masks: equal digests mean identical masks (resume and DDP checks)."""
    import hashlib

    if sp is None:
        return ""
    h = hashlib.sha256()
    for k in sorted(sp.masks):
        h.update(k.encode())
        h.update(sp.masks[k].to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _search_scorer(prep: Prepared, seed: int, n: int, spe: int, one_step, batch, lr: float, model):
    """Random search's score: train ``probe_epochs`` on 90% of the training set, score on the rest."""
    data = prep.data
    n_val = max(1, n // 10)
    steps = max(1, int(prep.config.probe_epochs * spe))

    def score(sp: Sparsifier) -> float:
        for s in range(steps):
            xb, yb = batch(s // spe, s % spe, order_seed=seed + 1)
            one_step(sp, xb[:-max(1, len(xb) // 10)], yb[:-max(1, len(yb) // 10)] if len(yb) else yb, lr)
        xv, yv = data.x_train[-n_val:], data.y_train[-n_val:]
        m = evaluate(model, data, xv, yv)
        return -m if data.kind == "text" else m

    return score


def summarize(prep: Prepared, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``--json`` document: means and standard deviations over seeds, plus every run."""
    cfg = prep.config
    metric = "perplexity" if prep.data.kind == "text" else "accuracy"
    vals = torch.tensor([r["metric"] for r in runs], dtype=torch.float64)
    mean = lambda k: float(sum(r[k] for r in runs) / len(runs))
    doc = {
        "task": cfg.task, "model": cfg.model, "method": cfg.method,
        "sparsity_spec": cfg.sparsity if prep.spec is not None else "0",
        "allocation": cfg.allocation, "epochs": cfg.epochs, "seeds": [r["seed"] for r in runs],
        "sparsity": mean("sparsity"),
        metric: float(vals.mean()), f"{metric}_std": float(vals.std(unbiased=False)) if len(runs) > 1 else 0.0,
        "train_flops": mean("train_flops"), "train_flops_dense": mean("train_flops_dense"),
        "inference_flops": mean("inference_flops"), "inference_flops_dense": mean("inference_flops_dense"),
        "width": prep.width, "options": dict(cfg.options), "runs": runs,
    }
    if prep.finetune is not None:
        doc["book"] = cfg.text_file or cfg.book
        doc["finetune_book"] = cfg.finetune_text_file or cfg.finetune_book
        doc["finetune_epochs"] = cfg.finetune_epochs
        doc[f"pretrain_{metric}"] = float(sum(r["pretrain_metric"] for r in runs) / len(runs))
    return doc


def run(config: TrainConfig, seeds: list[int], *, resume: bool = False, progress: bool = True,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
        data: Optional[Dataset] = None) -> dict[str, Any]:
    """Validate, check every checkpoint to be resumed, then train each seed and summarize.

    Under torchrun the process group is joined only after all of that succeeded (a bad input fails
    on every rank alike, before any collective), and left at the end; only rank 0 logs.
    """
    prep = prepare(config, data)
    if resume:
        for s in seeds:
            if checkpoint_path(config, s).exists():
                load_checkpoint(checkpoint_path(config, s), config)  # a foreign checkpoint fails now
    with distributed() as (rank, world):
        say = log if rank == 0 else (lambda s: None)
        runs = [train_one(prep, s, resume=resume, progress=progress, log=say) for s in seeds]
    doc = summarize(prep, runs)
    doc["world_size"] = world
    return doc


def write_json(path: str, doc: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, p)
