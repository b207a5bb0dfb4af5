"""The one layer-by-layer calibration runner (after Wanda and SparseGPT), written once.

A decoder-only transformer is processed block by block. The inputs of block 0 are captured by a
hook that stops the forward pass right there; each block then runs on the previous block's
(already pruned) outputs, so peak memory is the model plus one block's activations, and later
blocks see the errors of earlier ones, which their pruning then compensates.

Inside a block, hooks on every targeted linear collect the statistics the method ``needs`` from
that linear's real input and call ``on_layer(target, stats)``, which may rewrite the weight:

- *in-flight* (the calibration set fits in one chunk, the default for small models): the hook is a
  forward *pre*-hook, so each linear is pruned just before it computes, and the block's single
  forward pass both calibrates and produces the pruned outputs. Layers later in the block (o_proj,
  down_proj) are calibrated on inputs that already went through the pruned q/k/v and gate/up:
  SparseGPT's "true sequential" order, at the cost of one forward per block instead of two.
- *two-pass* (several chunks): every chunk is run once to accumulate statistics, all layers of the
  block are pruned, and every chunk is run again to produce the outputs (Wanda's and SparseGPT's
  reference loop).

*Asymmetric* statistics (``cross``, :data:`prunus.core.stats.DENSE_STATS`) compare each linear's input
in the pruned model with its input in the dense model on the same tokens. For those a second,
dense stream of hidden states runs beside the pruned one: each chunk first goes through the block
while it is still dense, recording every target's input, and the pruned pass then reads them. This
costs one more forward per block and, in-flight, the dense inputs of one block (about 210 MB for
SmolLM2-135M at 32 x 512 tokens).

No per-architecture code: the blocks are the model's largest ``nn.ModuleList`` of identical modules,
and whatever keyword arguments the model passes to its blocks (masks, rotary embeddings, position
ids) are captured and replayed. Llama/Mistral/Qwen2, OPT and GPT-2 are covered by tests, and so are
BERT-family encoders (``BertModel``, ``BertForMaskedLM``: bidirectional, no KV cache).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from prunus.errors import ModelError
from prunus.core.stats import DENSE_STATS, LayerStats, layer_seed
from prunus.core.capture import inputs_of
from prunus.core.targets import Target
from prunus.core.units import find_blocks  # noqa: F401  (re-exported: the loop's blocks)

OnLayer = Callable[[Target, LayerStats], None]
# after_block(index, block, its targets, per chunk (pruned-stream inputs, kwargs), per chunk dense outputs)
# -> None, or the block's outputs per chunk when it ran the block unchanged
AfterBlock = Callable[[int, nn.Module, Sequence[Target], Sequence[tuple[Tensor, dict]], Sequence[Tensor]],
                      Optional[list[Tensor]]]


class Residency(Protocol):
    """Where a model's weights are while :func:`run_blockwise` runs, when not all in memory."""

    def capturing(self) -> ContextManager[Any]: ...

    def enter(self, index: int, block: nn.Module) -> None: ...

    def leave(self, index: int, block: nn.Module) -> None: ...


@dataclass
class Chunk:
    """One batch of calibration activations at a block boundary.

    ``hidden`` is (batch, seq, hidden); ``kwargs`` are what the model passes to every block.
    """

    hidden: Tensor
    kwargs: dict[str, Any]


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside its tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _to(obj: Any, device: torch.device) -> Any:
    return map_tensors(obj, lambda t: t.to(device))


