"""One-shot pruning of a model, end to end: targets -> budgets -> calibrated pruning -> check.

This is the library entry point behind ``prunus.prune`` and ``prunus prune``. It takes typed
objects only (a :class:`~prunus.core.spec.SparsitySpec`, option dataclasses); strings are parsed by the
CLI and recipe loader before they get here.

Example:
    >>> spec = SparsitySpec.parse("2:4")
    >>> result = prune(model, spec, method="wanda", calib=windows)   # windows: (n, seqlen) token ids
    >>> result.sparsity                                               # achieved, over the targets
    0.5
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from prunus import budgets
from prunus.oneshot.calibrate import block_index, find_blocks, run_blockwise
from prunus.oneshot.embeddings import EMBEDDING_QUANT, embedding_quant, quantize_embeddings  # noqa: F401
from prunus.oneshot.plan import PrunePlan, make_plan
from prunus.oneshot.steps import BlockContext
from prunus.errors import DataError, ModelError, SparsityCheckError
from prunus.core.finite import check_finite
from prunus.core.masks import check_divisible, n_pruned, pattern_violations, sparsity_of
from prunus.core.quant import QuantizedWeight, check_quant_shape, off_grid, rtn
from prunus.core.spec import Block, Channel, Quant, SparsitySpec, Unstructured
from prunus.core.stats import LayerStats, weight_only_stats
from prunus.core.targets import DEFAULT_EXCLUDE, Target, select


@dataclass(frozen=True)
class LayerReport:
    """What happened to one layer."""

    name: str
    shape: tuple[int, int]
    target: float  # the layer's budget
    achieved: float  # fraction of exact zeros after pruning
    violations: int  # groups breaking the pattern (0 = valid)


@dataclass
class PruneResult:
    """The outcome of :func:`prune`.

    Attributes:
        masks: layer name -> bool keep mask (out, in), kept beside the weights.
        quant: with a ``spec.quant``, module fqn -> :class:`~prunus.core.quant.QuantizedWeight`
            whose ``dequantize()`` the module's weight now equals exactly: every target, and every
            ``nn.Embedding`` outside the targets (int8 per row, or the spec's int4 groups: see
            :func:`quantize_embeddings`).
        layers: per-layer reports in module order.
        sparsity: achieved sparsity over all targeted weights.
        seconds: wall time of calibration plus pruning.
    """

    spec: SparsitySpec
    method: str
    refine: Optional[str]
    masks: dict[str, Tensor]
    layers: list[LayerReport]
    sparsity: float
    seconds: float
    budgets: dict[str, float] = field(default_factory=dict)
    label: str = ""
    quant: dict[str, QuantizedWeight] = field(default_factory=dict)  # module fqn -> codes (spec.quant)
    structure: Any = None  # a prunus.structured StructureResult when the spec removed structure

    def per_layer(self) -> dict[str, dict[str, Any]]:
        return {l.name: {"shape": list(l.shape), "target": round(l.target, 6),
                         "achieved": round(l.achieved, 6), "violations": l.violations}
                for l in self.layers}


def _layer_infos(targets: Sequence[Target], prefix: Optional[str], weights: bool,
                 observed: Optional[dict[str, Any]] = None) -> list[budgets.LayerInfo]:
    out = []
    for t in targets:
        b = block_index(prefix, t.name) if prefix else None
        out.append(budgets.LayerInfo(t.name, t.shape, t.get() if weights else None, b,
                                     None if observed is None else observed.get(t.name)))
    return out


def observe_dense(model: nn.Module, targets: Sequence[Target], calib: Tensor, plan: PrunePlan, *,
                  device: str, batch_size: Optional[int], seed: int, progress: bool) -> dict[str, Any]:
    """A budget's statistics pass on the dense model: each layer's ``observe(weight, stats, options)``."""
    alloc, opts = plan.allocation, plan.allocation_options
    observed: dict[str, Any] = {}

    def record(t: Target, stats: LayerStats) -> None:
        observed[t.name] = alloc.observe(t.get(), stats, opts)

    run_blockwise(model, calib, targets, alloc.needs, record, device=device, batch_size=batch_size,
                  seed=seed, progress=progress, desc=f"{alloc.name} stats")
    return observed


def _rounding_tolerance(spec: SparsitySpec, shape: tuple[int, int]) -> float:
    """How far a layer's mask may sit from its budget by rounding alone: one unit per row."""
    out_f, in_f = shape
    if isinstance(spec.pattern, Block):
        return spec.pattern.cols / in_f + 1e-9
    if isinstance(spec.pattern, Channel):
        return 1.0 / out_f + 1e-9
    return 1.0 / in_f + 1e-9


