"""Data larger than one disk: a data module's splits packed into LitData's streaming format, read back
from a folder or an object store (``s3://``, ``gs://``, ``azure://``, ...) while training.

Packing (:func:`pack_stream`, ``python -m transferkit pack-data --config X --out DIR``) decodes every
file once (a bad one stops it, named), and writes the splits the data module made (its seed and
fractions) as LitData chunks of about 64 MB, one folder per split, plus ``meta/`` (the class names and
every split's labels); upload ``DIR`` to an object store to train from there::

    DIR/train/  DIR/val/  DIR/test/  DIR/meta/      each: index.json + chunk-*.bin

Each sample keeps its file's bytes as they are (a JPEG stays a JPEG, decoded by the reader at reduced
scale as a file would be; an in-memory array is stored as PNG), with its label, its position in its split
and its file name. Training on the pack (``data.source: stream``, ``data.root: DIR or URL``) sees the same
images in the same splits as training on the files; LitData's ``StreamingDataset`` downloads chunks
ahead of use into a local cache, shuffles chunk-wise each epoch, and gives each DDP rank and loader
worker its own part of every epoch. Augmentation draws stay a function of ``(seed, epoch, position)``.

Why LitData: it reads local folders and object stores through one class, splits an epoch between DDP
ranks and workers itself, and keeps only a bounded window of chunks on local disk. WebDataset does the
streaming too, but leaves the split between ranks and an epoch's length to the user.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import albumentations as A
import numpy as np
import torch
from PIL import Image

from transferkit.data.augment import decode_side
from transferkit.data.datasets import sample_seed
from transferkit.data.images import decode_image, to_rgb
from transferkit.errors import ConfigError, DatasetError, ImageReadError, MissingDependencyError, warn

try:
    import litdata
    from litdata.streaming.cache import Cache
except ImportError as err:  # the sources and the data module import this module only for packed data
    raise MissingDependencyError(
        "packed (streaming) datasets need the package 'litdata': pip install 'transferkit[stream]'."
    ) from err

__all__ = ["FORMAT", "StreamLoader", "StreamingImages", "pack_stream", "read_meta", "split_url"]

FORMAT = "transferkit-stream-1"
SPLITS = ("train", "val", "test")


def split_url(root: str | os.PathLike, part: str) -> str:
    """``root``'s folder for one split (or ``meta``), for a local path or an object-store URL alike."""
    return f"{str(root).rstrip('/')}/{part}"


def _is_url(root: str | os.PathLike) -> bool:
    return "://" in str(root)


# --- packing ---------------------------------------------------------------------------------------


