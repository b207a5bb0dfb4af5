"""Sparse linear kernels against dense ``F.linear``: one layer at a time, per token count.

    .venv/bin/python bench/kernels.py --quick --json runs/kernels_cpu_quick.json   # < 3 min on 2 cores
    .venv/bin/python bench/kernels.py --json runs/kernels_cpu.json                 # + SmolLM2 shapes
    .venv/bin/python bench/kernels.py --device cuda --json runs/kernels_cuda.json  # cuda kernels

Each row compares dense ``F.linear(x, W * mask)`` with one applicable kernel on the same random
weight and mask (exact sparsity from ``prunus.core.masks.topk``), at the thread count given (default: torch's).
Times are medians of interleaved samples (see ``prunus.kernels.timing.time_linear``). The JSON
is a list of rows with device, out_features, in_features, pattern, sparsity, tokens, dtype,
dense_ms, sparse_ms, speedup, kernel, threads and cold.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import write_json  # noqa: E402

from prunus.errors import PrunusError  # noqa: E402
from prunus.kernels import cpu, kernels_for, resolve_device  # noqa: E402
from prunus.kernels.timing import Timing, time_linear  # noqa: E402
from prunus.core.masks import topk  # noqa: E402
from prunus.core.spec import NM, Block, Pattern, Unstructured  # noqa: E402

SMOLLM2 = [(576, 576), (1536, 576), (576, 1536), (192, 576)]  # q/o, gate/up, down, k/v
U = Unstructured()


def configs(device: str, quick: bool) -> list[tuple[tuple[int, int], Pattern, float, list[int],
                                                    torch.dtype]]:
    """(shape, pattern, sparsity, tokens, dtype) to run."""
    if device == "cpu":
        f32 = torch.float32
        if quick:
            return [((4096, 4096), U, s, [1, 4, 16], f32) for s in (0.5, 0.7, 0.9)]
        tokens = [1, 4, 16, 64, 256]
        out = [((4096, 4096), U, s, tokens, f32) for s in (0.5, 0.7, 0.8, 0.9, 0.95)]
        out += [((4096, 4096), Block(4, 4), s, tokens, f32) for s in (0.8, 0.9)]
        out += [(shape, U, s, tokens, f32) for shape in SMOLLM2 for s in (0.5, 0.7, 0.8, 0.9)]
        return out
    nm = NM(2, 4)
    if quick:
        return [((4096, 4096), nm, 0.5, [16, 1024, 8192], torch.float16),
                ((11008, 4096), nm, 0.5, [16, 1024, 8192], torch.float16)]
    tokens = [1, 16, 128, 1024, 4096, 8192, 16384]
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)]
    return [(s, nm, 0.5, tokens, dt) for dt in (torch.float16, torch.bfloat16) for s in shapes]


def run(device: str, quick: bool, threads: Optional[int], kernels: Optional[list[str]],
        repeats: int, seed: int, cold: bool = False) -> list[Timing]:
    rows: list[Timing] = []
    gen = torch.Generator().manual_seed(seed)
    for shape, pattern, sparsity, tokens, dtype in configs(device, quick):
        names = [k.name for k in kernels_for(shape, pattern, device, dtype)]
        if kernels is not None:
            names = [k for k in names if k in kernels]
        if not names:
            print(f"  {shape[0]}x{shape[1]} {pattern} {dtype}: no available kernel, skipped",
                  flush=True)
            continue
        weight = torch.randn(*shape, generator=gen)
        mask = topk(torch.rand(*shape, generator=gen), sparsity, pattern)
        for r in time_linear(weight.to(dtype), mask, tokens, device, names, pattern=pattern,
                             threads=threads, repeats=repeats, seed=seed, cold=cold):
            rows.append(r)
            print(format_row(r), flush=True)
    return rows


HEADER = (f"{'device':>6} {'shape':>10} {'pattern':>12} {'sparsity':>8} {'tokens':>6} {'dtype':>8} "
          f"{'dense_ms':>9} {'sparse_ms':>9} {'speedup':>7}  kernel")


def format_row(r: Timing) -> str:
    return (f"{r.device:>6} {r.out_features}x{r.in_features:<5} {r.pattern:>12} {r.sparsity:8.2f} "
            f"{r.tokens:6d} {r.dtype:>8} {r.dense_ms:9.3f} {r.sparse_ms:9.3f} {r.speedup:6.2f}x  "
            f"{r.kernel}")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 at 50/70/90%%, 1/4/16 tokens")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--kernels", default=None, help="comma-separated kernel names (default: all)")
    ap.add_argument("--repeats", type=int, default=9, help="timed samples per kernel and count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cold", action="store_true",
                    help="flush the cache before every call (weights come from memory, as in a "
                         "model larger than the cache)")
    args = ap.parse_args(argv)
    try:
        resolve_device(args.device)
        kernels = None if args.kernels is None else [k.strip() for k in args.kernels.split(",")]
        start = time.perf_counter()
        threads = args.threads or torch.get_num_threads()
        build = cpu.build_info() if args.device == "cpu" else {}
        print(f"# {datetime.date.today()} torch {torch.__version__}, {threads} threads, "
              f"{platform.processor() or platform.machine()}"
              + (f", compiled: {build.get('isa') or build.get('error')}" if build else "")
              + (", cold cache" if args.cold else ", warm cache"))
        print(HEADER)
        rows = run(args.device, args.quick, threads, kernels, args.repeats, args.seed, args.cold)
    except PrunusError as e:
        print(f"bench/kernels.py: error: {e}", file=sys.stderr)
        return 2
    print(f"# {len(rows)} rows in {time.perf_counter() - start:.0f} s")
    if args.json:
        write_json(args.json, [r.to_dict() for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
