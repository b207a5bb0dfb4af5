"""Activation sparsity at decode, training-free: thresholds that zero small inputs of every linear.

At batch-1 decode a linear reads all its weights for one input vector; when most entries of that
vector are zero, a kernel can skip most weight columns. This package calibrates one threshold per
linear and applies it as a forward pre-hook (:mod:`~prunus.activation.gate`):

- methods, one file each in :mod:`prunus.activation.methods` (:mod:`~prunus.activation.registry`):
  ``teal`` (Liu et al. 2024: histogram thresholds, TEAL's block-wise greedy allocation), ``wina``
  (Chen et al. 2025: scores ``|x_j| * ||W[:, j]||_2``), ``uniform`` (the same quantile of ``|x|`` in
  every layer, the baseline);
- :func:`calibrate_activations` / :func:`sparsify_activations` run them through the one calibration
  loop (:func:`prunus.oneshot.calibrate.run_blockwise`), after any weight pruning;
- checkpoints store the gates under :data:`ACT_KEY` (:func:`gates_metadata`, :func:`read_gates`);
  :func:`prunus.load` attaches them after its kernel plan (:func:`reattach_gates`);
- :func:`count_inputs` / :func:`summarize` measure the sparsity achieved on any data.
"""

from prunus.activation.gate import (ACT_KEY, SCALES, Gate, attach_gates, column_norms, detach_gates, gate_input,
                                    gates_of, reattach_gates, servable)
from prunus.activation.measure import count_inputs, layer_type, measured, summarize
from prunus.activation.registry import METHODS, ActivationMethod, activation_method, get, load_all, options_for
from prunus.activation.sparsify import (ActivationResult, calibrate_activations, sparsify_activations,
                                        split_servable)
from prunus.activation.store import gates_metadata, read_entry, read_gates

__all__ = ["ACT_KEY", "SCALES", "Gate", "attach_gates", "column_norms", "detach_gates", "gate_input", "gates_of",
           "reattach_gates", "servable", "count_inputs", "layer_type", "measured", "summarize", "METHODS", "ActivationMethod",
           "activation_method", "get", "load_all", "options_for", "ActivationResult", "calibrate_activations",
           "sparsify_activations", "split_servable", "gates_metadata", "read_entry", "read_gates"]
