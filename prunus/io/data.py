"""Calibration and evaluation text: where it comes from, how it becomes token windows.

This module defines the token windows everyone uses, prunus and the peer benchmarks alike:

* :func:`calibration_windows`: ``n`` random windows, the wanda/SparseGPT convention (random start
  positions drawn from a generator seeded with ``seed``, so a seed always gives the same windows);
* :func:`eval_windows`: the first ``k`` non-overlapping windows from the start of the text
  (perplexity is the exp of the mean next-token NLL over all of them);
* :func:`heldout_sentences` and :func:`encode_sentences`: the held-out sentences an encoder is
  evaluated on (:func:`prunus.evaluate.embedding_similarity`), evenly spaced over the text and none
  of them in the calibration text.

Sources accepted by :func:`resolve_text`:

* a path to a UTF-8 text file;
* ``book:NAME``: a book fetched by ``scripts/fetch_data.sh`` (see :mod:`prunus.io.books`);
* ``hf:DATASET[:CONFIG][:SPLIT]``: a Hugging Face dataset (needs ``datasets`` and a network),
  e.g. ``hf:wikitext:wikitext-2-raw-v1:test``.

Example:
    >>> ids = tokenize(resolve_text("book:emma"), tokenizer)          # doctest: +SKIP
    >>> calibration_windows(ids, n=32, seqlen=512, seed=0).shape        # doctest: +SKIP
    torch.Size([32, 512])
    >>> eval_windows(tokenize(resolve_text("book:pride"), tokenizer), 512, k=64).shape  # doctest: +SKIP
    torch.Size([64, 512])
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from prunus.errors import DataError

TextSource = Union[str, "os.PathLike[str]"]

#: The split used by ``hf:DATASET[:CONFIG]`` when none is named.
HF_DEFAULT_SPLIT = "train"


def resolve_text(source: TextSource) -> str:
    """Read the text named by ``source``.

    Args:
        source: a text-file path; ``book:NAME`` (``emma``, ``pride``, ``persuasion``, ``sense``,
            ``mansfield``, ``northanger``, ``shakespeare``) from the prunus cache; or
            ``hf:DATASET[:CONFIG][:SPLIT]`` (split defaults to ``train``; the ``text`` column,
            rows joined with ``"\\n\\n"`` as in wanda/SparseGPT).

    Returns:
        The whole text.

    Raises:
        DataError: a missing or unreadable file, a book not fetched yet (the message names the
            fetch command), a missing ``datasets`` package, or an empty text.

    Example:
        >>> resolve_text("book:pride")[:19]          # doctest: +SKIP
        'PRIDE AND PREJUDICE'
    """
    if isinstance(source, str) and source.startswith("book:"):
        text = _book_text(source[len("book:"):])
    elif isinstance(source, str) and source.startswith("hf:"):
        text = _hf_text(source[len("hf:"):])
    else:
        text = _file_text(Path(os.fspath(source)).expanduser())
    if not text.strip():
        raise DataError(f"text source {os.fspath(source)!r} is empty")
    return text


def _file_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"text file {path} does not exist (pass a .txt path, book:NAME or "
                        f"hf:DATASET[:CONFIG][:SPLIT])")
    if not path.is_file():
        raise DataError(f"{path} is not a file: pass a UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"convert it with iconv -t utf-8") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _book_text(name: str) -> str:
    from prunus.io import books  # keep `import prunus.io.data` free of the fetching code

    path = books.book_path(name)
    if not path.is_file():
        if name not in books.BOOKS:
            raise DataError(f"unknown book {name!r}; known books: {', '.join(books.BOOKS)}")
        raise DataError(f"book {name!r} is not in {path.parent}; fetch it with: "
                        f"{books.FETCH_COMMAND}")
    return _file_text(path)


def _hf_text(spec: str) -> str:
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"bad source 'hf:{spec}': use hf:DATASET[:CONFIG][:SPLIT], "
                        f"e.g. hf:wikitext:wikitext-2-raw-v1:test")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else HF_DEFAULT_SPLIT
    try:
        import datasets
    except ImportError:
        raise DataError("hf: text sources need the datasets package: pip install datasets "
                        "(or pass a local .txt file)") from None
    try:
        ds: Any = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the hub, the network, a bad config or split: all one user error
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot load hf:{spec} ({type(e).__name__}: {first}); are you online? "
                        f"Or pass a local .txt file") from None
    columns = list(ds.column_names)
    column = "text" if "text" in columns else next(
        (c for c in columns if ds.features[c].dtype == "string"), None)
    if column is None:
        raise DataError(f"hf:{spec} has no text column (columns: {', '.join(columns)})")
    return "\n\n".join(ds[column])


def tokenize(text: str, tokenizer: Any) -> Tensor:
    """Token ids of the whole text, without special tokens (no BOS/EOS), in one pass.

    The fast (Rust) tokenizer encodes the whole string at once, so there is no chunk boundary to
    change the tokenization and no "sequence length is longer than the specified maximum" warning
    (that limit is about the model, not the text). Slow tokenizers go through ``encode`` with the
    limit lifted for the call.

    Args:
        text: any text, e.g. from :func:`resolve_text`.
        tokenizer: a Hugging Face tokenizer.

    Returns:
        LongTensor ``(n,)``.

    Example:
        >>> tokenize("It is a truth universally acknowledged", tok).shape    # doctest: +SKIP
        torch.Size([6])
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None or backend.padding is not None:
            # a tokenizer.json may fix a length (all-MiniLM-L6-v2: truncate and pad to 128): a copy
            # without it, so the whole text is encoded and the tokenizer itself is left as it was
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        ids = backend.encode(text, add_special_tokens=False).ids
    else:
        limit = getattr(tokenizer, "model_max_length", None)
        try:
            tokenizer.model_max_length = int(1e30)
            ids = tokenizer.encode(text, add_special_tokens=False)
        finally:
            if limit is not None:
                tokenizer.model_max_length = limit
    return torch.tensor(ids, dtype=torch.long)


