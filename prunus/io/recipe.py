"""The one recipe loader, for ``prunus prune`` and ``prunus train``: YAML plus dotted overrides.

YAML 1.1 reads an unquoted ``2:4`` as the base-60 integer 124; this loader keeps it the string "2:4".
Tags that build Python objects (``!!python/...``) are refused, as are recipes that are not a mapping,
folders, binary files, and (when the caller names its known keys) unknown keys.

Example:
    >>> d = load_recipe("recipes/wanda_owl_60.yaml", ["nsamples=8"], known={"model", "method", ...})
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from prunus.errors import DataError, SpecError


class _Loader(yaml.SafeLoader):
    """YAML without YAML 1.1's base-60 integers, so an unquoted ``2:4`` stays the string "2:4"."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if not (tag.endswith((":int", ":float")) and ":" in rx.pattern.replace("tag:", ""))]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _ch in "-+0123456789.":
    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), [_ch])
    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), [_ch])


def yaml_load(text: str) -> Any:
    """Parse YAML with the 2:4-safe loader; a YAML error becomes a one-line SpecError."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise SpecError(f"not valid YAML: {str(e).splitlines()[0]}") from None


def parse_value(text: str) -> Any:
    """A dotted override's value, read as YAML (``3`` -> 3, ``[a, b]`` -> list, ``2:4`` -> str)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def apply_override(d: dict, dotted: str) -> None:
    """Apply ``a.b=value`` to a nested mapping in place."""
    if "=" not in dotted:
        raise SpecError(f"override {dotted!r} must look like key=value or key.sub=value")
    key, value = dotted.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError(f"override {dotted!r} has an empty key")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise SpecError(f"override {dotted!r}: {p} is not a mapping")
    cur[parts[-1]] = parse_value(value)


def load_recipe(path: str | Path, overrides: Sequence[str] = (), *,
                known: Optional[Iterable[str]] = None) -> dict:
    """Read a YAML recipe and apply dotted overrides.

    Args:
        path: the recipe file.
        overrides: ``key=value`` or ``key.sub=value`` strings, applied in order.
        known: the top-level keys the caller accepts; others are a SpecError naming them.

    Returns:
        The recipe as a plain mapping, for the caller's typed job builder.

    Raises:
        DataError: the file is missing, a folder or unreadable.
        SpecError: not UTF-8 text, not YAML, not a mapping, a Python tag, or an unknown key.
    """
    p = Path(path)
    if p.is_dir():
        raise DataError(f"recipe {p} is a folder, not a YAML file")
    if not p.is_file():
        raise DataError(f"recipe {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"recipe {p} is not a text file") from None
    except OSError as e:
        raise DataError(f"cannot read recipe {p}: {e.strerror}") from None
    try:
        d = yaml.load(text, Loader=_Loader)
    except yaml.constructor.ConstructorError as e:
        raise SpecError(f"recipe {p}: {str(e.problem or e).splitlines()[0]} (prunus recipes hold plain "
                        f"values only)") from None
    except yaml.YAMLError as e:
        raise SpecError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise SpecError(f"recipe {p} must be a mapping of settings")
    for o in overrides:
        apply_override(d, o)
    if known is not None and (unknown := set(d) - set(known)):
        raise SpecError(f"recipe {p}: unknown key(s) {sorted(map(str, unknown))}; known: {sorted(known)}")
    return d