def _check(result_layers: list[LayerReport], spec: SparsitySpec, mask_sparsity: dict[str, float],
           budgets: dict[str, float]) -> float:
    """Fail loudly when a layer misses its budget or breaks the pattern (Wanda's check_sparsity)."""
    total = zeros = 0
    for l in result_layers:
        if l.violations:
            raise SparsityCheckError(f"layer {l.name}: {l.violations} groups break {spec.pattern}")
        tol = _rounding_tolerance(spec, l.shape)
        if abs(mask_sparsity[l.name] - budgets[l.name]) > tol or l.achieved + 1e-9 < mask_sparsity[l.name]:
            raise SparsityCheckError(
                f"layer {l.name}: achieved sparsity {l.achieved:.4f} does not meet its budget "
                f"{budgets[l.name]:.4f}")
        n = l.shape[0] * l.shape[1]
        total += n
        zeros += l.achieved * n
    achieved = zeros / max(1, total)
    want = sum(budgets[l.name] * l.shape[0] * l.shape[1] for l in result_layers) / max(1, total)
    if achieved + max(_rounding_tolerance(spec, l.shape) for l in result_layers) < want:
        raise SparsityCheckError(f"achieved sparsity {achieved:.4f} is below the spec's {want:.4f}")
    return achieved


def _check_quant(targets: Sequence[Target], masks: dict[str, Tensor], quant: dict[str, QuantizedWeight],
                 spec: SparsitySpec) -> None:
    """Every target's weight is exactly its codes dequantized, with the pruning mask."""
    for t in targets:
        qw = quant.get(t.name)
        if qw is None or qw.quant != spec.quant or not torch.equal(qw.keep.cpu(), masks[t.name]):
            raise SparsityCheckError(f"layer {t.name}: no {spec.quant} codes matching its mask")
        if bad := off_grid(t.get(), qw):
            raise SparsityCheckError(f"layer {t.name}: {bad} weights are off the {spec.quant} grid")


def prune(model: nn.Module, spec: SparsitySpec, method: str = "wanda", calib: Optional[Tensor] = None,
          *, refine: Optional[str] = None, include: Sequence[str] = ("*",),
          exclude: Sequence[str] = DEFAULT_EXCLUDE, method_options: Any = None,
          refine_options: Any = None, allocation_options: Any = None, device: str = "cpu",
          batch_size: Optional[int] = None, seed: int = 0, progress: bool = True,
          reconstruct: Any = None, steps: Sequence[Any] = ()) -> PruneResult:
    """Prune ``model`` in place to ``spec`` with ``method``; return masks and a per-layer report.

    Args:
        model: a PyTorch model; calibrated methods need a decoder-only transformer.
        spec: pattern, sparsity and layer budget.
        method: a registered method name (``prunus list``): magnitude, random, wanda, sparsegpt, ...
        calib: (n, seqlen) token ids for methods, refiners, budgets or steps that need statistics.
        refine: optional refiner name (``dsnot``) applied to every layer after the method.
        include, exclude: FQN globs choosing the layers.
        method_options, refine_options, allocation_options: the option dataclasses (or mappings)
            of the method, refiner and allocation; None takes their defaults.
        device: where the blocks run during calibration (``cpu``, ``cuda``).
        batch_size: calibration windows per chunk; None processes all at once (one forward per block).
        seed: seeds random criteria and nothing else (calibration windows are chosen by the caller).
        progress: progress bars.
        reconstruct: :class:`~prunus.oneshot.steps.reconstruct.ReconstructOptions` (or a mapping of
            them): shorthand for the block step ``reconstruct``; None: off.
        steps: block steps run on each block after it is pruned: names, ``(name, options)`` pairs
            (options a mapping or the step's dataclass), in order (``prunus list`` shows them).

    Returns:
        A :class:`PruneResult`; the model's weights are pruned in place.

    Raises:
        SpecError, ModelError, DataError: bad input, before the model is modified.
        SparsityCheckError: the achieved sparsity does not meet the spec (after pruning).
    """
    all_steps = ([("reconstruct", reconstruct)] if reconstruct is not None else []) + list(steps)
    plan = make_plan(spec, method, refine=refine, method_options=method_options,
                     refine_options=refine_options, allocation_options=allocation_options, steps=all_steps)
    return prune_targets(model, select(model, include, exclude), plan, calib, device=device,
                         batch_size=batch_size, seed=seed, progress=progress)