def _check_ids(ids: Tensor, seqlen: int) -> Tensor:
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen <= 0:
        raise DataError(f"--seqlen must be a positive integer, got {seqlen!r}")
    if not isinstance(ids, Tensor):
        raise DataError(f"token ids must be a tensor, got {type(ids).__name__}")
    if ids.dim() == 2 and ids.shape[0] == 1:  # tokenizer(..., return_tensors="pt") shape
        ids = ids[0]
    if ids.dim() != 1:
        raise DataError(f"token ids must be 1-D (n,), got shape {tuple(ids.shape)}")
    return ids.long()


def calibration_windows(ids: Tensor, n: int, seqlen: int, seed: int = 0) -> Tensor:
    """``n`` random windows of ``seqlen`` tokens (the wanda/SparseGPT calibration convention).

    Each start is drawn uniformly from ``[0, len(ids) - seqlen - 1]`` (one token is left after
    the window, as in wanda's ``get_c4``) by a private ``torch.Generator`` seeded with ``seed``:
    the same ids, ``n``, ``seqlen`` and ``seed`` always give the same windows, and the global RNG
    is untouched. Windows may overlap.

    Args:
        ids: token ids ``(n_tokens,)`` from :func:`tokenize`.
        n: number of windows (``--nsamples``), at least 1.
        seqlen: tokens per window, at least 1.
        seed: generator seed.

    Returns:
        LongTensor ``(n, seqlen)``.

    Raises:
        DataError: ``n < 1``, ``seqlen < 1``, or fewer than ``seqlen + 1`` tokens.

    Example:
        >>> calibration_windows(torch.arange(1000), n=4, seqlen=128, seed=0).shape
        torch.Size([4, 128])
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DataError(f"--nsamples must be at least 1, got {n!r}")
    ids = _check_ids(ids, seqlen)
    total = ids.numel()
    if total < seqlen + 1:
        raise DataError(f"calibration text has {total} tokens, fewer than one window of "
                        f"--seqlen {seqlen} + 1: use a longer text or a smaller --seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen, (n,), generator=gen)  # (n,) in [0, total-seqlen-1]
    offsets = torch.arange(seqlen)  # (seqlen,)
    return ids[starts[:, None] + offsets[None, :]]  # (n, seqlen)


def max_eval_windows(ids: Tensor, seqlen: int) -> int:
    """How many non-overlapping ``seqlen`` windows :func:`eval_windows` can take from ``ids``."""
    return _check_ids(ids, seqlen).numel() // seqlen


def eval_windows(ids: Tensor, seqlen: int, k: int | None = None) -> Tensor:
    """The first ``k`` non-overlapping windows of ``seqlen`` tokens (all of them if ``k`` is None).

    Window ``i`` is ``ids[i * seqlen : (i + 1) * seqlen]``; a trailing partial window is dropped
    (the wanda/SparseGPT perplexity convention).

    Args:
        ids: token ids ``(n_tokens,)`` from :func:`tokenize`.
        seqlen: tokens per window, at least 1.
        k: number of windows (``--windows``); None for every full window.

    Returns:
        LongTensor ``(k, seqlen)``.

    Raises:
        DataError: ``seqlen < 1``, ``k < 1``, no full window, or ``k`` above the number available
            (the message gives the maximum).

    Example:
        >>> eval_windows(torch.arange(10), seqlen=4).tolist()
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    ids = _check_ids(ids, seqlen)
    total = ids.numel()
    available = total // seqlen
    if available == 0:
        raise DataError(f"evaluation text has {total} tokens, fewer than one window of "
                        f"--seqlen {seqlen}: use a longer text or a smaller --seqlen")
    if k is None:
        k = available
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise DataError(f"--windows must be at least 1, got {k!r}")
    if k > available:
        raise DataError(f"--windows {k} is more than the text holds: {total} tokens give at most "
                        f"{available} windows of --seqlen {seqlen}")
    return ids[: k * seqlen].reshape(k, seqlen).clone()  # (k, seqlen), not a view of ids