def _takes(fn: Any, name: str) -> bool:
    """Whether ``fn`` accepts the keyword ``name`` (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@torch.inference_mode()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, windows: Tensor, batch_size: int,
                   device: torch.device) -> list[Chunk]:
    """Run the model up to block 0 on ``windows`` (n, seqlen) and keep block 0's inputs per chunk.

    Decoders are called with ``use_cache=False`` (no KV cache is built); a model whose forward
    takes no such keyword (some encoders) is called without it. An encoder's attention mask (None
    for windows without padding), position ids and the like are captured and replayed like a
    decoder's.
    """
    sig = inspect.signature(blocks[0].forward)
    first = next(iter(sig.parameters))
    extra = {"use_cache": False} if _takes(model.forward, "use_cache") else {}
    block_cache = _takes(blocks[0].forward, "use_cache")
    captured: list[Chunk] = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        got = inputs_of(blocks[0], lambda: model(input_ids=ids, **extra))
        if got is None:
            raise ModelError("could not capture the inputs of the first block")
        # name every argument (GPT-2 passes the mask positionally) so blocks can be called by keyword
        named: dict[str, Any] = {}
        for k, v in sig.bind_partial(*got[0], **got[1]).arguments.items():
            if sig.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
                named.update(v)
            else:
                named[k] = v
        hidden = named.pop(first)
        for k in ("past_key_values", "past_key_value", "layer_past"):
            named.pop(k, None)
        if block_cache:
            named["use_cache"] = False
        captured.append(Chunk(hidden, named))
    return captured


class _Collector:
    """Forward pre-hooks that gather statistics for the targets of one block."""

    def __init__(self, targets: Sequence[Target], needs: frozenset[str], seed: int,
                 on_layer: Optional[OnLayer]) -> None:
        self.needs = needs
        self.stats = {t.name: LayerStats(seed=layer_seed(seed, t.name)) for t in targets}
        self.on_layer = on_layer
        self.targets = targets
        self._shared_x: Optional[Tensor] = None  # held, so identity cannot be reused by a new tensor
        self._shared: Optional[LayerStats] = None
        self.handles: list = []
        self.dense_inputs: dict[str, Tensor] = {}  # target -> its input in the dense model, this chunk

    def attach(self, in_flight: bool) -> None:
        for t in self.targets:
            self.handles.append(t.module.register_forward_pre_hook(self._hook(t, in_flight)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self._shared_x = self._shared = None

    def _hook(self, target: Target, in_flight: bool):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            dense = self.dense_inputs.get(target.name)
            if not in_flight:
                self.stats[target.name].add(x, self.needs, dense)
                return
            # q/k/v (and gate/up) read the same tensor: compute its statistics once
            if self._shared_x is not x:
                self._shared_x, self._shared = x, LayerStats()
                self._shared.add(x, self.needs, dense)
            shared = self._shared
            own = self.stats[target.name]
            own.tokens = shared.tokens
            own.input_sq_norm, own.input_sum = shared.input_sq_norm, shared.input_sum
            # shared, read-only: consumers must not modify them in place
            own.hessian, own.cross = shared.hessian, shared.cross
            if self.on_layer is not None:
                self.on_layer(target, own)
            self.stats[target.name] = LayerStats(seed=own.seed)  # free the statistics early
        return hook


def _block_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _dense_pass(block: nn.Module, targets: Sequence[Target], chunk: Chunk,
                hidden: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Run the (still dense) ``block`` on the dense stream's ``hidden``: the inputs of ``targets``,
    and the output."""
    got: dict[str, Tensor] = {}
    handles = [t.module.register_forward_pre_hook(lambda m, a, n=t.name: got.__setitem__(n, a[0]))
               for t in targets]
    try:
        out = _block_output(block(hidden, **chunk.kwargs))
    finally:
        for h in handles:
            h.remove()
    return got, out


def block_index(block_prefix: str, name: str) -> Optional[int]:
    """The block number in ``name`` (``model.layers.7.mlp.up_proj`` -> 7), or None."""
    head = block_prefix + "."
    if not name.startswith(head):
        return None
    idx = name[len(head):].split(".", 1)[0]
    return int(idx) if idx.isdigit() else None


