"""Structured pruning of a transformer: whole blocks, attention heads and MLP channels removed.

The model really gets smaller: linears are replaced by narrower ones, blocks leave the stack, and
the config records the new widths (:mod:`prunus.structured.config`). Order of work:

1. *observe* (only when needed: ``blocks@`` with an activation-aware criterion, or the ``global`` /
   ``cfsp`` allocations): one calibration pass over the dense model, through the one calibration
   loop, collecting each consumer's input statistics and each block's input/output similarity;
2. *depth*: the ``blocks@K`` lowest-scoring blocks go (ShortGPT's block influence, Men et al. 2024,
   "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect");
3. *width*: block by block on the already-pruned stream, each block's units are scored by the unit
   criterion, the lowest go (counts from :mod:`prunus.structured.allocate`), FLAP's bias compensation
   optionally folds the removed channels' mean contribution into the consumer's bias, and the block
   steps (``reconstruct``) tune the smaller block towards the dense block's outputs.

Heads of a GQA layer (``units``): ``group`` removes whole key/value groups with their query heads;
``query`` removes query heads in equal numbers from every group; ``auto`` takes ``group`` unless a
group holds more query heads than there are groups.

BERT-family encoders (``BertModel``, ``BertForMaskedLM``, all-MiniLM-L6-v2) take the same path: every
head is its own key/value group, FFN channels are ``intermediate.dense`` rows and ``output.dense``
columns, FLAP's compensation adds to the consumers' existing biases (An et al. 2024), blocks go by
ShortGPT's block influence, and Wanda-sp (An et al. 2024, after Sun et al. 2023) scores units from
the same consumer statistics. The calibration loop captures the encoder's first-block inputs and
attention mask and replays them; the config keeps the global head count (BERT's head size is
``hidden / heads``) and records the removed heads per layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from prunus.core.options import check, option
from prunus.core.spec import Structure
from prunus.core.stats import layer_seed
from prunus.core.targets import Target
from prunus.core.units import Layout, find_blocks, layout_of, remove_heads, remove_mlp
from prunus.errors import DataError, SpecError
from prunus.oneshot.calibrate import run_blockwise
from prunus.oneshot.steps import BlockContext, StepRun
from prunus.structured import allocate
from prunus.structured.config import record_structure
from prunus.structured.registry import UnitCriterion, UnitView, generator, get

HEAD_UNITS = ("auto", "group", "query")


@dataclass(frozen=True)
class StructureOptions:
    """How structures are chosen and repaired.

    Attributes:
        allocation: ``uniform``, ``global`` (FLAP) or ``cfsp`` (see :mod:`prunus.structured.allocate`).
        heads: ``auto``, ``group`` or ``query``: the head unit of a GQA layer (module docstring).
        compensate: FLAP's bias compensation of removed channels.
        cfsp_a: CFSP's sigmoid slope over standardised block importance.
        multiple: every MLP keeps a multiple of this many channels (0: as the spec after the
            structure needs: M of N:M, the int4 group, the block width; else 1).
    """

    allocation: str = "uniform"
    heads: str = "auto"
    compensate: bool = False
    cfsp_a: float = option(1.0, gt=0)
    multiple: int = option(0, min=0)

    def __post_init__(self) -> None:
        check(self, "structure")
        if self.allocation not in allocate.ALLOCATIONS:
            raise SpecError(f"unknown structure allocation {self.allocation!r}; choose "
                            f"{', '.join(allocate.ALLOCATIONS)}")
        if self.heads not in HEAD_UNITS:
            raise SpecError(f"unknown head unit {self.heads!r}; choose {', '.join(HEAD_UNITS)}")


@dataclass
class StructureResult:
    """What :func:`prune_structure` removed."""

    structure: Structure
    method: str
    options: StructureOptions
    removed_blocks: list[int]
    widths: list[dict[str, int]]  # per remaining block: intermediate_size, num_attention_heads, ...
    params_before: int  # parameters of the blocks
    params_after: int
    seconds: float
    steps: tuple[str, ...] = ()
    block_scores: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # where rounding moved a fraction from the spec

    @property
    def removed_fraction(self) -> float:
        return 1 - self.params_after / max(1, self.params_before)

    @property
    def uniform(self) -> bool:
        return len({tuple(sorted(w.items())) for w in self.widths}) <= 1


def _head_unit(lay: Layout, choice: str) -> str:
    if choice != "auto":
        return choice
    return "group" if lay.group <= lay.kv_heads else "query"


def _view(block: nn.Module, lay: Layout, kind: str, unit: str, stats: Any, seed: int) -> UnitView:
    if kind == "mlp":
        prods = tuple(block.get_submodule(p).weight.detach().reshape(lay.width, 1, -1) for p in lay.producers)
        cons = block.get_submodule(lay.consumer).weight.detach()
        return UnitView(prods, cons.reshape(cons.shape[0], lay.width, 1), stats, seed)
    q = block.get_submodule(lay.q).weight.detach()
    o = block.get_submodule(lay.o).weight.detach()
    hd = lay.head_dim
    if unit == "query":
        return UnitView((q.reshape(lay.heads, hd, -1),), o.reshape(o.shape[0], lay.heads, hd), stats, seed)
    k = block.get_submodule(lay.k).weight.detach()
    v = block.get_submodule(lay.v).weight.detach()
    g = lay.kv_heads
    return UnitView((q.reshape(g, lay.group * hd, -1), k.reshape(g, hd, -1), v.reshape(g, hd, -1)),
                    o.reshape(o.shape[0], g, lay.group * hd), stats, seed)


def _units(lay: Layout, kind: str, unit: str, block: int) -> allocate.LayerUnits:
    if kind == "mlp":
        return allocate.LayerUnits(block, kind, lay.width)
    if unit == "query":
        return allocate.LayerUnits(block, kind, lay.heads, lay.kv_heads)
    return allocate.LayerUnits(block, kind, lay.kv_heads)


def _block_params(blocks: nn.ModuleList) -> int:
    return sum(p.numel() for b in blocks for p in b.parameters())


def _magnitude_block(block: nn.Module) -> float:
    ws = [m.weight.detach().float() for m in block.modules() if isinstance(m, nn.Linear)]
    return float(sum(w.pow(2).sum() for w in ws) / max(1, sum(w.numel() for w in ws)))


class _Pass:
    """One calibration pass: consumer statistics per block, and per-block input/output similarity."""

    def __init__(self, model: nn.Module, prefix: str, blocks: nn.ModuleList, needs: frozenset[str]) -> None:
        self.prefix, self.blocks, self.needs = prefix, blocks, needs
        self.stats: dict[str, Any] = {}
        self.influence: dict[int, float] = {}
        self.angular: dict[int, float] = {}

    def consumers(self) -> list[Target]:
        out = []
        for i, b in enumerate(self.blocks):
            lay = layout_of(b)
            for path in (lay.o, lay.consumer):
                out.append(Target(f"{self.prefix}.{i}.{path}", b.get_submodule(path)))
        return out

    def record(self, t: Target, stats: Any) -> None:
        self.stats[t.name] = stats

    def similarity(self, i: int, inputs: Sequence[tuple[Tensor, Any]], outputs: Sequence[Tensor]) -> None:
        bi = ang = 0.0
        n = 0
        for (x, _), y in zip(inputs, outputs):
            bi += float(allocate.influence(x, y).sum())
            ang += float(allocate.angular(x, y).sum())
            n += x.shape[0] * x.shape[1]
        self.influence[i], self.angular[i] = bi / max(1, n), ang / max(1, n)


def prune_structure(model: nn.Module, structure: Structure, method: str = "flap",
                    calib: Optional[Tensor] = None, *, options: StructureOptions = StructureOptions(),
                    steps: Sequence[StepRun] = (), device: str | torch.device = "cpu",
                    batch_size: Optional[int] = None, seed: int = 0,
                    progress: bool = True) -> StructureResult:
    """Remove ``structure`` from ``model`` in place, scoring units with the unit criterion ``method``.

    Args:
        model: a Llama-family decoder or BERT-family encoder (transformers).
        structure: what to remove (``Structure(mlp=0.3, heads=0.25, blocks=2)``).
        method: a unit criterion (``magnitude``, ``random``, ``wanda-sp``, ``flap``; ``prunus list``).
        calib: calibration token ids (n, seqlen); needed by activation-aware criteria, bias
            compensation, block steps, and the ``global``/``cfsp`` allocations with such criteria.
        options: allocation, head unit, compensation.
        steps: block steps run on each block once it is smaller (``reconstruct``).

    Returns:
        :class:`StructureResult`; the model's config records the new widths.
    """
    t0 = time.perf_counter()
    crit: UnitCriterion = get(method)
    prefix, blocks = find_blocks(model)
    layouts = [layout_of(b) for b in blocks]  # a ModelError now for an unknown architecture
    if structure.blocks >= len(blocks):
        raise SpecError(f"blocks@{structure.blocks} would remove all {len(blocks)} blocks")
    steps = tuple(s for s in steps if s.step.active(s.options))
    needs = crit.needs | ({"input_sum", "input_sq_norm"} if options.compensate else frozenset())
    widths_wanted = bool(structure.mlp or structure.heads)
    observe = (structure.blocks and crit.blocks == "influence") or options.allocation == "cfsp" or \
        (options.allocation == "global" and bool(crit.needs) and widths_wanted)
    calibrated = observe or (widths_wanted and (bool(needs) or bool(steps)))
    if calibrated and calib is None:
        raise DataError(f"structure method {method!r} with these options needs calibration data (--calib)")
    before = _block_params(blocks)
    obs = _Pass(model, prefix, blocks, needs)
    if observe:
        run_blockwise(model, calib, obs.consumers() if widths_wanted else [], needs if widths_wanted
                      else frozenset(), obs.record, device=device, batch_size=batch_size, seed=seed,
                      progress=progress, desc=f"{method} observe",
                      after_block=lambda i, b, mine, inp, dense: obs.similarity(i, inp, dense))

    removed: list[int] = []
    block_scores: list[float] = []
    if structure.blocks:
        if crit.blocks == "influence":
            block_scores = [obs.influence[i] for i in range(len(blocks))]
        elif crit.blocks == "magnitude":
            block_scores = [_magnitude_block(b) for b in blocks]
        else:
            block_scores = torch.rand(len(blocks), generator=generator(layer_seed(seed, "blocks"))).tolist()
        order = sorted(range(len(blocks)), key=lambda i: (block_scores[i], i))
        removed = sorted(order[:structure.blocks])
        _drop_blocks(blocks, removed)
    kept = [i for i in range(len(layouts)) if i not in removed]  # original index of each block now

    notes: list[str] = []
    if widths_wanted:
        notes = _widths(model, prefix, blocks, structure, crit, options, steps, needs, calib, obs, kept,
                        device=device, batch_size=batch_size, seed=seed, progress=progress)
    widths = record_structure(model, blocks, removed, layouts[0])
    return StructureResult(structure, method, options, removed, widths, before, _block_params(blocks),
                           time.perf_counter() - t0, tuple(s.name for s in steps), block_scores, notes)


def _notes(layers: Sequence[allocate.LayerUnits], counts: dict, ratio: dict[str, float],
           unit: dict[int, str], lays: Sequence[Layout]) -> list[str]:
    """One line per kind whose achieved fraction differs from the spec's, saying why."""
    out = []
    for kind in ("heads", "mlp"):
        mine = [l for l in layers if l.kind == kind]
        if not mine:
            continue
        got = sum(counts[l.key] for l in mine) / sum(l.units for l in mine)
        if abs(got - ratio[kind]) < 1e-9:
            continue
        if kind == "heads":
            lay, u = lays[mine[0].block], unit[mine[0].block]
            why = (f"{lay.heads} query heads in {lay.kv_heads} KV groups go a whole group at a time "
                   f"(--heads-unit group)" if u == "group" else
                   f"{lay.heads} query heads go in equal numbers from each of {lay.kv_heads} KV groups, "
                   f"each keeping at least one (--heads-unit query)")
        else:
            why = "whole channels, widths rounded to the multiple the spec after the structure needs"
        out.append(f"{kind}@{ratio[kind]:g}: removed {got:.3f} of the {kind} units: {why}")
    return out