# a sentence ends at . ! or ? (maybe closed by a quote or bracket) before a capital, not after a title
_SENTENCE_END = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)"
                           r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[_]*[A-Z])")


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, whitespace collapsed; paragraphs (blank lines) always end one."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        flat = " ".join(para.split())
        out += [s.strip() for s in _SENTENCE_END.split(flat) if s.strip()]
    return out


def heldout_sentences(text: str, n: int, exclude: Optional[str] = None, *, min_words: int = 5,
                      max_words: int = 60) -> list[str]:
    """``n`` sentences of ``text``, evenly spaced over it, none of which occurs in ``exclude``.

    Sentences of ``min_words`` to ``max_words`` words count (headings and fragments do not); the
    same text, ``n`` and ``exclude`` always give the same sentences. ``exclude`` is the calibration
    text, so the sentences an encoder is scored on were never seen by its pruning.

    Raises:
        DataError: ``n < 1``, or fewer than ``n`` such sentences (the message gives how many).

    Example:
        >>> heldout_sentences("One two three four five. Six seven eight nine ten.", 1)
        ['One two three four five.']
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DataError(f"--sentences must be at least 1, got {n!r}")
    seen = " ".join(exclude.split()) if exclude else ""
    cands, found = [], set()
    for s in split_sentences(text):
        if min_words <= len(s.split()) <= max_words and s not in found and s not in seen:
            found.add(s)
            cands.append(s)
    if len(cands) < n:
        raise DataError(f"the evaluation text has {len(cands)} sentences of {min_words}-{max_words} words "
                        f"not in the calibration text, fewer than --sentences {n}: use a longer or "
                        f"different --eval text, or fewer sentences")
    return [cands[(i * len(cands)) // n] for i in range(n)]


def encode_sentences(sentences: Sequence[str], tokenizer: Any, max_length: int) -> tuple[Tensor, Tensor]:
    """Token ids with the tokenizer's special tokens (``[CLS] ... [SEP]``), at most ``max_length``
    each, right-padded: ``(ids, attention_mask)``, both LongTensor ``(n, longest)``."""
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise DataError(f"--seqlen must be at least 2, got {max_length!r}")
    enc = tokenizer(list(sentences), add_special_tokens=True, truncation=True, max_length=max_length)
    rows = [list(r) for r in enc["input_ids"]]
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask
