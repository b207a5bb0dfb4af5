"""Structured pruning: remove whole heads, MLP channels and blocks, so the dense model gets smaller.

Specs (one parser, :mod:`prunus.core.spec`): ``mlp@0.3`` (30% of MLP intermediate channels),
``heads@0.25`` (25% of attention heads, GQA-aware), ``blocks@4`` (4 whole blocks), joined by ``+`` and
followed by any unstructured, N:M or quantization spec for what remains (``mlp@0.25+2:4+int8``).

Unit criteria (one file each in :mod:`prunus.structured.criteria`): ``magnitude`` and ``random``
(the baselines), ``wanda-sp`` and ``flap``. Allocations: ``uniform``, ``global`` (FLAP), ``cfsp``.

Example:
    >>> from prunus.core.spec import Structure
    >>> result = prune_structure(model, Structure(mlp=0.3), "flap", calib=windows)   # doctest: +SKIP
    >>> result.removed_fraction                                                       # doctest: +SKIP
    0.225
"""

from prunus.structured.prune import StructureOptions, StructureResult, prune_structure
from prunus.structured.registry import UNIT_CRITERIA, UnitView, get, load_all, unit_criterion

__all__ = ["StructureOptions", "StructureResult", "prune_structure", "UNIT_CRITERIA", "UnitView", "get",
           "load_all", "unit_criterion"]
