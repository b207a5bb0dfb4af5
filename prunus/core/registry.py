"""What every registry shares: discovery of its entries by being there, and lookup by name.

A registry (criteria, methods, budgets, block steps, training methods, kernels, formats) is a dict in
its package; its entries register themselves when their module is imported. :func:`discover`
imports every module of a package once (``pkgutil``: not an import statement, so no circle), and
:func:`lookup` turns an unknown name into a one-line error listing the registered ones.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Mapping, TypeVar

from prunus.errors import SpecError

T = TypeVar("T")
_DISCOVERED: set[str] = set()


def discover(package: str) -> None:
    """Import every module of ``package`` once, so that all its registrations have run."""
    if package in _DISCOVERED:
        return
    _DISCOVERED.add(package)  # first: a module that looks something up while loading does not recurse
    pkg = importlib.import_module(package)
    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{package}.{mod.name}")


def lookup(table: Mapping[str, T], name: str, kind: str, listing: str = "registered:") -> T:
    """``table[name]``, or a SpecError ``unknown <kind> 'name'; registered: a, b``."""
    if name not in table:
        raise SpecError(f"unknown {kind} {name!r}; {listing} {', '.join(sorted(table)) or 'none'}")
    return table[name]
