"""The library's structure: no import cycles, no Streamlit."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jpq_core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Every jpq_core module `tree` imports, at any depth (a function-level import is an import too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c`: the module a.b.c when there is one, else a.b
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    # A package's __init__ importing its own submodules is how packages expose names, not a dependency cycle.
    return {name: {m for m in _imports(tree, known) if m != name and not m.startswith(name + ".")}
            for name, tree in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_jpq_core_has_no_import_cycles():
    graph = import_graph()
    assert "jpq_core.pipeline" in graph and graph["jpq_core.pipeline"], "the walk found no imports: it is broken"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_jpq_core_imports_no_streamlit():
    """The library runs without the app: Streamlit stays in app.py, app_support/ and pages/."""
    users = sorted(name for name, tree in _modules().items()
                   if any(isinstance(n, ast.Import) and any(a.name.split(".")[0] == "streamlit" for a in n.names)
                          or isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "streamlit"
                          for n in ast.walk(tree)))
    assert users == [], f"these jpq_core modules import Streamlit: {users}"
