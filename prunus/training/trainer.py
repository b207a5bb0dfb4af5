"""The reference trainer behind ``prunus train``: one task, one model, one method, N seeds.

It is an ordinary PyTorch loop with the three sparse-training lines in it; everything it knows comes
from a frozen :class:`TrainConfig` built at the CLI edge. It is deterministic on CPU: data order,
initialisation and every random mask update derive from the seed and the step, so a run killed
(even with SIGKILL) and resumed from its last checkpoint ends with the same masks and metrics as an
uninterrupted one. Checkpoints are written atomically (temporary file, then ``os.replace``).

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) it joins a gloo process group, wraps the model in
DDP and gives each rank an equal slice of every batch; masks are computed identically on all ranks
(RigL from the all-reduced gradients, SET from generators seeded by (seed, layer, step)).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from prunus.errors import CheckpointError, SpecError
from prunus.spec import SparsitySpec
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
    train_subset: int = 0
    probe_epochs: float = 1.0
    checkpoint_every: int = 0
    checkpoint_dir: str = "prunus-checkpoints"

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (everything but where checkpoints go)."""
        d = dataclasses.asdict(self)
        for k in ("checkpoint_every", "checkpoint_dir", "seed"):
            d.pop(k)
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


def prepare(config: TrainConfig, data: Optional[Dataset] = None) -> Prepared:
    """Check every user input before anything runs or is written; load the data."""
    if config.epochs < 1 or config.batch_size < 1:
        raise SpecError("epochs and batch size must be positive")
    spec, rounds, dense_backward = None, 1, False
    if config.method != "dense":
        entry = get_method(config.method)
        spec = SparsitySpec.parse(config.sparsity, config.allocation)
        from prunus.algorithms import build_options

        opts = build_options(entry.options, dict(config.options), f"training method {config.method!r}")
        rounds, dense_backward = entry.rounds(opts), entry.dense_backward
    data = data or load_task(config.task, text_file=config.text_file, book=config.book)
    with torch.random.fork_rng(devices=[]):
        probe = build_model(config.model, data)  # model/task mismatch fails here
    prep = Prepared(config, data, spec, rounds, dense_backward)
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


