"""Lazy attributes of a package (PEP 562): a name is imported from its submodule when it is first used."""

import importlib
import sys
from collections.abc import Callable


def lazy_attributes(package: str, names: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of a package whose `names` load on first use.

    Args:
        package (`str`): the package's `__name__`.
        names (`dict[str, str]`): public name -> the submodule (relative to `package`) that defines it.

    Returns:
        `(__getattr__, __dir__)`, to assign at the package's top level.
    """

    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(f".{names[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