def prune_targets(model: nn.Module, targets: Sequence[Target], plan: PrunePlan, calib: Optional[Tensor], *,
                  device: str = "cpu", batch_size: Optional[int] = None, seed: int = 0,
                  progress: bool = True, residency: Any = None) -> PruneResult:
    """Prune the given targets of ``model`` in place by a resolved :class:`PrunePlan`.

    ``residency`` (streaming, :class:`prunus.oneshot.stream.Streamer`): the weights are brought in
    block by block (``enter``) and handed over once the block is pruned (``leave(i, block, masks)``,
    the block's masks then leave the result); None: the model is in memory."""
    t0 = time.perf_counter()
    spec, meth, ref = plan.spec, plan.method, plan.refiner
    quant = spec.quant
    for t in targets:
        check_divisible(t.shape, spec.pattern, t.name)
        if quant is not None:
            check_quant_shape(t.shape, quant, t.name)
    check_finite(model)  # every tensor, pruned or not, named in the message
    if plan.calibrated and calib is None:
        raise DataError(f"{plan.needs_calibration_by()} needs calibration data (calib token windows)")
    if calib is not None and calib.ndim != 2:
        raise DataError(f"calibration windows must be (n, seqlen), got shape {tuple(calib.shape)}")

    # per-layer budgets
    prefix = find_blocks(model)[0] if plan.calibrated else None
    observed = None
    if plan.allocation.needs:
        observed = observe_dense(model, targets, calib, plan, device=device, batch_size=batch_size,
                                 seed=seed, progress=progress)
    budget = budgets.allocate(_layer_infos(targets, prefix, plan.allocation.reads_weights, observed),
                              spec.sparsity, spec.allocation, plan.allocation_options)
    del observed

    masks: dict[str, Tensor] = {}
    quantized: dict[str, QuantizedWeight] = {}
    # A method that quantizes itself does so when nothing changes its weights after it; otherwise
    # the kept weights are rounded to nearest after the refiner, or after the block steps.
    joint = quant is not None and meth.quantizes and ref is None and not plan.steps

    def prune_layer(t: Target, stats: LayerStats) -> None:
        w = t.get().float()  # (out, in)
        args = (w, stats, budget[t.name], spec.pattern, plan.method_options, t.name)
        if joint:
            new_w, keep, quantized[t.name] = meth.prune(*args, quant=quant)
        else:
            new_w, keep = meth.prune(*args)
        if ref is not None:
            new_w, keep = ref.refine(w, new_w, keep, stats, spec.pattern, plan.refine_options, t.name)
        if quant is not None and not joint and not plan.steps:
            quantized[t.name] = rtn(new_w * keep, keep, quant, t.name)
            new_w = quantized[t.name].dequantize()
        t.set((new_w * keep).to(t.get().dtype))
        masks[t.name] = keep.bool().cpu()

    after = None
    if plan.steps:
        def after(i, block, mine, inputs, wanted):  # noqa: ANN001
            ctx = BlockContext(i, block, mine, masks, inputs, wanted)
            for s in plan.steps:
                s.step.run(ctx, s.options)
            for t in mine if quant is not None else ():
                w = t.get()
                quantized[t.name] = qw = rtn(w.float(), masks[t.name].to(w.device), quant, t.name)
                t.set(qw.dequantize().to(w.dtype))

    reports: dict[str, LayerReport] = {}
    mask_sparsity: dict[str, float] = {}

    def report(t: Target) -> None:
        w, keep = t.get(), masks[t.name]
        reports[t.name] = LayerReport(t.name, t.shape, budget[t.name], sparsity_of(w),
                                      pattern_violations(w, spec.pattern))
        mask_sparsity[t.name] = 1.0 - float(keep.sum()) / keep.numel()

    stream = None if residency is None else _Handover(residency, model, targets, masks, quantized, report)
    if plan.needs or plan.steps:
        run_blockwise(model, calib, targets, plan.needs, prune_layer, device=device, batch_size=batch_size,
                      seed=seed, progress=progress, desc=f"{meth.name} {spec}", after_block=after,
                      residency=stream)
    elif stream is not None:
        stream.weights_only(lambda t: prune_layer(t, weight_only_stats(t.name, seed)))
    else:
        with torch.no_grad():
            for t in tqdm(targets, desc=f"{meth.name} {spec}", unit="layer", disable=not progress,
                          leave=False):
                prune_layer(t, weight_only_stats(t.name, seed))

    for t in targets if stream is None else ():
        report(t)
    layers = [reports[t.name] for t in targets]
    achieved = _check(layers, spec, mask_sparsity, budget)
    if quant is not None and stream is None:
        _check_quant(targets, masks, quantized, spec)
        solver = None
        if meth.quantizes and calib is not None:
            def solver(w: Tensor, stats: LayerStats, grid: Quant, name: str) -> QuantizedWeight:
                return meth.prune(w, stats, 0.0, Unstructured(), plan.method_options, name, quant=grid)[2]
        quantized.update(quantize_embeddings(model, targets, quant, solver=solver, calib=calib,
                                             batch_size=batch_size, device=device))
    return PruneResult(spec, meth.name, ref.name if ref else None, masks, layers, achieved,
                       time.perf_counter() - t0, budget, label=plan.label, quant=quantized)


