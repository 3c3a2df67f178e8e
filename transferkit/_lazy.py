"""Package namespaces that import what they export on first use (PEP 562).

``import transferkit`` then costs milliseconds instead of the seconds Lightning and torch take to import,
``python -m transferkit --help`` answers at once, and no subpackage's ``__init__`` imports another
subpackage while that one is still half-imported.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for a package whose name ``N`` is ``exports[N]``'s
    attribute ``N`` (``"module"``), or a module itself (``"module:"``), imported when first asked for.

    Example:
        >>> getattr_, dir_, all_ = lazy_exports("pkg", {"sqrt": "math", "json": "json:"})
        >>> getattr_("sqrt")(4.0), getattr_("json").__name__, all_
        (2.0, 'json', ['json', 'sqrt'])
    """

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if target.endswith(":"):
            value = importlib.import_module(target[:-1])
        else:
            value = getattr(importlib.import_module(target), name)
        if package in sys.modules:
            setattr(sys.modules[package], name, value)  # found in the namespace from now on
        return value

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__, sorted(exports)
