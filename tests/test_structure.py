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


# The layers, lowest first (docs/architecture.md): a module imports from its own layer or below.
LAYERS = [
    ["nepa_scale.errors", "nepa_scale.flops", "nepa_scale.objective", "nepa_scale.models"],
    ["nepa_scale.config"],
    [
        "nepa_scale.rundir",
        "nepa_scale.ownership",
        "nepa_scale.data",
        "nepa_scale.eval",
        "nepa_scale.memory",
        "nepa_scale.comm",
    ],
    ["nepa_scale.engine", "nepa_scale.scaling"],
    ["nepa_scale.launch"],
    ["nepa_scale.workflows", "nepa_scale.bench"],
    ["nepa_scale.cli"],
]


def layer_of(module: str) -> int | None:
    if module == "nepa_scale":  # the package itself: its version only
        return 0
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def imports_against_the_layers(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
        for source, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(source)
    ]


def test_no_module_imports_from_a_layer_above_its_own():
    graph = module_imports()  # lazy and type-only imports included
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS and docs/architecture.md): {unplaced}"
    assert imports_against_the_layers(graph) == []
    # The check sees one: the report once imported the demo's transfer step to read transfer.json.
    upward = {**graph, "nepa_scale.scaling.report": {"nepa_scale.workflows.transfer"}}
    assert imports_against_the_layers(upward) == [
        "nepa_scale.scaling.report (layer 3) imports nepa_scale.workflows.transfer (layer 5)"
    ]


def lazy_imports_without_a_reason(source: str) -> list[str]:
    """Imports inside functions whose line (or the comment line above) does not say why."""
    lines = source.splitlines()
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import | ast.ImportFrom):
                line, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                if "#" not in line and not above.startswith("#"):
                    found.append(f"{node.lineno}: {line.strip()}")
    return found


def test_imports_inside_functions_say_why():
    """Optional or heavy imports only (torch for a light command, an optional package), each with
    a comment; anything else belongs at the top of its module, where the layers can be read."""
    unexplained = {
        str(path.relative_to(REPO)): found
        for path in sorted((REPO / "nepa_scale").rglob("*.py"))
        if (found := lazy_imports_without_a_reason(path.read_text()))
    }
    assert unexplained == {}
    assert lazy_imports_without_a_reason("def f():\n    import torch\n") == ["2: import torch"]
    assert lazy_imports_without_a_reason("def f():\n    import torch  # heavy\n") == []


def test_the_commands_parser_needs_no_torch_and_the_launcher_no_deepspeed():
    """What the lazy imports are for: `nepa-scale --help` without torch, `sweep launch` without
    DeepSpeed (whose import prints to stdout, in the middle of the command's own output)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from nepa_scale.cli import build_parser\n"
        "build_parser()\n"
        "print('torch' in sys.modules)\n"
        "import nepa_scale.launch.launcher, nepa_scale.launch.plan, nepa_scale.scaling.report\n"
        "print('deepspeed' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
