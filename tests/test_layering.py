"""The package's import graph has no cycle, and native code is reached through one door.

Every ``import`` and ``from … import`` in looplm/ — at module level or inside a function — is an
edge from its module to the looplm module it names (importing ``a.b.c`` also runs the packages
``a`` and ``a.b``, so those are edges too).  Run ``python tests/test_layering.py`` to print the
graph's layers (modules that import only earlier layers)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "looplm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # ``from a import b`` may import the submodule a.b: count it when it exists.
        return [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
    return []


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _targets(node, module, path.name == "__init__.py"):
                parts = target.split(".")
                for end in range(1, len(parts) + 1):  # the packages on the way run too
                    name = ".".join(parts[:end])
                    if name in files and name != module and not module.startswith(name + "."):
                        edges.add(name)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_a_cycle_is_found_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_kernels_package_imports_ctypes():
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(name and name.split(".")[0] == "ctypes" for name in names):
                importers.add(module_name(path))
    assert importers and all(name.startswith("looplm.kernels") for name in importers), sorted(importers)


def test_the_checkpoint_foundation_imports_no_higher_layer():
    graph = import_graph()
    higher = ("looplm.model", "looplm.training", "looplm.interop", "looplm.serve", "looplm.eval", "looplm.cli")
    for module in (name for name in graph if name.startswith("looplm.checkpoint")):
        assert not {target for target in graph[module] if target.startswith(higher)}, module


def layers(graph: dict[str, set[str]]) -> list[list[str]]:
    placed: dict[str, int] = {}
    while len(placed) < len(graph):
        ready = [node for node in graph if node not in placed and graph[node] <= set(placed)]
        if not ready:
            raise ValueError(f"cycle among {sorted(set(graph) - set(placed))}")
        for node in ready:
            placed[node] = 1 + max((placed[target] for target in graph[node]), default=-1)
    return [sorted(node for node, level in placed.items() if level == depth)
            for depth in range(max(placed.values()) + 1)]


if __name__ == "__main__":
    for depth, modules in enumerate(layers(import_graph())):
        print(f"{depth:2d}: {' '.join(modules)}")
