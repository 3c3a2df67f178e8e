"""Process-level settings: the allocator that makes CPU training fast, and third-party console noise."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import warnings

__all__ = ["quiet_third_party", "tune_allocator"]

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


# Lightning's console lines that a transferkit user cannot act on, by the start of their text: an advert,
# and a note that configure_optimizers reads the number of training batches (the schedules need it)
_LIGHTNING_INFO_NOISE = (
    "💡 Tip: For seamless cloud logging",
    "Loading `train_dataloader` to estimate number of stepping batches",
)


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_quiet = False


def quiet_third_party() -> None:
    """Silence, where it arises, what third-party code prints that a transferkit user cannot act on:
    Lightning's LitLogger advert and its stepping-batches note (filtered on Lightning's rank-zero logger,
    by their text), and a deprecation Lightning's own ``_pytree`` module triggers inside torch (filtered
    by its text and that module). Everything else Lightning says still shows. Called by
    :class:`transferkit.Trainer`; idempotent."""
    global _quiet
    if not _quiet:
        logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
            _DropLines(_LIGHTNING_INFO_NOISE)
        )
        _quiet = True
    # added every time (filterwarnings replaces an equal entry): a caller's catch_warnings may have reset it
    warnings.filterwarnings(
        "ignore",
        message=r".*isinstance\(treespec, LeafSpec\)",
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