def train_one(prep: Prepared, seed: int, *, resume: bool = False, progress: bool = True,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Train one seed; returns its result (metric, sparsity, FLOPs, per-epoch history)."""
    cfg, data = prep.config, prep.data
    rank, world = _world()
    text = data.kind == "text"
    x_tr, y_tr = data.x_train, data.y_train
    if cfg.train_subset:
        x_tr, y_tr = x_tr[:cfg.train_subset], y_tr[:cfg.train_subset]
    n = len(x_tr)
    bs = cfg.batch_size
    spe = n // bs  # steps per epoch (the last partial batch is dropped: equal DDP shards)
    if spe < 1:
        raise SpecError(f"batch size {bs} is larger than the {n} training examples")
    if bs % world:
        raise SpecError(f"batch size {bs} must divide evenly over {world} ranks")
    total = spe * cfg.epochs * prep.rounds
    torch.manual_seed(seed)
    model = build_model(cfg.model, data, width=prep.width)
    opt_name = cfg.optimizer or ("adamw" if text else "sgd")
    lr = cfg.lr or (3e-3 if opt_name == "adamw" else 0.05)
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                              weight_decay=cfg.weight_decay)
    elif opt_name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    else:
        raise SpecError(f"unknown optimizer {opt_name!r}; choose sgd or adamw")
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)

    def batch(epoch: int, b: int, order_seed: int = seed) -> tuple[torch.Tensor, torch.Tensor]:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(order_seed * 100003 + epoch))
        idx = perm[b * bs:(b + 1) * bs][rank::world]
        return x_tr[idx], (y_tr[idx] if not text else y_tr)

    def one_step(sp: Optional[Sparsifier], xb, yb, step_lr: float) -> float:
        for g in opt.param_groups:
            g["lr"] = step_lr
        opt.zero_grad(set_to_none=True)
        loss = _loss(net, data, xb, yb)
        loss.backward()
        opt.step()
        if sp is not None:
            sp.step()
        return loss.item()

    sp: Optional[Sparsifier] = None
    if prep.spec is not None:
        kwargs: dict[str, Any] = dict(dict(cfg.options))
        if get_method(cfg.method).needs_score:
            kwargs["score_fn"] = _search_scorer(prep, seed, n, spe, one_step, batch, lr, model)
        sp = get_method(cfg.method).factory(net, opt, prep.spec, total_steps=total, seed=seed,
                                            exclude=default_exclude(cfg.model), **kwargs)
    phases = sp.phases if sp is not None else [0, total]

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

    def snapshot(done: bool = False, result: Optional[dict] = None) -> None:
        if rank == 0:
            save_checkpoint(path, {
                "format": FORMAT, "fingerprint": cfg.fingerprint(), "seed": seed, "step": step,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "sparsifier": sp.state_dict() if sp is not None else None, "history": history,
                "train_flops": train_flops, "rng": torch.get_rng_state(), "done": done, "result": result})

    from tqdm import tqdm

    n_epochs = cfg.epochs * prep.rounds
    t0 = time.time()
    for epoch in range(n_epochs):
        if len(history) > epoch:
            continue  # finished before the resume
        bar = tqdm(range(spe), desc=f"seed {seed} epoch {epoch + 1}/{n_epochs}", leave=False,
                   disable=not progress or rank != 0, file=sys.stderr)
        losses = []
        for b in bar:
            if epoch * spe + b < step:
                continue  # done before the resume
            xb, yb = batch(epoch, b)
            loss = one_step(sp, xb, yb, _lr(lr, step, phases))
            step += 1
            losses.append(loss)
            f_s = fl.forward_flops(costs, sp.densities(), extra=attn) if sp is not None else f_dense
            train_flops += bs * fl.train_step_flops(f_s, f_dense, dense_backward=prep.dense_backward)
            bar.set_postfix(loss=f"{loss:.3f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                snapshot()
        metric = evaluate(model, data, data.x_test, data.y_test)
        rec = {"epoch": epoch + 1, "step": step, "loss": sum(losses) / max(1, len(losses)) if losses else None,
               "metric": metric, "sparsity": sp.sparsity() if sp is not None else 0.0}
        history.append(rec)
        name = "ppl" if text else "acc"
        loss_s = f"{rec['loss']:.4f}" if rec["loss"] is not None else "-"
        log(f"seed {seed} epoch {epoch + 1}/{n_epochs} step {step} loss {loss_s} "
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
        "width": prep.width, "steps": total, "history": history,
    }
    if cfg.checkpoint_every:
        snapshot(done=True, result=result)
    return result


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
    return {
        "task": cfg.task, "model": cfg.model, "method": cfg.method,
        "sparsity_spec": cfg.sparsity if prep.spec is not None else "0",
        "allocation": cfg.allocation, "epochs": cfg.epochs, "seeds": [r["seed"] for r in runs],
        "sparsity": mean("sparsity"),
        metric: float(vals.mean()), f"{metric}_std": float(vals.std(unbiased=False)) if len(runs) > 1 else 0.0,
        "train_flops": mean("train_flops"), "train_flops_dense": mean("train_flops_dense"),
        "inference_flops": mean("inference_flops"), "inference_flops_dense": mean("inference_flops_dense"),
        "width": prep.width, "options": dict(cfg.options), "runs": runs,
    }


def run(config: TrainConfig, seeds: list[int], *, resume: bool = False, progress: bool = True,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
        data: Optional[Dataset] = None) -> dict[str, Any]:
    """Validate, check every checkpoint to be resumed, then train each seed and summarize."""
    prep = prepare(config, data)
    if resume:
        for s in seeds:
            if checkpoint_path(config, s).exists():
                load_checkpoint(checkpoint_path(config, s), config)  # a foreign checkpoint fails now
    runs = [train_one(prep, s, resume=resume, progress=progress, log=log) for s in seeds]
    return summarize(prep, runs)


def write_json(path: str, doc: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, p)
