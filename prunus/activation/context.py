"""What an activation method sees of one block: its layers' calibration inputs, and the block to rerun.

:meth:`BlockCalibration.collect` runs the block once on every calibration chunk with pre-hooks that
keep each layer's input (layers that read the same tensor, q/k/v and gate/up, share it), and keeps
the first ``windows`` windows and the block's outputs on them for :meth:`BlockCalibration.error`,
TEAL's objective: the block's output with the gates on against the output without them.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from prunus.activation.gate import Gate, GateHook, column_norms
from prunus.activation.histogram import Distribution, subsample
from prunus.core.stats import layer_seed
from prunus.core.targets import Target
from prunus.oneshot.calibrate import map_tensors

Chunk = tuple[Tensor, dict]


def block_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def take_windows(chunks: Sequence[Chunk], windows: int) -> list[Chunk]:
    """The first ``windows`` windows of the chunks (the last one cut, with the keyword tensors
    whose first dimension is that chunk's batch)."""
    out: list[Chunk] = []
    left = windows
    for hidden, kwargs in chunks:
        if left <= 0:
            break
        b = hidden.shape[0]
        if b <= left:
            out.append((hidden, kwargs))
        else:
            cut = map_tensors(kwargs, lambda t: t[:left] if t.ndim and t.shape[0] == b else t)
            out.append((hidden[:left], cut))
        left -= min(b, left)
    return out


class BlockCalibration:
    """One block's calibration inputs and its rerun; built by :meth:`collect`.

    Attributes:
        index: the block's number.
        block: the block module.
        layers: the block's gated layers, in module order.
        names: their names.
        seed: the run's seed (subsamples are seeded per layer from it).
        samples: how many values a distribution is estimated from (0: all).
    """

    def __init__(self, index: int, block: nn.Module, layers: Sequence[Target], inputs: dict[str, Tensor],
                 subset: list[Chunk], seed: int = 0, samples: int = 1 << 21) -> None:
        self.index, self.block, self.layers = index, block, list(layers)
        self.names = [t.name for t in self.layers]
        self._inputs = inputs
        self._subset = subset
        self._reference: Optional[list[Tensor]] = None
        self._batched: Optional[bool] = None  # whether stacking candidates along the batch works here
        self._norms: dict[str, Tensor] = {}
        self._dists: dict[tuple, Distribution] = {}
        self.seed, self.samples = seed, samples
        self.block_outputs: list[Tensor] = []  # the ungated block's outputs per chunk (from collect)

    @classmethod
    @torch.no_grad()
    def collect(cls, index: int, block: nn.Module, layers: Sequence[Target], chunks: Sequence[Chunk],
                windows: Optional[int] = None, seed: int = 0, samples: int = 1 << 21) -> "BlockCalibration":
        """Run ``block`` on every chunk, keeping each layer's input ((tokens, in), one tensor per
        distinct input); keep the first ``windows`` windows (all: None) for :meth:`error`."""
        parts: dict[str, list[Tensor]] = {t.name: [] for t in layers}
        owner: dict[str, str] = {}  # layer -> the first layer that read the same tensor
        outputs: list[Tensor] = []
        for hidden, kwargs in chunks:
            seen: dict[int, tuple[str, Tensor]] = {}

            def keep(name: str):
                def hook(module: nn.Module, args: tuple) -> None:
                    x = args[0]
                    if id(x) in seen and seen[id(x)][1] is x:
                        owner.setdefault(name, seen[id(x)][0])
                        return
                    seen[id(x)] = (name, x)
                    parts[name].append(x.detach().reshape(-1, x.shape[-1]))
                return hook

            handles = [t.module.register_forward_pre_hook(keep(t.name)) for t in layers]
            try:
                outputs.append(block_output(block(hidden, **kwargs)))
            finally:
                for h in handles:
                    h.remove()
        inputs: dict[str, Tensor] = {}
        for t in layers:
            src = owner.get(t.name, t.name)
            if src not in inputs:
                inputs[src] = torch.cat(parts[src]) if len(parts[src]) > 1 else parts[src][0]
            inputs[t.name] = inputs[src]
        subset = list(chunks) if windows is None else take_windows(chunks, windows)
        ctx = cls(index, block, layers, inputs, subset, seed, samples)
        ctx.block_outputs = outputs
        return ctx

    # ----------------------------------------------------------------- inputs and scores

    def input(self, name: str) -> Tensor:
        """The layer's calibration inputs, (tokens, in); shared by layers reading the same tensor."""
        return self._inputs[name]

    def numel(self, name: str) -> int:
        """The number of weights of the layer (what gating its inputs can skip)."""
        t = self.layers[self.names.index(name)]
        return t.shape[0] * t.shape[1]

    def norms(self, name: str) -> Tensor:
        """``||W[:, j]||_2`` of the layer's current weight, (in,)."""
        if name not in self._norms:
            self._norms[name] = column_norms(self.layers[self.names.index(name)].module).to(self.input(name).device)
        return self._norms[name]

    def scale_of(self, name: str, scale: str) -> Optional[Tensor]:
        return self.norms(name) if scale == "colnorm" else None

    def scores(self, name: str, scale: str) -> Tensor:
        """The layer's calibration scores, (tokens, in): ``|x|`` or ``|x| * ||W[:, j]||_2``."""
        s = self.input(name).abs().float()
        return s * self.norms(name) if scale == "colnorm" else s

    def distribution(self, name: str, kind: str, scale: str = "none", **kw: Any) -> Distribution:
        """The layer's input distribution (``binned``: TEAL's, of the signed inputs; ``exact``: of the
        scores), from at most :attr:`samples` values; shared by layers with the same input and
        ``scale="none"``."""
        key = (id(self.input(name)), kind, tuple(sorted(kw.items()))) if scale == "none" else (name, kind, scale)
        if key not in self._dists:
            seed = layer_seed(self.seed, name)
            if kind == "binned":
                self._dists[key] = Distribution.binned(subsample(self.input(name), self.samples, seed), **kw)
            else:
                self._dists[key] = Distribution.exact(subsample(self.scores(name, scale), self.samples, seed))
        return self._dists[key]

    def zeroed(self, name: str, threshold: float, scale: str) -> float:
        """The fraction of the layer's calibration inputs whose score is below ``threshold``."""
        if threshold <= 0:
            return 0.0
        return float((self.scores(name, scale) < threshold).float().mean())

    def gate(self, name: str, threshold: float, scale: str) -> Gate:
        """A :class:`Gate` at ``threshold`` with its calibrated sparsity measured here."""
        return Gate(threshold, self.zeroed(name, threshold, scale), scale)

    # ----------------------------------------------------------------- the block's output error

    @torch.no_grad()
    def outputs(self, thresholds: Mapping[str, float], scale: str = "none") -> list[Tensor]:
        """The block's outputs on the kept windows with the given layers gated at ``thresholds``."""
        handles = [t.module.register_forward_pre_hook(GateHook(thresholds[t.name], self.scale_of(t.name, scale)),
                                                      with_kwargs=True)
                   for t in self.layers if thresholds.get(t.name, 0.0) > 0]
        try:
            return [block_output(self.block(h, **kw)) for h, kw in self._subset]
        finally:
            for h in handles:
                h.remove()

    def error(self, thresholds: Mapping[str, float], scale: str = "none", last_fraction: float = 1.0) -> float:
        """TEAL's block error: the L2 norm over the last ``last_fraction`` of the positions of (gated
        output - ungated output), averaged over windows and hidden channels (``greedyopt.py``)."""
        return _error(self.reference(), self.outputs(thresholds, scale), last_fraction)

    def reference(self) -> list[Tensor]:
        """The block's ungated outputs on the kept windows."""
        if self._reference is None:
            self._reference = self.outputs({})
        return self._reference

    def errors(self, candidates: Sequence[Mapping[str, float]], scale: str = "none",
               last_fraction: float = 1.0) -> list[float]:
        """:meth:`error` of each set of thresholds, computed in one forward per window chunk with the
        candidates stacked along the batch (each copy gated by its own thresholds). The first call
        checks the stacked result against :meth:`error` of the first candidate and falls back to
        one forward per candidate when a model's block does not broadcast over the stacked batch."""
        if len(candidates) < 2 or self._batched is False:
            return [self.error(c, scale, last_fraction) for c in candidates]
        try:
            got = self._stacked(candidates, scale, last_fraction)
        except (RuntimeError, ValueError):
            got = None
        if self._batched is None:
            one = self.error(candidates[0], scale, last_fraction)
            self._batched = got is not None and abs(got[0] - one) <= 1e-5 * max(1.0, abs(one))
            if not self._batched:
                return [one] + [self.error(c, scale, last_fraction) for c in candidates[1:]]
        return got if got is not None else [self.error(c, scale, last_fraction) for c in candidates]

    @torch.no_grad()
    def _stacked(self, candidates: Sequence[Mapping[str, float]], scale: str, last_fraction: float) -> list[float]:
        k = len(candidates)
        handles = [t.module.register_forward_pre_hook(
            StackedGate(torch.tensor([float(c.get(t.name, 0.0)) for c in candidates]), self.scale_of(t.name, scale)),
            with_kwargs=True) for t in self.layers]
        try:
            outs = []
            for hidden, kwargs in self._subset:
                b = hidden.shape[0]
                rep = map_tensors(kwargs, lambda t: t.repeat(k, *[1] * (t.ndim - 1)) if b > 1 and t.ndim and
                                  t.shape[0] == b else t)
                out = block_output(self.block(hidden.repeat(k, *[1] * (hidden.ndim - 1)), **rep))
                if out.shape[0] != k * b:
                    raise ValueError("the block did not keep the stacked batch")
                outs.append(out.reshape(k, b, *out.shape[1:]))
        finally:
            for h in handles:
                h.remove()
        ref = self.reference()
        return [_error(ref, [o[i] for o in outs], last_fraction) for i in range(k)]


class StackedGate:
    """A pre-hook for ``k`` copies of the input stacked along the batch, each gated at its own
    threshold exactly as :func:`~prunus.activation.gate.gate_input` gates one."""

    def __init__(self, thresholds: Tensor, scale: Optional[Tensor]) -> None:
        self.thresholds, self.scale = thresholds, scale

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = args[0]
        k = self.thresholds.numel()
        xs = x.reshape(k, -1, x.shape[-1])
        score = xs.abs().float()
        if self.scale is not None:
            score = score * self.scale.to(device=x.device, dtype=torch.float32)
        thr = self.thresholds.to(x.device).view(k, 1, 1)
        return (xs.masked_fill(score < thr, 0.0).reshape(x.shape),) + tuple(args[1:]), kwargs


def _error(reference: Sequence[Tensor], outputs: Sequence[Tensor], last_fraction: float) -> float:
    norms = []
    for ref, new in zip(reference, outputs):
        start = int(new.shape[1] * (1 - last_fraction))
        norms.append(torch.norm(ref[:, start:] - new[:, start:], dim=1))
    return float((norms[0] if len(norms) == 1 else torch.cat(norms)).mean())
