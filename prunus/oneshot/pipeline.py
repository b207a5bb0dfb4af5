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

import prunus.budgets as alloc_mod
from prunus.algorithms import Method, Refiner, get_method, get_refiner
from prunus.core.options import build_options
from prunus.oneshot.calibrate import block_index, find_blocks, run_blockwise
from prunus.errors import DataError, ModelError, SparsityCheckError
from prunus.core.masks import check_divisible, n_pruned, pattern_violations, sparsity_of
from prunus.core.spec import NM, SparsitySpec
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

    def per_layer(self) -> dict[str, dict[str, Any]]:
        return {l.name: {"shape": list(l.shape), "target": round(l.target, 6),
                         "achieved": round(l.achieved, 6), "violations": l.violations}
                for l in self.layers}


def check_weights_finite(targets: Sequence[Target]) -> None:
    """Fail before any work if a targeted weight holds NaN or Inf, naming the layer."""
    for t in targets:
        w = t.get()
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise ModelError(f"layer {t.name} has {bad} NaN/Inf weight(s); prunus will not prune it")


def _layer_infos(targets: Sequence[Target], prefix: Optional[str], weights: bool,
                 outliers: Optional[dict[str, float]] = None) -> list[alloc_mod.LayerInfo]:
    out = []
    for t in targets:
        b = block_index(prefix, t.name) if prefix else None
        out.append(alloc_mod.LayerInfo(t.name, t.shape, t.get() if weights else None, b,
                                       None if outliers is None else outliers.get(str(b))))
    return out


def owl_outliers(model: nn.Module, targets: Sequence[Target], calib: Tensor, m: float, *,
                 device: str, batch_size: Optional[int], seed: int, progress: bool) -> dict[str, float]:
    """OWL's statistics pass on the dense model: per block, the share of Wanda scores above m * mean."""
    from prunus.budgets import owl_outlier_ratio
    from prunus.criteria import get as get_criterion

    wanda = get_criterion("wanda")
    prefix, _ = find_blocks(model)
    scores: dict[str, list[Tensor]] = {}

    def record(t: Target, stats: LayerStats) -> None:
        scores.setdefault(str(block_index(prefix, t.name)), []).append(wanda(t.get(), stats))

    run_blockwise(model, calib, targets, frozenset({"input_sq_norm"}), record, device=device,
                  batch_size=batch_size, seed=seed, progress=progress, desc="owl stats")
    return {b: owl_outlier_ratio(s, m) for b, s in scores.items()}


def _rounding_tolerance(spec: SparsitySpec, shape: tuple[int, int]) -> float:
    """How far a layer's mask may sit from its budget by rounding alone: one unit per row."""
    from prunus.core.spec import Block, Channel

    out_f, in_f = shape
    if isinstance(spec.pattern, Block):
        return spec.pattern.cols / in_f + 1e-9
    if isinstance(spec.pattern, Channel):
        return 1.0 / out_f + 1e-9
    return 1.0 / in_f + 1e-9


def _check(result_layers: list[LayerReport], spec: SparsitySpec, masks: dict[str, Tensor],
           budgets: dict[str, float]) -> float:
    """Fail loudly when a layer misses its budget or breaks the pattern (Wanda's check_sparsity)."""
    total = zeros = 0
    for l in result_layers:
        if l.violations:
            raise SparsityCheckError(f"layer {l.name}: {l.violations} groups break {spec.pattern}")
        keep = masks[l.name]
        mask_sparsity = 1.0 - float(keep.sum()) / keep.numel()
        tol = _rounding_tolerance(spec, l.shape)
        if abs(mask_sparsity - budgets[l.name]) > tol or l.achieved + 1e-9 < mask_sparsity:
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


