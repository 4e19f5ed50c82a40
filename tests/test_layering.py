"""The packages are layered: models < gan.core < gan.eval < gan.tools. A module imports only from its own
layer or the ones below (at module level, inside functions and under TYPE_CHECKING alike), and no set of
modules imports itself round in a cycle. cli.py, scripts/ and tests/ sit above every layer."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

LAYERS = ("models", "gan.core", "gan.eval", "gan.tools")  # lowest first
PACKAGES = ("models", "gan")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, wherever it stands. `from pkg import x`
    names the submodule pkg.x when there is one, else pkg."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level-1 steps
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
    return list(dict.fromkeys(found))  # `from pkg import a, b` names pkg once


def _layer(module: str) -> int | None:
    hits = [i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")]
    return hits[0] if hits else None


def _graph() -> dict[str, list[tuple[str, int]]]:
    """module -> [(module of these packages it imports, line)]."""
    modules = _modules()
    known = set(modules)
    return {name: [(m, line) for m, line in _imports(name, path, known) if m in known and m != name]
            for name, path in modules.items()}


def upward_imports(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    bad = []
    for name, edges in graph.items():
        own = _layer(name)
        for target, line in edges:
            up = _layer(target)
            if own is not None and up is not None and up > own:
                bad.append(f"{_path(name)}:{line} imports {target} ({LAYERS[own]} may not import {LAYERS[up]})")
    return bad


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path(module: str) -> str:
    return str(_modules()[module].relative_to(ROOT))


def _describe(component: list[str], graph) -> str:
    inside = set(component)
    edges = [f"{_path(a)}:{line} imports {b}" for a in component for b, line in graph[a] if b in inside]
    return "cycle between " + ", ".join(component) + ": " + "; ".join(edges)


def test_imports_point_only_downwards():
    bad = upward_imports(_graph())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    found = cycles(graph)
    assert not found, "\n".join(_describe(c, graph) for c in found)


def test_the_checks_see_lazy_type_checking_and_relative_imports(tmp_path):
    """The parser finds imports inside functions and TYPE_CHECKING blocks, and resolves relative ones."""
    src = tmp_path / "mod.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gan.tools.study import X\n"
                   "def f():\n    import gan.eval.metrics\n    from . import data\n    from .run_folder import R\n")
    known = {"gan.tools.study", "gan.eval.metrics", "gan.core.data", "gan.core.run_folder"}
    got = [m for m, _ in _imports("gan.core.mod", src, known)]
    assert set(got) >= {"gan.tools.study", "gan.eval.metrics", "gan.core.data", "gan.core.run_folder"}
    graph = {"gan.core.mod": [("gan.eval.metrics", 5)], "gan.eval.metrics": [("gan.core.mod", 1)]}
    assert cycles(graph) == [["gan.core.mod", "gan.eval.metrics"]]
    assert cycles({"a": [("b", 1)], "b": [("c", 1)], "c": []}) == []
