"""Imports between evomerge's modules point one way: no cycle among modules or among packages,
and no function-level import of an evomerge module outside ``evomerge/cli.py``.

Run alone: ``python -m pytest -q tests/test_imports.py``; ``python tests/test_imports.py`` prints
the package graph. The source is parsed, nothing is imported.
Imports inside ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PKG = "evomerge"
ROOT = Path(__file__).resolve().parents[1] / PKG
LAZY_OK = {f"{PKG}.cli"}  # the CLI imports each verb's module when the verb runs (fast --help)


@dataclass(frozen=True)
class Edge:
    src: str  # importing module
    dst: str  # imported evomerge module
    line: int
    in_function: bool


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__`` is the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.Import | ast.ImportFrom, module: str, mods: dict[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package
            parts = module.split(".")
            if not mods[module].name == "__init__.py":
                parts = parts[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    found = {_owner(n, mods) for n in names if n.split(".")[0] == PKG}
    return {t for t in found if t is not None and t != module}


def edges(mods: dict[str, Path] | None = None) -> list[Edge]:
    """Every import of an evomerge module by an evomerge module, outside ``if TYPE_CHECKING:``."""
    mods = mods or modules()
    out: list[Edge] = []

    def visit(node: ast.AST, module: str, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    visit(sub, module, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for t in sorted(_targets(child, module, mods)):
                    out.append(Edge(module, t, child.lineno, in_function))
            visit(
                child,
                module,
                in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)),
            )

    for module, path in mods.items():
        visit(ast.parse(path.read_text(), str(path)), module, False)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def package_of(module: str) -> str:
    """``evomerge.engine.kernels.chunked`` -> ``engine``; top-level modules are their own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _is_own_package(comp: list[str]) -> bool:
    # A package's __init__ importing its submodules, which import siblings through it, is no cycle.
    return all(x == comp[0] or x.startswith(comp[0] + ".") for x in comp)


def test_no_import_cycle_among_modules():
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges():
        graph[e.src].add(e.dst)
    real = [c for c in cycles(graph) if not _is_own_package(c)]
    assert not real, "import cycles: " + "; ".join(" <-> ".join(c) for c in real)


def test_packages_depend_one_way():
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges():
        a, b = package_of(e.src), package_of(e.dst)
        if a != b and e.src not in LAZY_OK:
            graph[a].add(b)
    found = cycles(graph)
    assert not found, "packages that import each other: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(_witnesses(c)) + ")" for c in found
    )


def _witnesses(comp: list[str]) -> list[str]:
    inside = set(comp)
    return [
        f"{e.src}:{e.line} -> {e.dst}"
        for e in edges()
        if package_of(e.src) in inside
        and package_of(e.dst) in inside
        and package_of(e.src) != package_of(e.dst)
    ][:4]


def test_no_function_level_import_of_evomerge_modules():
    lazy = [f"{e.src}:{e.line} -> {e.dst}" for e in edges() if e.in_function]
    lazy = [x for x in lazy if x.split(":")[0] not in LAZY_OK]
    assert not lazy, "import these at module level: " + ", ".join(lazy)


def test_the_check_sees_cycles_and_function_level_imports(tmp_path):
    """The checker itself, on a made-up package: a cycle and a function-level import are found."""
    pkg = tmp_path / PKG
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from evomerge.a.x import X\n")
    (pkg / "a" / "x.py").write_text("from evomerge.b import y\nX = 1\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from evomerge import c\n"
        "def f():\n    from evomerge.a import x\n"
    )
    (pkg / "c.py").write_text("from . import b\n")
    mods = modules(pkg)
    found = edges(mods)
    graph: dict[str, set[str]] = defaultdict(set)
    for e in found:
        graph[e.src].add(e.dst)
    assert [e for e in found if e.in_function] == [
        Edge("evomerge.b", "evomerge.a", 5, True),
        Edge("evomerge.b", "evomerge.a.x", 5, True),
    ]
    assert not any(e.src == "evomerge.b" and e.dst == "evomerge.c" for e in found)
    assert ("evomerge.c", "evomerge.b") in {(e.src, e.dst) for e in found}
    assert cycles(graph) == [["evomerge.a", "evomerge.a.x", "evomerge.b"]]


if __name__ == "__main__":
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges():
        if package_of(e.src) != package_of(e.dst):
            graph[package_of(e.src)].add(package_of(e.dst))
    for pkg in sorted(graph):
        print(f"{pkg:14} -> {', '.join(sorted(graph[pkg]))}")