class _Handover:
    """The calibration loop's residency over a streaming one: each block's layer reports are taken,
    and its masks handed to ``outer.leave``, before the block's weights go."""

    def __init__(self, outer: Any, model: nn.Module, targets: Sequence[Target], masks: dict[str, Tensor],
                 quantized: dict[str, QuantizedWeight], report: Any) -> None:
        self.outer, self.masks, self.quantized, self.report = outer, masks, quantized, report
        self.prefix, self.blocks = find_blocks(model)
        self.by_block: dict[int, list[Target]] = {}
        for t in targets:
            b = block_index(self.prefix, t.name)
            if b is None:
                raise ModelError(f"layer {t.name} is outside the transformer blocks ({self.prefix}.*), "
                                 f"which streaming does not prune: exclude it or use --load memory")
            self.by_block.setdefault(b, []).append(t)

    def capturing(self) -> Any:
        return self.outer.capturing()

    def enter(self, index: int, block: nn.Module) -> None:
        self.outer.enter(index, block)

    def leave(self, index: int, block: nn.Module) -> None:
        mine = self.by_block.get(index, [])
        for t in mine:
            self.report(t)
        self.outer.leave(index, block, {t.name: self.masks.pop(t.name) for t in mine},
                         {t.name: self.quantized.pop(t.name) for t in mine if t.name in self.quantized})

    def weights_only(self, prune_layer: Any) -> None:
        """Methods without calibration: block by block, each block's layers pruned from its weights."""
        with self.capturing():
            pass
        for i, block in enumerate(self.blocks):
            self.enter(i, block)
            with torch.no_grad():
                for t in self.by_block.get(i, []):
                    prune_layer(t)
            self.leave(i, block)
