"""The activation-method registry: a method is one file in :mod:`prunus.activation.methods`.

A method turns one block's calibration inputs into a gate per layer::

    from prunus.activation.registry import activation_method

    @activation_method("half", paper="...")
    def half(ctx, sparsity, options):               # ctx: prunus.activation.context.BlockCalibration
        return {n: ctx.gate(n, ctx.distribution(n, "exact").icdf(sparsity), "none") for n in ctx.names}

and is then ``prunus prune MODEL --activation-sparsity 0.3 --activation-method half`` and
``prunus.sparsify_activations(model, calib, 0.3, method="half")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from prunus.activation.gate import Gate
from prunus.core.options import NoOptions, build_options, option
from prunus.core.registry import discover, lookup
from prunus.errors import SpecError

Calibrate = Callable[[Any, float, Any], Mapping[str, Gate]]


@dataclass(frozen=True)
class ActivationMethod:
    """A registered activation method: ``calibrate(ctx, sparsity, options) -> {layer: Gate}`` per block."""

    name: str
    calibrate: Calibrate
    options: type = NoOptions
    paper: str = ""
    scale: str = "none"  # the score its gates use: none (|x|) or colnorm (|x| * ||W[:, j]||)


METHODS: dict[str, ActivationMethod] = {}
STREAMS = ("gated", "ungated")


def check_stream(stream: str) -> None:
    """A method's ``stream`` option: ``gated`` (each block is calibrated on what the gated blocks before
    it give, as at run time) or ``ungated`` (the model's own stream, as TEAL's and WINA's reference
    calibration does)."""
    if stream not in STREAMS:
        raise SpecError(f"activation option stream must be gated or ungated, got {stream!r}")


@dataclass(frozen=True)
class SampledOptions:
    """Options every built-in method shares: ``samples``, the values a layer's distribution is
    estimated from (0: all of them); ``stream``, see :func:`check_stream`."""

    samples: int = option(1 << 21, min=0)
    stream: str = "gated"  # the next block's calibration input: through this block's gates, or ungated

    def __post_init__(self) -> None:
        check_stream(self.stream)


@dataclass(frozen=True)
class GreedyOptions(SampledOptions):
    """TEAL's block-wise greedy allocation (false: every layer at the target), its step, and the
    calibration windows (and the last fraction of their positions) its block error is measured on."""

    greedy: bool = True
    step: float = option(0.1, gt=0, max=1)  # TEAL's base_step_size (its default 0.05; 0.1 halves the search)
    windows: int = option(1, min=1)
    last_fraction: float = option(1.0, gt=0, max=1)


def activation_method(name: str, *, options: type = NoOptions, paper: str = "",
                      scale: str = "none") -> Callable[[Calibrate], Calibrate]:
    """Register the decorated ``calibrate(ctx, sparsity, options)`` as activation method ``name``."""
    def deco(fn: Calibrate) -> Calibrate:
        METHODS[name] = ActivationMethod(name, fn, options, paper, scale)
        return fn
    return deco


def load_all() -> dict[str, ActivationMethod]:
    discover("prunus.activation.methods")
    return METHODS


def get(name: str) -> ActivationMethod:
    """The method called ``name``, or a SpecError listing the registered ones."""
    return lookup(load_all(), name, "activation method")


def options_for(name: str, values: Optional[Any]) -> Any:
    """The typed options of method ``name`` from a mapping (or an instance), range-checked."""
    return build_options(get(name).options, values, f"activation method {name}")
