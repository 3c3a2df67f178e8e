"""Reading images from disk into ``(H, W, 3) uint8`` RGB arrays, whatever their mode.

Grayscale, palette, CMYK, 16-bit and alpha images are converted to 3-channel RGB (alpha composited
onto white); EXIF orientation is applied. An image that cannot be read raises :class:`ImageReadError`
naming the file and the reason.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transferkit.errors import ImageReadError

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageReadError",
    "decode_image",
    "load_image",
    "read_header",
    "to_rgb",
    "find_unreadable",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def load_image(path: str | os.PathLike, min_side: int | None = None) -> np.ndarray:
    """Read an image file as an ``(H, W, 3) uint8`` RGB array.

    With ``min_side``, a JPEG is decoded at a reduced scale where that loses nothing the caller needs:
    libjpeg's DCT scaling (Pillow's ``draft``) picks the smallest of 1/8, 1/4, 1/2 or full scale at which
    both sides are still at least ``min_side`` pixels, several times faster than a full decode of a
    camera photo. Other formats, and JPEGs too small to scale down, are decoded in full. EXIF
    orientation is applied after decoding either way.

    Raises :class:`ImageReadError` (never another exception) for a missing, empty, truncated or
    corrupt file, a file that is not an image, and an image over Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``), which is checked before any pixel is decoded.
    """
    path = Path(path)
    try:
        _check_not_empty(path)
        with Image.open(path) as image:
            return _decode(path, image, min_side)
    except ImageReadError:
        raise
    except Exception as err:
        raise _read_error(path, err) from err


def decode_image(
    data: bytes | memoryview, name: str, min_side: int | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """:func:`load_image` for a file's bytes already in memory (a sample of a packed dataset, an upload);
    ``name`` is the file's name, for errors. ``max_pixels``: a lower limit than Pillow's decompression-bomb
    limit, checked from the header before any pixel is decoded (a server's).

    Example:
        >>> import io
        >>> buffer = io.BytesIO(); Image.new("L", (4, 3)).save(buffer, format="PNG")
        >>> decode_image(buffer.getvalue(), "gray.png").shape
        (3, 4, 3)
    """
    path = Path(name)
    try:
        if not data:
            raise ImageReadError(path, "the file is empty (0 bytes)")
        with Image.open(io.BytesIO(data)) as image:
            return _decode(path, image, min_side, max_pixels)
    except ImageReadError:
        raise
    except Exception as err:
        raise _read_error(path, err) from err


def _decode(
    path: Path, image: Image.Image, min_side: int | None, max_pixels: int | None = None
) -> np.ndarray:
    _check_size(path, image, max_pixels)
    if min_side is not None and image.format == "JPEG":
        image.draft(None, (min_side, min_side))  # both sides stay >= min_side
    image = ImageOps.exif_transpose(image) or image
    image.load()
    return to_rgb(image)


def read_header(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` from the file's header, without decoding a pixel (EXIF orientation not applied).

    What set-up checks of every file: it exists, is not empty, is an image Pillow knows, and is under the
    decompression-bomb limit. A file whose pixel data is truncated or corrupt passes; decoding finds it
    (a loader worker, or :func:`find_unreadable`). Raises :class:`ImageReadError` as :func:`load_image`.
    """
    path = Path(path)
    try:
        _check_not_empty(path)
        with Image.open(path) as image:
            _check_size(path, image)
            return image.size
    except ImageReadError:
        raise
    except Exception as err:
        raise _read_error(path, err) from err


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise ImageReadError(path, "the file is empty (0 bytes)")


def _read_error(path: Path, err: Exception) -> ImageReadError:
    """The :class:`ImageReadError` for what reading ``path`` raised, with the reason a person can act on."""
    if isinstance(err, FileNotFoundError):
        return ImageReadError(path, "the file does not exist")
    if isinstance(err, UnidentifiedImageError):
        return ImageReadError(path, "not an image in a format Pillow can decode")
    if isinstance(err, Image.DecompressionBombError):
        return ImageReadError(
            path,
            f"over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels (PIL.Image.MAX_IMAGE_PIXELS; "
            f"Pillow: {err}); downscale the file, or raise the limit if you trust it",
            oversized=True,
        )
    if isinstance(err, OSError | SyntaxError | ValueError | EOFError):
        reason = str(err) or type(err).__name__
        if "truncated" in reason.lower():
            reason = f"the file is truncated or corrupt ({reason})"
        return ImageReadError(path, reason)
    if isinstance(err, MemoryError):
        return ImageReadError(path, "not enough memory to decode it")
    # a corrupt file can trip any decoder (struct.error, IndexError, ...)
    return ImageReadError(path, f"the file is corrupt ({type(err).__name__}: {err})")


def _check_size(path: Path, image: Image.Image, max_pixels: int | None = None) -> None:
    # Pillow only warns between 1x and 2x its limit; a training set is better served by a clear error
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageReadError(path, f"the image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageReadError(
            path,
            f"{width}x{height} = {width * height:,} pixels is over this server's limit of {max_pixels:,} pixels",
            oversized=True,
        )
    if limit is not None and width * height > limit:
        raise ImageReadError(
            path,
            f"{width}x{height} = {width * height:,} pixels is over the decompression-bomb limit of "
            f"{limit:,} (PIL.Image.MAX_IMAGE_PIXELS); downscale the file, or raise the limit if you trust it",
            oversized=True,
        )


def to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """A PIL image of any mode, or a ``(H, W)`` / ``(H, W, 1|3|4)`` array, as an ``(H, W, 3) uint8`` array.

    Gray is repeated into three channels, an alpha channel of an array is dropped (a PIL image's is
    composited onto white), 16-bit and float PIL images are scaled to 8 bits.

    Example:
        >>> to_rgb(np.zeros((2, 3), dtype=np.uint8)).shape
        (2, 3, 3)
    """
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit and 32-bit grayscale: scale to 8 bits instead of clipping
        array = np.asarray(image, dtype=np.float64)
        if mode == "F":
            lo, hi = float(array.min()), float(array.max())
            array = (array - lo) / (hi - lo or 1.0) * 255.0
        else:
            top = 65535.0 if array.max() > 255 else 255.0
            array = array / top * 255.0
        gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image array must be (H, W) or (H, W, 1|3|4), got shape {array.shape}.")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        array = array[..., :3]
    return np.ascontiguousarray(array.astype(np.uint8, copy=False))


def find_unreadable(
    paths: Sequence[str | os.PathLike],
    workers: int | None = None,
    decode: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[ImageReadError]:
    """The files among ``paths`` that cannot be read, as errors naming each file and why, in ``paths`` order.

    ``decode=True`` decodes every image in full (in threads: decoding releases the GIL); ``False`` reads
    only the headers (:func:`read_header`), which costs a file open, not a decode, per image.
    ``progress(n)`` is called as each file is done (n = 1), e.g. a progress bar's ``update``.
    """
    check_one = load_image if decode else read_header

    def check(path: str | os.PathLike) -> ImageReadError | None:
        try:
            check_one(path)
        except ImageReadError as err:
            return err
        finally:
            if progress is not None:
                progress(1)
        return None

    workers = workers or min(8, 2 * (os.cpu_count() or 1)) * (1 if decode else 4)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [err for err in pool.map(check, paths) if err is not None]
