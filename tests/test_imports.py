"""The package's import graph has no cycle, function-level imports included, and no module of `src/` is too long.

Every `import` and `from ... import` statement of every module under `src/mpsupernet` is read with `ast`, wherever it
stands (module level, inside a function or a class), and resolved to the package module it loads: `from . import x`
and `from .pkg import x` name the submodule `x` when there is one, else the module itself. An edge A → B says A
imports B; a cycle is a path from a module back to itself. A package's `__init__` is the node of the package's name.
"""

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "mpsupernet"
MAX_LINES = 600


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    names = {}
    for path in sorted((SOURCE / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SOURCE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` loads the deepest package module it names.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path `[a, b, ..., a]`, or None (depth-first search with three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_resolves_relative_and_function_level_imports(tmp_path, monkeypatch):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from .. import a\nfrom ..sub import c\n")
    (package / "sub" / "c.py").write_text("import mpsupernet.sub\n")
    monkeypatch.setattr(__import__(__name__), "SOURCE", tmp_path)
    graph = import_graph()
    assert graph == {
        "mpsupernet": {"mpsupernet.a"},
        "mpsupernet.a": {"mpsupernet.sub.b"},
        "mpsupernet.sub": set(),
        "mpsupernet.sub.b": {"mpsupernet.a", "mpsupernet.sub.c"},
        "mpsupernet.sub.c": {"mpsupernet.sub"},
    }
    assert find_cycle(graph) == ["mpsupernet.a", "mpsupernet.sub.b", "mpsupernet.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"Import cycle: {' -> '.join(cycle)}"


def test_the_search_package_does_not_import_training():
    graph = import_graph()
    search = {name for name in graph if name == f"{PACKAGE}.search" or name.startswith(f"{PACKAGE}.search.")}
    reached, todo = set(), list(search)
    while todo:
        for target in graph[todo.pop()] - reached:
            reached.add(target)
            todo.append(target)
    assert not {name for name in reached if name.startswith(f"{PACKAGE}.training")}


@pytest.mark.parametrize("name", sorted(module_names()))
def test_no_module_is_over_the_line_limit(name):
    lines = module_names()[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by role (at most {MAX_LINES})."