def pack_stream(
    datamodule: Any,
    output_dir: str | os.PathLike,
    chunk_bytes: str = "64MB",
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write the splits of ``datamodule`` (an :class:`~transferkit.ImageDataModule`) to the local folder
    ``output_dir`` in the streaming format; returns what it wrote: ``meta`` (classes, labels per split,
    the data it came from), ``bytes`` (the chunks' total size) and ``skipped``
    (:class:`~transferkit.errors.ImageReadError` of the files left out).

    Every file is decoded as it is packed, as the loader will decode it (in ``workers`` threads), so a
    truncated or corrupt file never reaches a pack: the run stops naming every bad file, and removes what
    it wrote, unless the data module has ``skip_bad_images=True`` (then they are left out, with a
    warning, but a split none of whose images can be decoded is refused: every split asked for is packed).
    Whatever stops a pack part-way (a refusal, an interrupt, a full disk) removes what it had written. ``output_dir`` must be new or empty: nothing is overwritten. To train from an object
    store, upload the folder (e.g. ``aws s3 sync DIR s3://bucket/packed``) and read it by its URL.
    ``progress(n)`` is called as samples are done.
    """
    output_dir = str(output_dir)
    kind = getattr(datamodule, "target_kind", "single_label")
    if kind != "single_label":
        raise ConfigError(
            f"pack-data packs one class per image, and this data's targets are {kind} (data.target.kind): "
            "train from its CSV instead (a streaming pack of other kinds of target is not supported)."
        )
    if _is_url(output_dir):
        raise DatasetError(
            f"pack into a local folder, not {output_dir}; then upload it (e.g. aws s3 sync DIR "
            f"{output_dir}) and set data.root to the URL."
        )
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise DatasetError(
            f"'{output_dir}' already holds files; pack into a new or empty folder (nothing is overwritten)."
        )
    if datamodule.split_indices is None:
        datamodule.setup()
    data = datamodule.data
    if data.name == "stream":
        raise DatasetError("the data is already packed; pack from the folder, CSV or dataset it came from.")
    side = decode_side(datamodule.train_transform) if datamodule.settings.pipeline.jpeg_draft else None
    labels: dict[str, list[int]] = {}
    skipped: list[ImageReadError] = []
    emptied: list[tuple[str, int]] = []  # splits none of whose images could be decoded, and their sizes
    total = 0
    created = not os.path.exists(output_dir)

    def remove_what_was_written() -> None:
        for part in [output_dir] if created else [split_url(output_dir, s) for s in (*SPLITS, "meta")]:
            shutil.rmtree(part, ignore_errors=True)  # only what this call wrote

    try:
        with ThreadPoolExecutor(max_workers=workers or min(8, 2 * (os.cpu_count() or 1))) as pool:
            for split in SPLITS:
                indices = np.asarray(datamodule.split_indices.get(split, []), dtype=np.int64)
                labels[split] = []
                if len(indices) == 0:
                    continue
                url = split_url(output_dir, split)
                cache = Cache(url, chunk_bytes=chunk_bytes)
                for sample in pool.map(lambda i: _sample(data, int(i), side), indices):
                    if progress is not None:
                        progress(1)
                    if isinstance(sample, ImageReadError):
                        skipped.append(sample)
                        continue
                    sample["position"] = len(labels[split])
                    cache[sample["position"]] = sample
                    labels[split].append(sample["label"])
                if not labels[split]:
                    emptied.append((split, len(indices)))
                    if datamodule.settings.skip_bad_images:
                        break  # refused below whatever the other splits hold: no need to decode them
                    continue  # a writer with no sample never finishes its index: done() would wait forever
                cache.done()
                cache.merge()
                total += _folder_bytes(url)

        if skipped and not datamodule.settings.skip_bad_images:
            listing = "\n".join(f"  {err.path}: {err.reason}" for err in skipped[:20])
            more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
            raise DatasetError(
                f"{len(skipped)} image files cannot be decoded, nothing was packed:\n{listing}{more}\n"
                "Fix or remove them, or set data.skip_bad_images=true to pack without them."
            )
        if emptied:
            split, size = emptied[0]
            advice = (
                "a model needs training images: fix or replace those files"
                if split == "train"
                else "fix or replace those files, or set data.split.val_fraction / data.split.test_fraction to 0 for a split "
                "you do not need"
            )
            raise DatasetError(
                f"no image in the {split} split ({size} files) can be decoded (skip_bad_images=true left them all "
                "out), so nothing "
                f"was packed: a pack needs every split it was asked for; {advice}."
            )
        if skipped:
            warn(
                f"{len(skipped)} image files cannot be decoded and were left out of the pack "
                f"(skip_bad_images=true), e.g. {skipped[0]}"
            )
        meta = {
            "format": FORMAT,
            "source": data.name,
            "class_names": list(data.class_names),
            "seed": datamodule.seed,
            "val_fraction": datamodule.settings.split.val_fraction,
            "test_fraction": datamodule.test_fraction,
            "skipped": [str(err.path) for err in skipped],
            "splits": labels,
        }
        cache = Cache(split_url(output_dir, "meta"), chunk_bytes="256MB")
        cache[0] = {"meta": json.dumps(meta)}
        cache.done()
        cache.merge()
    except BaseException:
        remove_what_was_written()  # a refusal, an interrupt or a full disk: no half-written pack is left
        raise
    return {"meta": meta, "bytes": total, "skipped": skipped}


def _sample(data: Any, index: int, side: int | None) -> dict[str, Any] | ImageReadError:
    """One sample as packed (the file's bytes as they are), or why its file cannot be decoded."""
    item = data.items[index]
    if isinstance(item, np.ndarray):
        buffer = io.BytesIO()
        Image.fromarray(to_rgb(item)).save(buffer, format="PNG")
        image, name = buffer.getvalue(), f"{data.name}-{index}.png"
    else:
        name = str(item)
        try:
            with open(item, "rb") as handle:
                image = handle.read()
            decode_image(image, name, side)
        except ImageReadError as err:
            return err
        except OSError as err:
            return ImageReadError(name, str(err))
    # the name as bytes: LitData would store a str naming an existing file as that file's decoded pixels
    return {"label": int(data.labels[index]), "image": image, "name": name.encode()}


def _folder_bytes(url: str) -> int:
    if _is_url(url):
        return 0  # not listed remotely
    return sum(entry.stat().st_size for entry in os.scandir(url) if entry.is_file())


# --- reading ---------------------------------------------------------------------------------------


def read_meta(root: str | os.PathLike, cache_dir: str | None = None) -> dict[str, Any]:
    """The classes and splits of the pack at ``root`` (a folder or URL), read through LitData."""
    where = split_url(root, "meta")
    if not _is_url(root) and not os.path.isfile(os.path.join(where, "index.json")):
        raise DatasetError(
            f"'{root}' is not a packed dataset (no {where}/index.json); write one with "
            "python -m transferkit pack-data --config <recipe of the folder or CSV> --out DIR."
        )
    try:
        meta = json.loads(litdata.StreamingDataset(where, cache_dir=cache_dir)[0]["meta"])
    except DatasetError:
        raise
    except Exception as err:
        raise DatasetError(
            f"cannot read the packed dataset's {where}: {type(err).__name__}: {err}. Check the URL and "
            "the object store's credentials (LitData reads them as boto3 / the store's SDK does)."
        ) from err
    if meta.get("format") != FORMAT:
        raise DatasetError(
            f"'{root}' was packed in format {meta.get('format')!r}; this version reads {FORMAT!r}: pack it again."
        )
    return meta


class StreamingImages(litdata.StreamingDataset):
    """One split of a pack: ``(image (3, S, S) float32, label int64)`` per sample, through ``pipeline``.

    The pipeline's draws for a sample depend only on ``(seed, epoch, position in the split)``, as for
    :class:`~transferkit.data.datasets.ImageDataset`; the epoch is LitData's (counted from 1 by its
    loader; :class:`StreamLoader` sets it from the Trainer). ``labels`` are the whole split's, in order.
    """

    def __init__(
        self,
        root: str,
        split: str,
        pipeline: A.Compose,
        labels: Sequence[int],
        seed: int = 0,
        shuffle: bool = False,
        decode_side: int | None = None,
        cache_dir: str | None = None,
        drop_last: bool | None = None,
    ) -> None:
        super().__init__(
            split_url(root, split), cache_dir=cache_dir, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        # not ``transform``: LitData applies an attribute of that name to every item itself
        self.pipeline = pipeline
        self.labels = np.asarray(labels, dtype=np.int64)
        self.augment_seed = seed
        self.decode_side = decode_side

    def read(self, position: int) -> np.ndarray:
        """The raw image ``(H, W, 3) uint8`` at ``position`` in the split, before any transform."""
        item = super().__getitem__(int(position))
        return decode_image(item["image"], bytes(item["name"]).decode(), self.decode_side)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        item = super().__getitem__(index)
        image = decode_image(item["image"], bytes(item["name"]).decode(), self.decode_side)
        epoch = max(int(self.current_epoch) - 1, 0)
        self.pipeline.set_random_seed(sample_seed(self.augment_seed, epoch, int(item["position"])))
        image = self.pipeline(image=image)["image"]
        return image, torch.as_tensor(item["label"], dtype=torch.long)


class StreamLoader(litdata.StreamingDataLoader):
    """LitData's loader, its epoch count taken from ``epoch_of_run()`` (the Trainer's epoch about to run)
    when given: a resumed run shuffles and augments as an uninterrupted one."""

    def __init__(self, *args: Any, epoch_of_run: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_of_run = epoch_of_run

    def __iter__(self) -> Any:
        if self.epoch_of_run is not None and not self.restore:
            self.current_epoch = self.epoch_of_run()  # LitData adds 1 as it starts the epoch
        return super().__iter__()
