"""Process-level settings that make CPU training fast."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_tuned = False


def tune_allocator() -> bool:
    """Keep freed activation memory in the heap instead of returning it to the OS after every step.

    glibc serves each large tensor (a batch's activations are tens of MB) with a fresh ``mmap`` and
    unmaps it on free, so every training step page-faults its whole working set back in, which on a
    small CPU costs as much as the step's arithmetic (docs/benchmarks.md). Serving everything from the
    heap and trimming it only past 1 GiB removes that cost. Set ``TRANSFERKIT_TUNE_MALLOC=0`` to leave the allocator alone.

    Returns:
        Whether the allocator was tuned (glibc on Linux only).
    """
    global _tuned
    if _tuned:
        return True
    if os.environ.get("TRANSFERKIT_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _tuned
