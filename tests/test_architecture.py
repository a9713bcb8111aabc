"""The import graph of the ``fleetsim`` package (the ``simulator/`` folder) is layered.

Every module belongs to a stage, the first part of its path under ``simulator/``; a module may
import only from its own stage or an earlier one, and no set of modules may import each other
in a cycle. Every import counts: top-level, inside functions, and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "simulator"
PKG = "fleetsim"
# the data flow, first to last; the package's own __init__ (the Python API) and __main__ sit on top
STAGES = ("base", "device", "workload", "config", "serving", "results", "apps", "calibrate", "")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PKG, *parts])


def stage(mod: str) -> int:
    parts = mod.split(".")
    first = parts[1] if len(parts) > 1 else ""
    if first in ("__main__",):
        first = ""
    return STAGES.index(first) if first in STAGES else len(STAGES) - 1


def imports_of(path: Path, mod: str, known: set[str]) -> set[str]:
    """The fleetsim modules that ``path`` imports (resolving relative imports)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            # the longest known module that is a prefix of the imported name
            while n and n not in known:
                n = n.rsplit(".", 1)[0] if "." in n else ""
            if n and n != mod:
                out.add(n)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {module_name(p): p for p in root.rglob("*.py")}
    known = set(files)
    return {m: imports_of(p, m, known) for m, p in files.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Upward imports and import cycles, as readable lines."""
    bad = [
        f"{a} (stage {STAGES[stage(a)] or 'api'}) imports {b} (stage "
        f"{STAGES[stage(b)] or 'api'}), a later stage"
        for a, deps in graph.items()
        for b in deps
        if stage(b) > stage(a) and not (a == PKG and b.startswith(PKG))
    ]
    # package __init__ files that only re-export their own children are not cycles
    edges = {
        a: {b for b in deps if not (b == a.rsplit(".", 1)[0] and b != PKG)}
        for a, deps in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    counter = [0]

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
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
                bad.append("import cycle: " + " -> ".join(sorted(comp)))

    for v in list(edges):
        if v not in index:
            strong(v)
    return bad


def test_import_graph_is_layered_and_acyclic():
    graph = import_graph()
    assert len(graph) > 30  # the whole package was read
    assert violations(graph) == []


@pytest.mark.parametrize(
    "extra,expected",
    [
        ({"fleetsim.device.latency": {"fleetsim.serving.core"}}, "a later stage"),
        ({"fleetsim.serving.routers": {"fleetsim.serving.pod"}}, "import cycle"),
    ],
)
def test_checker_catches_back_imports_and_cycles(extra, expected):
    """The checker itself: a deliberately added back-import (a device module importing the
    engine) and a same-stage cycle (routers <-> pod) are both reported."""
    graph = import_graph()
    for a, deps in extra.items():
        graph[a] = graph[a] | deps
    assert any(expected in line for line in violations(graph))
