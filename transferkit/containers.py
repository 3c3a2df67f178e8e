"""Plain containers for YAML, JSON and checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["plain"]


def plain(value: Any) -> Any:
    """``value`` with tuples as lists and mappings as dicts with string keys, recursively: what a recipe's
    YAML, a checkpoint read with ``weights_only=True`` and JSON all hold, so they compare equal.

    >>> plain({"mean": (0.5, 0.5), 3: [(1, 2)]})
    {'mean': [0.5, 0.5], '3': [[1, 2]]}
    """
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
