"""Datasets the loaders draw from: images through an Albumentations pipeline, or cached features."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from transferkit.data.decoded import DecodedImages
from transferkit.data.images import load_image, to_rgb
from transferkit.errors import ImageReadError, warn

__all__ = ["CachedFeatures", "ImageDataset", "sample_seed", "target_tensor"]


def target_tensor(labels: np.ndarray | np.generic) -> torch.Tensor:
    """Labels as the loss takes them: class indices as int64, 0/1 labels and numbers as float32.

    Example:
        >>> target_tensor(np.int64(2)).dtype, target_tensor(np.asarray([0.0, 1.0], dtype=np.float32)).dtype
        (torch.int64, torch.float32)
    """
    array = np.asarray(labels)
    if np.issubdtype(array.dtype, np.floating):
        return torch.as_tensor(array, dtype=torch.float32)
    return torch.as_tensor(array, dtype=torch.long)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample's augmentation, well mixed from ``(seed, epoch, index)``.

    Example:
        >>> sample_seed(0, 1, 2) == sample_seed(0, 1, 2) != sample_seed(0, 2, 2)
        True
    """
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1)[0])


class ImageDataset(Dataset):
    """Items (file paths or ``(H, W)``/``(H, W, C)`` uint8 arrays) through an Albumentations pipeline.

    ``dataset[i]`` is ``(image (3, S, S) float32, label int64)``. The pipeline's random draws for a
    sample depend only on ``(seed, epoch, i)`` (Albumentations keeps its own RNG, which
    ``seed_everything`` does not reach), so two runs with the same seed see the same augmented images
    whatever the number of DataLoader workers, and a resumed run continues with the same draws.
    ``dataset[(epoch, i)]`` (what :class:`~transferkit.data.samplers.EpochShuffleSampler` yields with
    ``tag_epoch=True``) draws for that epoch; ``dataset[i]`` for :attr:`epoch`.

    An image that cannot be read raises :class:`~transferkit.errors.ImageReadError` naming it (also from
    a DataLoader worker); with ``skip_bad=True`` (a file that broke after the data module checked it)
    the next readable sample stands in for it, with a warning.

    ``decode_side`` (see :func:`transferkit.data.augment.decode_side`): JPEGs are decoded at the
    smallest DCT scale that keeps both sides at least this many pixels; ``None`` decodes in full.
    ``decoded``: a :class:`~transferkit.data.decoded.DecodedImages` cache to read files from where it
    holds them (others are decoded as without it).
    ``targets``: ``(N, C)`` class distributions (soft labels) to return instead of the labels, as float32
    ``(C,)`` per sample; ``labels`` stay the classes samplers and metrics use.
    """

    def __init__(
        self,
        items: Sequence[str | np.ndarray],
        labels: np.ndarray,
        transform: A.Compose,
        seed: int = 0,
        epoch: int = 0,
        skip_bad: bool = False,
        decode_side: int | None = None,
        decoded: DecodedImages | None = None,
        targets: np.ndarray | None = None,
    ) -> None:
        self.items = items
        self.labels = labels
        self.transform = transform
        self.seed = seed
        self.epoch = epoch
        self.skip_bad = skip_bad
        self.decode_side = decode_side
        self.decoded = decoded
        self.targets = targets

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int) -> np.ndarray:
        """The raw image ``(H, W, 3) uint8`` of sample ``index``, before any transform."""
        item = self.items[index]
        if isinstance(item, np.ndarray):
            return to_rgb(item)
        if self.decoded is not None and item in self.decoded:
            return self.decoded[item]
        return load_image(item, min_side=self.decode_side)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        image, index = self._read_or_stand_in(index)
        self.transform.set_random_seed(sample_seed(self.seed, epoch, index))
        image = self.transform(image=image)["image"]
        if self.targets is not None:
            return image, torch.as_tensor(self.targets[index], dtype=torch.float32)
        return image, target_tensor(self.labels[index])

    def _read_or_stand_in(self, index: int) -> tuple[np.ndarray, int]:
        try:
            return self.read(index), index
        except ImageReadError as err:
            if not self.skip_bad:
                raise
            for step in range(1, min(len(self), 16)):
                stand_in = (index + step) % len(self)
                try:
                    image = self.read(stand_in)
                except ImageReadError:
                    continue
                warn(f"{err}; skipped (skip_bad_images=true), sample {stand_in} used instead")
                return image, stand_in
            raise


class CachedFeatures(Dataset):
    """``(features, label)`` pairs (``(F,)`` pooled features or a trunk's ``(C, H, W)`` maps) from a
    ``(views, N, ...)`` tensor; with several views, each epoch draws one view per image, the same one
    in every run with the same ``seed``."""

    def __init__(
        self,
        features: torch.Tensor,
        labels: np.ndarray,
        epoch: int,
        seed: int,
        targets: np.ndarray | None = None,
    ) -> None:
        views, count = features.shape[:2]
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch + 7)
        self.view = (
            torch.randint(views, (count,), generator=generator)
            if views > 1
            else torch.zeros(count, dtype=torch.long)
        )
        self.features = features
        self.labels = target_tensor(labels)
        # soft labels: the class distributions are what training sees (``labels`` stay the classes)
        self.targets = torch.as_tensor(targets, dtype=torch.float32) if targets is not None else self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[self.view[index], index], self.targets[index]