def _drop_blocks(blocks: nn.ModuleList, removed: Sequence[int]) -> None:
    for i in sorted(removed, reverse=True):
        del blocks[i]
    for i, b in enumerate(blocks):  # the KV cache is indexed by layer_idx
        for m in b.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i


def _widths(model: nn.Module, prefix: str, blocks: nn.ModuleList, structure: Structure, crit: UnitCriterion,
            options: StructureOptions, steps: Sequence[StepRun], needs: frozenset[str],
            calib: Optional[Tensor], obs: _Pass, kept: list[int], *, device: Any, batch_size: Any,
            seed: int, progress: bool) -> list[str]:
    kinds = [k for k, r in (("heads", structure.heads), ("mlp", structure.mlp)) if r]
    ratio = {"mlp": structure.mlp, "heads": structure.heads}
    lays = [layout_of(b) for b in blocks]
    unit = {i: _head_unit(lay, options.heads) for i, lay in enumerate(lays)}
    layers = [_units(lay, k, unit[i], i) for i, lay in enumerate(lays) for k in kinds]
    if options.allocation == "uniform":
        counts = allocate.uniform_counts(layers, ratio)
    elif options.allocation == "cfsp":
        counts = allocate.cfsp_counts(layers, ratio, [obs.angular[j] for j in kept], options.cfsp_a)
    else:
        scores = {}
        for i, lay in enumerate(lays):
            for k in kinds:
                name = f"{prefix}.{kept[i]}.{lay.o if k == 'heads' else lay.consumer}"
                seed_i = layer_seed(seed, f"{prefix}.{i}.{k}")
                scores[(i, k)] = crit.score(_view(blocks[i], lay, k, unit[i], obs.stats.get(name), seed_i), None)
        counts = allocate.global_counts(layers, ratio, scores)
    counts = allocate.round_kept(counts, layers, "mlp", options.multiple)
    notes = _notes(layers, counts, ratio, unit, lays)

    def shrink(i: int, block: nn.Module, stats: dict[str, Any]) -> None:
        lay = layout_of(block)
        for k in kinds:
            path = lay.o if k == "heads" else lay.consumer
            st = stats.get(f"{prefix}.{i}.{path}")
            view = _view(block, lay, k, unit[i], st, layer_seed(seed, f"{prefix}.{i}.{k}"))
            lu = _units(lay, k, unit[i], i)
            keep = allocate.choose(crit.score(view, None), counts[(i, k)], lu.groups)
            if keep.numel() == lu.units:
                continue
            per = view.consumer.shape[2]
            gone = torch.ones(lu.units, dtype=torch.bool)
            gone[keep] = False
            cols = (gone.nonzero().reshape(-1)[:, None] * per + torch.arange(per)).reshape(-1)
            bias = None
            if options.compensate and st is not None and cols.numel():
                w = block.get_submodule(path).weight.detach()
                bias = w[:, cols].float() @ st.input_mean[cols].float()
            if k == "mlp":
                lay = remove_mlp(block, lay, keep, bias)
            elif unit[i] == "query":
                lay = remove_heads(block, lay, keep, (keep // lay.group).unique(), bias)
            else:
                q = (keep[:, None] * lay.group + torch.arange(lay.group)).reshape(-1)
                lay = remove_heads(block, lay, q, keep, bias)

    calibrated = bool(needs) or bool(steps)
    if not calibrated:
        for i, b in enumerate(blocks):
            shrink(i, b, {})
        return notes
    cur = _Pass(model, prefix, blocks, needs)

    def after(i: int, block: nn.Module, mine: Sequence[Target], inputs: Any, dense: Any) -> None:
        shrink(i, block, {t.name: cur.stats.get(t.name) for t in mine})
        if steps:
            targets = [Target(f"{prefix}.{i}.{n}", m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
            masks = {t.name: torch.ones_like(t.module.weight, dtype=torch.bool) for t in targets}
            ctx = BlockContext(i, block, targets, masks, inputs, dense)
            for s in steps:
                s.step.run(ctx, s.options)

    run_blockwise(model, calib, cur.consumers(), needs, cur.record, device=device,
                  batch_size=batch_size, seed=seed, progress=progress, desc=f"{crit.name} structure",
                  after_block=after, dense_stream=bool(steps))
    return notes
