"""prunus's CPU sparse kernels against DeepSparse 1.8 on one linear layer, side by side.

    bash bench/setup_deepsparse.sh                                          # once: .venv-deepsparse
    .venv-deepsparse/bin/python bench/peer_deepsparse.py --quick            # one shape, one sparsity
    .venv-deepsparse/bin/python bench/peer_deepsparse.py --json runs/peer_deepsparse.json

The single-layer table of the issue "Sparsity that pays on CPU": y = x @ W.T, fp32, for
4096x4096 and SmolLM2's 1536x576 (gate/up) and 576x1536 (down), each at 50/70/90% random
unstructured sparsity (an exact mask from ``prunus.core.masks.topk``), at 1 / 4 / 16 tokens.
For each row, in ONE process and ONE timing loop: torch dense ``F.linear(x, W * mask)`` at
``--threads`` threads, DeepSparse (the masked W as the initializer of an ONNX MatMul, compiled
with ``num_cores=--threads`` and ``batch_size=tokens``), and every available prunus CPU float32
kernel (``kernels_for``; each checked against dense first). The timings are medians of rounds that
interleave all of them (``prunus.kernels.timing._time_fns``, the sampler of ``time_linear``):
warm cache (weights stay cached between calls, each sample repeats the call for at least
``--min-sample-ms``) and, unless ``--no-cold``, cold (the last-level cache flushed before every
call, as ``time_linear(cold=True)`` does, but by one thread: see ``numpy_flusher``; so every
engine starts the call with its threads asleep). Speedups are over torch dense in the same loop.

It prints a markdown table and, with ``--json``, writes the machine (CPU model, flags, L3, load
average), the versions, the date and every row (every kernel's time too), atomically.
It must run in the venv of ``bench/setup_deepsparse.sh`` (deepsparse 1.8.0 wants CPython 3.11 and
numpy < 2), which also builds prunus's compiled kernels for that venv's torch into
``.venv-deepsparse/torch_extensions`` (used here whenever it exists).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

# Before torch / prunus are imported: the venv's own kernel cache (see setup_deepsparse.sh), and
# no analytics calls from DeepSparse / SparseZoo.
_VENV_EXT = Path(sys.prefix) / "torch_extensions"
if "TORCH_EXTENSIONS_DIR" not in os.environ and _VENV_EXT.is_dir():
    os.environ["TORCH_EXTENSIONS_DIR"] = str(_VENV_EXT)
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import machine, write_json  # noqa: E402
from prunus.core.masks import topk  # noqa: E402
from prunus.core.spec import Unstructured  # noqa: E402
from prunus.errors import PrunusError  # noqa: E402
from prunus.kernels import SparseLinear, cpu, kernels_for  # noqa: E402
from prunus.kernels.timing import _last_level_cache_bytes, _time_fns, num_threads  # noqa: E402

U = Unstructured()
SHAPES = [(4096, 4096), (1536, 576), (576, 1536)]  # (out, in): a big layer, SmolLM2 gate/up, down
SPARSITIES = [0.5, 0.7, 0.9]
TOKENS = [1, 4, 16]
QUICK = [((1536, 576), 0.7)]
BUSY_LOAD = 1.0  # a 1-min load average from here up: say that the timings are contended
SETTLE_S = 0.02  # see run_layer
TOL = 1e-3  # max |y - y_dense| / max |y_dense|: fp32 summation order, not a wrong kernel


_NP_FLUSH: dict[str, Any] = {}


def numpy_flusher() -> Callable[[], None]:
    """Evicts the last-level cache like ``timing.cache_flusher`` (writes 2 x L3 + 8 MiB), but with
    one thread (numpy), so that no torch OpenMP worker is left spinning when DeepSparse starts."""
    import numpy as np

    if "buf" not in _NP_FLUSH:
        n = min(2 * _last_level_cache_bytes(torch.device("cpu")) + (8 << 20), 512 << 20) // 4
        _NP_FLUSH["buf"] = np.empty(n, dtype=np.float32)
    buf = _NP_FLUSH["buf"]

    def flush() -> None:
        buf.fill(1.0)

    return flush


def onnx_matmul(w_t, tokens: int, path: Path) -> None:
    """An ONNX model y = x @ w_t (w_t: the (in, out) masked weight, as an initializer)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    in_f, out_f = w_t.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, in_f])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, out_f])
    wt = numpy_helper.from_array(np.ascontiguousarray(w_t, dtype=np.float32), name="wt")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["y"])], "linear", [x], [y],
                              initializer=[wt])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@torch.inference_mode()
