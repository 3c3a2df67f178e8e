"""Every exception and warning transferkit gives a person to read, in one place.

Each one is a :class:`TransferKitError`, so a program (and the command line, which prints them as one
``error: <message>`` block instead of a traceback) can catch them all, and each keeps the built-in type
code written before it expected (a :class:`ConfigError` is a ``ValueError``, an :class:`ImageReadError`
an ``OSError``). Messages say what was wrong, the value seen, and what to do.

Warnings go through :func:`warn`: a :class:`TransferKitWarning`, shown as ``transferkit warning
(<module>:<line>): <message>`` naming the transferkit code that warns, also when Lightning called it.
"""

from __future__ import annotations

import math
import os
import re
import warnings

__all__ = [
    "BackboneError",
    "CheckpointError",
    "CheckpointMismatchError",
    "ConfigError",
    "DatasetError",
    "DiskWriteError",
    "FoldingError",
    "HubUnreachableError",
    "ImageReadError",
    "LightningInternalsError",
    "MissingDependencyError",
    "NonFiniteLossError",
    "TransferKitError",
    "TransferKitWarning",
    "warn",
]


class TransferKitError(Exception):
    """The base of every error transferkit raises for a person to read."""


class ConfigError(TransferKitError, ValueError):
    """A setting that cannot work: out of its range, unknown, or contradicting another one."""


class BackboneError(ConfigError):
    """A backbone could not be built as asked (unknown name, weights that do not fit, ...)."""


class HubUnreachableError(BackboneError, ConnectionError):
    """Weights were asked from the model hub, which cannot be reached from this machine."""


class DatasetError(TransferKitError, ValueError):
    """The dataset is not usable as given: a missing path, an empty class, too few images to split, ..."""


class ImageReadError(TransferKitError, OSError):
    """An image file could not be read. ``path`` and ``reason`` say which and why.

    Raised inside a DataLoader worker, it reaches the main process as an ``ImageReadError`` too, with
    the same path and reason and the worker named instead of the worker's traceback. ``oversized``: the
    file is over a pixel limit rather than broken.
    """

    def __init__(self, path: str | os.PathLike, reason: str | None = None, oversized: bool = False) -> None:
        if reason is None:  # one argument: the text a DataLoader worker sends back
            path, reason = _from_worker_text(str(path))
        self.path = str(path)
        self.reason = reason
        self.oversized = oversized  # readable, but over a pixel limit (a decompression bomb, or a server's)
        super().__init__(f"cannot read image '{self.path}': {reason}")

    def __str__(self) -> str:
        return f"cannot read image '{self.path}': {self.reason}"

    def __reduce__(self):  # keeps path and reason when pickled
        return (type(self), (self.path, self.reason))


def _from_worker_text(text: str) -> tuple[str, str]:
    """Path and reason out of ``Caught ImageReadError in DataLoader worker process N. Original Traceback
    ... ImageReadError: cannot read image '<path>': <reason>``."""
    where = re.search(r"Caught ImageReadError (in [^.\n]*)", text)
    found = re.findall(r"ImageReadError: cannot read image '(.*)': (.*)", text)
    if not found:
        return "<unknown>", text.strip().splitlines()[-1] if text.strip() else "unknown reason"
    path, reason = found[-1]
    return path, f"{reason} ({where.group(1)})" if where else reason


class CheckpointError(TransferKitError, ValueError):
    """A checkpoint could not be read, or is not a transferkit checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's model does not fit the model it is being loaded into."""


class NonFiniteLossError(TransferKitError, RuntimeError):
    """The training loss became NaN or infinite; the message says where, why, and what to do.

    Attributes:
        epoch: the epoch of the bad batch.
        step: optimizer steps done before it (``trainer.global_step``).
        loss: the loss value (``nan``, ``inf`` or ``-inf``).
        learning_rates: optimizer parameter-group name -> learning rate at that step.
    """

    def __init__(
        self,
        message: str,
        epoch: int = 0,
        step: int = 0,
        loss: float = math.nan,
        learning_rates: dict[str, float] | None = None,
    ) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.loss = loss
        self.learning_rates = dict(learning_rates or {})


class DiskWriteError(TransferKitError, OSError):
    """A file (a checkpoint, a report, a cache) could not be written, e.g. the disk is full; the message
    names the file, the reason, what was kept (the previous version is never left half-written) and what to
    do. ``errno`` is the operating system's."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)  # one argument: str() is the message alone, without "[Errno N]"
        self.errno = errno


class FoldingError(TransferKitError, RuntimeError):
    """Folding BatchNorm into the layer before it would change what the model computes."""


class MissingDependencyError(TransferKitError, ModuleNotFoundError):
    """An optional package a feature needs is not installed; the message names the ``pip install``."""


class LightningInternalsError(TransferKitError, RuntimeError):
    """The installed Lightning lacks a private attribute transferkit relies on (see
    :mod:`transferkit.lightning_internals`); the message names it and the supported versions."""


class TransferKitWarning(UserWarning):
    """Something a person may want to act on that does not stop the run; :func:`warn` issues it."""


class RequestRefused(TransferKitError):
    """A request to ``serve`` that is answered with an HTTP error: ``status`` and the ``reason`` it gives."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


class QueueFull(RequestRefused):
    """``serve``'s queue is full: the request is refused at once (HTTP 503, ``Retry-After``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(503, reason, {"Retry-After": "1"})


def warn(message: str, stacklevel: int = 1) -> None:
    """Warn with a :class:`TransferKitWarning`, attributed to the transferkit function that calls this
    (``stacklevel=1``) or the one ``stacklevel - 1`` frames above it, never to the library that called it.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warn("the training split is small")
        >>> seen[0].category.__name__, str(seen[0].message)
        ('TransferKitWarning', 'the training split is small')
    """
    warnings.warn(message, TransferKitWarning, stacklevel=stacklevel + 1)


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """``transferkit warning (data/checks.py:86): ...`` for ours; any other warning as before."""
    if isinstance(category, type) and issubclass(category, TransferKitWarning):
        where = filename.replace(os.sep, "/")
        where = where.rsplit("/transferkit/", 1)[-1] if "/transferkit/" in where else os.path.basename(where)
        return f"transferkit warning ({where}:{lineno}): {message}\n"
    return _previous_format_warning(message, category, filename, lineno, line)


# chained, as Lightning chains its own: whichever is imported first, both formats keep working
_previous_format_warning = warnings.formatwarning
warnings.formatwarning = _format_warning
