"""``prunus prune`` streamed: the job of :mod:`prunus.oneshot.runner`, one block in memory at a time.

:func:`run_job` is what the CLI runs. ``--load stream`` (and ``auto``, the default, where it can)
streams a ``save_pretrained`` safetensors folder or a hub id (its files downloaded into the Hugging
Face cache, then streamed from there; ``smollm2-135m`` once its safetensors copy is cached); every
other job runs in memory (:func:`prunus.oneshot.runner.run_prune`), and ``auto`` says why in a note:

- a ``.gguf`` file (transformers dequantizes it whole) and a prunus checkpoint (its format's loader
  decodes it whole);
- an encoder (its embedding-similarity score needs whole-model forwards; the encoders prunus ships
  are small);
- structured specs (``mlp@``, ``heads@``, ``blocks@``: the surgery changes the model's shape and the
  block influence reads every block), ``+int8``/``+int4`` specs (the embedding tables are rounded once
  every block is pruned), budgets that observe the whole model first (``owl``) or rank all weights
  together (``global``, ``erk`` read every weight) — a whole-model pass streamed first would serve
  them, and is not written yet; activation sparsity (``--activation-sparsity``: its thresholds are
  calibrated once the weights are pruned, on the whole model);
- a checkpoint whose tensor names differ from the model's, and a format other than compressed/dense.

A streamed job gives the same rows, masks, weights and checkpoint contents as the in-memory one
(bit-identical; ``tests/test_stream.py``): the dense perplexity is one streamed pass, and each method
and baseline another, which prunes, evaluates and (for the first method) writes block by block.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from prunus.core.masks import check_divisible
from prunus.core.spec import SparsitySpec
from prunus.core.targets import select
from prunus.errors import SpecError
from prunus.evaluate import uses_embeddings
from prunus.io.dtypes import short_name
from prunus.io.lazy import LazyModel, NotStreamable
from prunus.oneshot.disk import check_disk, estimate_bytes
from prunus.oneshot.dtype import working_dtype
from prunus.oneshot.job import PruneJob
from prunus.oneshot.pipeline import prune_targets
from prunus.oneshot.plan import make_plan
from prunus.oneshot.runner import _calibration, _row, assemble, provenance, run_prune
from prunus.oneshot.stream import Streamer, dense_perplexity, replay_perplexity

Log = Callable[[str], None]
STREAM_ALLOCATIONS = ("uniform",)  # budgets that need neither an observe pass nor every weight


def run_job(job: PruneJob, log: Log = print) -> dict[str, Any]:
    """Run ``job`` streamed where it can be (``--load auto|stream``), else in memory."""
    if job.load == "memory":
        return run_prune(job, log)
    folder, why = stream_source(job)
    if folder is not None:
        why = job_reason(job)
    if folder is not None and why is None:
        try:
            lazy = LazyModel(folder, working_dtype(job), job.device)
            why = model_reason(lazy, job)
        except NotStreamable as e:
            why = str(e)
        if why is None:
            return run_streamed(job, lazy, log)
    if job.load == "stream":
        raise SpecError(f"--load stream cannot serve this job: {why}; use --load memory")
    if why:
        log(f"note: loading {job.model} in memory: {why}")
    return run_prune(job, log)


def stream_source(job: PruneJob) -> tuple[Optional[Path], Optional[str]]:
    """The safetensors folder to stream ``job.model`` from, or None and why not (None: no note)."""
    from prunus.io.cache import cache_root
    from prunus.io.models import ALIASES, MINILM, _looks_like_path
    from prunus.io.shards import INDEX

    text = job.model
    if text.lower() in ALIASES:
        if ALIASES[text.lower()] == MINILM:
            return None, "minilm is an encoder"
        cached = cache_root() / "models" / ALIASES[text.lower()]
        if (cached / "config.json").is_file() and any(cached.glob("*.safetensors")):
            return cached, None
        return None, f"{text} is converted from its GGUF file on first use"
    path = Path(text).expanduser()
    if path.is_file():
        return None, "a single file (GGUF) is dequantized whole" if path.suffix.lower() == ".gguf" else None
    if path.is_dir():
        if (path / "prunus.json").is_file():
            return None, "a prunus checkpoint is decoded whole by its format's loader"
        if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or (path / INDEX).is_file()):
            return path, None
        return None, None  # the in-memory loader says what is wrong with the folder
    if _looks_like_path(text):
        return None, None
    try:
        from huggingface_hub import snapshot_download

        got = snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"])
    except Exception:  # offline, no such repo: the in-memory loader gives the one-line error
        return None, None
    return Path(got), None


def job_reason(job: PruneJob) -> Optional[str]:
    """Why the job's specs or format cannot be streamed (None: they can)."""
    from prunus.export.writer import FORMATS

    for spec in job.specs:
        if spec.structure is not None:
            return f"structured specs ({spec}) change the model's shape"
        if spec.quant is not None:
            return f"{spec} rounds the embedding tables once every block is pruned"
        if spec.allocation not in STREAM_ALLOCATIONS:
            return f"the {spec.allocation} budget needs a pass over the whole model first"
    if job.activation is not None:
        return "activation thresholds are calibrated on the whole pruned model (not streamed yet)"
    if job.out and job.format not in FORMATS:
        return f"the {job.format} format has no streaming writer ({', '.join(FORMATS)} have)"
    return None


