"""The ``prunus prune`` job: load, calibrate, prune each method and baseline, evaluate, save, report.

Every method runs on the same calibration windows and is scored on the same evaluation data
(perplexity windows, or for an encoder held-out sentences: :mod:`prunus.oneshot.quality`),
beside the dense model and the magnitude and random baselines at the same spec. Between runs only
the targeted weights are restored (they are all that pruning changes), so memory stays at one
model plus one copy of its prunable weights.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from prunus import __version__
from prunus.oneshot.job import PruneJob
from prunus.evaluate import peak_rss_mb
from prunus.oneshot.pipeline import PruneResult, prune_targets
from prunus.oneshot.plan import make_plan
from prunus.core.spec import SparsitySpec
from prunus.core.finite import check_finite
from prunus.core.targets import select
from prunus.oneshot.quality import Quality, check_positions, summary
from prunus.evaluate import uses_embeddings
from prunus.oneshot.dtype import describe_dtype, quant_dtype, working_dtype
from prunus.activation import detach_gates
from prunus.oneshot.act_runs import activation_rows, trivial

Log = Callable[[str], None]


def _calibration(job: PruneJob, tokenizer: Any) -> tuple[Optional[Tensor], Optional[str]]:
    """The calibration windows and the text they come from (None, None without ``--calib``)."""
    from prunus.io import data

    if not job.calib:
        return None, None
    text = data.resolve_text(job.calib)
    ids = data.tokenize(text, tokenizer)
    return data.calibration_windows(ids, job.nsamples, job.seqlen, job.seed), text


def _row(label: str, role: str, spec: Optional[SparsitySpec], res: Optional[PruneResult],
         scores: dict[str, Any], model: Optional[nn.Module] = None) -> dict[str, Any]:
    row: dict[str, Any] = {"label": label, "role": role, "spec": str(spec) if spec else "-",
                           "perplexity": scores.get("perplexity"), "eval_seconds": scores.get("eval_seconds"),
                           "peak_rss_mb": round(peak_rss_mb(), 1)}
    if scores.get("similarity") is not None:
        row["similarity"] = scores["similarity"]
    if model is not None:
        row["parameters"] = sum(p.numel() for p in model.parameters())
    if res is not None:
        row.update(method=res.method, refine=res.refine, allocation=res.spec.allocation,
                   pattern=str(res.spec.pattern), target_sparsity=res.spec.sparsity,
                   sparsity=res.sparsity, seconds=res.seconds, per_layer=res.per_layer())
        if res.structure is not None:
            from prunus.structured.run import structure_summary

            row["structure"] = structure_summary(res)
    else:
        row.update(sparsity=0.0 if role == "dense" else None, seconds=None)
    return row


def run_prune(job: PruneJob, log: Log = print) -> dict[str, Any]:
    """Run a :class:`PruneJob`; return the result dict that ``--json`` writes.

    The returned dict has one entry per run in ``runs`` (dense first), and, for the first method
    at the first spec, the fields ``perplexity``, ``sparsity``, ``per_layer``, ``seconds`` and
    ``peak_rss_mb`` at top level with ``baselines`` beside them.
    """
    from prunus import export
    from prunus.io import fsutil
    from prunus.io.models import load_model

    # every output path is checked before any work; the writers check again at write time
    if job.out:
        fsutil.check_out_dir(job.out, job.overwrite)
    for path in (job.json, job.plot):
        if path:
            fsutil.check_out_file(path)
    t0 = time.perf_counter()
    model, tokenizer = load_model(job.model, dtype=working_dtype(job))
    model = quant_dtype(job, model, log)
    log(f"loaded {job.model} ({describe_dtype(model)}) in {time.perf_counter() - t0:.1f} s")
    if n_gated := detach_gates(model):
        log(f"note: {job.model} carries activation thresholds for {n_gated} layers; they are off while pruning "
            f"(--activation-sparsity calibrates new ones)")
    check_finite(model, job.model)  # before any window is cut or any layer pruned
    if uses_embeddings(model):
        check_positions(model, job.seqlen)  # before the windows are cut
    calib, calib_text = _calibration(job, tokenizer)
    if calib is not None:
        log(f"calibration: {calib.shape[0]} windows x {calib.shape[1]} tokens from {job.calib}")

    if job.out and job.format == "dense":
        from prunus.structured.run import check_dense_export

        for spec in job.specs:
            check_dense_export(model, spec)  # before any work: BERT heads are per-layer entries
    targets = select(model, job.include, job.exclude)
    if job.out:  # room for the output, before any pruning
        from prunus.export.tensors import unique_state
        from prunus.oneshot.disk import check_disk, estimate_bytes

        check_disk(job.out, estimate_bytes(((k, tuple(t.shape), t.dtype) for k, t in unique_state(model)[0].items()),
                                           {f"{t.name}.weight": float(job.specs[0].sparsity) for t in targets},
                                           job.format))
    n_runs = len(job.specs) * (len(job.methods) + sum(b in job.baselines and b not in job.methods
                                                      for b in ("magnitude", "random")))
    # only the targeted weights change; keep a copy only when a later run needs the dense model
    dense_w = {t.name: t.get().detach().clone() for t in targets} if n_runs > 1 else {}
    # a quant spec also rounds the embedding tables (pipeline.quantize_embeddings)
    dense_emb = {id(m): (m, m.weight.detach().clone()) for m in model.modules()
                 if isinstance(m, torch.nn.Embedding)} \
        if n_runs > 1 and any(s.quant is not None for s in job.specs) else {}

    def restore() -> None:
        for t in targets:
            if t.name in dense_w:
                t.set(dense_w[t.name])
        with torch.no_grad():
            for m, w in dense_emb.values():
                m.weight.copy_(w)

    if job.device != "cpu":
        model.to(job.device)
    quality = Quality(job, model, tokenizer, calib_text)  # an encoder's dense embeddings, now
    if (line := quality.describe()) is not None:
        log(line)
    rows: list[dict[str, Any]] = []
    if "dense" in job.baselines:
        scores = quality.score(model, "dense")
        rows.append(_row("dense", "dense", None, None, scores, model))
        log(f"dense: {summary(scores)}".rstrip(": "))

    saved: Optional[dict[str, Any]] = None
    for spec in job.specs:
        runs = [(m, "method") for m in job.methods]
        if trivial(spec) and any(b in job.baselines and b not in job.methods for b in ("magnitude", "random")):
            log(f"note: at sparsity {spec} the magnitude and random baselines are the dense model: skipped")
        runs += [(b, "baseline") for b in ("magnitude", "random")
                 if b in job.baselines and b not in job.methods and not trivial(spec)]
        for name, role in runs:
            restore()
            plan = None
            if spec.structure is None or spec.remainder:
                if role == "method":
                    plan = make_plan(spec, name, refine=job.refine, method_options=job.options_of(name),
                                     refine_options=job.refine_options,
                                     allocation_options=job.allocation_options, steps=job.steps)
                else:
                    plan = make_plan(spec, name, allocation_options=job.allocation_options)
            net = model
            if spec.structure is not None:
                net, res = _structured(job, model, spec, name, role, plan, calib)
            else:
                res = prune_targets(model, targets, plan, calib, device=job.device,
                                    batch_size=job.calib_batch_size, seed=job.seed, progress=job.progress)
            label = res.label
            for note in (res.structure.notes if res.structure is not None and role == "method" else ()):
                log(f"note: {note}")
            act_on = job.activation is not None and role == "method"
            scores: dict[str, Any] = {}
            if not act_on or ("weights-only" in job.baselines and not (trivial(spec) and "dense" in job.baselines)):
                scores = quality.score(net, f"{label} {spec}")
                rows.append(_row(label, "weights-only" if act_on else role, spec, res, scores, net))
                log(f"{label} {spec}: sparsity {res.sparsity:.4f}, {res.seconds:.1f} s"
                    + (f", {summary(scores)}" if summary(scores) else ""))
            act_res = None
            if act_on:
                act_rows, act_res = activation_rows(
                    job, net, calib, quality, label, spec, log=log, weight_seconds=res.seconds,
                    make_row=lambda lab, rl, sc: _row(lab, rl, spec, res, sc, net))
                rows += act_rows
                scores = {"perplexity": act_rows[0].get("perplexity"), "similarity": act_rows[0].get("similarity")}
            if job.out and role == "method" and saved is None:
                meta = provenance(job, spec, res, scores)
                if act_res is not None:
                    meta.update(act_res.metadata())
                extra = {"quant": res.quant} if res.quant else {}
                info = export.save(net.to("cpu"), job.out, format=job.format, masks=res.masks,
                                   metadata=meta, tokenizer=tokenizer, overwrite=job.overwrite, **extra)
                saved = {"path": str(info.path), "format": info.format, "bytes": info.bytes,
                         "dense_bytes": info.dense_bytes}
                log(f"saved {job.format} checkpoint to {info.path}: {info.bytes / 2**20:.1f} MiB "
                    f"({info.bytes / max(1, info.dense_bytes):.2f}x of dense {info.dense_bytes / 2**20:.1f} MiB)")
                if job.device != "cpu":
                    net.to(job.device)
            del net
    restore()  # the caller gets the dense model back (when a copy was kept)
    out = assemble(job, rows, saved)
    out["settings"]["working_dtype"] = describe_dtype(model)
    return out


def _structured(job: PruneJob, model: nn.Module, spec: SparsitySpec, name: str, role: str,
                plan: Any, calib: Optional[Tensor]) -> tuple[nn.Module, PruneResult]:
    """Structure removed from a copy of the dense model (it changes shape), then the remainder."""
    import copy

    from prunus.structured.prune import StructureOptions
    from prunus.structured.run import prune_with_structure, structure_method_for

    work = copy.deepcopy(model)
    smethod = structure_method_for(name, job.structure_method if role == "method" else None)
    res = prune_with_structure(work, spec, smethod, plan, calib,
                               options=job.structure_options or StructureOptions(),
                               steps=job.steps if role == "method" else (), include=job.include,
                               exclude=job.exclude, device=job.device, batch_size=job.calib_batch_size,
                               seed=job.seed, progress=job.progress)
    return work, res


def provenance(job: PruneJob, spec: SparsitySpec, res: PruneResult, scores: dict[str, Any]) -> dict[str, Any]:
    """Metadata stored with a checkpoint: how it was made, and how good it was."""
    return {"prunus_version": __version__, "source_model": job.model, "method": res.method,
            "refine": res.refine, "reconstruct": _step_options(job, "reconstruct"),
            "steps": {s.name: dataclasses.asdict(s.options) for s in job.steps} or None,
            "spec": str(spec), "pattern": str(spec.pattern),
            "sparsity_target": spec.sparsity, "allocation": spec.allocation,
            "achieved_sparsity": res.sparsity, "calib": job.calib, "nsamples": job.nsamples,
            "seqlen": job.seqlen, "seed": job.seed, "eval": job.eval, "perplexity": scores.get("perplexity"),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "per_layer": {k: v["achieved"] for k, v in res.per_layer().items()},
            **({"activation": {"method": job.activation.method, "target": job.activation.sparsity}}
               if job.activation is not None else {}),
            **({"quant": str(spec.quant)} if spec.quant is not None else {}),
            **({"embedding_similarity": scores["similarity"], "sentences": job.sentences}
               if scores.get("similarity") is not None else {}),
            **({"structure": _summary(res)} if res.structure is not None else {})}


def _summary(res: PruneResult) -> Optional[dict[str, Any]]:
    from prunus.structured.run import structure_summary

    return structure_summary(res)


def _step_options(job: PruneJob, name: str) -> Optional[dict[str, Any]]:
    return next((dataclasses.asdict(s.options) for s in job.steps if s.name == name), None)


def assemble(job: PruneJob, rows: list[dict[str, Any]], saved: Optional[dict[str, Any]]) -> dict[str, Any]:
    settings = {"model": job.model, "calib": job.calib, "eval": job.eval, "nsamples": job.nsamples,
                "seqlen": job.seqlen, "windows": job.windows, "sentences": job.sentences, "seed": job.seed,
                "device": job.device, "dtype": job.dtype, "activation": None if job.activation is None else
                {"method": job.activation.method, "sparsity": job.activation.sparsity},
                "torch_threads": torch.get_num_threads(), "prunus_version": __version__}
    out: dict[str, Any] = {"settings": settings, "runs": rows, "checkpoint": saved}
    main = next((r for r in rows if r["role"] == "method"), None)
    if main is not None:
        for k in ("method", "refine", "spec", "perplexity", "sparsity", "per_layer", "seconds", "peak_rss_mb"):
            out[k] = main.get(k)
        if "similarity" in main:
            out["similarity"] = main["similarity"]
        if "activation" in main:
            out["activation"] = main["activation"]
        keys = ("perplexity", "similarity", "sparsity", "seconds", "peak_rss_mb")
        out["baselines"] = {r["label"]: {k: r.get(k) for k in keys if k != "similarity" or k in r}
                            for r in rows if r["role"] != "method" and r["spec"] in ("-", main["spec"])}
    return out


def write_json(obj: Any, path: str) -> None:
    from prunus.io.fsutil import atomic_file

    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=float)
            f.write("\n")
