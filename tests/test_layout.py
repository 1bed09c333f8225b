"""The house's layout: file names spelled in one module, no import cycle, small modules (read from the source)."""

import ast
from pathlib import Path

import mpsupernet.layout as layout

PACKAGE = Path(layout.__file__).resolve().parent
MAX_MODULE_LINES = 600


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The package's modules that `name` imports anywhere in its file, function-level imports included."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {module for module in found if module in modules and module != name}


def test_no_import_cycle_inside_the_package():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module == goal:
                return True
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return False

    cycles = sorted(f"{name} -> {other}" for name in graph for other in graph[name] if reaches(other, name))
    assert not cycles, f"modules that import each other (directly or around a loop): {cycles}"


def test_layout_imports_nothing_and_file_names_are_spelled_there_only():
    tree = ast.parse(Path(layout.__file__).read_text(encoding="utf-8"))
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = {
        value for key, value in vars(layout).items() if key.endswith("_NAME") and isinstance(value, str)
    }
    assert {"config.json", "tiers.json", "vision_encoder.onnx", "preprocessor_config.json", "README.md"} <= names
    spelled = []
    for name, path in _modules().items():
        if name == "mpsupernet.layout":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled.append(f"{name}:{node.lineno}: {node.value!r}")
    assert not spelled, f"file names spelled outside mpsupernet.layout: {spelled}"


def test_no_module_is_over_600_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
