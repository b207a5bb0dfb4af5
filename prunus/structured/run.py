"""A spec with structure, end to end: remove the structure, then prune what remains by the
one-shot pipeline (``mlp@0.25+2:4``: 25% of the MLP channels go, then 2:4 on every remaining linear).

This is what ``prunus prune --sparsity mlp@0.3`` and ``prunus.prune(model, "mlp@0.3+2:4", ...)`` run.
The structure's unit criterion is ``structure_method`` when given, else the method itself when it is
one (``--method flap``), else the method's structured counterpart (``wanda`` -> ``wanda-sp``,
``magnitude`` and ``random`` -> themselves), else ``flap``.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Optional, Sequence

from torch import Tensor, nn

from prunus.core.spec import NM, Block, SparsitySpec
from prunus.core.targets import DEFAULT_EXCLUDE, select
from prunus.errors import SpecError
from prunus.oneshot.pipeline import PruneResult, prune_targets
from prunus.oneshot.plan import PrunePlan
from prunus.oneshot.steps import StepRun
from prunus.structured.prune import StructureOptions, prune_structure
from prunus.structured.registry import UNIT_CRITERIA, get, load_all

_COUNTERPART = {"wanda": "wanda-sp"}


def is_unit_criterion(name: str) -> bool:
    return name in load_all()


def structure_method_for(method: str, given: Optional[str] = None) -> str:
    """The unit criterion that scores the structure of a run of ``method`` (module docstring)."""
    if given:
        return get(given).name
    load_all()
    if method in UNIT_CRITERIA:
        return method
    return _COUNTERPART.get(method, "flap")


def check_remainder_method(spec: SparsitySpec, method: str) -> None:
    """A structure criterion cannot prune the unstructured remainder of a spec."""
    from prunus.algorithms import METHODS, load_all as load_methods

    load_methods()
    if spec.remainder and method not in METHODS:
        raise SpecError(f"{method!r} scores structures only; {spec} also prunes or quantizes what remains: "
                        f"pass a one-shot method for that (--method sparsegpt --structure-method {method})")


def width_multiple(spec: SparsitySpec) -> int:
    """What the remainder of ``spec`` needs an MLP width to be a multiple of."""
    m = 1
    p = spec.pattern
    if isinstance(p, NM):
        m = p.m
    elif isinstance(p, Block):
        m = p.cols
    if spec.quant is not None and spec.quant.group:
        m = math.lcm(m, spec.quant.group)
    return m


def structured_label(smethod: str, options: StructureOptions, plan: Optional[PrunePlan],
                     steps: Sequence[StepRun]) -> str:
    label = smethod + ("+bias" if options.compensate else "")
    if plan is not None:
        return label if plan.label == smethod else f"{label}+{plan.label}"
    return label + "".join(s.step.label for s in steps)


def prune_with_structure(model: nn.Module, spec: SparsitySpec, structure_method: str,
                         plan: Optional[PrunePlan], calib: Optional[Tensor], *,
                         options: StructureOptions = StructureOptions(), steps: Sequence[StepRun] = (),
                         include: Sequence[str] = ("*",), exclude: Sequence[str] = DEFAULT_EXCLUDE,
                         device: str = "cpu", batch_size: Optional[int] = None, seed: int = 0,
                         progress: bool = True) -> PruneResult:
    """Remove ``spec.structure`` from ``model`` in place, then run ``plan`` (the remainder's plan, or
    None when the spec has nothing after the structure). Block steps run once, in the last pass."""
    if spec.structure is None:
        raise SpecError(f"{spec} has no structure (mlp@, heads@, blocks@)")
    if spec.remainder and plan is None:
        raise SpecError(f"{spec} prunes or quantizes after the structure: it needs a one-shot method")
    t0 = time.perf_counter()
    if options.multiple == 0:
        options = replace(options, multiple=width_multiple(spec))
    sres = prune_structure(model, spec.structure, structure_method, calib, options=options,
                           steps=() if plan is not None else steps, device=device,
                           batch_size=batch_size, seed=seed, progress=progress)
    if plan is not None:
        res = prune_targets(model, select(model, include, exclude), plan, calib, device=device,
                            batch_size=batch_size, seed=seed, progress=progress)
    else:
        res = PruneResult(spec, structure_method, None, {}, [], 0.0, 0.0)
    res.spec = spec
    res.structure = sres
    res.seconds = time.perf_counter() - t0
    res.label = structured_label(structure_method, options, plan, steps)
    return res


def check_dense_export(model: nn.Module, spec: SparsitySpec) -> None:
    """A plain transformers folder cannot hold an encoder without some of its heads: BERT derives the
    head size from the head count, so removed heads are per-layer entries it ignores."""
    from prunus.core.units import find_blocks, layout_of

    if spec.structure is None or not spec.structure.heads:
        return
    if layout_of(find_blocks(model)[1][0]).family == "encoder":
        raise SpecError("--format dense is a plain transformers folder, and an encoder without some of its "
                        "heads is not one (BERT derives the head size from the head count, so the new counts "
                        "are per-layer entries it ignores): use --format compressed (prunus.load rebuilds it)")


def structure_summary(res: Any) -> Optional[dict[str, Any]]:
    """JSON-ready facts about the structure a result removed (None without one)."""
    s = getattr(res, "structure", None)
    if s is None:
        return None
    return {"structure": str(s.structure), "method": s.method, "allocation": s.options.allocation,
            "compensate": s.options.compensate, "heads_unit": s.options.heads,
            "removed_blocks": s.removed_blocks, "block_params_before": s.params_before,
            "block_params_after": s.params_after, "removed_fraction": round(s.removed_fraction, 6),
            "uniform": s.uniform, "widths": s.widths, "seconds": round(s.seconds, 3), "notes": s.notes}
