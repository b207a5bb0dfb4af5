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

    steps: {reconstruct: {epochs: 4}}   # block steps run on each block after it is pruned
    activation: {sparsity: 0.25, method: teal}   # then activation thresholds, calibrated on the pruned model

and ``prunus prune --recipe recipes/wanda_2of4.yaml method=sparsegpt method_options.blocksize=64``.
``reconstruct: {epochs: 4}`` (and ``--reconstruct 4``) is shorthand for the block step ``reconstruct``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from prunus.activation.spec import ActivationSpec, activation_spec
from prunus.core.options import build_options, check, coerce, option
from prunus.core.spec import SparsitySpec
from prunus.core.targets import DEFAULT_EXCLUDE
from prunus.errors import SpecError
from prunus.export import format_names
from prunus.io.checks import check_device
from prunus.oneshot.plan import make_plan, make_steps
from prunus.oneshot.steps import StepRun
from prunus.structured.prune import StructureOptions
from prunus.structured.run import check_remainder_method, is_unit_criterion, structure_method_for

BASELINES = ("dense", "magnitude", "random", "weights-only", "uniform-activation")
# weights-only and uniform-activation are the baselines of an activation-sparse run: the same weights
# without activation sparsity, and with uniform magnitude thresholds at the same target


@dataclass(frozen=True)
class PruneJob:
    """Everything ``prunus prune`` does, typed. Lists of methods and specs form a grid.

    ``method_options`` pairs each method with its options dataclass; ``refine_options`` and
    ``allocation_options`` are the refiner's and budget's dataclasses (None: defaults); ``steps`` are
    the block steps of every method run (not of the baselines); ``activation``: activation thresholds
    calibrated after each method run (:mod:`prunus.activation`), or None.
    """

    model: str
    methods: tuple[str, ...]
    specs: tuple[SparsitySpec, ...]
    calib: Optional[str] = None
    eval: Optional[str] = None
    refine: Optional[str] = None
    nsamples: int = option(32, min=1)
    seqlen: int = option(512, min=2)
    windows: Optional[int] = option(64, min=1)
    sentences: int = option(256, min=1)  # an encoder's held-out evaluation sentences
    eval_batch_size: int = option(1, min=1)
    calib_batch_size: Optional[int] = option(None, min=1)
    seed: int = option(0, min=0)
    device: str = "cpu"
    dtype: str = "auto"  # the working dtype: auto (the checkpoint's), float32, bfloat16, float16
    load: str = "auto"  # stream (block by block from the shards), memory, or auto (stream where it can)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    baselines: tuple[str, ...] = BASELINES
    method_options: tuple[tuple[str, Any], ...] = ()
    refine_options: Any = None
    allocation_options: Any = None
    steps: tuple[StepRun, ...] = ()
    structure_method: Optional[str] = None
    structure_options: Any = None
    activation: Optional[ActivationSpec] = None
    out: Optional[str] = None
    format: str = "compressed"
    overwrite: bool = False
    json: Optional[str] = None
    plot: Optional[str] = None
    progress: bool = True

    def __post_init__(self) -> None:
        check(self, "")

    def options_of(self, method: str) -> Any:
        """The options dataclass of ``method`` in this job (None: its defaults)."""
        return dict(self.method_options).get(method)


_INT_FIELDS = {"nsamples", "seqlen", "windows", "sentences", "eval_batch_size", "calib_batch_size", "seed"}
_MAPPINGS = ("method_options", "refine_options", "allocation_options", "reconstruct", "steps", "structure",
             "activation")


def _as_list(v: Any) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    return [s.strip() for s in str(v).split(",") if s.strip()]


def _steps(d: dict) -> tuple[StepRun, ...]:
    """``reconstruct: {...}`` then ``steps: {name: {options}}`` (or a list of names), typed."""
    items: list[Any] = []
    rec = d.pop("reconstruct", None)
    if rec:
        if not isinstance(rec, Mapping):
            raise SpecError("reconstruct must be a mapping of options, e.g. {epochs: 4, lr: 1.0e-4}")
        items.append(("reconstruct", rec))
    st = d.pop("steps", None) or {}
    if isinstance(st, (list, tuple)) and all(isinstance(x, str) for x in st):
        st = {x: {} for x in st}
    if not isinstance(st, Mapping):
        raise SpecError("steps must map block-step names to their options, e.g. {reconstruct: {epochs: 4}}")
    for name, values in st.items():
        if values is not None and not isinstance(values, Mapping):
            raise SpecError(f"steps.{name} must be a mapping of options, got {values!r}")
        items.append((str(name), values))
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise SpecError(f"block step(s) given twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return make_steps(items)


def job_from_mapping(d: Mapping[str, Any]) -> PruneJob:
    """Validate a flat mapping (recipe + overrides + flags) into a :class:`PruneJob`."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(PruneJob)} | {"method", "sparsity", "allocation", "reconstruct",
                                                             "structure"}
    if unknown := set(d) - known:
        raise SpecError(f"unknown setting(s) {sorted(map(str, unknown))}; known: {sorted(known)}")
    if not d.get("model"):
        raise SpecError("no model given: pass MODEL (a hub id, folder, .gguf file or smollm2-135m)")
    given = d.pop("method", d.pop("methods", None))
    methods = tuple(_as_list("wanda" if given is None else given))
    if not methods or not all(isinstance(m, str) for m in methods):
        raise SpecError(f"--method needs one or more method names (prunus list), got {given!r}")
    sp = d.pop("sparsity", None)
    if sp is None:
        raise SpecError("no sparsity given: pass --sparsity (0.5, 50%, 2:4, 4x4@0.5, channel@0.3)")
    allocation = d.pop("allocation", None)
    allocation = "uniform" if allocation is None else coerce(allocation, str, "allocation")
    items = sp if isinstance(sp, (list, tuple)) else _as_list(sp) if isinstance(sp, str) else [sp]
    if not items:
        raise SpecError(f"--sparsity needs one or more specs (0.5, 50%, 2:4, ...), got {sp!r}")
    specs = tuple(SparsitySpec.parse(s, allocation) for s in items)
    for k in _MAPPINGS[:3]:
        if d.get(k) is not None and not isinstance(d[k], Mapping):
            raise SpecError(f"{k} must be a mapping of option: value, got {d[k]!r}")
    steps = _steps(d)
    structure_method, structure_options = _structure(d, specs, methods)
    activation = activation_spec(d.pop("activation", None))
    if activation is not None and not d.get("calib"):
        raise SpecError("--activation-sparsity needs --calib: the thresholds are calibrated on those windows")
    method_options, refine_options, allocation_options = [], None, None
    for m in methods:
        plan = None
        for s in specs:  # every run of the grid resolves now, so a bad option fails before loading
            if s.structure is not None:
                check_remainder_method(s, m)
                if not s.remainder:
                    continue
            plan = make_plan(s, m, refine=d.get("refine"), method_options=d.get("method_options"),
                             refine_options=d.get("refine_options"),
                             allocation_options=d.get("allocation_options"), steps=steps)
        if plan is not None:
            method_options.append((plan.method.name, plan.method_options))
            refine_options, allocation_options = plan.refine_options, plan.allocation_options
    hints = typing.get_type_hints(PruneJob)
    for k in _INT_FIELDS | {"out", "json", "plot", "calib", "eval", "refine", "device", "format", "model"}:
        if k in d:
            d[k] = coerce(d[k], hints[k], k)
    _dtype_and_load(d, specs)
    if d.get("device") is not None:
        check_device(d["device"])  # cuda without CUDA, tpu9: refused before the model is loaded
    for k in ("out", "json", "plot"):
        if d.get(k) is not None and not str(d[k]).strip():
            raise SpecError(f"--{k} needs a path, got an empty string")
    bl = tuple(_as_list(d.pop("baselines", BASELINES)))
    if bad := set(bl) - set(BASELINES):
        raise SpecError(f"unknown baseline(s) {sorted(bad)}; choose from {', '.join(BASELINES)}")
    fmt = d.get("format", "compressed")
    if fmt not in format_names():
        raise SpecError(f"unknown format {fmt!r}; choose {' or '.join(format_names())}")
    if d.get("out") and (len(methods) > 1 or len(specs) > 1):
        raise SpecError("--out saves one model: give a single --method and --sparsity")
    if d.get("out") and fmt == "dense" and any(s.structure is not None for s in specs) and \
            structure_options.allocation != "uniform":
        raise SpecError(f"--format dense is a plain transformers folder, and --structure-allocation "
                        f"{structure_options.allocation} gives layers of different widths, which stock "
                        f"transformers ignores (it builds every layer at the global width): use --format "
                        f"compressed (prunus.load rebuilds them) or --structure-allocation uniform")
    for k in ("include", "exclude"):
        if k in d:
            d[k] = tuple(_as_list(d[k]))
    for k in _MAPPINGS[:3]:
        d.pop(k, None)
    return PruneJob(methods=methods, specs=specs, baselines=bl, method_options=tuple(method_options),
                    refine_options=refine_options, allocation_options=allocation_options, steps=steps,
                    structure_method=structure_method, structure_options=structure_options,
                    activation=activation, **d)


LOADS = ("auto", "stream", "memory")


def _dtype_and_load(d: dict, specs: tuple[SparsitySpec, ...]) -> None:
    """``dtype`` to its canonical name (a quant spec needs float32: its grid is not bf16's), ``load``
    checked."""
    from prunus.io.dtypes import dtype_choice

    d["dtype"] = dtype_choice(coerce(d.get("dtype", "auto"), str, "dtype"))
    if d["dtype"] in ("bfloat16", "float16") and any(s.quant is not None for s in specs):
        raise SpecError(f"+int8/+int4 specs store weights on an integer grid that {d['dtype']} cannot hold "
                        f"exactly: use --dtype float32 (or auto on a float32 checkpoint)")
    d["load"] = str(coerce(d.get("load", "auto"), str, "load")).strip().lower()
    if d["load"] not in LOADS:
        raise SpecError(f"unknown load {d['load']!r}; choose {' | '.join(LOADS)}")


def _structure(d: dict, specs: tuple[SparsitySpec, ...], methods: tuple[str, ...]) -> tuple[Optional[str], Any]:
    """``structure: {method: flap, allocation: global, heads: auto, compensate: true}`` (or the
    flags ``--structure-method``, ``--structure-allocation``, ``--compensate``), typed."""
    raw = d.pop("structure", None) or {}
    if not isinstance(raw, Mapping):
        raise SpecError("structure must be a mapping, e.g. {method: flap, allocation: global, compensate: true}")
    raw = dict(raw)
    given = raw.pop("method", None)
    if d.get("structure_method") is not None:
        given = d.pop("structure_method")
    d.pop("structure_method", None)
    if d.get("structure_options") is not None:
        extra = d.pop("structure_options")
        if not isinstance(extra, Mapping):
            raise SpecError(f"structure_options must be a mapping, got {extra!r}")
        raw.update(extra)
    d.pop("structure_options", None)
    options = build_options(StructureOptions, raw, "structure")
    if given is not None:
        given = structure_method_for("", coerce(given, str, "structure method"))
    for m in methods:
        if is_unit_criterion(m) and m not in ("magnitude", "random"):
            for s in specs:
                if s.structure is None:
                    raise SpecError(f"{m!r} scores structures: give a structured spec (mlp@0.3, heads@0.25, "
                                    f"blocks@2), not {s}")
    return given, options
