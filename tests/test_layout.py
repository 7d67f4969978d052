"""The package's architecture as measurable rules (issue 12): subpackages depend on each other one way (no cycle,
counting imports inside functions too), the benchmarks and the CLI sit on top (only the CLI imports ``fastdiff.bench``,
nothing imports the CLI), no private name crosses a module boundary, every objective family fits in one short file,
and private APIs of other libraries are reached only through ``fastdiff._compat``."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastdiff"
OBJECTIVE_SHARED = {"__init__.py", "base.py", "losses.py", "conditioning.py"}  # what the families share
PRIVATE_APIS = re.compile(r"_compute_fid|hooks\._helpers|_diffusers_hook|_set_cache_context|diffusers\.hooks\.hooks\b")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _unit(module: str) -> str:
    """The architectural unit of a module: its subpackage, or the top-level module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fastdiff"


def _imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.ImportFrom, ast.Import))]


def _imported(node: ast.ImportFrom | ast.Import) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return [node.module] if node.module and node.module.startswith("fastdiff") else []
    return [a.name for a in node.names if a.name.startswith("fastdiff")]


def unit_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, tree in modules.items():
        for node in _imports(tree):
            for target in _imported(node):
                if _unit(target) != _unit(name):
                    graph[_unit(name)].add(_unit(target))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_subpackages_import_each_other_one_way():
    cycle = find_cycle(unit_graph(_modules()))
    assert cycle is None, f"import cycle between fastdiff's units: {' -> '.join(cycle)}"


def test_only_the_cli_imports_the_benchmarks_and_nothing_imports_the_cli():
    graph = unit_graph(_modules())
    assert {u for u, deps in graph.items() if "bench" in deps} <= {"cli"}
    assert not {u for u, deps in graph.items() if "cli" in deps}


def test_no_private_name_crosses_a_unit():
    crossings = []
    for name, tree in _modules().items():
        for node in _imports(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastdiff"):
                if _unit(node.module) != _unit(name) and node.module != "fastdiff._compat":
                    crossings += [f"{name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
    assert not crossings, crossings


@pytest.mark.parametrize("path", sorted(p.name for p in (PACKAGE / "objectives").glob("*.py") if p.name not in OBJECTIVE_SHARED))
def test_each_objective_family_is_one_short_file(path):
    lines = len((PACKAGE / "objectives" / path).read_text().splitlines())
    assert lines <= 320, f"fastdiff/objectives/{path} has {lines} lines; split the family or move shared parts out"


def test_private_apis_of_other_libraries_only_in_compat():
    offenders = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                 if p.name != "_compat.py" and PRIVATE_APIS.search(p.read_text())]  # fmt: skip
    assert not offenders, f"private APIs of torchmetrics / diffusers used outside fastdiff/_compat.py: {offenders}"