def run_layer(shape: tuple[int, int], sparsity: float, tokens_list: list[int], threads: int,
              kernels: Optional[list[str]], repeats: int, warmup: int, min_sample_ms: float,
              cold: bool, seed: int, tmp: Path) -> list[dict[str, Any]]:
    """All token counts of one (shape, sparsity): one weight, one mask, one DeepSparse model per
    token count; rows of dense / DeepSparse / each kernel, warm (and cold) medians."""
    import deepsparse

    out_f, in_f = shape
    gen = torch.Generator().manual_seed(seed + 1000 * out_f + in_f + int(round(sparsity * 100)))
    weight = torch.randn(out_f, in_f, generator=gen)
    mask = topk(torch.rand(out_f, in_f, generator=gen), sparsity, U)
    masked = (weight * mask).contiguous()
    actual = 1.0 - float(mask.float().mean())
    names = [k.name for k in kernels_for(shape, U, "cpu", torch.float32)]
    if kernels is not None:
        names = [n for n in names if n in kernels]
    lin = nn.Linear(in_f, out_f, bias=False)
    lin.weight.data.copy_(weight)
    modules = {n: SparseLinear.from_dense(lin, mask, n, pattern=U, name=f"{out_f}x{in_f}")
               for n in names}
    w_t = masked.T.contiguous().numpy()
    dev = torch.device("cpu")
    rows = []
    with num_threads(threads) as nt:
        for tokens in tokens_list:
            path = tmp / f"linear_{out_f}x{in_f}_{sparsity}_{tokens}.onnx"
            onnx_matmul(w_t, tokens, path)
            t0 = time.perf_counter()
            engine = deepsparse.compile_model(str(path), batch_size=tokens, num_cores=threads)
            compile_s = time.perf_counter() - t0
            x = torch.randn(tokens, in_f, generator=gen)
            x_np = x.numpy()  # shares x's memory: the cold flush's x.sum() re-caches both
            ref = F.linear(x, masked)
            errs = {"deepsparse": rel_err(torch.from_numpy(engine.run([x_np], True)[0]), ref)}
            for n, m in modules.items():
                errs[n] = rel_err(m(x), ref)
            bad = [n for n, e in errs.items() if not e <= TOL]
            if bad:
                raise PrunusError(f"{out_f}x{in_f} {sparsity:.0%} {tokens} tokens: "
                                  + ", ".join(f"{n} rel err {errs[n]:.2e}" for n in bad)
                                  + f" against dense (tolerance {TOL})")
            # Order of a round: dense, the kernels, a 20 ms sleep (timed, ignored), DeepSparse.
            # torch's OpenMP workers spin for a few ms after each call; DeepSparse's own threads
            # would then share the 2 cores with them. The sleep lets them stop first (DeepSparse's
            # threads do not spin after a run, so dense right after it is not slowed).
            fns: list[Callable[[], Any]] = [lambda: F.linear(x, masked)]
            fns += [(lambda m: lambda: m(x))(m) for m in modules.values()]
            fns += [lambda: time.sleep(SETTLE_S), lambda: engine.run([x_np], False)]
            warm = _time_fns(fns, dev, repeats, warmup, min_sample_ms)
            cold_ms = None
            if cold:
                evict = numpy_flusher()

                def flush() -> None:  # weights out, the activation back in (as time_linear does)
                    evict()
                    x.sum()
                cold_ms = _time_fns(fns, dev, repeats, warmup, min_sample_ms, flush)
            del engine
            row: dict[str, Any] = {"shape": f"{out_f}x{in_f}", "out_features": out_f,
                                   "in_features": in_f, "sparsity": round(actual, 6),
                                   "tokens": tokens, "threads": nt,
                                   "deepsparse_compile_s": round(compile_s, 2),
                                   "rel_err": {n: float(f"{e:.3g}") for n, e in errs.items()}}
            for tag, times in (("warm", warm), ("cold", cold_ms)):
                if times is None:
                    continue
                dense, ds, ks = times[0], times[-1], dict(zip(modules, times[1:-2]))
                best = min(ks, key=ks.get) if ks else None
                row[tag] = {"dense_ms": dense, "deepsparse_ms": ds, "kernels_ms": ks,
                            "deepsparse_x": dense / ds,
                            "prunus_best": best,
                            "prunus_best_x": dense / ks[best] if best else None,
                            "prunus_over_deepsparse": ds / ks[best] if best else None}
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def _x(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2f}"


