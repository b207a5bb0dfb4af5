"""Where a batch-1 decode step's time goes: the linears, prunus's own wrapper around its kernels, and
the model around them (norms, rotary embeddings, attention, cache, Python), eager and compiled.

For one checkpoint (a prunus runtime folder from ``prunus export --runtime auto``, or ``smollm2-135m``
for the dense model) it measures, at batch 1 after a ``--prompt-tokens`` prompt:

- ``step``: one decode step of the model as loaded (median ms);
- ``linears``: every linear of the model called once on a one-token input, back to back, in a
  cold loop (the weights come from memory as in a decode step) -- what the kernels cost;
- ``wrapper``: for the prunus kernel modules, the module call against the raw ``torch.ops`` call
  on the same arrays (the Python that prunus adds per layer);
- ``rest``: the same step with every linear replaced by a module that returns a preallocated
  output (no arithmetic): the framework's own cost per token;
- ``rest, compiled``: the same after ``torch.compile`` (``--no-compile`` skips it: minutes).

    .venv/bin/python bench/decode_profile.py runs/frontier-work/rt-sparsegpt_2_4_int8-a8 --json runs/profile.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import write_json  # noqa: E402

from prunus.io.models import load_model  # noqa: E402
from prunus.kernels.base import SparseLinear  # noqa: E402


class Free(nn.Module):
    """A linear that costs nothing but a call: returns a preallocated output of the right shape."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self._out: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape[:-1])
        if key not in self._out:
            self._out[key] = x.new_zeros(*key, self.out_features)
        return self._out[key]


def linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, SparseLinear))]


def step_ms(model: nn.Module, prompt: torch.Tensor, steps: int) -> float:
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            times.append((time.perf_counter() - t0) * 1e3)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(times)


def linears_ms(model: nn.Module, repeats: int = 5) -> tuple[float, dict[str, float]]:
    """Every linear once on a (1, in) input, back to back; (total ms, ms by kernel name)."""
    layers = linears(model)
    xs = {n: torch.randn(1, m.in_features) for n, m in layers}
    totals, by_kind = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            kinds: dict[str, float] = {}
            t_all = 0.0
            for n, m in layers:
                t0 = time.perf_counter()
                m(xs[n])
                dt = (time.perf_counter() - t0) * 1e3
                t_all += dt
                k = getattr(m, "kernel", "dense")
                kinds[k] = kinds.get(k, 0.0) + dt
            totals.append(t_all)
            by_kind.append(kinds)
    i = totals.index(statistics.median(totals))
    return totals[i], by_kind[i]


def wrapper_us(model: nn.Module) -> float | None:
    """Mean µs per call that SparseLinear.forward adds over calling its matmul directly."""
    mods = [m for _, m in linears(model) if isinstance(m, SparseLinear)]
    if not mods:
        return None
    xs = [torch.randn(1, m.in_features) for m in mods]
    with torch.inference_mode():
        for _ in range(3):
            for m, x in zip(mods, xs):
                m(x)
                m.matmul(x)
        t0 = time.perf_counter()
        for _ in range(20):
            for m, x in zip(mods, xs):
                m(x)
        t_mod = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(20):
            for m, x in zip(mods, xs):
                m.matmul(x)
        t_raw = time.perf_counter() - t0
    return (t_mod - t_raw) / (20 * len(mods)) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.threads < 1 or a.prompt_tokens < 1 or a.steps < 1:
        print("decode_profile: error: --threads, --prompt-tokens and --steps must be at least 1",
              file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, _ = load_model(a.model, runtime="auto")
    prompt = torch.randint(0, model.config.vocab_size, (1, a.prompt_tokens))
    res: dict[str, object] = {"model": a.model, "threads": a.threads}
    res["step_ms"] = step_ms(model, prompt, a.steps)
    res["linears_ms"], res["linears_by_kernel_ms"] = linears_ms(model)
    res["wrapper_us_per_call"] = wrapper_us(model)
    free = copy.deepcopy(model)
    for n, m in linears(free):
        parent, _, child = n.rpartition(".")
        setattr(free.get_submodule(parent) if parent else free, child, Free(m.out_features))
    res["rest_ms"] = step_ms(free, prompt, a.steps)
    if not a.no_compile:
        from prunus.kernels.compiled_model import compile_model

        compile_model(free)
        step_ms(free, prompt, 2)  # compiles
        res["rest_compiled_ms"] = step_ms(free, prompt, a.steps)
        compile_model(model)
        step_ms(model, prompt, 2)
        res["step_compiled_ms"] = step_ms(model, prompt, a.steps)
    for k, v in res.items():
        print(f"{k:24s} {v:.3f}" if isinstance(v, float) else f"{k:24s} {v}")
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
