"""The ``prunus`` command line: ``prune``, ``eval``, ``list``, ``train``, ``bench``, ``export``.

Flags are turned into a :class:`~prunus.oneshot.job.PruneJob` here and nowhere deeper. Every error a user
can cause ends as one line, ``prunus: error: ...``, with exit status 2; ``--debug`` shows the
traceback instead. Unexpected failures also print one line (status 1) and point at ``--debug``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Optional, Sequence

from prunus.errors import PrunusError


def _add_prune(sub: Any) -> None:
    p = sub.add_parser("prune", help="one-shot prune a causal LM or encoder and compare it with baselines",
                       description="One-shot prune a causal LM (scored by perplexity) or an encoder (by "
                       "embedding similarity to dense), evaluate it beside dense, magnitude and random "
                       "at the same sparsity, and optionally save it.")
    p.add_argument("model", nargs="?", help="hub id, local folder, .gguf file, or smollm2-135m / minilm "
                                            "(bundled)")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. method_options.blocksize=64")
    p.add_argument("--recipe", help="YAML recipe; flags and overrides take precedence")
    p.add_argument("--method", help="method name(s), comma-separated: magnitude, random, wanda, sparsegpt, ...")
    p.add_argument("--sparsity", help="spec(s), comma-separated: 0.5, 50%%, 2:4, 4x4@0.5, channel@0.3, "
                                        "mlp@0.3, heads@0.25, blocks@4, mlp@0.25+2:4+int8")
    p.add_argument("--allocation", help="layer budget: uniform, global, erk, owl")
    p.add_argument("--structure-method", help="unit criterion for mlp@/heads@/blocks@ specs: flap, wanda-sp, "
                                              "magnitude, random (default: from --method, else flap)")
    p.add_argument("--structure-allocation", help="structure budget over layers: uniform (default), "
                                                  "global (FLAP), cfsp (coarse-to-fine)")
    p.add_argument("--heads-unit", help="GQA head unit: auto (default), group (whole KV groups), query")
    p.add_argument("--compensate", action="store_true", default=None,
                   help="FLAP bias compensation: fold removed channels' mean output into a bias")
    p.add_argument("--refine", help="mask refiner applied after the method: dsnot")
    p.add_argument("--reconstruct", type=int, metavar="EPOCHS",
                   help="after each block is pruned, tune its kept weights for EPOCHS passes over the "
                        "calibration windows towards the dense block's outputs (default off)")
    p.add_argument("--step", help="block step(s) run on each block after it is pruned, comma-separated "
                                  "(prunus list); options as steps.NAME.KEY=VALUE")
    p.add_argument("--activation-sparsity", help="also zero this fraction of every linear's inputs at run time "
                   "(0.25 or 25%%; thresholds calibrated on --calib after the weights are pruned)")
    p.add_argument("--activation-method", help="activation thresholds: teal (default), wina, uniform")
    p.add_argument("--calib", help="calibration text: a file, book:NAME or hf:DATASET[:CONFIG][:SPLIT]")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, help="tokens per window (default 512)")
    p.add_argument("--eval", help="evaluation text (same forms as --calib)")
    p.add_argument("--windows", type=int, help="evaluation windows (default 64)")
    p.add_argument("--sentences", type=int, help="an encoder's held-out evaluation sentences (default 256)")
    p.add_argument("--include", help="comma-separated FQN globs of layers to prune (default *)")
    p.add_argument("--exclude", help="comma-separated FQN globs to keep dense (default lm_head, embeddings)")
    p.add_argument("--out", help="save the pruned model to this folder")
    p.add_argument("--format", help="checkpoint format: compressed (default), dense, or any registered one")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out folder")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--plot", help="write a PNG comparing perplexity and per-layer sparsity")
    p.add_argument("--device", help="where calibration and evaluation run: cpu (default), cuda")
    p.add_argument("--seed", type=int, help="seed for calibration windows and random pruning (default 0)")
    p.add_argument("--baselines", help="subset of dense,magnitude,random,weights-only,uniform-activation (default all)")
    p.add_argument("--no-baselines", action="store_true", help="run only the method(s)")
    p.add_argument("--batch-size", type=int, dest="eval_batch_size", help="evaluation windows per forward")
    p.add_argument("--dtype", help="working dtype: auto (the checkpoint's, default), float32, bfloat16, float16")
    p.add_argument("--load", help="stream (block by block from safetensors shards; default for folders, hub ids), memory, auto")
    p.add_argument("--calib-batch-size", type=int, help="calibration windows per chunk (default: all)")


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="perplexity and sparsity of a model or prunus checkpoint")
    p.add_argument("model", help="hub id, folder, .gguf file, prunus checkpoint, or smollm2-135m")
    p.add_argument("--text", required=True, help="a text file, book:NAME or hf:DATASET[:CONFIG][:SPLIT]")
    for flag, kw in (("--seqlen", dict(type=int, default=512)), ("--batch-size", dict(type=int, default=1)),
                     ("--windows", dict(type=int, default=None, help="evaluation windows (default: all)")),
                     ("--device", dict(default="cpu")), ("--json", dict(help="write the result to this JSON file"))):
        p.add_argument(flag, **kw)


def _add_runtime(sub: Any) -> None:
    p = sub.add_parser("bench", help="time every prunable linear, dense vs sparse kernels, and end to end")
    p.add_argument("model", help="a prunus checkpoint, or any model (its zero pattern is used)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tokens", default="1,16,128", help="comma-separated token counts per layer timing")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="end-to-end prefill length")
    p.add_argument("--new-tokens", type=int, default=32, help="end-to-end decode length")
    p.add_argument("--compile", action="store_true",
                   help="also time the planned model after torch.compile (minutes to compile)")
    p.add_argument("--tune", action="store_true",
                   help="check the plan on the decode of the whole model (minutes)")
    p.add_argument("--json", help="write the timings to this JSON file")
    p = sub.add_parser("export", help="re-save a pruned checkpoint with a measured per-layer kernel plan")
    p.add_argument("checkpoint", help="a prunus checkpoint (with masks)")
    p.add_argument("--runtime", default="auto", choices=["auto", "dense"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", default="1", help="token counts the model will run at (a kernel must win at all)")
    p.add_argument("--margin", type=float, default=1.1, help="required speedup over dense")
    p.add_argument("--threads", type=int)
    p.add_argument("--tune", action="store_true",
                   help="then check the per-layer plan on the decode of the whole model, group by "
                        "group of like layers (minutes)")
    p.add_argument("--act-int8", action="store_true",
                   help="let W8A8 kernels (activations rounded to int8 per token) compete for int8 "
                        "layers: faster, not exact")
    p.add_argument("--overwrite", action="store_true")


def _at_least(**checks: tuple[Optional[int], int]) -> None:
    """``--name`` must be at least its bound (None: not given, fine)."""
    from prunus.errors import SpecError

    for name, (value, lo) in checks.items():
        if value is not None and value < lo:
            raise SpecError(f"--{name.replace('_', '-')} must be at least {lo}, got {value}")


def _tokens(text: str) -> list[int]:
    from prunus.errors import SpecError

    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SpecError(f"--tokens must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise SpecError(f"--tokens must be positive integers, got {text!r}")
    return vals


def cmd_bench(args: argparse.Namespace) -> int:
    from prunus.report import table
    from prunus.kernels.runtime import bench_model
    from prunus.oneshot.runner import write_json

    if args.json:
        from prunus.io.fsutil import check_out_file

        check_out_file(args.json)  # before anything is loaded or timed
    res = bench_model(args.model, device=args.device, tokens=_tokens(args.tokens), threads=args.threads,
                      prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                      log=lambda s: print(s, file=sys.stderr), compile=args.compile,
                      tune=args.tune)
    best: dict[tuple, dict] = {}
    for r in res["layers"]:
        k = (r["layer"], r["tokens"])
        if k not in best or r["speedup"] > best[k]["speedup"]:
            best[k] = r
    print(table(list(best.values()), (("layer", "layer"), ("tokens", "tokens"), ("sparsity", "sparsity"),
                                      ("dense_ms", "dense ms"), ("sparse_ms", "best ms"), ("kernel", "kernel"),
                                      ("speedup", "speedup"))))
    e = res["end_to_end"]
    print(f"\nend to end ({res['sparse_layers']} layers on sparse kernels): prefill "
          f"{e['dense']['prefill_s'] * 1e3:.1f} -> {e['planned']['prefill_s'] * 1e3:.1f} ms "
          f"({e['prefill_speedup']:.2f}x); decode {e['dense']['decode_tok_s']:.1f} -> "
          f"{e['planned']['decode_tok_s']:.1f} tok/s ({e['decode_speedup']:.2f}x)")
    for key, what in (("dense_gated", "activation gates on dense kernels"), ("compiled", "after torch.compile")):
        if key in e:
            print(f"{what}: prefill {e[key]['prefill_s'] * 1e3:.1f} ms; decode {e[key]['decode_tok_s']:.1f} "
                  f"tok/s ({e[key]['decode_tok_s'] / e['dense']['decode_tok_s']:.2f}x dense)")
    if args.json:
        write_json(res, args.json)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from prunus.kernels.runtime import export_runtime

    info, plan = export_runtime(args.checkpoint, args.out, runtime=args.runtime, tokens=_tokens(args.tokens),
                                margin=args.margin, device=args.device, threads=args.threads,
                                overwrite=args.overwrite, log=lambda s: print(s, file=sys.stderr),
                                act_int8=args.act_int8, tune=args.tune)
    if plan is not None:
        print(plan.table())
    print(f"saved {info.path}: {info.bytes / 2**20:.1f} MiB ({info.bytes / max(1, info.dense_bytes):.2f}x of dense)"
          + (f"; {len(plan.sparse_layers)} of {len(plan.layers)} layers on sparse kernels" if plan else ""))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with prunus's error format: one line ``prunus: error: ...``, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"prunus: error: {self.prog.removeprefix('prunus').strip() + ': ' if self.prog != 'prunus' else ''}"
              f"{message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prunus", description="Make neural networks sparse, "
                                     "measure it honestly, and make the sparsity pay.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_prune(sub)
    _add_eval(sub)
    _add_runtime(sub)
    sub.add_parser("list", help="registered methods, refiners, layer budgets and patterns")
    from prunus.training.cli import add_parser as add_train

    add_train(sub)
    for p in sub.choices.values():  # --debug / --quiet also after the command name
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return parser


_PRUNE_KEYS = ("method", "sparsity", "allocation", "refine", "calib", "nsamples", "seqlen", "eval",
               "windows", "sentences", "include", "exclude", "out", "format", "overwrite", "json", "plot",
               "device", "seed", "baselines", "eval_batch_size", "calib_batch_size", "dtype", "load")


def cmd_prune(args: argparse.Namespace) -> int:
    from prunus.io.recipe import apply_override, load_recipe
    from prunus.oneshot.job import job_from_mapping
    from prunus.report import plot_prune, prune_table
    from prunus.oneshot.runner import write_json
    from prunus.oneshot.stream_run import run_job

    overrides = list(args.overrides)
    model = args.model
    if model and "=" in model:  # `prunus prune --recipe r.yaml method=wanda`: no MODEL given
        overrides.insert(0, model)
        model = None
    d: dict[str, Any] = load_recipe(args.recipe) if args.recipe else {}
    for o in overrides:
        apply_override(d, o)
    if model:
        d["model"] = model
    for k in _PRUNE_KEYS:
        v = getattr(args, k, None)
        if v is not None:
            d[k] = v
    if args.no_baselines:
        d["baselines"] = []
    if args.structure_method:
        d["structure_method"] = args.structure_method
    for flag, key in (("structure_allocation", "allocation"), ("heads_unit", "heads"), ("compensate", "compensate")):
        if getattr(args, flag, None) is not None:
            d["structure"] = {**dict(d.get("structure") or {}), key: getattr(args, flag)}
    for flag, key in (("activation_sparsity", "sparsity"), ("activation_method", "method")):
        if getattr(args, flag, None) is not None:
            d["activation"] = {**dict(d.get("activation") or {}), key: getattr(args, flag)}
    if getattr(args, "reconstruct", None) is not None:
        d["reconstruct"] = {**dict(d.get("reconstruct") or {}), "epochs": args.reconstruct}
    if args.step:
        st = d.get("steps") or {}
        if isinstance(st, list):
            st = {n: {} for n in st}
        if isinstance(st, dict):
            for name in (x.strip() for x in args.step.split(",") if x.strip()):
                st.setdefault(name, {})
        d["steps"] = st
    d["progress"] = not args.quiet
    job = job_from_mapping(d)
    result = run_job(job, log=lambda s: print(s, file=sys.stderr))
    print(prune_table(result["runs"]))
    if job.json:
        write_json(result, job.json)
        print(f"wrote {job.json}", file=sys.stderr)
    if job.plot:
        plot_prune(result["runs"], job.plot)
        print(f"wrote {job.plot}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import time

    from prunus.activation import measured
    from prunus.evaluate import count_zeros, peak_rss_mb, perplexity, uses_embeddings
    from prunus.io import data
    from prunus.io.models import check_device, load_model
    from prunus.oneshot.runner import write_json

    _at_least(seqlen=(args.seqlen, 2), windows=(args.windows, 1), batch_size=(args.batch_size, 1))
    check_device(args.device)
    if args.json:
        from prunus.io.fsutil import check_out_file

        check_out_file(args.json)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, runtime="auto")  # as it runs: the stored kernel plan and gates applied
    if uses_embeddings(model):
        from prunus.errors import ModelError

        raise ModelError(f"{args.model} is an encoder, which has no perplexity: prunus prune scores it by "
                         f"embedding similarity to its dense model")
    ids = data.tokenize(data.resolve_text(args.text), tok)
    windows = data.eval_windows(ids, args.seqlen, args.windows)
    model.to(args.device)
    t1 = time.perf_counter()
    ppl, act = measured(model, lambda: perplexity(model, windows, batch_size=args.batch_size, device=args.device,
                                                  progress=not args.quiet))
    zeros, total = count_zeros(model)
    res = {"model": args.model, "text": args.text, "seqlen": args.seqlen, "windows": int(windows.shape[0]),
           "perplexity": ppl, "sparsity": zeros / max(1, total), "load_seconds": t1 - t0,
           "seconds": time.perf_counter() - t1, "peak_rss_mb": round(peak_rss_mb(), 1), "activation_sparsity": act}
    print(f"{args.model}: perplexity {ppl:.3f} over {res['windows']} x {args.seqlen} tokens; sparsity of prunable "
          f"layers {res['sparsity']:.4f}" + (f"; activation sparsity {act['achieved']:.4f}" if act else "")
          + f"; {res['seconds']:.1f} s")
    if args.json:
        write_json(res, args.json)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from prunus import budgets
    from prunus.activation import load_all as load_activation
    from prunus.algorithms import METHODS, REFINERS, load_all
    from prunus.oneshot import steps
    from prunus.report import table

    load_all()
    rows = [{"kind": "method", "name": m.name, "needs": ", ".join(sorted(m.needs)) or "weights only",
             "patterns": ", ".join(p.__name__ for p in m.patterns), "paper": m.paper}
            for m in sorted(METHODS.values(), key=lambda m: m.name)]
    rows += [{"kind": "refiner", "name": r.name, "needs": ", ".join(sorted(r.needs)),
              "patterns": ", ".join(p.__name__ for p in r.patterns), "paper": r.paper}
             for r in sorted(REFINERS.values(), key=lambda r: r.name)]
    rows += [{"kind": "block step", "name": st.name, "needs": "calibration, dense outputs", "patterns": "all",
              "paper": st.paper} for st in sorted(steps.load_all().values(), key=lambda x: x.name)]
    rows += [{"kind": "allocation", "name": a.name, "needs": "calibration" if a.needs else "-",
              "patterns": "all" if a.name == "uniform" else "all but N:M", "paper": a.paper}
             for a in sorted(budgets.load_all().values(), key=lambda a: a.name)]
    rows += [{"kind": "activation", "name": a.name, "needs": "calibration", "patterns": f"inputs (score: {a.scale})",
              "paper": a.paper} for a in sorted(load_activation().values(), key=lambda a: a.name)]
    from prunus.structured import load_all as load_structure
    from prunus.structured.allocate import ALLOCATIONS

    rows += [{"kind": "structure", "name": c.name, "needs": ", ".join(sorted(c.needs)) or "weights only",
              "patterns": f"mlp@, heads@, blocks@ ({c.blocks})", "paper": c.paper}
             for c in sorted(load_structure().values(), key=lambda c: c.name)]
    print(table(rows, (("kind", "kind"), ("name", "name"), ("needs", "needs"), ("patterns", "patterns"),
                       ("paper", "paper"))))
    from prunus.training import METHODS as TRAINING

    print("\nsparse training (prunus train / prunus.training):")
    print(table([{"name": m.name, "paper": getattr(m, "paper", "")} for m in
                 sorted(TRAINING.values(), key=lambda m: m.name)], (("name", "name"), ("paper", "paper"))))
    print("\nsparsity specs: 0.5 | 50% | N:M (2:4, 4:8, 1:4) | RxC@ratio (4x4@0.5) | channel@ratio, then +int8 | +int4")
    print("structured specs (first): mlp@RATIO | heads@RATIO | blocks@N, joined by + (mlp@0.25+2:4); "
          f"--structure-allocation {' | '.join(ALLOCATIONS)}, --compensate, --heads-unit auto | group | query")
    print("block steps: --step NAME (options steps.NAME.KEY=VALUE); --reconstruct N is --step reconstruct "
          "with N epochs")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from prunus.training.cli import run

    return run(args)


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "list": cmd_list, "train": cmd_train,
            "bench": cmd_bench, "export": cmd_export}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        # dotted overrides (key.sub=value) may also follow the flags of `prune`
        late = [a for a in rest if re.match(r"^[A-Za-z_][\w.\-]*=", a)]
        if rest != late or (late and args.command != "prune"):
            parser.error(f"unrecognized arguments: {' '.join(a for a in rest if a not in late or args.command != 'prune')}")
        if late:
            args.overrides = list(args.overrides) + late
    except SystemExit as e:  # --help (0) or a usage error (2, already printed on one line)
        return e.code if isinstance(e.code, int) else 2
    if not args.command:
        parser.print_help()
        return 2
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars
        if "transformers" in sys.modules:  # imported already (in-process use): tell it directly
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    try:
        return COMMANDS[args.command](args)
    except PrunusError as e:
        if args.debug:
            raise
        print(f"prunus: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunus: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one line, not a traceback dump
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"prunus: error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
