"""Quality and cost measurements: perplexity, embedding similarity, peak memory, FLOPs.

Perplexity follows the convention of the Wanda/SparseGPT papers: non-overlapping windows of
``seqlen`` tokens, each scored independently, ``exp`` of the mean next-token negative
log-likelihood over every predicted token (``seqlen - 1`` per window).

An encoder (a model that cannot generate: BERT, MiniLM) has no next-token loss; it is scored by
how close its sentence embeddings stay to the dense model's (:func:`embedding_similarity`): the
mean cosine similarity, over held-out sentences, of the mean-pooled, L2-normalised last hidden
states, which is how sentence-transformers embeds with all-MiniLM-L6-v2 (Reimers and Gurevych
2019, "Sentence-BERT"). 1.0 means the same embeddings; pruning the model lowers it.
"""

from __future__ import annotations

import math
import resource
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from prunus.core.targets import Target


# configs whose causal-LM head does more than a plain linear map (soft-capping, scaling): these get
# the full logits from the model's own forward instead of the chunked head below
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _nll_chunked(model: nn.Module, ids: Tensor, chunk: int) -> Optional[tuple[float, int]]:
    """Summed next-token NLL computing the output head ``chunk`` positions at a time, or None.

    The full (batch, seqlen, vocab) logits of a 49k-vocabulary model are 100 MB per 512-token window
    in float32, twice over in the loss; the hidden states are 30x smaller. The head's input is
    captured by a pre-hook that stops the forward there, and the head is applied slice by slice.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    if not isinstance(head, nn.Linear) or any(getattr(cfg, a, None) for a in _HEAD_EXTRAS):
        return None
    from prunus.core.capture import inputs_of

    got = inputs_of(head, lambda: model(input_ids=ids, use_cache=False))
    h = got[0][0] if got and got[0] else None
    if h is None or h.shape[:2] != ids.shape:
        return None
    nll, T = 0.0, ids.shape[1]
    for s in range(0, T - 1, chunk):
        e = min(s + chunk, T - 1)
        logits = head(h[:, s:e])  # (b, e - s, vocab)
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                     ids[:, s + 1:e + 1].reshape(-1), reduction="sum"))
    return nll, ids[:, 1:].numel()


@torch.inference_mode()
def perplexity(model: nn.Module, windows: Tensor, *, batch_size: int = 1, device: str = "cpu",
               progress: bool = True, desc: str = "perplexity", head_chunk: int = 128) -> float:
    """Perplexity of ``model`` over ``windows`` (k, seqlen) of token ids.

    ``head_chunk`` positions of the output head are computed at a time (0: the model's own full
    logits); the result is the same, the peak memory far lower for large vocabularies.

    Example:
        >>> perplexity(model, eval_windows(ids, 512, 64))
        26.77
    """
    nll, count = 0.0, 0
    dev = torch.device(device)
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch",
                      disable=not progress, leave=False):
        ids = windows[start:start + batch_size].to(dev)
        if head_chunk:
            part = _nll_chunked(model, ids, head_chunk)
            if part is not None:
                nll, count = nll + part[0], count + part[1]
                continue
        logits = model(input_ids=ids, use_cache=False).logits  # (b, seqlen, vocab)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / max(1, count))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    On Linux ``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` of a process started by another one
    also counts the parent's pages at the fork, so a benchmark's child would report its parent's
    size. Elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def linear_flops(targets: Sequence[Target], tokens: int = 1, sparse: bool = True) -> int:
    """Multiply-add FLOPs (2 per MAC) of the targeted layers for ``tokens`` tokens.

    With ``sparse``, only non-zero weights count: the work an ideal sparse kernel does.
    """
    total = 0
    for t in targets:
        w = t.get()
        macs = int((w != 0).sum()) if sparse else w.numel()
        total += 2 * macs * tokens
    return total


def layer_sparsity(targets: Sequence[Target]) -> dict[str, float]:
    """Fraction of zeros per targeted layer."""
    return {t.name: float((t.get() == 0).float().mean()) for t in targets}


def count_zeros(model: nn.Module, targets: Optional[Sequence[Target]] = None) -> tuple[int, int]:
    """(zeros, total) over ``targets`` (all prunable layers by default)."""
    from prunus.core.targets import select

    targets = targets if targets is not None else select(model)
    z = sum(int((t.get() == 0).sum()) for t in targets)
    n = sum(t.get().numel() for t in targets)
    return z, n


def uses_embeddings(model: nn.Module) -> bool:
    """Whether ``model`` is scored by :func:`embedding_similarity` instead of perplexity: a
    transformers model that cannot generate (an encoder such as BertModel or BertForMaskedLM)."""
    can = getattr(model, "can_generate", None)
    return callable(can) and hasattr(model, "config") and not can()


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """(b, seq, d) hidden states, (b, seq) attention mask -> (b, d) L2-normalised mean over the
    tokens the mask keeps (sentence-transformers' mean pooling, then its Normalize)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden * m).sum(dim=1)
    mean = summed / m.sum(dim=1).clamp_min(1e-9)
    return F.normalize(mean.float(), p=2, dim=-1)


@torch.inference_mode()
def sentence_embeddings(model: nn.Module, ids: Tensor, mask: Tensor, *, batch_size: int = 32,
                        device: str = "cpu", progress: bool = True, desc: str = "embed") -> Tensor:
    """(n, d) float32 sentence embeddings of ``ids``/``mask`` (n, seq) from :func:`encode_sentences`
    (:mod:`prunus.io.data`): the base model's last hidden state, mean-pooled and normalised."""
    base = getattr(model, "base_model", model)
    dev = torch.device(device)
    out = []
    for start in tqdm(range(0, ids.shape[0], batch_size), desc=desc, unit="batch",
                      disable=not progress, leave=False):
        i, m = ids[start:start + batch_size].to(dev), mask[start:start + batch_size].to(dev)
        longest = int(m.sum(dim=1).max())  # a batch of short sentences needs no padding past them
        i, m = i[:, :longest], m[:, :longest]
        res = base(input_ids=i, attention_mask=m)
        hidden = res.last_hidden_state if hasattr(res, "last_hidden_state") else res[0]
        out.append(mean_pool(hidden, m).cpu())
    return torch.cat(out)


def embedding_similarity(embeddings: Tensor, reference: Tensor) -> float:
    """Mean cosine similarity of matching rows of two (n, d) embedding matrices (the rows need not
    be normalised): 1.0 when every embedding points the same way as its reference."""
    if embeddings.shape != reference.shape:
        raise ValueError(f"embeddings {tuple(embeddings.shape)} and reference {tuple(reference.shape)} differ")
    return float(F.cosine_similarity(embeddings.double(), reference.double(), dim=-1).mean())