def model_reason(lazy: LazyModel, job: PruneJob) -> Optional[str]:
    """Why this model cannot be streamed (None: it can)."""
    if uses_embeddings(lazy.model):
        return "an encoder is scored by embedding similarity over the whole model"
    head = lazy.prefix + "."
    outside = [t.name for t in select(lazy.model, job.include, job.exclude) if not t.name.startswith(head)]
    if outside:
        return f"{outside[0]} lies outside the transformer blocks"
    return None


def run_streamed(job: PruneJob, lazy: LazyModel, log: Log = print) -> dict[str, Any]:
    """:func:`prunus.oneshot.runner.run_prune`, streamed (see the module docstring)."""
    from prunus.io import data, fsutil
    from prunus.io.models import _tokenizer

    if job.out:
        fsutil.check_out_dir(job.out, job.overwrite)
    for path in (job.json, job.plot):
        if path:
            fsutil.check_out_file(path)
    lazy.scan(job.model)  # NaN/Inf anywhere, float16 overflow: refused before any work
    model = lazy.model
    targets = select(model, job.include, job.exclude)
    for spec in job.specs:
        for t in targets:
            check_divisible(t.shape, spec.pattern, t.name)
    if job.out:
        sparsity = {f"{t.name}.weight": float(job.specs[0].sparsity) for t in targets}
        check_disk(job.out, estimate_bytes(((r.key, lazy.index.shape(r.key), lazy.dtype if lazy.index.dtype(r.key)
                                              .is_floating_point else lazy.index.dtype(r.key)) for r in lazy.refs),
                                           sparsity, job.format))
    tokenizer = _tokenizer(lazy.folder, local_files_only=True)
    log(f"streaming {job.model} ({short_name(lazy.dtype)}) from {len(lazy.index.files())} shard(s), "
        f"{lazy.index.total_bytes() / 2**20:.1f} MiB, one block at a time")
    calib, _ = _calibration(job, tokenizer)
    if calib is not None:
        log(f"calibration: {calib.shape[0]} windows x {calib.shape[1]} tokens from {job.calib}")
    windows = None
    if job.eval:
        windows = data.eval_windows(data.tokenize(data.resolve_text(job.eval), tokenizer), job.seqlen, job.windows)
        log(f"evaluation: {windows.shape[0]} windows x {windows.shape[1]} tokens from {job.eval}")

    rows: list[dict[str, Any]] = []
    if "dense" in job.baselines:
        scores = _scores(lambda: dense_perplexity(lazy, windows, batch_size=job.eval_batch_size,
                                                  progress=job.progress) if windows is not None else None)
        rows.append(_row("dense", "dense", None, None, scores, model))
        log(f"dense: ppl {scores['perplexity']:.2f}" if scores["perplexity"] is not None else "dense")
    saved: Optional[dict[str, Any]] = None
    for spec in job.specs:
        runs = [(m, "method") for m in job.methods]
        runs += [(b, "baseline") for b in ("magnitude", "random") if b in job.baselines and b not in job.methods]
        for name, role in runs:
            if role == "method":
                plan = make_plan(spec, name, refine=job.refine, method_options=job.options_of(name),
                                 refine_options=job.refine_options, allocation_options=job.allocation_options,
                                 steps=job.steps)
            else:
                plan = make_plan(spec, name, allocation_options=job.allocation_options)
            if job.out and role == "method" and saved is None:
                res, scores, saved = _saved_pass(job, lazy, targets, plan, spec, calib, windows, tokenizer)
                log(f"saved {job.format} checkpoint to {saved['path']}: {saved['bytes'] / 2**20:.1f} MiB "
                    f"({saved['bytes'] / max(1, saved['dense_bytes']):.2f}x of dense "
                    f"{saved['dense_bytes'] / 2**20:.1f} MiB)")
            else:
                res, scores = _pass(job, lazy, targets, plan, calib, windows, None)
            rows.append(_row(res.label, role, spec, res, scores, model))
            log(f"{res.label} {spec}: sparsity {res.sparsity:.4f}, {res.seconds:.1f} s"
                + (f", ppl {scores['perplexity']:.2f}" if scores["perplexity"] is not None else ""))
    out = assemble(job, rows, saved)
    out["settings"].update(working_dtype=short_name(lazy.dtype), load="stream")
    return out


