"""The pieces of one training step: data segments and batches, the optimizer, the loss, evaluation.

Deterministic on CPU: the data order of every epoch is a permutation drawn from a generator seeded by
``(seed, epoch)``, and every rank takes an equal, disjoint slice of each global batch, so a run killed
and resumed at any step sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from prunus.errors import SpecError
from prunus.training.sparsifier import Sparsifier
from prunus.training.tasks import Dataset
from prunus.training.trainer.config import TrainConfig
from prunus.training.trainer.ddp import average_gradients


@dataclass
class Segment:
    """One corpus trained on for ``epochs`` epochs of ``spe`` steps (a run has one or two)."""

    data: Dataset
    x: torch.Tensor
    y: torch.Tensor
    n: int
    spe: int  # steps per epoch (the last partial batch is dropped: equal DDP shards)
    epochs: int
    name: str


def segment(cfg: TrainConfig, d: Dataset, epochs: int, name: str) -> Segment:
    """The training examples of ``d`` (the first ``train_subset`` when set) as a segment."""
    x, y = d.x_train, d.y_train
    if cfg.train_subset:
        x, y = x[:cfg.train_subset], y[:cfg.train_subset]
    spe = len(x) // cfg.batch_size
    if spe < 1:
        raise SpecError(f"batch size {cfg.batch_size} is larger than the {len(x)} training examples")
    return Segment(d, x, y, len(x), spe, epochs, name)


def make_optimizer(cfg: TrainConfig, model: nn.Module, text: bool) -> tuple[torch.optim.Optimizer, float]:
    """The configured optimizer and its base learning rate (sgd+Nesterov for images, adamw for text)."""
    opt_name = cfg.optimizer or ("adamw" if text else "sgd")
    lr = cfg.lr or (3e-3 if opt_name == "adamw" else 0.05)
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                              weight_decay=cfg.weight_decay)
    elif opt_name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    else:
        raise SpecError(f"unknown optimizer {opt_name!r}; choose sgd or adamw")
    return opt, lr


class Batches:
    """``batches(epoch, b)``: this rank's share of global batch ``b`` of ``epoch``."""

    def __init__(self, first: Segment, batch_size: int, seed: int, rank: int, world: int, text: bool) -> None:
        self.first, self.bs, self.seed, self.rank, self.world, self.text = first, batch_size, seed, rank, world, text
        self.perms: dict[tuple[int, int, int], torch.Tensor] = {}  # one shuffle per epoch, not one per step

    def __call__(self, epoch: int, b: int, order_seed: Optional[int] = None,
                 sg: Optional[Segment] = None) -> tuple[torch.Tensor, torch.Tensor]:
        sg = sg or self.first
        order_seed = self.seed if order_seed is None else order_seed
        key = (order_seed, epoch, sg.n)
        if key not in self.perms:
            if len(self.perms) > 4:
                self.perms.clear()
            self.perms[key] = torch.randperm(sg.n, generator=torch.Generator().manual_seed(order_seed * 100003 + epoch))
        idx = self.perms[key][b * self.bs:(b + 1) * self.bs][self.rank::self.world]
        xb = sg.x[idx]
        if xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)  # ~1.5x faster convolutions on CPU
        return xb, (sg.y[idx] if not self.text else sg.y)


class Stepper:
    """``stepper(sp, xb, yb, lr)``: one optimizer step and one sparsifier step; returns the loss.

    ``net`` is the model or, once wrapped, its DDP wrapper (``synced``: the wrapper, DDP or FSDP2,
    reduces the gradients); un-wrapped steps on several ranks (random search's probe training) average
    the gradients by hand, exactly as DDP would.

    With ``micro`` > 1 the batch is cut into ``micro`` strided slices (``xb[j::micro]``, as a global
    batch is cut over the ranks), each slice's mean loss is back-propagated, and the summed gradients
    are divided by ``micro``: for ``micro=2`` in one process, ``(g0 + g1) / 2``, the very operations
    (and so the very bits) of two ranks' averaged gradients.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, data: Dataset, world: int,
                 micro: int = 1) -> None:
        self.model, self.net, self.opt, self.data, self.world, self.micro = model, model, opt, data, world, micro
        self.synced = False

    def __call__(self, sp: Optional[Sparsifier], xb: torch.Tensor, yb: torch.Tensor, step_lr: float) -> float:
        for g in self.opt.param_groups:
            g["lr"] = step_lr
        self.opt.zero_grad(set_to_none=True)
        m, losses = self.micro, []
        for j in range(m):
            xj = xb[j::m] if m > 1 else xb
            yj = yb[j::m] if m > 1 and self.data.kind != "text" else yb
            loss = loss_fn(self.net, self.data, xj, yj)
            loss.backward()  # under DDP/FSDP2, returns once the gradient reduction is complete
            losses.append(loss.item())
        if m > 1:
            with torch.no_grad():
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.div_(m)
        if self.world > 1 and not self.synced:
            average_gradients(self.model, self.world)
        self.opt.step()
        if sp is not None:
            sp.step()  # reads the reduced gradients (RigL)
        return sum(losses) / m


def loss_fn(model: nn.Module, data: Dataset, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Cross-entropy: of the class (classification) or of every next byte (text)."""
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
            total += float(loss_fn(model, data, xb, y)) * len(xb)
        else:
            total += float((model(xb).argmax(1) == y[i:i + batch]).sum())
        n += len(xb)
    model.train()
    return math.exp(total / n) if data.kind == "text" else 100.0 * total / n


def cosine_lr(base: float, step: int, phases: list[int]) -> float:
    """Cosine decay within the phase containing ``step`` (LTH restarts it at every rewind)."""
    for a, b in zip(phases, phases[1:]):
        if a <= step < b:
            return base * 0.5 * (1 + math.cos(math.pi * (step - a) / max(1, b - a)))
    return 0.0
