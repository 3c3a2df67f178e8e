"""Files written so that a crash, a kill or a full disk never leaves a damaged one behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from transferkit.errors import DiskWriteError

__all__ = ["atomic_write"]

_CHUNK = 1 << 20


class _DescriptorWriter:
    """The smallest file object ``torch.save`` and friends write to: every byte goes through ``os.write``
    in chunks, so a full disk fails the write it happens in."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            count = os.write(self.fd, view[:_CHUNK])
            view = view[count:]
        self.written += total
        return total

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.written


def atomic_write(
    path: str | os.PathLike,
    content: bytes | str | Callable[[IO[bytes]], Any],
    what: str = "file",
    advice: str = "Free disk space or choose another folder.",
) -> Path:
    """Write ``path`` through a temporary file in the same folder, synced to disk, then moved over it.

    ``content`` is bytes, text (UTF-8) or a function that writes to the file object it is given (e.g.
    ``lambda f: torch.save(obj, f)``, which streams without holding the whole file in memory). If
    anything fails midway the previous ``path`` is untouched and no temporary file is left; a
    :class:`~transferkit.errors.DiskWriteError` (an ``OSError``, printed by the command line as one
    ``error:`` block, exit status 2) names the file, the reason, what was kept, ``what`` it was and ``advice``.

    Example:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> atomic_write(os.path.join(folder, "a.txt"), "hello").read_text()
        'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        writer = _DescriptorWriter(fd)
        if isinstance(content, str):
            writer.write(content.encode())
        elif isinstance(content, bytes | bytearray | memoryview):
            writer.write(content)
        else:
            content(writer)  # type: ignore[arg-type]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temp, path)
    except BaseException as err:
        if fd >= 0:
            os.close(fd)
        Path(temp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError | PermissionError):
            kept = f"the previous '{path.name}' is unchanged" if path.exists() else "nothing was written"
            reason = os.strerror(err.errno) if err.errno else str(err)
            message = f"could not write {what} '{path}' ({reason}); {kept}. {advice}"
            raise DiskWriteError(message, err.errno) from err
        raise
    return path
