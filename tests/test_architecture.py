"""The layout tells the architecture: imports run one way, and no import cycle in the library.

Imports are read from the source (every ``import`` statement, also those inside functions),
so a lazy import that closes a cycle is caught as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "circuits"
# Only the command line reaches up into the app, the figures and the benchmarks.
UPPER = ("app", "circuits.figures", "circuits.bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules that ``path`` imports (absolute names; relative imports resolved)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _library_graph() -> nx.DiGraph:
    modules = {_module_name(p): p for p in LIBRARY.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target in _imports(path):
            if target in modules and target != name and not name.startswith(target + "."):
                graph.add_edge(name, target)
    return graph


def _is_upper(module: str) -> bool:
    return any(module == upper or module.startswith(upper + ".") for upper in UPPER)


def test_the_library_has_no_import_cycle():
    cycles = list(nx.simple_cycles(_library_graph()))
    assert cycles == [], f"import cycles: {cycles}"


def test_only_the_command_line_imports_the_app_figures_or_benchmarks():
    offenders = []
    for path in LIBRARY.rglob("*.py"):
        name = _module_name(path)
        if name == "circuits.cli" or _is_upper(name):
            continue
        offenders += [f"{name} imports {target}" for target in _imports(path) if _is_upper(target)]
    assert offenders == []


def test_the_executors_import_the_visit_and_nothing_imports_the_sweep_back():
    graph = _library_graph()
    assert graph.has_edge("circuits.executors", "circuits.visit")
    importers = set(graph.predecessors("circuits.sweep"))
    assert importers <= {"circuits.cli"} | {m for m in graph if _is_upper(m)}
