"""A decoded-image cache: each image decoded once, at the pipeline's working resolution, in files every
loader worker maps into memory.

A 12 MP camera JPEG takes tens of milliseconds to decode even at reduced scale, every epoch, for a model
that sees 224 pixels. ``data.cache.decoded_images: true`` decodes each file once, scales it so its shorter side
is :func:`working_side` (1.15x the side the pipeline needs; smaller images are kept as they are, never
enlarged), and stores the ``uint8`` pixels back to back in ``images.u8`` beside an index under
``<cache_dir>/decoded-<side>/``. Each loader worker maps that file (``np.memmap``): the operating system
shares its pages between workers and runs, nothing is copied per worker, and later epochs and later runs
of any recipe with the same working side read it instead of decoding.

An entry is valid for a file with the same path, size and modification time; a file edited since is
decoded again on the next set-up (the stale bytes stay in the file until :meth:`DecodedImages.compact`).
A file that cannot be decoded is not cached: the loader meets it as without the cache (an error naming
it, or ``skip_bad_images``). Building takes a file lock, so ranks of a multi-process run that share the
cache directory build it once.

Why not LitData's ``optimize`` or WebDataset shards: both store samples serialized in chunks to stream
them from object stores in order; reading one image at random copies its chunk into the reading worker,
and an edited file means rewriting the dataset. Here random access is a memory view, and one edited file
costs one decode.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from transferkit.data.images import load_image
from transferkit.errors import ImageReadError

__all__ = ["DecodedImages", "working_side"]

WORKING_MARGIN = 1.15  # stored shorter side / the side the pipeline needs: room for crops and scaling
_FORMAT = 1  # bump when the stored layout or the decoding changes: old caches are then ignored


def working_side(needed: int) -> int:
    """The shorter side images are stored at for a pipeline that needs ``needed`` pixels.

    Example:
        >>> working_side(224)
        258
    """
    return math.ceil(needed * WORKING_MARGIN)


class DecodedImages:
    """Decoded images at one working side in ``directory``; ``cache[path]`` is an ``(H, W, 3) uint8`` view."""

    def __init__(self, directory: str | os.PathLike, side: int) -> None:
        self.side = int(side)
        self.directory = Path(directory) / f"decoded-{self.side}"
        self._entries: dict[str, tuple[int, int, int, int, int]] = {}  # path -> size, mtime, offset, h, w
        self._pixels: np.memmap | None = None
        self._load_index()

    # --- reading -------------------------------------------------------------------------------------

    def __contains__(self, path: object) -> bool:
        return str(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, path: str | os.PathLike) -> np.ndarray:
        _, _, offset, height, width = self._entries[str(path)]
        if self._pixels is None:  # mapped on first use in each process (a loader worker maps its own)
            self._pixels = np.memmap(self.directory / "images.u8", dtype=np.uint8, mode="r")
        return self._pixels[offset : offset + height * width * 3].reshape(height, width, 3)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}  # a worker maps the file itself instead of a copy

    @property
    def nbytes(self) -> int:
        """Bytes of the pixel file (live entries and any stale ones)."""
        path = self.directory / "images.u8"
        return path.stat().st_size if path.exists() else 0

    # --- building ------------------------------------------------------------------------------------

    def stale(self, paths: Sequence[str | os.PathLike]) -> list[str]:
        """The files among ``paths`` with no entry, or whose size or modification time changed since."""
        out = []
        for path in map(str, paths):
            entry = self._entries.get(path)
            try:
                stat = os.stat(path)
            except OSError:
                continue  # gone: the loader names it if it is read
            if entry is None or entry[:2] != (stat.st_size, stat.st_mtime_ns):
                out.append(path)
        return out

    def build(
        self,
        paths: Sequence[str | os.PathLike],
        workers: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[ImageReadError]:
        """Decode the stale files among ``paths`` (in threads) and append them; returns the files that
        could not be decoded (not cached). Safe to call from several processes at once."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then find it built
            try:
                self._load_index()
                todo = self.stale(paths)
                if not todo:
                    return []
                return self._append(todo, workers or min(8, 2 * (os.cpu_count() or 1)), progress)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _append(
        self, todo: list[str], workers: int, progress: Callable[[int], None] | None
    ) -> list[ImageReadError]:
        def decode(path: str) -> tuple[str, os.stat_result, np.ndarray | ImageReadError]:
            stat = os.stat(path)
            try:
                image = self._scaled(load_image(path, min_side=self.side))
            except ImageReadError as err:
                image = err
            if progress is not None:
                progress(1)
            return path, stat, image

        failed = []
        self._pixels = None
        with open(self.directory / "images.u8", "ab") as pixels, ThreadPoolExecutor(workers) as pool:
            for path, stat, image in pool.map(decode, todo):  # decoded in threads, written in order
                if isinstance(image, ImageReadError):
                    failed.append(image)
                    self._entries.pop(path, None)
                    continue
                offset = pixels.tell()
                pixels.write(np.ascontiguousarray(image).tobytes())
                height, width = image.shape[:2]
                self._entries[path] = (stat.st_size, stat.st_mtime_ns, offset, height, width)
            pixels.flush()
            os.fsync(pixels.fileno())
        self._save_index()
        return failed

    def _scaled(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        scale = self.side / min(height, width)
        if scale >= 1:
            return image  # never enlarged
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA)

    def compact(self) -> None:
        """Rewrite the pixel file with the live entries only (after many edited files)."""
        with open(self.directory / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._load_index()
                fresh = self.directory / "images.u8.new"
                entries = {}
                with open(fresh, "wb") as out:
                    for path in self._entries:
                        image = self[path]
                        size, mtime, _, height, width = self._entries[path]
                        entries[path] = (size, mtime, out.tell(), height, width)
                        out.write(image.tobytes())
                self._pixels = None
                os.replace(fresh, self.directory / "images.u8")
                self._entries = entries
                self._save_index()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # --- index ---------------------------------------------------------------------------------------

    def _load_index(self) -> None:
        path = self.directory / "index.json"
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = None
        if not isinstance(stored, dict) or stored.get("format") != _FORMAT or stored.get("side") != self.side:
            self._entries = {}
            return
        self._entries = {p: tuple(e) for p, e in stored["entries"].items()}

    def _save_index(self) -> None:
        path = self.directory / "index.json"
        temporary = path.with_suffix(".json.tmp")
        stored = {"format": _FORMAT, "side": self.side, "entries": self._entries}
        temporary.write_text(json.dumps(stored))
        os.replace(temporary, path)  # readers see the old index or the new one, never half of one
