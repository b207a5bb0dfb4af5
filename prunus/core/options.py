"""Typed options: the one place a recipe's mapping becomes an options dataclass.

Every method, refiner, criterion, layer budget, block step and training method that takes options names a
frozen dataclass; :func:`build_options` turns ``{"blocksize": "64"}`` into it at the edge (CLI, recipe, API
call), coercing scalars to the field's type and rejecting unknown keys. Library code below the edge only
ever sees the dataclass.

Example:
    >>> @dataclass(frozen=True)
    ... class Opts:
    ...     blocksize: int = 128
    >>> build_options(Opts, {"blocksize": "64"}, "method sparsegpt")
    Opts(blocksize=64)
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from prunus.errors import SpecError


@dataclass(frozen=True)
class NoOptions:
    """Options of something that takes none."""


def build_options(cls: type, values: Any, owner: str) -> Any:
    """Turn a recipe mapping into the options dataclass ``cls``; unknown keys are a SpecError."""
    if isinstance(values, cls):
        return values  # already typed (the API may pass the dataclass itself)
    if values is not None and not isinstance(values, Mapping):
        raise SpecError(f"{owner}: options must be a mapping of name: value, got {type(values).__name__}")
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if unknown := set(values) - set(fields):
        raise SpecError(f"{owner}: unknown option(s) {sorted(map(str, unknown))}; known: {sorted(fields) or 'none'}")
    hints = typing.get_type_hints(cls)  # resolves string annotations (from __future__ import annotations)
    typed = {}
    for k, v in values.items():
        ftype = hints.get(k, object)
        try:
            typed[k] = ftype(v) if ftype in (int, float, bool, str) and not isinstance(v, ftype) else v
        except (TypeError, ValueError):
            raise SpecError(f"{owner}: option {k}={v!r} is not a {getattr(ftype, '__name__', ftype)}") from None
    return cls(**typed)