HEADER = ("| layer | sparsity | tokens | dense ms | DeepSparse x | prunus best x | kernel "
          "| prunus / DS | cold: DeepSparse x | cold: prunus best x | cold: kernel |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict[str, Any]) -> str:
    w, c = r["warm"], r.get("cold")
    cold = (f" {_x(c['deepsparse_x'])} | {_x(c['prunus_best_x'])} | {c['prunus_best'] or '–'} |"
            if c else " – | – | – |")
    return (f"| {r['shape']} | {r['sparsity']:.0%} | {r['tokens']} | {w['dense_ms']:.4f} "
            f"| {_x(w['deepsparse_x'])} | {_x(w['prunus_best_x'])} | {w['prunus_best'] or '–'} "
            f"| {_x(w['prunus_over_deepsparse'])} |" + cold)


def summary(rows: list[dict[str, Any]], tokens_list: list[int]) -> str:
    """The issue's table: per layer and sparsity, speedups over dense at each token count."""
    by: dict[tuple[str, float], dict[int, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["shape"], round(r["sparsity"], 2)), {})[r["tokens"]] = r
    lines = [f"| layer | sparsity | DeepSparse {' / '.join(map(str, tokens_list))} tokens "
             f"| prunus best kernel | kernels |", "|---|---|---|---|---|"]
    for (shape, sp), per in by.items():
        cells = [per.get(t) for t in tokens_list]
        ds = " / ".join(_x(c["warm"]["deepsparse_x"]) if c else "–" for c in cells)
        pr = " / ".join(_x(c["warm"]["prunus_best_x"]) if c else "–" for c in cells)
        ks = " / ".join((c["warm"]["prunus_best"] or "–") if c else "–" for c in cells)
        lines.append(f"| {shape} | {sp:.0%} | {ds} | {pr} | {ks} |")
    won = [r for r in rows if (r["warm"]["prunus_over_deepsparse"] or 0) >= 1.0]
    lines.append(f"\nprunus >= DeepSparse (warm) on {len(won)} of {len(rows)} rows")
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, int]:
    try:
        out_f, in_f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected OUTxIN (e.g. 4096x4096), got {text!r}") from None
    return out_f, in_f


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"one shape and one sparsity ({QUICK[0][0][0]}x{QUICK[0][0][1]} at "
                         f"{QUICK[0][1] * 100:.0f}%%), all token counts")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads and DeepSparse num_cores (default 2)")
    ap.add_argument("--json", type=Path, help="write the machine, versions and rows here")
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=None,
                    help="OUTxIN layers (default: 4096x4096 1536x576 576x1536)")
    ap.add_argument("--sparsities", type=float, nargs="+", default=None,
                    help="default 0.5 0.7 0.9")
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS, help="default 1 4 16")
    ap.add_argument("--kernels", default=None, help="comma-separated prunus kernels (default: all "
                                                    "available float32 CPU kernels)")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds (median taken)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls of each first")
    ap.add_argument("--min-sample-ms", type=float, default=5.0,
                    help="a warm sample repeats the call for at least this long")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache timings")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads < 1 or any(t < 1 for t in args.tokens):
        ap.error("--threads and --tokens must be positive")
    try:
        import deepsparse
        import numpy
        import onnx
    except ImportError as e:
        print(f"bench/peer_deepsparse.py: error: {e}; run it with .venv-deepsparse/bin/python "
              f"(bash bench/setup_deepsparse.sh)", file=sys.stderr)
        return 2
    if args.quick:
        layers = QUICK
    else:
        layers = [(s, p) for s in (args.shapes or SHAPES) for p in (args.sparsities or SPARSITIES)]
    kernels = None if args.kernels is None else [k.strip() for k in args.kernels.split(",")]
    build = cpu.build_info()
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine(),
            "versions": {"torch": torch.__version__, "deepsparse": deepsparse.__version__,
                         "onnx": onnx.__version__, "numpy": numpy.__version__},
            "prunus_kernels": {"isa": build.get("isa"), "error": build.get("error")},
            "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
            "min_sample_ms": args.min_sample_ms, "cold": not args.no_cold, "seed": args.seed,
            "deepsparse_model": "ONNX MatMul, masked W.T initializer, batch_size=tokens"}
    m = info["machine"]
    print(f"# {info['date']}: {m['cpu']}, {m['cpus']} cpus, L3 {m['l3_mib']:.0f} MiB, "
          f"{' '.join(m['flags'])}; load average {m['loadavg_1_5_15']}")
    print(f"# torch {torch.__version__}, deepsparse {deepsparse.__version__}, {args.threads} threads, "
          f"prunus compiled kernels: {build.get('isa') or build.get('error')}")
    load1 = (m["loadavg_1_5_15"] or [0.0])[0]
    if load1 >= BUSY_LOAD:
        print(f"# warning: the machine is busy (1-min load average {load1} on {m['cpus']} cpus): "
              f"other processes share the cores, so {args.threads}-thread timings (DeepSparse's "
              f"and torch's thread pools wait for each other) are not to be trusted",
              file=sys.stderr)
    if not build.get("loaded"):
        print("# warning: prunus's compiled kernels are not loaded: only the torch.sparse "
              "fallback is timed (bash bench/setup_deepsparse.sh builds them)", file=sys.stderr)
    print(HEADER, flush=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="peer_deepsparse_") as tmp:
            for shape, sp in layers:
                rows += run_layer(shape, sp, list(args.tokens), args.threads, kernels,
                                  args.repeats, args.warmup, args.min_sample_ms,
                                  not args.no_cold, args.seed, Path(tmp))
    except PrunusError as e:
        print(f"bench/peer_deepsparse.py: error: {e}", file=sys.stderr)
        return 1
    info["seconds"] = round(time.perf_counter() - start, 1)
    info["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    print()
    print(summary(rows, list(args.tokens)))
    print(f"# {len(rows)} rows in {info['seconds']:.0f} s; load average at the end "
          f"{info['machine']['loadavg_end']}")
    if args.json:
        write_json(args.json, {**info, "rows": rows})
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
