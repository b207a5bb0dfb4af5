"""``prunus.prune``: one entry point for every spec, structured or not.

A spec without structure goes to :func:`prunus.oneshot.pipeline.prune`; one with ``mlp@``,
``heads@`` or ``blocks@`` parts to :func:`prunus.structured.run.prune_with_structure`, which removes
the structure and then prunes what remains with the same pipeline.

Example:
    >>> res = prune(model, "mlp@0.3", method="flap", calib=windows)          # doctest: +SKIP
    >>> res.structure.removed_fraction                                        # doctest: +SKIP
    0.225
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import Tensor, nn

from prunus.core.spec import SparsitySpec
from prunus.core.targets import DEFAULT_EXCLUDE
from prunus.oneshot import pipeline
from prunus.oneshot.pipeline import PruneResult


def prune(model: nn.Module, spec: SparsitySpec | str, method: str = "wanda", calib: Optional[Tensor] = None,
          *, structure_method: Optional[str] = None, structure_options: Any = None,
          include: Sequence[str] = ("*",), exclude: Sequence[str] = DEFAULT_EXCLUDE,
          reconstruct: Any = None, steps: Sequence[Any] = (), device: str = "cpu",
          batch_size: Optional[int] = None, seed: int = 0, progress: bool = True, **kw: Any) -> PruneResult:
    """Prune ``model`` in place to ``spec`` (a :class:`SparsitySpec` or its string).

    Args are those of :func:`prunus.oneshot.pipeline.prune`, plus, for structured specs,
    ``structure_method`` (a unit criterion: flap, wanda-sp, magnitude, random) and
    ``structure_options`` (:class:`prunus.structured.StructureOptions` or a mapping of it).
    """
    if not isinstance(spec, SparsitySpec):
        spec = SparsitySpec.parse(spec)
    if spec.structure is None:
        return pipeline.prune(model, spec, method, calib, include=include, exclude=exclude,
                              reconstruct=reconstruct, steps=steps, device=device, batch_size=batch_size,
                              seed=seed, progress=progress, **kw)
    from prunus.core.options import build_options
    from prunus.oneshot.plan import make_plan, make_steps
    from prunus.structured.prune import StructureOptions
    from prunus.structured.run import check_remainder_method, prune_with_structure, structure_method_for

    all_steps = make_steps(([("reconstruct", reconstruct)] if reconstruct is not None else []) + list(steps))
    check_remainder_method(spec, method)
    plan = make_plan(spec, method, steps=all_steps, **kw) if spec.remainder else None
    options = build_options(StructureOptions, structure_options, "structure")
    return prune_with_structure(model, spec, structure_method_for(method, structure_method), plan, calib,
                                options=options, steps=all_steps, include=include, exclude=exclude,
                                device=device, batch_size=batch_size, seed=seed, progress=progress)
