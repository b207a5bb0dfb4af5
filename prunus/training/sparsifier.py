"""The one sparsifier every training method is built on: masks kept beside the weights.

A method is a factory that picks the initial masks and, optionally, one ``update`` hook; the base
does the rest. After ``optimizer.step()`` the user calls ``sparsifier.step()``, which

1. advances the step counter and runs the method's ``update(sparsifier, step)`` (which may change
   masks: GMP prunes more, SET/RigL drop and grow, LTH rewinds);
2. multiplies every targeted weight by its mask, and zeroes the optimizer state (SGD momentum,
   Adam's first and second moments) at the pruned positions, so that neither momentum nor weight
   decay can revive a pruned weight.

Gradients are left dense on purpose: RigL grows where the dense |grad| is largest, and under DDP the
gradient it reads is the all-reduced one. On a model sharded by FSDP2, :func:`prunus.training.sharding.attach`
shards the masks like the weights and runs ``update`` on full tensors (``sp.sharding``).

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    >>> sp = prunus.training.static(model, opt, "75%")
    >>> loss = model(torch.randn(4, 8)).sum(); loss.backward(); opt.step(); sp.step()
    >>> round(sp.sparsity(), 2)
    0.75
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import contextlib

import torch
from torch import Tensor, nn

from prunus import criteria
from prunus.budgets import LayerInfo, allocate
from prunus.errors import SpecError
from prunus.core.masks import n_pruned, topk
from prunus.core.spec import NM, Pattern, SparsitySpec
from prunus.core.stats import LayerStats, layer_seed, weight_only_stats
from prunus.core.targets import TRAINABLE, Target, select
from prunus.training.sharding import full, shard_like

PRUNABLE = TRAINABLE  # nn.Linear, nn.Conv1d, nn.Conv2d (and GPT-2's Conv1D)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP/DataParallel wrapper, so names do not depend on wrapping."""
    return getattr(model, "module", model) if isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def find_targets(model: nn.Module, include: Optional[Sequence[str]] = None,
                 exclude: Sequence[str] = ()) -> list[Target]:
    """Linear and convolution weights whose names match ``include`` globs and no ``exclude`` glob.

    The one target selection, :func:`prunus.core.targets.select`, with convolutions added: a weight
    tied to an excluded module, or to one already selected, is not targeted twice.
    """
    try:
        return select(unwrap(model), ("*",) if include is None else include, exclude, kinds=PRUNABLE, root=True)
    except SpecError:
        raise SpecError("no layer to sparsify: no Linear/Conv layer matches the include/exclude globs") from None


def as_spec(spec: SparsitySpec | str | float, allocation: Optional[str] = None) -> SparsitySpec:
    """Accept a spec or a sparsity string (``"90%"``, ``"2:4"``) at the API edge."""
    if isinstance(spec, SparsitySpec):
        return spec if allocation is None else SparsitySpec(spec.pattern, spec.sparsity, allocation)
    return SparsitySpec.parse(spec, allocation or "uniform")


def check_pattern(method: str, spec: SparsitySpec, allowed: tuple[type, ...]) -> None:
    if not isinstance(spec.pattern, allowed):
        kinds = ", ".join(p.__name__ for p in allowed)
        raise SpecError(f"training method {method!r} does not support {spec.pattern}; it supports {kinds}")


def layer_budgets(targets: Sequence[Target], spec: SparsitySpec, sparsity: Optional[float] = None,
                  weights: Optional[dict[str, Tensor]] = None) -> dict[str, float]:
    """Per-layer sparsities for ``spec`` (through :func:`prunus.budgets.allocate`), checked.

    A layer that would keep no weight at all is an error: it would cut the network in two.
    """
    s = spec.sparsity if sparsity is None else sparsity
    if isinstance(spec.pattern, NM):
        return {t.name: spec.pattern.sparsity for t in targets}
    layers = [LayerInfo(t.name, tuple(t.weight.shape),
                        weight=(weights or {}).get(t.name, t.weight.detach())) for t in targets]
    budgets = allocate(layers, s, spec.allocation)
    for t in targets:
        if n_pruned(t.weight.numel(), budgets[t.name]) >= t.weight.numel():
            raise SpecError(f"layer {t.name!r} would keep no weight at sparsity {budgets[t.name]:g}; "
                            f"lower the sparsity or exclude the layer")
    return budgets


def magnitude(weight: Tensor, stats: Optional[LayerStats] = None) -> Tensor:
    """|W| as float scores, from the criteria registry's ``magnitude`` (the one definition of it)."""
    return criteria.get("magnitude")(weight, stats if stats is not None else _NO_STATS)


_NO_STATS = weight_only_stats("", 0)  # magnitude reads no statistics