@torch.inference_mode()
def run_blockwise(model: nn.Module, windows: Tensor, targets: Sequence[Target], needs: frozenset[str],
                  on_layer: Optional[OnLayer], *, device: str | torch.device = "cpu",
                  batch_size: Optional[int] = None, seed: int = 0, progress: bool = True,
                  desc: str = "calibrate", after_block: Optional[AfterBlock] = None,
                  dense_stream: bool = True, residency: Optional["Residency"] = None) -> list[Tensor]:
    """Run ``windows`` (n, seqlen) through the model block by block, calling ``on_layer`` per target.

    Args:
        model: a decoder-only transformer or an encoder (its blocks found by :func:`find_blocks`).
        windows: calibration token ids (n, seqlen).
        targets: layers to collect statistics for; every one must sit inside a block.
        needs: statistics to collect (names from ``prunus.core.stats.STAT_NAMES``).
        on_layer: called once per target with its statistics; may rewrite the weight in place.
            None runs the model without touching it (with ``after_block``, each block runs only
            for it: activation calibration, :mod:`prunus.activation`).
        device: where each block runs; the rest of the model stays where it is.
        batch_size: windows per chunk; None (default) puts all windows in one chunk (in-flight).
        seed: base seed for per-layer seeds in the statistics.
        progress: show a progress bar over blocks.
        after_block: called once per block after its targets are pruned, with the block's
            pruned-stream inputs and the dense block's outputs per chunk (a dense stream is kept
            for it); it may update the block (see :mod:`prunus.oneshot.steps.reconstruct`), whose outputs are
            then recomputed, or return the block's outputs per chunk when it ran the block as it stays.
        dense_stream: keep the dense stream for ``after_block`` (False: it gets None for the dense
            outputs, and each block runs once less).
        residency: where the weights live when they are not all in memory (streaming,
            :mod:`prunus.oneshot.stream`): ``capturing()`` wraps the capture of block 0's inputs,
            ``enter(i, block)`` brings block i's weights in before it runs, ``leave(i, block)`` is
            called once its outputs are computed (and it may free them). None: the model is in memory.

    Returns:
        The last block's outputs, per chunk.
    """
    device = torch.device(device)
    prefix, blocks = find_blocks(model)
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        b = block_index(prefix, t.name)
        if b is None:
            raise ModelError(f"layer {t.name} is outside the transformer blocks ({prefix}.*); "
                             f"exclude it or use a method that needs no calibration")
        by_block.setdefault(b, []).append(t)

    batch_size = batch_size or windows.shape[0]
    home = next(model.parameters()).device
    if device.type != "cpu" and residency is None:
        model.to(device)  # non-block parts go to the device for the capture; blocks follow one at a time
        blocks.to("cpu")
    with residency.capturing() if residency is not None else contextlib.nullcontext():
        chunks = capture_inputs(model, blocks, windows, batch_size, device)
    in_flight = len(chunks) == 1
    # the dense model's hidden states, per chunk, when a statistic compares against them
    want_inputs = bool(needs & DENSE_STATS) and on_layer is not None
    dense = [c.hidden for c in chunks] if (want_inputs or (after_block is not None and dense_stream)) else None
    bar = tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress, leave=False)
    for i in bar:
        if residency is not None:
            residency.enter(i, blocks[i])
        block = blocks[i].to(device)
        mine = by_block.get(i, [])
        col = _Collector(mine, needs, seed, on_layer)
        try:
            if in_flight:
                if dense is not None:
                    col.dense_inputs, dense[0] = _dense_pass(block, mine if want_inputs else [],
                                                             chunks[0], dense[0])
                col.attach(in_flight=True)
                if on_layer is not None or after_block is None:  # else nothing to prune: after_block's outputs
                    outs = [_block_output(block(c.hidden, **c.kwargs)) for c in chunks]
            else:
                for k, c in enumerate(chunks if mine or dense is not None else ()):  # else nothing to collect
                    if dense is not None:
                        col.dense_inputs, dense[k] = _dense_pass(block, mine if want_inputs else [],
                                                                 c, dense[k])
                    col.attach(in_flight=False)
                    block(c.hidden, **c.kwargs)
                    col.detach()
                col.dense_inputs = {}
                if on_layer is not None:
                    for t in by_block.get(i, []):
                        on_layer(t, col.stats[t.name])
                        col.stats[t.name] = LayerStats()
                if after_block is None:  # otherwise the outputs are computed once, after it
                    outs = [_block_output(block(c.hidden, **c.kwargs)) for c in chunks]
        finally:
            col.detach()
            col.dense_inputs = {}
        if after_block is not None:
            outs = None  # recomputed below; not held while the block is tuned
            outs = after_block(i, block, mine, [(c.hidden, c.kwargs) for c in chunks], dense)
            if outs is None:
                outs = [_block_output(block(c.hidden, **c.kwargs)) for c in chunks]
        for c, o in zip(chunks, outs):
            c.hidden = o
        if residency is not None:
            residency.leave(i, block)
        elif device.type != "cpu":
            blocks[i].to("cpu")
    outs = [c.hidden for c in chunks]
    del chunks
    if residency is None:
        model.to(home)
    return outs
