"""Data: sources, Albumentations pipelines, the datamodule."""

from transferkit.data.augment import PRESETS, build_eval_transform, build_train_transform
from transferkit.data.datamodule import ImageDataModule, ImageDataset
from transferkit.data.images import ImageReadError, load_image
from transferkit.data.sources import DatasetError, DataSource, load_source, split_indices

__all__ = [
    "PRESETS",
    "DataSource",
    "DatasetError",
    "ImageDataModule",
    "ImageDataset",
    "ImageReadError",
    "build_eval_transform",
    "build_train_transform",
    "load_image",
    "load_source",
    "split_indices",
]