def prune(model: nn.Module, spec: SparsitySpec, method: str = "wanda", calib: Optional[Tensor] = None,
          *, refine: Optional[str] = None, include: Sequence[str] = ("*",),
          exclude: Sequence[str] = DEFAULT_EXCLUDE, method_options: Any = None,
          refine_options: Any = None, allocation_options: Any = None, device: str = "cpu",
          batch_size: Optional[int] = None, seed: int = 0, progress: bool = True,
          reconstruct: Any = None) -> PruneResult:
    """Prune ``model`` in place to ``spec`` with ``method``; return masks and a per-layer report.

    Args:
        model: a PyTorch model; calibrated methods need a decoder-only transformer.
        spec: pattern, sparsity and layer budget.
        method: a registered method name (``prunus list``): magnitude, random, wanda, sparsegpt, ...
        calib: (n, seqlen) token ids for methods, refiners or allocations that need statistics.
        refine: optional refiner name (``dsnot``) applied to every layer after the method.
        include, exclude: FQN globs choosing the layers.
        method_options, refine_options, allocation_options: the option dataclasses (or mappings)
            of the method, refiner and allocation; None takes their defaults.
        device: where the blocks run during calibration (``cpu``, ``cuda``).
        batch_size: calibration windows per chunk; None processes all at once (one forward per block).
        seed: seeds random criteria and nothing else (calibration windows are chosen by the caller).
        progress: progress bars.
        reconstruct: :class:`~prunus.oneshot.steps.reconstruct.ReconstructOptions` (or a mapping of them) to tune
            each pruned block's kept weights towards the dense block's outputs; None: off.

    Returns:
        A :class:`PruneResult`; the model's weights are pruned in place.

    Raises:
        SpecError, ModelError, DataError: bad input, before the model is modified.
        SparsityCheckError: the achieved sparsity does not meet the spec (after pruning).
    """
    t0 = time.perf_counter()
    meth: Method = get_method(method)
    meth.check_pattern(spec.pattern)
    ref: Optional[Refiner] = get_refiner(refine) if refine else None
    if ref is not None and not isinstance(spec.pattern, ref.patterns):
        raise DataError(f"refiner {ref.name!r} does not support {spec.pattern}")
    allocation = alloc_mod.ALLOCATIONS[spec.allocation]
    m_opts = method_options if not isinstance(method_options, (dict, type(None))) else \
        build_options(meth.options, method_options, f"method {meth.name}")
    r_opts = None if ref is None else (refine_options if not isinstance(refine_options, (dict, type(None)))
                                       else build_options(ref.options, refine_options, f"refiner {ref.name}"))
    a_opts = allocation_options if not isinstance(allocation_options, (dict, type(None))) else \
        build_options(allocation.options, allocation_options, f"allocation {allocation.name}")

    targets = select(model, include, exclude)
    for t in targets:
        check_divisible(t.shape, spec.pattern, t.name)
    check_weights_finite(targets)
    needs = meth.needs | (ref.needs if ref else frozenset())
    from prunus.oneshot.steps.reconstruct import ReconstructOptions, reconstruct_block

    rec = reconstruct if not isinstance(reconstruct, dict) else \
        build_options(ReconstructOptions, reconstruct, "reconstruct")
    if rec is not None and rec.epochs == 0:
        rec = None
    if (needs or allocation.needs_outliers or rec is not None) and calib is None:
        what = meth.name if meth.needs else (ref.name if ref and ref.needs else
                                             spec.allocation if allocation.needs_outliers else "reconstruct")
        raise DataError(f"{what} needs calibration data (calib token windows)")
    if calib is not None and calib.ndim != 2:
        raise DataError(f"calibration windows must be (n, seqlen), got shape {tuple(calib.shape)}")

    # per-layer budgets
    prefix = find_blocks(model)[0] if (needs or allocation.needs_outliers or rec is not None) else None
    outliers = None
    if allocation.needs_outliers:
        prefix = find_blocks(model)[0]
        outliers = owl_outliers(model, targets, calib, a_opts.m, device=device,
                                batch_size=batch_size, seed=seed, progress=progress)
    budgets = alloc_mod.allocate(_layer_infos(targets, prefix, spec.allocation == "global", outliers),
                                 spec.sparsity, spec.allocation, a_opts)

    masks: dict[str, Tensor] = {}

    def prune_layer(t: Target, stats: LayerStats) -> None:
        w = t.get().float()  # (out, in)
        new_w, keep = meth.prune(w, stats, budgets[t.name], spec.pattern, m_opts, t.name)
        if ref is not None:
            new_w, keep = ref.refine(w, new_w, keep, stats, spec.pattern, r_opts, t.name)
        t.set((new_w * keep).to(t.get().dtype))
        masks[t.name] = keep.bool().cpu()

    after = None
    if rec is not None:
        def after(i, block, mine, inputs, wanted):  # noqa: ANN001
            reconstruct_block(block, mine, masks, inputs, wanted, rec)

    if needs or rec is not None:
        run_blockwise(model, calib, targets, needs, prune_layer, device=device, batch_size=batch_size,
                      seed=seed, progress=progress, desc=f"{meth.name} {spec}", after_block=after)
    else:
        with torch.no_grad():
            for t in tqdm(targets, desc=f"{meth.name} {spec}", unit="layer", disable=not progress,
                          leave=False):
                prune_layer(t, weight_only_stats(t.name, seed))

    layers = [LayerReport(t.name, t.shape, budgets[t.name], sparsity_of(t.get()),
                          pattern_violations(t.get(), spec.pattern)) for t in targets]
    achieved = _check(layers, spec, masks, budgets)
    return PruneResult(spec, meth.name, ref.name if ref else None, masks, layers, achieved,
                       time.perf_counter() - t0, budgets)