def mask_from_scores(scores: Tensor, sparsity: float, pattern: Pattern, name: str) -> Tensor:
    """Keep-mask shaped like ``scores`` (2-D, or a conv weight flattened to (out, in*k*k))."""
    flat = scores.reshape(scores.shape[0], -1)
    return topk(flat, sparsity, pattern, name=name).reshape(scores.shape)


def random_masks(targets: Sequence[Target], budgets: dict[str, float], pattern: Pattern,
                 seed: int) -> dict[str, Tensor]:
    """Uniformly random masks at the given budgets; the same (seed, name) gives the same mask."""
    rnd = criteria.get("random")
    return {t.name: mask_from_scores(rnd(t.weight.detach(), weight_only_stats(t.name, seed)),
                                     budgets[t.name], pattern, t.name) for t in targets}


@torch.no_grad()
def sparse_init(targets: Sequence[Target], masks: dict[str, Tensor]) -> None:
    """Rescale each layer's initial weights by ``sqrt(numel / nnz)``: the sparse fan-in init.

    A random mask at density d shrinks every pre-activation's variance by d, layer after layer;
    scaling the survivors by 1/sqrt(d) restores the dense init's signal (Evci et al. 2020, sec. 4,
    "scaled initialization"; Liu et al. 2022). Used by the methods that start from a random mask.
    """
    for t in targets:
        nnz = int(masks[t.name].sum())
        if nnz:
            t.weight.mul_((t.weight.numel() / nnz) ** 0.5)


