"""A GGUF-loaded transformers model made plain: what ``save_pretrained`` and deepcopy accept."""

from __future__ import annotations

import torch
from torch import nn


def degguf(model: nn.Module) -> nn.Module:
    """A plain copy of a GGUF-loaded model, so that ``save_pretrained`` works.

    transformers refuses to save a GGUF-loaded model ("quantized with gguf and is not
    serializable"), although its weights are already plain dequantized tensors. Rebuilding the
    model from its config without ``quantization_config`` and loading the state dict fixes that.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    config = model.config  # type: ignore[attr-defined]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    auto = AutoModelForCausalLM
    try:
        plain = auto.from_config(config, dtype=torch.float32)
    except ValueError:
        auto = AutoModel
        plain = auto.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        plain.generation_config = generation
    return plain
