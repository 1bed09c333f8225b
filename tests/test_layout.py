"""The house's layout: file names spelled in one module (read from the source; tests/test_imports.py checks the
import graph and module sizes)."""

import ast
from pathlib import Path

import mpsupernet.layout as layout

PACKAGE = Path(layout.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


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
