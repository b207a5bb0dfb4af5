"""Gates in a checkpoint's metadata (``prunus.json``), under :data:`~prunus.activation.gate.ACT_KEY`::

    "activation_sparsity": {
      "method": "teal", "target": 0.25,
      "layers": {"model.layers.0.self_attn.q_proj": {"threshold": 0.031, "sparsity": 0.27, "scale": "none"},
                 ...}
    }

``sparsity`` is the fraction of the calibration inputs the threshold zeroed. :func:`read_gates`
checks every entry and names the layer of the first bad one.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from prunus.activation.gate import ACT_KEY, SCALES, Gate
from prunus.errors import CheckpointError, PrunusError

FIELDS = ("threshold", "sparsity", "scale")


def gates_metadata(method: str, target: float, gates: Mapping[str, Gate]) -> dict[str, Any]:
    """The JSON value stored under ``ACT_KEY``."""
    return {"method": method, "target": float(target),
            "layers": {n: {"threshold": g.threshold, "sparsity": g.sparsity, "scale": g.scale}
                       for n, g in gates.items()}}


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def read_entry(metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checked ``ACT_KEY`` value of ``metadata`` (None when it has none)."""
    if not isinstance(metadata, Mapping) or ACT_KEY not in metadata:
        return None
    entry = metadata[ACT_KEY]
    if not isinstance(entry, Mapping):
        raise CheckpointError(f"{ACT_KEY} in the checkpoint metadata must be a mapping, got {type(entry).__name__}")
    if not isinstance(entry.get("method"), str) or not entry["method"]:
        raise CheckpointError(f"{ACT_KEY}: 'method' must be a method name, got {entry.get('method')!r}")
    target = entry.get("target")
    if not _number(target) or not 0 <= target < 1:
        raise CheckpointError(f"{ACT_KEY}: 'target' must be a number in [0, 1), got {target!r}")
    if not isinstance(entry.get("layers"), Mapping):
        raise CheckpointError(f"{ACT_KEY}: 'layers' must map layer names to thresholds")
    return dict(entry)


def read_gates(metadata: Mapping[str, Any]) -> dict[str, Gate]:
    """The gates stored in a checkpoint's metadata, by layer name ({} when it stores none).

    Raises:
        CheckpointError: a malformed entry, naming the layer and the field.
    """
    entry = read_entry(metadata)
    if entry is None:
        return {}
    out: dict[str, Gate] = {}
    for name, e in entry["layers"].items():
        if not isinstance(e, Mapping):
            raise CheckpointError(f"{ACT_KEY}: the entry of layer {name} must be a mapping, got {e!r}")
        if missing := [f for f in FIELDS if f not in e]:
            raise CheckpointError(f"{ACT_KEY}: layer {name} has no {', '.join(missing)}")
        if extra := sorted(set(e) - set(FIELDS)):
            raise CheckpointError(f"{ACT_KEY}: layer {name} has unknown field(s) {extra}")
        if not _number(e["threshold"]) or e["threshold"] < 0:
            raise CheckpointError(f"{ACT_KEY}: layer {name} has threshold {e['threshold']!r}, not a number >= 0")
        if not _number(e["sparsity"]) or not 0 <= e["sparsity"] <= 1:
            raise CheckpointError(f"{ACT_KEY}: layer {name} has sparsity {e['sparsity']!r}, not a number in [0, 1]")
        if e["scale"] not in SCALES:
            raise CheckpointError(f"{ACT_KEY}: layer {name} has scale {e['scale']!r}; expected one of "
                                  f"{', '.join(SCALES)}")
        try:
            out[str(name)] = Gate(float(e["threshold"]), float(e["sparsity"]), e["scale"])
        except PrunusError as err:  # pragma: no cover - the checks above cover Gate's own
            raise CheckpointError(f"{ACT_KEY}: layer {name}: {err}") from None
    return out
