"""A package's public names, each imported from its module on first use (PEP 562): a package
whose modules load torch then costs nothing to enter, so `python -m <package> --help` and a CLI
that needs one light module of it start without loading torch."""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Mapping, Sequence


def lazy_names(package: str, modules: Mapping[str, Sequence[str]]) -> tuple[Callable[[str], object], list[str]]:
    """(the package's module `__getattr__`, its `__all__`) for `modules`: {module path: names it
    provides}. A name is imported on first access and kept on the package."""
    home = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> object:
        module = home.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__, list(home)
