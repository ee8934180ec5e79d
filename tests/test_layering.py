"""The import graph of sluice/ keeps its layers: sluice.core is pure Python (no torch, nothing of the engine,
the workers or the entrypoints), the entrypoints never reach into the workers, and no two modules import
each other, directly or around a cycle. Every import counts, also those inside functions (a lazy import is
still a dependency); only ``if TYPE_CHECKING:`` blocks are left out, since they never run."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "sluice"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def import_graph() -> dict[str, set[str]]:
    """module -> the modules it imports (sluice's own, plus the top-level name of third-party ones)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        imported: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import submodule` depends on the submodule; other names, on the module.
                subs = {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files}
                imported |= subs
                if len(subs) < len(node.names):
                    imported.add(node.module)
        graph[module] = {name if name in files else name.split(".")[0] for name in imported} - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
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
            if w not in graph:
                continue
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _violations(graph: dict[str, set[str]], importer: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} imports {t}" for m, targets in graph.items() if m == importer or m.startswith(importer + ".")
                  for t in targets if t in forbidden or t.startswith(tuple(f + "." for f in forbidden)))


def test_core_imports_neither_torch_nor_the_layers_above_it():
    forbidden = ("torch", "sluice.engine", "sluice.worker", "sluice.entrypoints")
    assert _violations(import_graph(), "sluice.core", forbidden) == []


def test_entrypoints_never_import_the_workers():
    assert _violations(import_graph(), "sluice.entrypoints", ("sluice.worker",)) == []


def test_no_import_cycles_between_modules():
    assert _cycles(import_graph()) == []


def test_the_checks_catch_what_they_look_for():
    graph = {"sluice.core.a": {"torch", "sluice.engine.x"}, "sluice.engine.x": {"sluice.engine.y"},
             "sluice.engine.y": {"sluice.engine.x"}, "sluice.entrypoints.s": {"sluice.worker.r"}}
    assert _violations(graph, "sluice.core", ("torch", "sluice.engine")) == [
        "sluice.core.a imports sluice.engine.x", "sluice.core.a imports torch"]
    assert _violations(graph, "sluice.entrypoints", ("sluice.worker",)) == ["sluice.entrypoints.s imports sluice.worker.r"]
    assert _cycles(graph) == [["sluice.engine.x", "sluice.engine.y"]]


def test_importing_the_core_loads_no_torch():
    code = ("import sys, sluice.core.scheduler, sluice.core.kv_cache_manager, sluice.core.interface; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
