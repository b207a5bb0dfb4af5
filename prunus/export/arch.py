"""Which transformers class a stored model is built as: the one it was saved as.

``AutoModelForCausalLM`` alone is wrong for encoders: a ``BertModel`` checkpoint (all-MiniLM-L6-v2)
would become a ``BertLMHeadModel`` whose head is missing from the files. The class is, in order:
the ``architecture`` a prunus manifest recorded; the first of ``config.architectures`` (what
``save_pretrained`` writes); a causal LM where the config has one and is not an encoder's (a
masked-LM family such as BERT without ``is_decoder``); else the base model.
"""

from __future__ import annotations

from typing import Any, Optional


def named_class(name: Optional[str]) -> Any:
    """The transformers model class called ``name``, or None when there is none."""
    import transformers

    try:
        cls = getattr(transformers, name or "", None)
    except Exception:  # a lazy module that fails to import (a missing optional dependency)
        return None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def model_class(config: Any, architecture: Optional[str] = None) -> Any:
    """The class to build ``config`` as (module docstring); an ``Auto*`` class as the fallback."""
    import transformers

    for name in (architecture, *(getattr(config, "architectures", None) or ())[:1]):
        cls = named_class(name)
        if cls is not None:
            return cls
    kind = type(config)
    encoder = kind in transformers.AutoModelForMaskedLM._model_mapping and not getattr(config, "is_decoder", False)
    if kind in transformers.AutoModelForCausalLM._model_mapping and not encoder:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def build(config: Any, architecture: Optional[str] = None, **kwargs: Any) -> Any:
    """A model of :func:`model_class` built from ``config`` (random or uninitialised weights)."""
    cls = model_class(config, architecture)
    if hasattr(cls, "from_config"):  # the Auto* classes
        return cls.from_config(config, **kwargs)
    return cls._from_config(config, **kwargs)
