"""Jobs as typed dataclasses, built from CLI flags or a YAML recipe plus dotted overrides.

This is the edge where strings become objects: sparsity strings become :class:`SparsitySpec`,
method and allocation names are checked against their registries, option mappings become the
registered option dataclasses. Library code below never sees a raw dict or an argparse namespace.

A recipe (``recipes/wanda_2of4.yaml``)::

    model: smollm2-135m
    method: wanda            # or a list: [wanda, sparsegpt]
    sparsity: "2:4"          # or a list: ["50%", "2:4"]
    calib: book:emma
    eval: book:pride
    nsamples: 32
    seqlen: 512

and ``prunus prune --recipe recipes/wanda_2of4.yaml method=sparsegpt method_options.blocksize=64``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from prunus.core.options import build_options
from prunus.algorithms import get_method, get_refiner
from prunus.budgets import ALLOCATIONS
from prunus.errors import DataError, SpecError
from prunus.core.spec import SparsitySpec
from prunus.core.targets import DEFAULT_EXCLUDE

BASELINES = ("dense", "magnitude", "random")


@dataclass(frozen=True)
class PruneJob:
    """Everything ``prunus prune`` does, typed. Lists of methods and specs form a grid."""

    model: str
    methods: tuple[str, ...]
    specs: tuple[SparsitySpec, ...]
    calib: Optional[str] = None
    eval: Optional[str] = None
    refine: Optional[str] = None
    nsamples: int = 32
    seqlen: int = 512
    windows: Optional[int] = 64
    eval_batch_size: int = 1
    calib_batch_size: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    baselines: tuple[str, ...] = BASELINES
    method_options: Mapping[str, Any] = field(default_factory=dict)
    refine_options: Mapping[str, Any] = field(default_factory=dict)
    allocation_options: Mapping[str, Any] = field(default_factory=dict)
    reconstruct: Mapping[str, Any] = field(default_factory=dict)  # ReconstructOptions; empty: off
    out: Optional[str] = None
    format: str = "compressed"
    overwrite: bool = False
    json: Optional[str] = None
    plot: Optional[str] = None
    progress: bool = True


_INT_FIELDS = {"nsamples", "seqlen", "windows", "eval_batch_size", "calib_batch_size", "seed"}


def _as_list(v: Any) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    return [s.strip() for s in str(v).split(",") if s.strip()]


def job_from_mapping(d: Mapping[str, Any]) -> PruneJob:
    """Validate a flat mapping (recipe + overrides + flags) into a :class:`PruneJob`."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(PruneJob)} | {"method", "sparsity", "allocation"}
    if unknown := set(d) - known:
        raise SpecError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
    if not d.get("model"):
        raise SpecError("no model given: pass MODEL (a hub id, folder, .gguf file or smollm2-135m)")
    methods = tuple(_as_list(d.pop("method", None) or d.pop("methods", None) or "wanda"))
    sp = d.pop("sparsity", None)
    if sp is None:
        raise SpecError("no sparsity given: pass --sparsity (0.5, 50%, 2:4, 4x4@0.5, channel@0.3)")
    allocation = str(d.pop("allocation", None) or "uniform")
    items = sp if isinstance(sp, (list, tuple)) else _as_list(sp) if isinstance(sp, str) else [sp]
    specs = tuple(SparsitySpec.parse(s, allocation) for s in items)
    for m in methods:
        meth = get_method(m)
        build_options(meth.options, d.get("method_options"), f"method {m}")
        for s in specs:
            meth.check_pattern(s.pattern)
    if d.get("refine"):
        r = get_refiner(str(d["refine"]))
        build_options(r.options, d.get("refine_options"), f"refiner {r.name}")
    build_options(ALLOCATIONS[allocation].options, d.get("allocation_options"), f"allocation {allocation}")
    if d.get("reconstruct"):
        from prunus.oneshot.steps.reconstruct import ReconstructOptions

        if not isinstance(d["reconstruct"], Mapping):
            raise SpecError("reconstruct must be a mapping of options, e.g. {epochs: 4, lr: 1.0e-4}")
        build_options(ReconstructOptions, d["reconstruct"], "reconstruct")
    for k in _INT_FIELDS:
        if d.get(k) is not None:
            try:
                d[k] = int(d[k])
            except (TypeError, ValueError):
                raise SpecError(f"{k} must be an integer, got {d[k]!r}") from None
    if d.get("nsamples", 1) is not None and int(d.get("nsamples", 1)) < 1:
        raise DataError("--nsamples must be at least 1")
    if int(d.get("seqlen", 512)) < 2:
        raise DataError("--seqlen must be at least 2")
    if d.get("windows") is not None and int(d["windows"]) < 1:
        raise DataError("--windows must be at least 1")
    bl = tuple(_as_list(d.pop("baselines", BASELINES)))
    if bad := set(bl) - set(BASELINES):
        raise SpecError(f"unknown baseline(s) {sorted(bad)}; choose from {', '.join(BASELINES)}")
    fmt = d.get("format", "compressed")
    if fmt not in ("compressed", "dense"):
        raise SpecError(f"unknown format {fmt!r}; choose compressed or dense")
    if d.get("out") and (len(methods) > 1 or len(specs) > 1):
        raise SpecError("--out saves one model: give a single --method and --sparsity")
    for k in ("include", "exclude"):
        if k in d:
            d[k] = tuple(_as_list(d[k]))
    for k in ("method_options", "refine_options", "allocation_options"):
        d[k] = dict(d.get(k) or {})
    return PruneJob(methods=methods, specs=specs, baselines=bl, **d)
