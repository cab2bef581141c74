"""Lazy package exports: one module-level ``__getattr__`` factory for every ``__init__.py``.

A package lists ``{public name: defining module}`` and sets ``__getattr__ = lazy_getattr(__name__, table)``;
the defining module is imported on first access (so ``import leafe_fast`` stays cheap and an optional
dependency only matters to the names that need it), and the value is cached in the package so later
accesses are plain attribute reads.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping


def lazy_getattr(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A PEP 562 ``__getattr__`` for ``package`` resolving each name of ``table`` from its module."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # cache: the next access skips __getattr__
        return value

    return __getattr__
