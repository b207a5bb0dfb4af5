"""Calibrate activation thresholds through the one calibration loop, and attach them.

:func:`calibrate_activations` runs :func:`prunus.oneshot.calibrate.run_blockwise` over the
calibration windows with a block step that, for each block, collects its layers' inputs
(:class:`~prunus.activation.context.BlockCalibration`) and asks the method for a gate per layer.
The stream between blocks runs through each block's new gates (the method option ``stream=gated``,
the default: later blocks are calibrated on what they will see) or not (``ungated``, as TEAL's and
WINA's references calibrate), and the whole pass runs after any weight pruning, so thresholds and
WINA's column norms see the final weights. Layers that cannot be gated (not an ``nn.Linear`` or prunus kernel layer, or outside the
transformer blocks) stay dense and are listed in :attr:`ActivationResult.dense`.

Example:
    >>> res = sparsify_activations(model, calib, 0.25, method="teal")   # doctest: +SKIP
    >>> prunus.save(model, "runs/teal25", metadata=res.metadata())     # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from prunus.activation.context import BlockCalibration, block_output
from prunus.activation.gate import ACT_KEY, Gate, attach_gates, detach_gates, gates_of, servable
from prunus.activation.registry import get, options_for
from prunus.activation.store import gates_metadata
from prunus.core.spec import parse_activation_sparsity
from prunus.core.targets import DEFAULT_EXCLUDE, Target, select
from prunus.errors import DataError, ModelError
from prunus.oneshot.calibrate import block_index, find_blocks, run_blockwise


@dataclass
class ActivationResult:
    """The gates of one calibration.

    Attributes:
        method: the activation method.
        target: the activation sparsity asked for.
        gates: layer name -> :class:`Gate`, in module order.
        dense: layer name -> why it stays dense (it cannot be gated).
        seconds: wall time of the calibration.
    """

    method: str
    target: float
    gates: dict[str, Gate]
    dense: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        """``{ACT_KEY: ...}`` for :func:`prunus.save`'s ``metadata`` (what :func:`prunus.load` reads back)."""
        return {ACT_KEY: gates_metadata(self.method, self.target, self.gates)}

    def notes(self) -> list[str]:
        """One line per reason layers stay dense."""
        by: dict[str, list[str]] = {}
        for name, why in self.dense.items():
            by.setdefault(why, []).append(name)
        return [f"activation sparsity: {len(names)} layer(s) stay dense ({why}): {', '.join(names[:4])}"
                + (", ..." if len(names) > 4 else "") for why, names in by.items()]


def split_servable(model: nn.Module, targets: Sequence[Target]) -> tuple[list[Target], dict[str, str]]:
    """The targets a gate can serve (linears inside the transformer blocks), and why the rest cannot."""
    dense: dict[str, str] = {}
    try:
        prefix: Optional[str] = find_blocks(model)[0]
    except ModelError:
        prefix = None
    keep = []
    for t in targets:
        if not servable(t.module):
            dense[t.name] = f"a {type(t.module).__name__} is not an nn.Linear or prunus kernel layer"
        elif prefix is None or block_index(prefix, t.name) is None:
            dense[t.name] = "outside the transformer blocks the calibration runs through"
        else:
            keep.append(t)
    return keep, dense


