"""prunus: make neural networks sparse, measure it honestly, and make the sparsity pay.

The public API, imported lazily so that ``import prunus`` stays cheap::

    import prunus
    spec = prunus.SparsitySpec.parse("2:4")
    result = prunus.prune(model, spec, method="sparsegpt", calib=windows)
    prunus.save(model, "out/", masks=result.masks)       # compressed safetensors
    model = prunus.load("out/")                           # a transformers model again
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "prune": ("prunus.api", "prune"),
    "PruneResult": ("prunus.oneshot.pipeline", "PruneResult"),
    "SparsitySpec": ("prunus.core.spec", "SparsitySpec"),
    "parse_sparsity": ("prunus.core.spec", "parse_sparsity"),
    "load": ("prunus.io.models", "load_checkpoint"),
    "sparsify_activations": ("prunus.activation.sparsify", "sparsify_activations"),
    "save": ("prunus.export", "save"),
    "load_model": ("prunus.io.models", "load_model"),
    "perplexity": ("prunus.evaluate", "perplexity"),
    "PrunusError": ("prunus.errors", "PrunusError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'prunus' has no attribute {name!r}")
