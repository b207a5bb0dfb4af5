"""The training loop of the reference trainer: one seed (:func:`train_one`), N seeds (:func:`run`).

It is an ordinary PyTorch loop with the three sparse-training lines in it. A run is killed (even with
SIGKILL) and resumed from its last checkpoint ends with the same masks and metrics as an
uninterrupted one: data order, initialisation and every random mask update derive from the seed and
the step, and the checkpoint holds the RNG state.

Two data phases (text only): after ``epochs`` on the first corpus training continues on the second
for ``finetune_epochs``; the learning-rate cosine restarts there. A method learns about the switch
through its ``run_args`` hook (SPDF releases its mask exactly there: sparse pre-training on one book,
dense fine-tuning on another; Thangarasa et al. 2023).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from prunus.errors import PrunusError, SpecError
from prunus.io.fsutil import check_out_dir
from prunus.training import flops as fl
from prunus.training.registry import RunPlan, get as get_method
from prunus.training.sparsifier import Sparsifier
from prunus.training.tasks import Dataset, build_model, default_exclude
from prunus.training.trainer.checkpoints import FORMAT, checkpoint_path, load_checkpoint, save_checkpoint
from prunus.training.trainer.config import Prepared, TrainConfig, example_input, prepare
from prunus.training.trainer.dcp import check as dcp_check, dcp_path, load as dcp_load, save as dcp_save
from prunus.training.trainer.ddp import RankSync, distributed, dump_digests, mask_digest, world_info
from prunus.training.trainer.fsdp import ShardSync, shard
from prunus.training.trainer.steps import Batches, Segment, Stepper, cosine_lr, evaluate, make_optimizer, segment

Log = Callable[[str], None]


class DivergedError(PrunusError):
    """The training loss became NaN or infinite: the run stops there instead of reporting nonsense."""


def _stderr(s: str) -> None:
    print(s, file=sys.stderr)


class _Run:
    """One seed's run: model, optimizer, sparsifier, counters; built in the order that fixes the RNG."""

    def __init__(self, prep: Prepared, seed: int, log: Log) -> None:
        cfg, data = prep.config, prep.data
        self.prep, self.cfg, self.seed, self.log = prep, cfg, seed, log
        self.rank, self.world = world_info()
        self.text = data.kind == "text"
        if cfg.batch_size % (self.world * cfg.micro_batches):
            raise SpecError(f"batch size {cfg.batch_size} must divide evenly over {self.world} rank(s) "
                            f"x {cfg.micro_batches} micro-batch(es)")
        self.sharded = self.world > 1 and cfg.parallel == "fsdp"
        self.segments = [segment(cfg, data, cfg.epochs * prep.rounds,
                                 "pretrain" if prep.finetune is not None else "train")]
        if prep.finetune is not None:
            self.segments.append(segment(cfg, prep.finetune, cfg.finetune_epochs, "finetune"))
        self.plan: list[tuple[Segment, int]] = []  # one entry per epoch: (segment, first global step)
        first = 0
        for sg in self.segments:
            for _ in range(sg.epochs):
                self.plan.append((sg, first))
                first += sg.spe
        self.total = first
        self.pre_steps = self.segments[0].spe * self.segments[0].epochs

        torch.manual_seed(seed)
        model = build_model(cfg.model, data, width=prep.width)
        if len(data.input_shape) == 3:
            # NHWC: PyTorch's CPU convolutions and pooling are ~1.5x faster than in NCHW (measured on
            # LeNet-5, batch 128, 2 threads); the parameters are the same, only their strides differ.
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.opt, self.lr = make_optimizer(cfg, model, self.text)
        self.batches = Batches(self.segments[0], cfg.batch_size, seed, self.rank, self.world, self.text)
        self.stepper = Stepper(model, self.opt, data, self.world, cfg.micro_batches)
        # DDP wraps (FSDP2 shards) the model after the sparsifier is built: SR-STE/PGF register
        # parametrizations, which DDP's gradient hooks must see. Random search short-trains inside the
        # factory, before the wrap; there the gradients are averaged over the ranks by hand, as DDP would.
        self.sp = self._sparsifier()
        self._count_flops()
        if self.sharded:  # parameters, gradients, optimizer state and masks sharded (trainer.fsdp)
            self.opt = shard(model, self.sp, self.opt, lambda: make_optimizer(cfg, model, self.text)[0])
            self.stepper.opt, self.stepper.synced = self.opt, True
        elif self.world > 1:
            self.stepper.net = nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's parameters
            self.stepper.synced = True
        self.phases = self.sp.phases if self.sp is not None else [0, self.total]
        if prep.finetune is not None:
            self.phases = [0, self.pre_steps, self.total]  # the cosine restarts for fine-tuning
        self.sync = (ShardSync if self.sharded else RankSync)(
            model, self.sp, self.world, record=bool(os.environ.get("PRUNUS_DDP_DIGESTS")), log=log)
        self.step, self.history, self.train_flops = 0, [], 0.0
        self.losses: list[float] = []  # the current epoch's step losses (checkpointed: exact resumes)
        self.path = dcp_path(cfg, seed) if self.sharded else checkpoint_path(cfg, seed)

    # ---- construction -------------------------------------------------------------------------
    def _sparsifier(self) -> Optional[Sparsifier]:
        """The method's sparsifier, from the typed options and what its ``run_args`` hook asks for."""
        prep = self.prep
        if prep.spec is None:
            return None
        entry = get_method(self.cfg.method)
        plan = RunPlan(total_steps=self.total, two_phase=prep.finetune is not None,
                       switch_step=self.pre_steps if prep.finetune is not None else None, seed=self.seed,
                       given=prep.given, scorer=self._search_scorer)
        extra = entry.run_args(plan, prep.options) if entry.run_args is not None else {}
        return entry.factory(self.model, self.opt, prep.spec, total_steps=self.total, seed=self.seed,
                             exclude=default_exclude(self.cfg.model), options=prep.options, **extra)

    def _search_scorer(self) -> Callable[[Sparsifier], float]:
        """A candidate's score: train ``probe_epochs`` on 90% of the training set, score on the rest."""
        data, first = self.prep.data, self.segments[0]
        n_val = max(1, first.n // 10)
        spe = first.spe
        steps = max(1, int(self.cfg.probe_epochs * spe))

        def score(sp: Sparsifier) -> float:
            for s in range(steps):
                xb, yb = self.batches(s // spe, s % spe, order_seed=self.seed + 1)
                self.stepper(sp, xb[:-max(1, len(xb) // 10)], yb[:-max(1, len(yb) // 10)] if len(yb) else yb,
                             self.lr)
            xv, yv = data.x_train[-n_val:], data.y_train[-n_val:]
            m = evaluate(self.model, data, xv, yv)
            return -m if data.kind == "text" else m

        return score

    def _count_flops(self) -> None:
        data = self.prep.data
        ex = example_input(data)
        self.costs = fl.layer_flops(self.model, ex)
        self.attn = (self.model.attention_flops(data.x_train.shape[1] - 1)
                     if hasattr(self.model, "attention_flops") else 0.0)
        self.f_dense = fl.forward_flops(self.costs, extra=self.attn)
        with torch.random.fork_rng(devices=[]):
            base = build_model(self.cfg.model, data)  # the un-widened dense model: the "dense-equivalent"
        self.f_base = fl.forward_flops(fl.layer_flops(base, ex), extra=self.attn)

    # ---- checkpoints --------------------------------------------------------------------------
    def resume(self) -> Optional[dict[str, Any]]:
        """Continue from this seed's checkpoint; returns the result if that run had finished."""
        if not self.path.exists():
            return None
        if self.sharded:  # every rank reads its shards; a finished run's tensors are not read
            ck = dcp_load(self.path, self.cfg, self.model, self.opt, self.sp)
        else:
            ck = load_checkpoint(self.path, self.cfg)
        if ck.get("done"):
            self.log(f"seed {self.seed}: finished run found in {self.path}")
            return ck["result"]
        if not self.sharded:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            if self.sp is not None:
                self.sp.load_state_dict(ck["sparsifier"])
            torch.set_rng_state(ck["rng"])
        self.step, self.history, self.train_flops = int(ck["step"]), list(ck["history"]), float(ck["train_flops"])
        self.losses = [float(x) for x in ck["epoch_losses"]]
        self.log(f"seed {self.seed}: resumed from {self.path} at step {self.step}")
        return None

    def snapshot(self, done: bool = False, result: Optional[dict] = None) -> None:
        if self.sharded:  # a collective: every rank writes its shards (trainer.dcp)
            dcp_save(self.path, {"fingerprint": self.cfg.fingerprint(), "seed": self.seed, "step": self.step,
                                 "history": self.history, "train_flops": self.train_flops,
                                 "epoch_losses": list(self.losses), "done": done, "result": result},
                     self.model, self.opt, self.sp)
        elif self.rank == 0:
            sp = self.sp
            save_checkpoint(self.path, {
                "format": FORMAT, "fingerprint": self.cfg.fingerprint(), "seed": self.seed, "step": self.step,
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "sparsifier": sp.state_dict() if sp is not None else None, "history": self.history,
                "train_flops": self.train_flops, "epoch_losses": list(self.losses), "rng": torch.get_rng_state(), "done": done, "result": result})

    # ---- training -----------------------------------------------------------------------------
    def train_epoch(self, epoch: int, sg: Segment, start: int, progress: bool, t0: float) -> None:
        """Train one epoch of ``sg`` (skipping steps done before a resume), evaluate, log."""
        from tqdm import tqdm

        cfg, sp = self.cfg, self.sp
        n_epochs = len(self.plan)
        bar = tqdm(range(sg.spe), desc=f"seed {self.seed} epoch {epoch + 1}/{n_epochs}", leave=False,
                   disable=not progress or self.rank != 0, file=sys.stderr)
        losses = self.losses = self.losses if start < self.step else []  # a resume mid-epoch keeps its losses
        for b in bar:
            if start + b < self.step:
                continue  # done before the resume
            xb, yb = self.batches(epoch, b, sg=sg)
            # FLOPs of this step: the masks it runs under (before sparsifier.step() updates them)
            f_s = fl.forward_flops(self.costs, sp.densities(), extra=self.attn) if sp is not None else self.f_dense
            loss = self.stepper(sp, xb, yb, cosine_lr(self.lr, self.step, self.phases))
            self.step += 1
            if not math.isfinite(loss):
                raise DivergedError(f"seed {self.seed} epoch {epoch + 1}/{n_epochs} step {self.step}: the loss is "
                                    f"{loss} (diverged); lower the learning rate (--lr) and check the inputs")
            losses.append(loss)
            self.train_flops += cfg.batch_size * fl.train_step_flops(f_s, self.f_dense,
                                                                     dense_backward=self.prep.dense_backward)
            bar.set_postfix(loss=f"{loss:.3f}")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.snapshot()
        d = sg.data
        metric = evaluate(self.model, d, d.x_test, d.y_test)
        self.sync.check(epoch + 1)
        rec = {"epoch": epoch + 1, "step": self.step,
               "loss": sum(losses) / max(1, len(losses)) if losses else None,
               "metric": metric, "sparsity": sp.sparsity() if sp is not None else 0.0}
        two = self.prep.finetune is not None
        if two:
            rec["phase"] = sg.name
        self.history.append(rec)
        name = "ppl" if self.text else "acc"
        loss_s = f"{rec['loss']:.4f}" if rec["loss"] is not None else "-"
        where = f" [{sg.name}]" if two else ""
        self.log(f"seed {self.seed} epoch {epoch + 1}/{n_epochs}{where} step {self.step} loss {loss_s} "
                 f"{name} {metric:.2f}{'' if self.text else '%'} sparsity {rec['sparsity']:.4f} "
                 f"lr {cosine_lr(self.lr, max(0, self.step - 1), self.phases):.4g} ({time.time() - t0:.1f}s)")

    def result(self) -> dict[str, Any]:
        """The seed's result: metric, sparsity, masks digest, FLOPs, per-epoch history."""
        sp, bs = self.sp, self.cfg.batch_size
        densities = sp.densities() if sp is not None else {}
        f_inf = fl.forward_flops(self.costs, densities, extra=self.attn)
        # RigL's dense gradient at each update step adds f_dense - f_sparse (Evci et al. 2020, app. H).
        dense_steps = sp.dense_grad_steps if sp is not None else 0
        result = {
            "seed": self.seed, "metric": self.history[-1]["metric"],
            "sparsity": sp.sparsity() if sp is not None else 0.0,
            "layer_sparsity": sp.layer_sparsity() if sp is not None else {},
            "masks_sha": mask_digest(sp),
            "train_flops": self.train_flops + dense_steps * bs * (self.f_dense - (f_inf if sp is not None
                                                                                  else self.f_dense)),
            "train_flops_dense": 3.0 * self.f_base * bs * self.total,
            "inference_flops": f_inf, "inference_flops_dense": self.f_base,
            "width": self.prep.width, "steps": self.total, "history": self.history, "world_size": self.world,
        }
        if self.prep.finetune is not None:
            pre = [h for h in self.history if h.get("phase") == "pretrain"]
            result["pretrain_metric"] = pre[-1]["metric"] if pre else None
            result["pretrain_steps"] = self.pre_steps
        if self.world > 1:
            result[self.cfg.parallel] = self.sync.report()
        return result


def train_one(prep: Prepared, seed: int, *, resume: bool = False, progress: bool = True,
              log: Log = _stderr) -> dict[str, Any]:
    """Train one seed; returns its result (metric, sparsity, FLOPs, per-epoch history)."""
    r = _Run(prep, seed, log)
    if resume and (finished := r.resume()) is not None:
        return finished
    r.sync.start()
    t0 = time.time()
    for epoch, (sg, start) in enumerate(r.plan):
        if len(r.history) > epoch:
            continue  # finished before the resume
        r.train_epoch(epoch, sg, start, progress, t0)
    result = r.result()
    dump_digests(seed, r.rank, r.world, result, r.model, r.sync)
    if prep.config.checkpoint_every:
        r.snapshot(done=True, result=result)
    return result


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
        log: Log = _stderr, data: Optional[Dataset] = None) -> dict[str, Any]:
    """Validate, check every checkpoint to be resumed, then train each seed and summarize.

    Under torchrun the process group is joined only after all of that succeeded (a bad input fails
    on every rank alike, before any collective), and left at the end; only rank 0 logs.
    """
    prep = prepare(config, data)
    if config.checkpoint_every:  # the checkpoint folder: writable now, not at the first checkpoint
        d = check_out_dir(config.checkpoint_dir, overwrite=True)
        if d.exists() and not d.is_dir():
            raise SpecError(f"checkpoint folder {d} is a file; give a folder")
    if resume:
        for s in seeds:
            _check_resumable(config, s)  # a foreign or corrupt checkpoint fails now, on every rank
    with distributed() as (rank, world):
        say = log if rank == 0 else (lambda s: None)
        runs = [train_one(prep, s, resume=resume, progress=progress, log=say) for s in seeds]
    doc = summarize(prep, runs)
    doc["world_size"] = world
    if world > 1:
        doc["parallel"] = config.parallel
    return doc


def _check_resumable(config: TrainConfig, seed: int) -> None:
    """Verify the checkpoint a resume would read; one of the other kind (.pt / .dcp) is an error."""
    sharded = config.parallel == "fsdp"  # (prepare: only under torchrun)
    mine, other = (dcp_path, checkpoint_path) if sharded else (checkpoint_path, dcp_path)
    if mine(config, seed).exists():
        (dcp_check if sharded else load_checkpoint)(mine(config, seed), config)
    elif other(config, seed).exists():
        how = ("one process or DDP (without --parallel fsdp)" if sharded else
               "FSDP2 (torchrun ... --parallel fsdp)")
        raise SpecError(f"{other(config, seed)} was written by another parallel mode; resume it with {how}, "
                        f"or use another --checkpoint-dir")