def generator(seed: int, tag: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, tag)``: identical on every rank and after a resume."""
    g = torch.Generator()
    g.manual_seed(layer_seed(seed, tag))
    return g


UpdateFn = Callable[["Sparsifier", int], None]


class Sparsifier:
    """Masks beside the weights of ``targets``, re-applied after every optimizer step.

    Args:
        model: the (possibly DDP-wrapped) model.
        optimizer: its optimizer; its per-parameter state is masked too.
        targets: the sparsified layers (see :func:`find_targets`).
        masks: ``{name: bool tensor}`` shaped like each weight, True = keep.
        spec: the spec the method aims at (for reports and checkpoints).
        method: the registry name.
        total_steps: the run's length in optimizer steps (schedules need it).
        update: the method's hook, called at every :meth:`step` before masks are applied.
        seed: the run's seed, for randomised updates.
        phases: step boundaries at which the learning-rate schedule restarts (LTH).
        apply_to_weights: False for methods that keep dense weights and mask in the forward pass
            through a parametrization (SR-STE, PGF).
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 targets: Sequence[Target], masks: dict[str, Tensor], *, spec: SparsitySpec,
                 method: str, total_steps: int, update: Optional[UpdateFn] = None, seed: int = 0,
                 phases: Sequence[int] = (), apply_to_weights: bool = True) -> None:
        self.model, self.optimizer = model, optimizer
        self.targets = list(targets)
        self.masks = {k: v.to(dtype=torch.bool, device=self._target(k).weight.device)
                      for k, v in masks.items()}
        self.spec, self.method, self.total_steps, self.seed = spec, method, int(total_steps), seed
        self.update, self.apply_to_weights = update, apply_to_weights
        self.phases = list(phases) or [0, self.total_steps]
        self.step_count = 0
        self.state: dict[str, Any] = {}  # method state saved in checkpoints (tensors, numbers)
        self.dense_grad_steps = 0  # steps that needed a dense gradient (RigL), for FLOPs
        self.released = False
        self.sharding: Any = None  # a prunus.training.sharding.Sharding once the model is sharded (FSDP2)
        self.apply()

    def _target(self, name: str) -> Target:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(name)

    # ---- the hook point -------------------------------------------------------------------
    def step(self) -> None:
        """Call once after every ``optimizer.step()``: run the method's update, re-apply masks."""
        self.step_count += 1
        if self.update is not None:
            with (self.sharding.view(self.step_count) if self.sharding is not None else contextlib.nullcontext()):
                self.update(self, self.step_count)  # sharded: on full tensors, see prunus.training.sharding
        self.apply()

    def full_params(self) -> contextlib.AbstractContextManager[nn.Module]:
        """``with sp.full_params() as m:`` the unwrapped model with whole parameters (sharded or not).

        For update hooks that reset or rewind every parameter (LTH); on a sharded model the changes
        go back to the shards when the hook returns.
        """
        m = unwrap(self.model)
        return self.sharding.full_params(m) if self.sharding is not None else contextlib.nullcontext(m)

    def full_mask(self, name: str) -> Tensor:
        """The whole mask of layer ``name`` (gathered when it is sharded)."""
        return full(self.masks[name])

    @torch.no_grad()
    def apply(self) -> None:
        """Zero pruned weights and the optimizer state at pruned positions (no-op when released)."""
        if not self.apply_to_weights or self.released:
            return
        for t in self.targets:
            m = self.masks[t.name]
            w = t.weight
            w.mul_(m)
            self.mask_optimizer_state(w, m)

    @torch.no_grad()
    def mask_optimizer_state(self, param: Tensor, keep: Tensor) -> None:
        """Multiply every state tensor shaped like ``param`` (momentum, exp_avg, ...) by ``keep``."""
        if self.optimizer is None:
            return
        if self.sharding is not None:
            param, keep = self.sharding.localize(param, keep)
        for v in self.optimizer.state.get(param, {}).values():
            if isinstance(v, Tensor) and v.shape == param.shape:
                v.mul_(keep)

    def release(self) -> None:
        """Drop every mask (all weights trainable again); SPDF's switch to dense fine-tuning."""
        self.released = True
        for k in self.masks:
            self.masks[k] = torch.ones_like(self.masks[k])

    # ---- reports ----------------------------------------------------------------------------
    def effective_weight(self, t: Target) -> Tensor:
        """The weight the forward pass uses (the parametrized one for SR-STE/PGF), whole."""
        if self.sharding is not None:
            return self.sharding.effective_weight(t)
        return t.module.weight.detach()

    def _zeros(self, t: Target) -> float:
        """Zeros of ``t``'s effective weight; a position the mask prunes counts as zero whatever its value.

        NaN * 0 is NaN, so a diverged run's pruned weights compare unequal to 0: counting ``w == 0``
        alone would report a 90% mask as 0% sparse. Counting the mask too (for methods that zero the
        pruned weights, while the mask is in force) gives the same number on every finite run.
        """
        zero = self.effective_weight(t) == 0
        if self.apply_to_weights and not self.released:
            zero |= ~self.full_mask(t.name)
        return float(zero.sum())

    def layer_sparsity(self) -> dict[str, float]:
        """Achieved sparsity of each target: the share of zeros (or pruned positions) in its weight."""
        return {t.name: self._zeros(t) / t.weight.numel() for t in self.targets}

    def sparsity(self) -> float:
        """Achieved sparsity over all targeted weights (zeros / weights)."""
        zeros = sum(self._zeros(t) for t in self.targets)
        return zeros / max(1, sum(t.weight.numel() for t in self.targets))

    def densities(self) -> dict[str, float]:
        """Mask density of each target (kept / weights), for FLOP counting."""
        if self.sharding is not None:
            return self.sharding.densities()
        return {k: float(m.sum()) / m.numel() for k, m in self.masks.items()}

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Masks, step, and the method's state: everything a resume needs besides the model."""
        return {"method": self.method, "step": self.step_count, "released": self.released,
                "dense_grad_steps": self.dense_grad_steps,
                "masks": {k: v.clone() for k, v in self.masks.items()},
                "state": {k: (v.clone() if isinstance(v, Tensor) else
                              {kk: vv.clone() for kk, vv in v.items()} if isinstance(v, dict) else v)
                          for k, v in self.state.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("method") != self.method:
            raise SpecError(f"sparsifier state is for method {sd.get('method')!r}, not {self.method!r}")
        if set(sd["masks"]) != set(self.masks):
            raise SpecError("sparsifier state holds masks for other layers than this model's")
        self.step_count = int(sd["step"])
        self.released = bool(sd["released"])
        self.dense_grad_steps = int(sd.get("dense_grad_steps", 0))
        for k, v in sd["masks"].items():
            self.masks[k] = shard_like(v.to(dtype=torch.bool, device=self.masks[k].device), self.masks[k])
        self.state = dict(sd["state"])

    def squash(self) -> None:
        """Bake the masks into the weights and remove any parametrization: a plain sparse model."""
        from torch.nn.utils import parametrize

        if self.sharding is not None:
            raise SpecError("squash() works on a whole model; this one is sharded by FSDP2 (gather its "
                            "full state dict into an unsharded copy and squash that)")
        for t in self.targets:
            if parametrize.is_parametrized(t.module, "weight"):
                parametrize.remove_parametrizations(t.module, "weight", leave_parametrized=True)
        self.apply()



def option_values(options: Any, kwargs: dict[str, Any]) -> Any:
    """A factory's options: the typed dataclass when one is given (a trainer's), else the keywords."""
    if options is not None and kwargs:
        raise SpecError(f"pass a method's options either as one options dataclass or as keywords, "
                        f"not both (got options= and {sorted(kwargs)})")
    return options if options is not None else kwargs


def prepare(model: nn.Module, spec: SparsitySpec | str | float, *, method: str,
            patterns: tuple[type, ...], options: type, values: Any,
            allocation: Optional[str] = None, include: Optional[Sequence[str]] = None,
            exclude: Sequence[str] = ()) -> tuple[list[Target], SparsitySpec, Any]:
    """What every factory does first: parse the spec, find targets, type the options."""
    from prunus.core.options import build_options  # the one options builder, shared with one-shot

    spec = as_spec(spec, allocation)
    check_pattern(method, spec, patterns)
    opts = build_options(options, values, f"training method {method!r}")
    return find_targets(model, include, exclude), spec, opts
