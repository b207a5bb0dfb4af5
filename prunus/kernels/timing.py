"""Timing: one layer dense against each sparse kernel (:func:`time_linear`), and a whole model's
prefill and decode (:func:`time_generate`).

:func:`time_linear` times one layer, dense ``F.linear`` against every applicable kernel, at each
token count: warm-up calls, then rounds that alternate dense and sparse (so a busy machine slows
both alike), each sample long enough to read a clock, and the median per call.

The decisions built on these timings are in :mod:`prunus.kernels.plans`.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunus.core.spec import Pattern
from prunus.kernels.base import SparseLinear
from prunus.kernels.patterns import infer_pattern
from prunus.kernels.registry import KernelError, get_kernel, kernels_for, resolve_device


@dataclass(frozen=True)
class Timing:
    """One measurement: dense against one kernel, for one layer shape, at one token count."""

    device: str
    out_features: int
    in_features: int
    pattern: str
    sparsity: float
    tokens: int
    dtype: str
    dense_ms: float
    sparse_ms: float
    speedup: float
    kernel: str
    threads: int
    cold: bool = False
    input_sparsity: float = 0.0  # the fraction of the input that was exactly zero

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def num_threads(threads: Optional[int]) -> Iterator[int]:
    """Run with ``torch.set_num_threads(threads)`` (unchanged when None); yields the count in use."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise KernelError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))
    size = 32 << 20
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                text = (index / "size").read_text().strip().upper()
                unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
                size = int(text.rstrip("KMG")) * unit
        except (OSError, ValueError):
            pass
    return size


_FLUSH: dict[str, Tensor] = {}


def cache_flusher(device: torch.device) -> Callable[[], None]:
    """A function that evicts the weights from the last-level cache (writes twice its size)."""
    key = str(device)
    if key not in _FLUSH:
        n = min(2 * _last_level_cache_bytes(device) + (8 << 20), 512 << 20) // 4
        _FLUSH[key] = torch.empty(n, dtype=torch.float32, device=device)
    buf = _FLUSH[key]

    def flush() -> None:
        buf.fill_(1.0)

    return flush


def _time_fns(fns: Sequence[Callable[[], Any]], device: torch.device, repeats: int, warmup: int,
              min_sample_ms: float, flush: Optional[Callable[[], None]] = None) -> list[float]:
    """Median ms per call of each fn, sampled in interleaved rounds; with ``flush``, every sample
    is one call made right after the cache was flushed."""
    if flush is not None:
        samples_cold: list[list[float]] = [[] for _ in fns]
        for fn in fns:
            for _ in range(max(1, warmup)):
                fn()
        for _ in range(max(1, repeats)):
            for i, fn in enumerate(fns):
                flush()
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                samples_cold[i].append((time.perf_counter() - t0) * 1e3)
        return [statistics.median(s) for s in samples_cold]
    inner = []
    for fn in fns:
        for _ in range(max(1, warmup)):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        inner.append(max(1, min(1000, math.ceil(min_sample_ms / est_ms))))
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        for i, fn in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner[i]):
                fn()
            _sync(device)
            samples[i].append((time.perf_counter() - t0) * 1e3 / inner[i])
    return [statistics.median(s) for s in samples]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@torch.inference_mode()
