"""Plans: which kernel each layer runs, decided by measuring, and applying one to a model.

:func:`plan_model` does this for every masked ``nn.Linear`` of a model and records a :class:`Plan`:
per layer the chosen kernel, or ``"dense"``, and why (the measured speedups). A kernel is kept only
if it beats dense by ``margin`` at *every* token count that matters, so a layer is never made
slower at the shapes it will run. :func:`apply_plan` swaps the chosen modules in place. A plan is
a frozen dataclass that round-trips through JSON and records the layers' names and shapes;
applying it to a model it does not fit raises a :class:`~prunus.kernels.KernelError`.

Example:
    >>> plan = plan_model(model, result.masks, tokens_list=[1], margin=1.1)
    >>> print(plan.table())
    >>> plan.save("plan.json")
    >>> apply_plan(model, Plan.load("plan.json"), result.masks)

Activation sparsity: a layer with an activation gate (:mod:`prunus.kernels.gating`) is planned
too, masked or not, and there every kernel -- dense and the kernels that skip zero inputs
included -- is timed on inputs with the gate's fraction of zeros (``LayerPlan.input_sparsity``).
A kernel that skips zero inputs runs decode only; ``LayerPlan.prefill`` records the layer's choice
on dense inputs (the same timings, those kernels left out), which longer calls keep
(:mod:`prunus.kernels.swap`). :func:`apply_plan` carries each layer's gate to its new module.

A checkpoint written by ``prunus export --runtime auto`` carries its plan in its metadata under
:data:`PLAN_KEY`; :func:`apply_stored_plan` applies it (this module loads no model).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from prunus.core.spec import Pattern, format_sparsity, parse_sparsity
from prunus.kernels.base import SparseLinear
from prunus.kernels.decide import decide as _decide, prefill_choice
from prunus.kernels.gating import gated_layers
from prunus.kernels.patterns import infer_pattern
from prunus.kernels.registry import KERNELS, KernelError, get_kernel, kernels_for, resolve_device
from prunus.kernels.swap import build_module, put
from prunus.kernels.timing import Timing, dtype_name, num_threads, time_linear

PLAN_FORMAT = "prunus-kernel-plan"
PLAN_VERSION = 1
PLAN_KEY = "kernel_plan"  # where a checkpoint's metadata holds its plan


@dataclass(frozen=True)
class LayerPlan:
    """The decision for one layer: ``kernel`` is a registered name or ``"dense"``."""

    name: str
    out_features: int
    in_features: int
    pattern: str  # format_sparsity(pattern, sparsity): parses back with spec.parse_sparsity
    sparsity: float
    kernel: str
    reason: str
    timings: tuple[Timing, ...] = ()
    quant: str = ""  # the layer's stored grid ("int8", "int4g64"); "" when stored as floats
    input_sparsity: float = 0.0  # its activation gate's fraction of zero inputs (0: no gate)
    prefill: str = ""  # a kernel that skips zero inputs: the choice on dense inputs, for prefill

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_sparsity(self.pattern)[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timings"] = [t.to_dict() for t in self.timings]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerPlan":
        return cls(str(d["name"]), int(d["out_features"]), int(d["in_features"]),
                   str(d["pattern"]), float(d["sparsity"]), str(d["kernel"]), str(d["reason"]),
                   tuple(Timing(**t) for t in d.get("timings", ())), str(d.get("quant", "")),
                   float(d.get("input_sparsity", 0.0)), str(d.get("prefill", "")))


@dataclass(frozen=True)
class Plan:
    """Which kernel each layer runs, measured on one device; serialisable to JSON."""

    device: str
    dtype: str
    threads: int
    tokens: tuple[int, ...]
    margin: float
    layers: tuple[LayerPlan, ...]
    torch_version: str = field(default_factory=lambda: torch.__version__)

    @property
    def kernels(self) -> dict[str, str]:
        """Layer name -> chosen kernel (``"dense"`` included)."""
        return {layer.name: layer.kernel for layer in self.layers}

    @property
    def sparse_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.kernel != "dense"]

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "device": self.device,
                "dtype": self.dtype, "threads": self.threads, "tokens": list(self.tokens),
                "margin": self.margin, "torch_version": self.torch_version,
                "layers": [layer.to_dict() for layer in self.layers]}

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        if not isinstance(d, Mapping):
            raise KernelError(f"malformed kernel plan: expected a JSON object, got "
                              f"{type(d).__name__} {str(d)[:40]!r}; re-export with prunus export")
        if d.get("format") != PLAN_FORMAT:
            raise KernelError(f"not a prunus kernel plan (format {d.get('format')!r})")
        if d.get("version") != PLAN_VERSION:
            raise KernelError(f"kernel plan version {d.get('version')!r} is not supported "
                              f"(expected {PLAN_VERSION})")
        try:
            return cls(str(d["device"]), str(d["dtype"]), int(d["threads"]),
                       tuple(int(t) for t in d["tokens"]), float(d["margin"]),
                       tuple(LayerPlan.from_dict(layer) for layer in d["layers"]),
                       str(d.get("torch_version", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise KernelError(f"malformed kernel plan (bad or missing field {str(e)[:60]}); re-export "
                              f"with prunus export") from None

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise KernelError(f"kernel plan is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise KernelError("kernel plan must be a JSON object")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        if not p.is_file():
            raise KernelError(f"kernel plan {str(p)!r} does not exist")
        return cls.from_json(p.read_text())

    def check(self, model: nn.Module) -> None:
        """Raise a KernelError naming the first layer of the plan that ``model`` does not have,
        or has with another shape."""
        for layer in self.layers:
            try:
                module = model.get_submodule(layer.name)
            except AttributeError:
                raise KernelError(f"plan does not match the model: layer {layer.name!r} is not in "
                                  f"it") from None
            if not isinstance(module, (nn.Linear, SparseLinear)):
                raise KernelError(f"plan does not match the model: {layer.name!r} is a "
                                  f"{type(module).__name__}, not a Linear")
            shape = (module.out_features, module.in_features)
            if shape != (layer.out_features, layer.in_features):
                raise KernelError(f"plan does not match the model: {layer.name!r} is "
                                  f"{layer.out_features}x{layer.in_features} in the plan but "
                                  f"{shape[0]}x{shape[1]} in the model")

    def table(self) -> str:
        """A text table: layer, shape, pattern, kernel, speedup per token count, reason."""
        head = f"{'layer':<40} {'shape':>11} {'pattern':>10} {'kernel':>9}  why"
        lines = [head, "-" * len(head)]
        for layer in self.layers:
            shape = f"{layer.out_features}x{layer.in_features}"
            lines.append(f"{layer.name:<40} {shape:>11} {layer.pattern:>10} {layer.kernel:>9}  "
                         f"{layer.reason}")
        return "\n".join(lines)


def _linear_layers(model: nn.Module, masks: Mapping[str, Tensor], qweights: Mapping[str, Any],
                   also: Sequence[str] = ()) -> list[tuple[str, nn.Linear]]:
    """The linears with a mask, those stored quantized (an int8 ``lm_head`` tied to the
    embedding included) and those named in ``also``, in model order."""
    found = {name: m for name, m in model.named_modules() if name in masks}
    found.update({name: m for name, m in model.named_modules()
                  if (name in qweights or name in also) and name not in found
                  and isinstance(m, (nn.Linear, SparseLinear))})
    for name in masks:
        if name not in found:
            raise KernelError(f"mask for {name!r} has no matching module in the model")
        if not isinstance(found[name], (nn.Linear, SparseLinear)):
            raise KernelError(f"{name!r} is a {type(found[name]).__name__}; sparse kernels replace "
                              f"nn.Linear only")
    return [(name, m) for name, m in model.named_modules() if name in found]  # model order


def plan_model(model: nn.Module, masks: Optional[Mapping[str, Tensor]], tokens_list: Sequence[int],
               margin: float = 1.1, *, device: str | torch.device = "cpu",
               kernels: Optional[Sequence[str]] = None, threads: Optional[int] = None,
               patterns: Optional[Mapping[str, Pattern]] = None, reuse: bool = True,
               repeats: int = 9, warmup: int = 2, min_sample_ms: float = 2.0, cold: bool = True,
               progress: Optional[Callable[[str], None]] = None,
               qweights: Optional[Mapping[str, Any]] = None, approximate: bool = False,
               also: Sequence[str] = (), input_major: bool = True) -> Plan:
    """Measure every masked linear layer and keep a sparse kernel only where it pays.

    Args:
        model: the (pruned) model; it is not modified.
        masks: layer name -> bool keep-mask (out, in), as returned by ``prunus.prune``.
        tokens_list: the token counts that matter (e.g. ``[1]`` for batch-1 decode).
        margin: a kernel must be at least this many times faster than dense at every count.
        device: where to measure (and later run).
        kernels: kernel names to consider; ``None``: every available applicable one.
        threads: thread count for the measurement (and recorded in the plan).
        patterns: layer name -> pattern; inferred from the mask where absent.
        reuse: layers with the same shape, pattern, sparsity (to 0.1%), bias and fraction of
            zero inputs (to 5%) share one measurement (a 30-block model has a handful of distinct
            layers, not 200).
        cold: time each call with the weights evicted from the cache (see :func:`time_linear`):
            a model's weights stream from memory at every decode step unless the whole model
            fits in the cache, and a warm loop over one small layer would flatter dense.
        progress: called with one line per measured layer.
        qweights: layer name -> stored :class:`~prunus.core.quant.QuantizedWeight`
            (:func:`prunus.export.load_quantized`): those layers are planned too (a mask is not
            needed) and the integer kernels serving their grid compete with the float ones.
        approximate: let the kernels that round the activation too (W8A8, ``exact=False``)
            compete; a plan then changes the model's numbers, which must be measured.
        also: more linears to plan, unpruned ones included (their mask: the non-zero weights).
            A float kernel can beat the dense GEMV at batch 1 even at sparsity 0 (the bitmap
            kernel does on SmolLM2's 49k x 576 output head), and the plan keeps it only then.
            Linears with an activation gate are always planned, on inputs with its fraction of
            zeros, with the kernels that skip zero inputs among the candidates.
        input_major: let the kernels that skip zero inputs compete for every layer (default), a
            layer without a gate timed on inputs without zeros: their input-major storage is also
            a dense-weight kernel, which on some CPUs streams faster than the row-major ones (on
            an AMD Zen 5, int8 SmolLM2 decodes 1.6x faster with them). False: only gated layers.

    Raises:
        KernelError: no masks nor quantized layers, a mask without a matching ``nn.Linear``, CUDA absent.
    """
    qweights = dict(qweights or {})
    masks = dict(masks or {})
    gates = gated_layers(model)
    also = list(also) + [n for n in gates if n not in also]
    if not masks and not qweights and not also:
        raise KernelError("the model has no masks: choosing kernels (runtime 'auto') needs the "
                          "keep-masks saved at prune time")
    dev = resolve_device(device)
    if margin <= 0:
        raise KernelError(f"margin must be > 0, got {margin}")
    tokens = tuple(int(t) for t in tokens_list)
    layers_out: list[LayerPlan] = []
    cache: dict[tuple, tuple[str, list[Timing]]] = {}
    dtype = None
    with num_threads(threads) as nt:
        for name, module in _linear_layers(model, masks, qweights, also):
            weight = module.weight.detach()
            dtype = dtype or weight.dtype
            qw = qweights.get(name)
            if qw is not None and tuple(qw.codes.shape) != tuple(weight.shape):
                raise KernelError(f"{name}: the stored quantized weight is {tuple(qw.codes.shape)} "
                                  f"but the layer is {tuple(weight.shape)}")
            mask = masks[name] if name in masks else qw.keep if qw is not None else weight != 0
            mask = mask.to(weight.device, torch.bool)
            if tuple(mask.shape) != tuple(weight.shape):
                raise KernelError(f"{name}: mask shape {tuple(mask.shape)} does not match weight "
                                  f"shape {tuple(weight.shape)}")
            pattern = (patterns or {}).get(name) or infer_pattern(mask)
            sparsity = 1.0 - float(mask.float().mean())
            out_f, in_f = weight.shape
            quant = None if qw is None else qw.quant
            zeros = gates.get(name, 0.0)
            names = [k.name for k in kernels_for((out_f, in_f), pattern, dev, weight.dtype,
                                                 quant=quant, approximate=approximate,
                                                 input_sparse=input_major or name in gates)]
            if kernels is not None:
                wanted = [get_kernel(k).name for k in kernels]
                names = [k for k in names if k in wanted]
            key = (out_f, in_f, str(pattern), round(sparsity, 3), module.bias is not None,
                   tuple(names), str(quant), round(zeros * 20) / 20)  # gates' zeros to 5%
            note = ""
            if reuse and key in cache:
                source, timings = cache[key]
                note = f" (timed on {source})"
            else:
                timings = time_linear(module, mask, tokens, dev, names, pattern=pattern,
                                      repeats=repeats, warmup=warmup,
                                      min_sample_ms=min_sample_ms, name=name,
                                      cold=cold, qweight=qw, approximate=approximate,
                                      input_sparsity=zeros) if names else []
                cache[key] = (name, timings)
            kernel, reason = _decide(timings, tokens, margin)
            prefill = prefill_choice(kernel, timings, tokens, margin)
            if prefill:
                reason += f" at {zeros:.0%} zero inputs; prefill {prefill}"
            layers_out.append(LayerPlan(name, out_f, in_f, format_sparsity(pattern, sparsity),
                                        round(sparsity, 6), kernel, reason + note,
                                        tuple(timings), "" if quant is None else str(quant),
                                        round(zeros, 6) if name in gates else 0.0, prefill))
            if progress is not None:
                progress(f"{name}: {kernel}: {reason}{note}")
    return Plan(dev.type, dtype_name(dtype or torch.float32), nt, tokens, float(margin),
                tuple(layers_out))


def apply_plan(model: nn.Module, plan: Plan, masks: Optional[Mapping[str, Tensor]] = None, *,
               strict: bool = False, qweights: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
    """Swap in place the layers the plan made sparse; returns layer name -> kernel applied.

    Args:
        model: the model the plan was made for (checked: names and shapes).
        plan: from :func:`plan_model` or :meth:`Plan.load`.
        masks: layer name -> keep-mask; a layer without one keeps its non-zero weights.
        strict: raise when a planned kernel is unavailable here; by default warn and keep the
            layer dense (a missing build must not make the model wrong or slower).
            A planned kernel that skips zero inputs takes the layer's ``prefill`` kernel for long
            calls, and a layer's activation gate moves to its new module (:mod:`prunus.kernels.swap`).
        qweights: layer name -> stored quantized weight, for the layers planned on an integer
            kernel (:func:`prunus.export.load_quantized`); without it such a layer is an error.
    """
    plan.check(model)
    if plan.device == "cuda":
        resolve_device("cuda")
    applied: dict[str, str] = {}
    for layer in plan.layers:
        if layer.kernel == "dense":
            continue
        module = model.get_submodule(layer.name)
        if isinstance(module, SparseLinear):
            applied[layer.name] = module.kernel
            continue
        if module.weight.device.type != plan.device:
            raise KernelError(f"{layer.name}: the plan was measured on {plan.device}, but the "
                              f"layer is on {module.weight.device.type}; load it on "
                              f"{plan.device}, or with runtime='dense' (decoded float weights, any "
                              f"device), or re-plan there with prunus export --device "
                              f"{module.weight.device.type}")
        spec = KERNELS.get(layer.kernel)
        if spec is None or not spec.available():
            msg = (f"{layer.name}: planned kernel {layer.kernel!r} is "
                   f"{'not registered' if spec is None else 'unavailable'} here"
                   f"{'' if spec is None else ' (' + spec.unavailable_reason() + ')'}")
            if strict:
                raise KernelError(msg)
            warnings.warn(msg + "; the layer stays dense" + (", from its decoded float weights"
                                                              if layer.quant else ""),
                          RuntimeWarning, stacklevel=2)
            continue
        qw = (qweights or {}).get(layer.name)
        if spec.quant is not None and qw is None:
            raise KernelError(f"{layer.name}: planned kernel {layer.kernel!r} computes with the "
                              f"stored integer weights, and none were given for this layer (load "
                              f"the checkpoint with prunus.load, or pass qweights=)")
        mask = None if masks is None else masks.get(layer.name)
        if mask is None and qw is not None:
            mask = qw.keep
        put(model, layer.name, build_module(module, layer.kernel, name=layer.name, mask=mask,
                                            pattern=layer.parsed_pattern, qweight=qw,
                                            prefill=layer.prefill))
        applied[layer.name] = layer.kernel
    return applied


def apply_stored_plan(model: nn.Module, metadata: Mapping[str, Any], masks: Mapping[str, Tensor],
                      qweights: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
    """Apply the kernel plan recorded in a checkpoint's metadata (none: nothing happens)."""
    if PLAN_KEY not in metadata:
        return {}
    plan = Plan.from_dict(metadata[PLAN_KEY])
    return apply_plan(model, plan, masks, qweights=qweights)


__all__ = ["PLAN_KEY", "LayerPlan", "Plan", "apply_plan", "apply_stored_plan", "plan_model"]