def calibrate_activations(model: nn.Module, calib: Optional[Tensor], targets: Sequence[Target], sparsity: float,
                          method: str = "teal", options: Any = None, *, device: str = "cpu",
                          batch_size: Optional[int] = None, seed: int = 0,
                          progress: bool = True) -> ActivationResult:
    """Thresholds for ``targets`` of ``model`` at activation ``sparsity`` by ``method``; attaches nothing.

    Args:
        model: the model, its weights final (pruned, quantized).
        calib: (n, seqlen) calibration token ids.
        targets: the layers to gate (those that cannot be gated are reported in ``dense``).
        sparsity: the target fraction of zeroed inputs, in [0, 1) (per block, weighted by the layers'
            weight counts for the greedy methods; per layer for ``uniform``).
        method: a registered activation method (``teal``, ``wina``, ``uniform``).
        options: the method's options (dataclass or mapping); None: defaults.
        device, batch_size, seed, progress: as for :func:`prunus.prune`.

    Raises:
        SpecError: a sparsity outside [0, 1), an unknown method or option.
        DataError: no calibration windows.
    """
    t0 = time.perf_counter()
    sparsity = parse_activation_sparsity(sparsity)
    entry = get(method)
    opts = options_for(method, options)
    if calib is None:
        raise DataError(f"activation method {method} needs calibration data (calib token windows, --calib)")
    if calib.ndim != 2:
        raise DataError(f"calibration windows must be (n, seqlen), got shape {tuple(calib.shape)}")
    previous = gates_of(model)  # gates already on the model would change what the layers see
    detach_gates(model)
    try:
        res = _calibrate(model, calib, targets, sparsity, entry, opts, device, batch_size, seed, progress)
    finally:
        if previous:
            attach_gates(model, previous)
    res.seconds = time.perf_counter() - t0
    return res


def _calibrate(model: nn.Module, calib: Tensor, targets: Sequence[Target], sparsity: float, entry: Any,
               opts: Any, device: str, batch_size: Optional[int], seed: int, progress: bool) -> ActivationResult:
    gated, dense = split_servable(model, targets)
    gates: dict[str, Gate] = {}
    windows = getattr(opts, "windows", None) if getattr(opts, "greedy", False) else 0
    samples = getattr(opts, "samples", 1 << 21)

    def step(i: int, block: nn.Module, mine: Sequence[Target], inputs: Any, _dense: Any) -> Optional[list[Tensor]]:
        if not mine:
            return None
        ctx = BlockCalibration.collect(i, block, mine, inputs, windows, seed=seed, samples=samples)
        got = entry.calibrate(ctx, sparsity, opts)
        mine_gates = {t.name: got[t.name] for t in mine}
        gates.update(mine_gates)
        if getattr(opts, "stream", "ungated") == "ungated":
            return ctx.block_outputs  # the block ran as it stays: its outputs go on
        del ctx
        attach_gates(model, mine_gates)  # the next block sees this one's gated outputs, as at run time
        try:
            with torch.no_grad():
                return [block_output(block(h, **kw)) for h, kw in inputs]
        finally:
            detach_gates(block)

    if gated:
        run_blockwise(model, calib, gated, frozenset(), None, device=device, batch_size=batch_size, seed=seed,
                      progress=progress, desc=f"{entry.name} activations", after_block=step, dense_stream=False)
    order = {t.name: i for i, t in enumerate(targets)}
    gates = dict(sorted(gates.items(), key=lambda kv: order[kv[0]]))
    return ActivationResult(entry.name, sparsity, gates, dense)


def sparsify_activations(model: nn.Module, calib: Optional[Tensor], sparsity: float, method: str = "teal", *,
                         options: Any = None, include: Sequence[str] = ("*",),
                         exclude: Sequence[str] = DEFAULT_EXCLUDE, device: str = "cpu",
                         batch_size: Optional[int] = None, seed: int = 0, progress: bool = True) -> ActivationResult:
    """Calibrate activation thresholds for the layers ``include``/``exclude`` choose and attach them
    to ``model`` (:func:`calibrate_activations`, then :func:`~prunus.activation.gate.attach_gates`);
    this is :func:`prunus.sparsify_activations`. Save them with ``prunus.save(model, path,
    metadata=result.metadata())``; :func:`prunus.load` attaches them again."""
    res = calibrate_activations(model, calib, select(model, include, exclude), sparsity, method, options,
                                device=device, batch_size=batch_size, seed=seed, progress=progress)
    attach_gates(model, res.gates)
    return res
