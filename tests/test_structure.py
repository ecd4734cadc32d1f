"""The package's shape: no import cycle between nepa_scale's modules, lazy and type-only imports included."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO


def module_imports() -> dict[str, set[str]]:
    """nepa_scale module -> the nepa_scale modules it imports anywhere (top level, in functions, or
    under TYPE_CHECKING: a cycle through any of them still ties the two modules together)."""
    package = REPO / "nepa_scale"
    names = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        names[name] = path
    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nepa_scale"):
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {m for m in found if m in names and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    graph = module_imports()
    assert graph["nepa_scale.engine.trainer"] >= {"nepa_scale.engine.tasks", "nepa_scale.engine.checkpoint"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # The check sees cycles: the trainer and its tasks once imported each other.
    assert find_cycle({**graph, "nepa_scale.engine.tasks": {"nepa_scale.engine.trainer"}}) is not None
