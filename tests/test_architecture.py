"""The package's structure holds: no import circles (imports inside functions count), small modules,
and the layers of docs/ARCHITECTURE.md (what may import what)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "prunus"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> prunus modules it imports anywhere in its source (module level or in functions)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else base)
            for t in targets:
                while t and t not in mods:  # `import prunus.x.y` names the module prunus.x.y
                    t = t.rpartition(".")[0]
                if t.startswith("prunus") and t != name:
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles(import_graph()) == []


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_over_400_lines():
    big = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}


# What may import what (docs/ARCHITECTURE.md): a layer imports only layers listed for it.
LAYERS = {
    "prunus.errors": set(),
    "prunus.core": {"prunus.errors"},
    "prunus.budgets": {"prunus.errors", "prunus.core", "prunus.criteria"},
    "prunus.criteria": {"prunus.errors", "prunus.core"},
    "prunus.algorithms": {"prunus.errors", "prunus.core", "prunus.criteria"},
    "prunus.evaluate": {"prunus.core"},
    "prunus.training": {"prunus.errors", "prunus.core", "prunus.criteria", "prunus.budgets", "prunus.io"},
    "prunus.export": {"prunus", "prunus.errors", "prunus.core", "prunus.io"},  # never kernels
    "prunus.oneshot": {"prunus", "prunus.errors", "prunus.core", "prunus.criteria", "prunus.budgets",
                       "prunus.algorithms", "prunus.io", "prunus.export", "prunus.evaluate",
                       "prunus.structured", "prunus.activation"},  # the job and runner hand structured specs over
    "prunus.activation": {"prunus.errors", "prunus.core", "prunus.oneshot"},  # oneshot: calibrate only (below)
    "prunus.structured": {"prunus", "prunus.errors", "prunus.core", "prunus.algorithms", "prunus.oneshot"},
}


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2])


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_import_only_what_they_may(layer):
    bad = sorted((m, t) for m, ts in import_graph().items() if _layer(m) == layer
                 for t in ts if _layer(t) != layer and _layer(t) not in LAYERS[layer])
    assert bad == []


def test_activation_reuses_only_the_calibration_loop():
    """prunus.activation sits low: of the one-shot package it imports the calibration loop alone, and
    of io only io.models imports it (to attach stored gates on load)."""
    graph = import_graph()
    oneshot = sorted({t for m, ts in graph.items() if _layer(m) == "prunus.activation"
                      for t in ts if _layer(t) == "prunus.oneshot"})
    assert oneshot == ["prunus.oneshot.calibrate"]
    io_users = sorted(m for m, ts in graph.items() if _layer(m) == "prunus.io"
                      and any(_layer(t) == "prunus.activation" for t in ts))
    assert io_users == ["prunus.io.models"]
