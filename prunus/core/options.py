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
import math
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from prunus.errors import SpecError


@dataclass(frozen=True)
class NoOptions:
    """Options of something that takes none."""


def option(default: Any = dataclasses.MISSING, *, min: Optional[float] = None, max: Optional[float] = None,
           gt: Optional[float] = None, finite: bool = True) -> Any:
    """A dataclass field with a valid range, checked by :func:`build_options` and :func:`check`.

    ``min``/``max`` are inclusive bounds, ``gt`` an exclusive lower bound; floats must be finite unless
    ``finite=False``. Example: ``lr: float = option(1e-3, gt=0)``.
    """
    return dataclasses.field(default=default, metadata={"min": min, "max": max, "gt": gt, "finite": finite})


def _base(ftype: Any) -> tuple[Any, bool]:
    """``Optional[int]`` -> (int, True); ``int`` -> (int, False)."""
    args = typing.get_args(ftype)
    if typing.get_origin(ftype) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)) \
            and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else object), True
    return ftype, False


def coerce(value: Any, ftype: Any, what: str) -> Any:
    """``value`` as a ``ftype`` (int, float, bool, str or Optional of them); a SpecError otherwise.

    Strict: 2.7 is not an int, "yes" is not a bool, NaN passes here (ranges are :func:`check`'s job).
    """
    base, optional = _base(ftype)
    if value is None:
        if optional or base is object:
            return None
        raise SpecError(f"{what} needs a value")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise SpecError(f"{what}={value!r} is not true or false")
    if base is int:
        if isinstance(value, bool):
            raise SpecError(f"{what}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise SpecError(f"{what}={value!r} is not an integer")
    if base is float:
        if isinstance(value, bool):
            raise SpecError(f"{what}={value!r} is not a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise SpecError(f"{what}={value!r} is not a number")
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise SpecError(f"{what}={value!r} is not a string")
    return value


def check(obj: Any, owner: str) -> Any:
    """Check every field of the dataclass ``obj`` against its type and :func:`option` range; return it."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        base, _ = _base(hints.get(f.name, object))
        what = f"{owner}: {f.name}" if owner else f.name
        if v is None or base not in (int, float):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SpecError(f"{what}={v!r} is not a number")
        md = f.metadata
        if base is float and md.get("finite", True) and not math.isfinite(v):
            raise SpecError(f"{what} must be a finite number, got {v!r}")
        if math.isnan(v):
            raise SpecError(f"{what} must be a number, got nan")
        if md.get("min") is not None and v < md["min"]:
            raise SpecError(f"{what} must be at least {md['min']:g}, got {v!r}")
        if md.get("max") is not None and v > md["max"]:
            raise SpecError(f"{what} must be at most {md['max']:g}, got {v!r}")
        if md.get("gt") is not None and not v > md["gt"]:
            raise SpecError(f"{what} must be greater than {md['gt']:g}, got {v!r}")
    return obj


def build_options(cls: type, values: Any, owner: str) -> Any:
    """Turn a recipe mapping into the options dataclass ``cls``, typed and range-checked.

    Unknown keys, values of the wrong type (2.7 for an int, NaN for a float) and values outside a
    field's :func:`option` range are a one-line SpecError naming ``owner`` and the option.
    """
    if isinstance(values, cls):
        return check(values, owner)  # already typed (the API may pass the dataclass itself)
    if values is not None and not isinstance(values, Mapping):
        raise SpecError(f"{owner}: options must be a mapping of name: value, got {type(values).__name__}")
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if unknown := set(values) - set(fields):
        raise SpecError(f"{owner}: unknown option(s) {sorted(map(str, unknown))}; known: {sorted(fields) or 'none'}")
    hints = typing.get_type_hints(cls)  # resolves string annotations (from __future__ import annotations)
    typed = {k: coerce(v, hints.get(k, object), f"{owner}: option {k}") for k, v in values.items()}
    try:
        obj = cls(**typed)
    except SpecError:
        raise
    except (TypeError, ValueError) as e:
        raise SpecError(f"{owner}: {e}".splitlines()[0]) from None
    return check(obj, owner)
