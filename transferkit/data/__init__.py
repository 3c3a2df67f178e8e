"""Data: sources, image reading, Albumentations pipelines, datasets, samplers, feature caches, the datamodule."""

from transferkit._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "PRESETS": "transferkit.data.augment",
        "build_eval_transform": "transferkit.data.augment",
        "build_train_transform": "transferkit.data.augment",
        "ImageDataModule": "transferkit.data.datamodule",
        "ImageDataset": "transferkit.data.datasets",
        "load_image": "transferkit.data.images",
        "DataSource": "transferkit.data.sources",
        "load_source": "transferkit.data.sources",
        "split_indices": "transferkit.data.sources",
        "DatasetError": "transferkit.errors",
        "ImageReadError": "transferkit.errors",
    },
)
