"""Streaming one-shot pruning: a model larger than memory, pruned and evaluated one block at a time.

The model is a :class:`~prunus.io.lazy.LazyModel` (the skeleton on the meta device, the weights in
the shards). A streamed pass is the ordinary pipeline (:func:`prunus.oneshot.pipeline.prune_targets`
and its one calibration loop, :func:`prunus.oneshot.calibrate.run_blockwise`) with a
:class:`Streamer` as the loop's residency:

1. ``capturing``: the parts outside the blocks (embeddings, final norm, head) are read; the loop
   captures block 0's inputs of the calibration windows, the streamer those of the evaluation
   windows; the outside parts are written to the output (when saving) and freed.
2. for each block, ``enter`` reads its weights; the loop calibrates and prunes it (and runs the block
   steps); ``leave`` carries the evaluation windows' hidden states through the pruned block, writes
   it with its masks, and frees it.
3. the perplexity: the outside parts are read again and the model's own forward runs with every
   block replaced by a stub that hands back the last block's outputs (:func:`replay_perplexity`),
   so the final norm, the chunked head and the loss are exactly :func:`prunus.evaluate.perplexity`'s.

The memory held is one block, the outside parts during steps 1 and 3, and the activations
(calibration and evaluation windows at one block boundary). Every computation is the one the
in-memory run does on the same inputs, so masks, weights and perplexities are bit-identical to it
(same seed and thread count; ``tests/test_stream.py``). The dense perplexity is a streamed pass of its
own through :func:`run_blockwise` without targets.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from prunus.evaluate import perplexity
from prunus.io.heap import fixed_mmap_threshold, release_freed
from prunus.io.lazy import LazyModel
from prunus.oneshot.calibrate import Chunk, _block_output, capture_inputs, run_blockwise


class Streamer:
    """The residency of one streamed pass (see the module docstring).

    Args:
        lazy: the model.
        eval_windows: (k, seqlen) evaluation token ids carried through the pruned blocks; None: none.
        eval_batch_size: windows per forward, as :func:`perplexity` batches them.
        writer: a :func:`prunus.export.writer.stream_writer`, or None (nothing saved).
    """

    def __init__(self, lazy: LazyModel, *, eval_windows: Optional[Tensor] = None, eval_batch_size: int = 1,
                 writer: Any = None) -> None:
        self.lazy, self.writer = lazy, writer
        self.eval_windows, self.eval_batch_size = eval_windows, eval_batch_size
        self.eval_chunks: Optional[list[Chunk]] = None
        self.tuple_out: Optional[bool] = None  # whether a block returns a tuple (GPT-2) or a tensor
        self._hook: Any = None
        fixed_mmap_threshold()  # a freed block's tensors go back to the system (prunus.io.heap)

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        lazy = self.lazy
        outside = lazy.outside_refs()
        lazy.load(outside, "the embeddings and head")
        try:
            yield
            if self.eval_windows is not None:
                self.eval_chunks = capture_inputs(lazy.model, lazy.blocks, self.eval_windows,
                                                  self.eval_batch_size, lazy.device)
            if self.writer is not None:
                self.writer.add(lazy.model, lazy.state(outside), {}, lazy.tied())
        finally:
            lazy.free(outside)
            release_freed()

    def enter(self, index: int, block: nn.Module) -> None:
        self.lazy.load(self.lazy.block_refs(index), f"block {index}")
        if self.tuple_out is None:
            def seen(mod: nn.Module, args: Any, out: Any) -> None:
                self.tuple_out = isinstance(out, (tuple, list))
            self._hook = block.register_forward_hook(seen)

    def leave(self, index: int, block: nn.Module, masks: Optional[dict[str, Tensor]] = None,
              quant: Any = None) -> None:
        if self.eval_chunks is not None:
            with torch.inference_mode():
                for c in self.eval_chunks:
                    c.hidden = _block_output(block(c.hidden, **c.kwargs))
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        refs = self.lazy.block_refs(index)
        if self.writer is not None:
            self.writer.add(self.lazy.model, self.lazy.state(refs), masks or {}, self.lazy.tied())
        self.lazy.free(refs)
        release_freed()

    def finals(self) -> Optional[list[Tensor]]:
        """The last block's outputs on the evaluation windows, per batch (after the pass)."""
        return None if self.eval_chunks is None else [c.hidden for c in self.eval_chunks]


class _Replay(nn.Module):
    """Stands in for a block: hands back the last block's stored output of the current batch."""

    def __init__(self, state: dict, first: bool, real: nn.Module) -> None:
        super().__init__()
        self.state, self.first = state, first
        object.__setattr__(self, "_real", real)  # not a submodule: its weights stay out of the way

    def __getattr__(self, name: str) -> Any:  # what the model reads of its blocks (attention_type, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.first:
            self.state["batch"] += 1
        h = self.state["finals"][self.state["batch"]]
        return (h,) if self.state["tuple"] else h


def replay_perplexity(lazy: LazyModel, finals: Sequence[Tensor], windows: Tensor, *, batch_size: int,
                      tuple_out: bool, progress: bool, desc: str) -> float:
    """:func:`perplexity` of the streamed model whose last block gave ``finals`` (per batch of
    ``batch_size`` windows): its forward runs with stub blocks, the outside parts read for it."""
    blocks = lazy.blocks
    real = list(blocks)
    state = {"batch": -1, "finals": list(finals), "tuple": bool(tuple_out)}
    outside = lazy.outside_refs()
    lazy.load(outside, "the embeddings and head")
    try:
        for i in range(len(real)):
            blocks[i] = _Replay(state, i == 0, real[i])
        return perplexity(lazy.model, windows, batch_size=batch_size, device=str(lazy.device), progress=progress,
                          desc=desc)
    finally:
        for i, b in enumerate(real):
            blocks[i] = b
        lazy.free(outside)


def dense_perplexity(lazy: LazyModel, windows: Tensor, *, batch_size: int, progress: bool) -> float:
    """The dense model's perplexity, streamed: block by block over every window, then the head."""
    streamer = Streamer(lazy)
    finals = run_blockwise(lazy.model, windows, [], frozenset(), None, device=lazy.device, batch_size=batch_size,
                           progress=progress, desc="dense ppl", residency=streamer)
    return replay_perplexity(lazy, finals, windows, batch_size=batch_size, tuple_out=bool(streamer.tuple_out),
                             progress=progress, desc="dense ppl")
