"""Imports point one way, `jobs -> {data_curation, pipelines, rl} -> lance_platform -> lance_model`,
and no module imports itself back through others. Every import in the tree counts, including the
ones inside functions (a lazy import is still a dependency)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"lance_model": 0, "lance_platform": 1, "data_curation": 2, "pipelines": 2, "rl": 2, "jobs": 3}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Our modules that `path` imports (`from pkg import mod` counts as `pkg.mod` when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, known) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        src_pkg = src.split(".")[0]
        for dst in targets:
            dst_pkg = dst.split(".")[0]
            if dst_pkg == src_pkg:
                continue
            if LAYERS[dst_pkg] >= LAYERS[src_pkg]:
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def test_imports_follow_the_layer_order():
    assert layer_violations(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": set()}, [["a.x", "a.y", "a.z"]]),
    ({"a.x": {"a.y"}, "a.y": set()}, []),
])
def test_cycle_finder_finds_cycles(graph, expected):
    assert cycles(graph) == expected


def test_layer_check_flags_upward_and_sideways_imports():
    graph = {"lance_model.model": {"lance_platform.tracking"}, "rl.trainer": {"pipelines.trainer"},
             "pipelines.trainer": {"lance_platform.config", "lance_model.model"}}
    assert layer_violations(graph) == ["lance_model.model -> lance_platform.tracking",
                                       "rl.trainer -> pipelines.trainer"]
