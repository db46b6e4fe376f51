"""Package faces whose names are imported on first use, so that importing a package (the
worker's, on the way to its first timed phase) loads nothing it does not use yet."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_face(package: str, exports: dict[str, str]) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package``, whose ``exports`` map each public
    name to the module that defines it."""
    names = sorted(exports)

    def getattr_(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return names, getattr_, lambda: names
