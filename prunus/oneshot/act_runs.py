"""The activation-sparse rows of a ``prunus prune`` job (``--activation-sparsity``).

After a method has pruned the weights (and its weights-only row is scored), the job's activation
method calibrates thresholds on the same calibration windows, on those final weights
(:func:`prunus.activation.calibrate_activations`, through the one calibration loop); the gates are
attached, the model scored again while the zeros entering each gated layer are counted, and the
gates removed. The uniform magnitude thresholds at the same target run the same way as the
baseline (``uniform-activation``). Each row gets an ``activation`` field: the method, the target,
the sparsity achieved on the evaluation data (weighted by the layers' weight counts, per layer
type, per layer) and the layers that stay dense.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor, nn

from prunus.activation import ActivationResult, attach_gates, calibrate_activations, count_inputs, detach_gates, summarize
from prunus.core.spec import SparsitySpec, Unstructured
from prunus.core.targets import select
from prunus.oneshot.job import PruneJob
from prunus.oneshot.quality import Quality, summary

Log = Callable[[str], None]


def trivial(spec: SparsitySpec) -> bool:
    """A spec that changes no weight (``--sparsity 0``): its weight baselines are the dense model."""
    return (spec.sparsity == 0 and isinstance(spec.pattern, Unstructured) and spec.quant is None
            and spec.structure is None)


def activation_field(res: ActivationResult, counts: dict[str, list[int]], net: nn.Module) -> dict[str, Any]:
    measured = summarize(counts, net) if any(t for _, t in counts.values()) else None
    layers = {n: {"threshold": g.threshold, "calibrated": g.sparsity,
                  "achieved": None if measured is None else measured["per_layer"].get(n)}
              for n, g in res.gates.items()}
    return {"method": res.method, "target": res.target,
            "achieved": None if measured is None else measured["achieved"],
            "per_type": None if measured is None else measured["per_type"], "per_layer": layers,
            "dense_layers": res.dense, "seconds": res.seconds}


def activation_rows(job: PruneJob, net: nn.Module, calib: Optional[Tensor], quality: Quality, label: str,
                    spec: SparsitySpec, make_row: Callable[..., dict[str, Any]], log: Log,
                    weight_seconds: float) -> tuple[list[dict[str, Any]], Optional[ActivationResult]]:
    """The job's activation method on ``net`` (already pruned), then its uniform baseline; the
    rows, and the method's :class:`ActivationResult` (what ``--out`` stores)."""
    act = job.activation
    assert act is not None
    runs = [(act.method, act.options, "method")]
    if act.method != "uniform" and "uniform-activation" in job.baselines:
        runs.append(("uniform", None, "baseline"))
    targets = select(net, job.include, job.exclude)
    rows, kept = [], None
    for method, options, role in runs:
        res = calibrate_activations(net, calib, targets, act.sparsity, method, options, device=job.device,
                                    batch_size=job.calib_batch_size, seed=job.seed, progress=job.progress)
        if role == "method":
            for note in res.notes():
                log(f"note: {note}")
            kept = res
        attach_gates(net, res.gates)
        try:
            with count_inputs(net) as counts:
                scores = quality.score(net, f"{label}+{method} {spec}")
        finally:
            detach_gates(net)
        row = make_row(f"{label}+{method}", role, scores)
        row["seconds"] = weight_seconds + res.seconds
        row["activation"] = field = activation_field(res, counts, net)
        rows.append(row)
        types = ", ".join(f"{k} {v:.2f}" for k, v in (field["per_type"] or {}).items())
        log(f"{label}+{method} {spec}: activation sparsity "
            + (f"{field['achieved']:.4f} ({types})" if field["achieved"] is not None else f"target {act.sparsity:g}")
            + f", {res.seconds:.1f} s" + (f", {summary(scores)}" if summary(scores) else ""))
    return rows, kept