def time_linear(layer: nn.Linear | Tensor, mask: Optional[Tensor], tokens_list: Sequence[int],
                device: str | torch.device = "cpu", kernels: Optional[Sequence[str]] = None, *,
                bias: Optional[Tensor] = None, pattern: Optional[Pattern] = None,
                threads: Optional[int] = None, repeats: int = 15, warmup: int = 3,
                min_sample_ms: float = 2.0, seed: int = 0, name: str = "layer",
                dtype: Optional[torch.dtype] = None, cold: bool = False,
                qweight: Optional[Any] = None, approximate: bool = False,
                input_sparsity: float = 0.0) -> list[Timing]:
    """Time dense ``F.linear`` against each kernel on one layer, per token count.

    Args:
        layer: an ``nn.Linear`` or a weight (out, in) (then ``bias`` is used).
        mask: (out, in) bool keep-mask; ``None`` keeps the non-zero weights. The dense reference
            uses ``weight * mask``, exactly what the masked model runs.
        tokens_list: token counts N; the input is (N, in).
        device: ``"cpu"`` or ``"cuda"`` (a KernelError where CUDA is absent).
        kernels: kernel names to time; ``None`` times every available applicable kernel.
        pattern: the mask's pattern; inferred from the mask when ``None``.
        threads: ``torch.set_num_threads`` for the measurement (restored after).
        repeats: samples per kernel and token count (median taken).
        warmup: untimed calls first.
        min_sample_ms: a sample repeats the call until it lasts about this long.
        dtype: compute dtype (default: the weight's).
        cold: flush the last-level cache before every call, so the weights come from memory as
            they do in a model too large for the cache (LLM decode); warm (the default) times a
            layer whose weights stay cached between calls, which flatters small dense layers.
        qweight: the layer's stored quantized weight (its dequantized value is the weight): the
            integer kernels that serve its grid are timed too.
        approximate: time the kernels that also round the activation (W8A8) too.
        input_sparsity: the fraction of each input row made exactly zero (its smallest
            magnitudes), as an activation gate leaves it; above 0, ``kernels=None`` also times
            the kernels that skip zero inputs (``input_sparse``).

    Returns:
        One :class:`Timing` per (kernel, token count), kernels in the given or priority order.
    """
    dev = resolve_device(device)
    if isinstance(layer, nn.Linear):
        weight, bias = layer.weight.detach(), (None if layer.bias is None else layer.bias.detach())
    else:
        weight = layer.detach()
    if weight.dim() != 2:
        raise KernelError(f"{name}: expected a 2-D (out, in) weight, got {tuple(weight.shape)}")
    dtype = dtype or weight.dtype
    weight = weight.to(dev, dtype)
    bias = None if bias is None else bias.detach().to(dev, dtype)
    mask = (weight != 0) if mask is None else mask.to(dev, torch.bool)
    if tuple(mask.shape) != tuple(weight.shape):
        raise KernelError(f"{name}: mask shape {tuple(mask.shape)} does not match weight shape "
                          f"{tuple(weight.shape)}")
    if not 0.0 <= input_sparsity <= 1.0:
        raise KernelError(f"{name}: input sparsity must be in [0, 1], got {input_sparsity}")
    if not tokens_list or any(int(t) < 1 for t in tokens_list):
        raise KernelError(f"token counts must be positive integers, got {list(tokens_list)}")
    pattern = pattern or infer_pattern(mask)
    out_f, in_f = weight.shape
    if kernels is None:
        specs = [k.name for k in kernels_for((out_f, in_f), pattern, dev, dtype,
                                             quant=None if qweight is None else qweight.quant,
                                             approximate=approximate,
                                             input_sparse=input_sparsity > 0)]
    else:
        specs = [get_kernel(k).name for k in kernels]
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=dev, dtype=dtype)
    lin.weight.data.copy_(weight)
    if bias is not None:
        lin.bias.data.copy_(bias)
    modules = [SparseLinear.from_dense(lin, mask, k, pattern=pattern, name=name, qweight=qweight)
               for k in specs]
    masked = weight * mask
    sparsity = 1.0 - float(mask.float().mean())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows: list[Timing] = []
    with num_threads(threads) as nt:
        for tokens in tokens_list:
            x = sparse_input(int(tokens), in_f, input_sparsity, gen).to(dev, dtype)
            fns: list[Callable[[], Any]] = [lambda: F.linear(x, masked, bias)]
            fns += [(lambda m: lambda: m(x))(m) for m in modules]
            flush = None
            if cold:
                evict = cache_flusher(dev)

                def flush() -> None:  # weights out, the activation back in (it was just made)
                    evict()
                    x.sum()
            times = _time_fns(fns, dev, repeats, warmup, min_sample_ms, flush)
            for spec, ms in zip(specs, times[1:]):
                rows.append(Timing(dev.type, out_f, in_f, str(pattern), round(sparsity, 6),
                                   int(tokens), dtype_name(dtype), times[0], ms,
                                   times[0] / ms if ms > 0 else math.inf, spec, nt, cold,
                                   float(input_sparsity)))
    return rows


def sparse_input(tokens: int, in_f: int, sparsity: float, gen: torch.Generator) -> Tensor:
    """A random (tokens, in_f) input whose ``round(sparsity * in_f)`` smallest magnitudes per row
    are exactly zero (what a magnitude gate such as TEAL's leaves)."""
    x = torch.randn(tokens, in_f, generator=gen)
    k = int(round(sparsity * in_f))
    if k:
        x.scatter_(1, x.abs().argsort(dim=1)[:, :k], 0.0)
    return x


@torch.inference_mode()
def time_generate(model: nn.Module, prompt: Tensor, new_tokens: int, repeats: int = 3) -> dict[str, float]:
    """Median prefill seconds (one forward over ``prompt``) and decode tokens/s (greedy, KV cache)."""
    prefill, decode = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        decode.append(new_tokens / (t2 - t1))
    return {"prefill_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode)}


__all__ = ["Timing", "cache_flusher", "dtype_name", "num_threads", "sparse_input", "time_generate",
           "time_linear"]