def _scores(fn: Callable[[], Optional[float]]) -> dict[str, Any]:
    t = time.perf_counter()
    ppl = fn()
    return {"perplexity": ppl, "similarity": None, "eval_seconds": None if ppl is None else time.perf_counter() - t}


def _pass(job: PruneJob, lazy: LazyModel, targets: Any, plan: Any, calib: Any, windows: Any,
          writer: Any) -> tuple[Any, dict[str, Any]]:
    """One streamed pass: prune block by block (the evaluation windows carried along), then the ppl."""
    streamer = Streamer(lazy, eval_windows=windows, eval_batch_size=job.eval_batch_size, writer=writer)
    res = prune_targets(lazy.model, targets, plan, calib, device=job.device, batch_size=job.calib_batch_size,
                        seed=job.seed, progress=job.progress, residency=streamer)
    finals = streamer.finals()
    scores = _scores(lambda: None if finals is None else replay_perplexity(
        lazy, finals, windows, batch_size=job.eval_batch_size, tuple_out=bool(streamer.tuple_out),
        progress=job.progress, desc=f"{res.label} {plan.spec} ppl"))
    return res, scores


def _saved_pass(job: PruneJob, lazy: LazyModel, targets: Any, plan: Any, spec: SparsitySpec, calib: Any,
                windows: Any, tokenizer: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The pass of the first method, writing the checkpoint as it goes (atomically: whole or absent)."""
    from prunus.export.manifest import WEIGHTS, folder_bytes
    from prunus.export.writer import stream_writer
    from prunus.io.fsutil import atomic_dir

    with atomic_dir(job.out, overwrite=job.overwrite) as tmp:
        writer = stream_writer(job.format, tmp, n_keys=len(lazy.refs))
        res, scores = _pass(job, lazy, targets, plan, calib, windows, writer)
        dense_bytes = writer.finish(lazy.model, provenance(job, spec, res, scores), tokenizer, lazy.tied())
    out = Path(job.out)
    size = (out / WEIGHTS).stat().st_size if job.format == "compressed" else folder_bytes(out, "*.safetensors")
    return res, scores, {"path": str(out), "format": job.format, "bytes": size, "dense_bytes": dense_bytes}
