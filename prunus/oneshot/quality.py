"""How the runs of a ``prunus prune`` job are scored: one metric per model family, fixed data.

- A causal LM: perplexity over the first ``--windows`` windows of ``--seqlen`` tokens of ``--eval``
  (:func:`prunus.evaluate.perplexity`).
- An encoder (BERT, all-MiniLM-L6-v2; :func:`prunus.evaluate.uses_embeddings`): the mean cosine
  similarity of its sentence embeddings to the dense model's, over ``--sentences`` held-out
  sentences of ``--eval`` that do not occur in the ``--calib`` text
  (:func:`prunus.io.data.heldout_sentences`, :func:`prunus.evaluate.embedding_similarity`). The dense
  embeddings are computed once, before any run prunes the model.

Every run of a job is scored on the same data; :meth:`Quality.score` returns the row fields
(``perplexity`` or ``similarity``, and ``eval_seconds``).
"""

from __future__ import annotations

import time
from typing import Any, Optional

from torch import Tensor, nn

from prunus.errors import DataError
from prunus.evaluate import embedding_similarity, perplexity, sentence_embeddings, uses_embeddings
from prunus.oneshot.job import PruneJob

METRICS = ("perplexity", "similarity")


class Quality:
    """The evaluation data of one job and the metric that scores every run on it.

    Args:
        job: the job (``eval``, ``seqlen``, ``windows``, ``sentences``, batch size, device).
        model: the dense model, as loaded; for an encoder its embeddings become the reference.
        tokenizer: the model's tokenizer.
        calib_text: the calibration text; an encoder's held-out sentences avoid it.
    """

    def __init__(self, job: PruneJob, model: nn.Module, tokenizer: Any, calib_text: Optional[str]) -> None:
        from prunus.io import data

        self.job = job
        self.metric = "similarity" if uses_embeddings(model) else "perplexity"
        self.windows: Optional[Tensor] = None
        self.sentences: Optional[tuple[Tensor, Tensor]] = None
        self.reference: Optional[Tensor] = None
        if self.metric == "similarity":
            check_positions(model, job.seqlen)
        if not job.eval:
            return
        text = data.resolve_text(job.eval)
        if self.metric == "perplexity":
            self.windows = data.eval_windows(data.tokenize(text, tokenizer), job.seqlen, job.windows)
            return
        chosen = data.heldout_sentences(text, job.sentences, calib_text)
        self.sentences = data.encode_sentences(chosen, tokenizer, job.seqlen)
        self.reference = self._embed(model, "dense embeddings")

    @property
    def active(self) -> bool:
        return self.windows is not None or self.sentences is not None

    def describe(self) -> Optional[str]:
        """One log line on the evaluation data, or None without ``--eval``."""
        if self.windows is not None:
            return f"evaluation: {self.windows.shape[0]} windows x {self.windows.shape[1]} tokens from {self.job.eval}"
        if self.sentences is not None:
            ids, mask = self.sentences
            return (f"evaluation: embedding similarity to dense over {ids.shape[0]} held-out sentences "
                    f"({int(mask.sum())} tokens) from {self.job.eval}")
        return None

    def _embed(self, net: nn.Module, desc: str) -> Tensor:
        assert self.sentences is not None
        ids, mask = self.sentences
        return sentence_embeddings(net, ids, mask, batch_size=max(self.job.eval_batch_size, 32),
                                   device=self.job.device, progress=self.job.progress, desc=desc)

    def score(self, net: nn.Module, desc: str) -> dict[str, Any]:
        """``{"perplexity": ..., "similarity": ..., "eval_seconds": ...}`` of ``net`` (None where
        not measured)."""
        out: dict[str, Any] = {"perplexity": None, "similarity": None, "eval_seconds": None}
        t = time.perf_counter()
        if self.windows is not None:
            out["perplexity"] = perplexity(net, self.windows, batch_size=self.job.eval_batch_size,
                                           device=self.job.device, progress=self.job.progress, desc=f"{desc} ppl")
        elif self.sentences is not None and self.reference is not None:
            out["similarity"] = embedding_similarity(self._embed(net, f"{desc} embed"), self.reference)
        else:
            return out
        out["eval_seconds"] = time.perf_counter() - t
        return out


def summary(fields: dict[str, Any]) -> str:
    """``ppl 12.34`` / ``similarity 0.9876`` / '' for the log line of a run."""
    if fields.get("perplexity") is not None:
        return f"ppl {fields['perplexity']:.2f}"
    if fields.get("similarity") is not None:
        return f"similarity {fields['similarity']:.4f}"
    return ""


def check_positions(model: nn.Module, seqlen: int) -> None:
    """An encoder's learned position embeddings end at ``max_position_embeddings``: a longer
    ``--seqlen`` is refused before any work (it would index past the table)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise DataError(f"--seqlen {seqlen} is longer than the {limit} positions this encoder has: "
                        f"use --seqlen {limit} or less")
