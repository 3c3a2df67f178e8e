"""The LightningDataModule: source -> seeded stratified splits -> Albumentations pipelines -> loaders."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal, Protocol

import albumentations as A
import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from transferkit.data.augment import build_eval_transform, build_train_transform, decode_side
from transferkit.data.checks import (
    drop_unreadable,
    subset,
    warn_duplicates_across_splits,
    warn_imbalance,
    warn_near_duplicates_across_splits,
)
from transferkit.data.class_groups import resolve_class_groups
from transferkit.data.datasets import ImageDataset
from transferkit.data.decoded import DecodedImages, working_side
from transferkit.data.loaders import make_loader, stream_loader
from transferkit.data.settings import (
    CacheSettings,
    DataSettings,
    LoaderSettings,
    PipelineSettings,
    SplitSettings,
    TargetSettings,
)
from transferkit.data.sources import DataSource, SourceName, load_source
from transferkit.data.splits import apply_exclusions, cv_split_indices, make_splits
from transferkit.errors import ConfigError, DatasetError, ImageReadError, warn

__all__ = ["FeatureFeed", "ImageDataModule", "cv_split_indices"]


class FeatureFeed(Protocol):
    """What serves a split instead of its images (:class:`~transferkit.training.feeding.FreezeAndCache`)."""

    def dataset(self, split: str) -> Dataset | None:
        """``(input, target)`` pairs to serve for ``split`` now, or ``None`` for the images."""


class ImageDataModule(L.LightningDataModule):
    """Labelled images for fine-tuning, split and augmented.

    Its settings come in typed groups validated at construction (:mod:`transferkit.data.settings`), read
    back as :attr:`settings`; each group may be given as itself, as a dict of the fields to change
    (``loader={"batch_size": 64}``) or left out (its defaults). The work is done by units of their own:
    the source (:mod:`~transferkit.data.sources`), the splits (:mod:`~transferkit.data.splits`), the
    pipelines (:mod:`~transferkit.data.augment`), the decoded-image cache (:mod:`~transferkit.data.decoded`)
    and the loaders (:mod:`~transferkit.data.loaders`).

    Args:
        source: ``folder`` (``root/<class>/<images>``, or ``root/{train,val,test}/<class>/...``),
            ``csv`` (``path,label[,split]`` columns), ``stream`` (a pack written by
            :func:`~transferkit.data.stream.pack_stream`, read by LitData from a folder or an object-store
            URL; its splits are the ones it was packed with), ``elpv`` (the ELPV solar-cell benchmark) or
            ``digits`` (scikit-learn's 8x8 digits).
        root: the image folder (``folder``), the folder CSV paths are relative to (``csv``), or the pack's
            folder or URL (``stream``, e.g. ``s3://bucket/packed``).
        csv_path: the CSV file (``csv``).
        task: ELPV only, which of its label sets: ``binary`` (defective = defect probability >= 0.5) or
            ``4class``, ``cell_type`` (monocrystalline or polycrystalline; single label), ``defective_polycrystalline`` (two labels per cell: defective, and
            polycrystalline rather than monocrystalline; multi-label) or ``defect_probability`` (the annotated
            0, 1/3, 2/3 or 1 as a number; regression). ``target.kind`` must match.
        seed: seed of the stratified splits, the augmentation draws and the training order.
        class_groups: coarser classes the labels refine, ``{group: [class names]}``, every class in one
            group; the model then also scores the groups (``val_group_acc``, ``test_group_acc``: a group's
            probability is the sum of its classes'). ``None``: the source's own, where it has them (ELPV's
            4-class task: ``{functional: [0, 1/3], defective: [2/3, 1]}``). See
            :mod:`transferkit.data.class_groups`.
        soft_labels: train on class distributions instead of hard labels, where the source gives them:
            a CSV's ``p_<class>`` columns, or ELPV's annotated defect probability (``task: binary``: a cell
            rated 1/3 defective trains as (2/3, 1/3)). Validation and test are scored on the hard labels.
        skip_bad_images: ``False``: an unreadable image is an error naming it. ``True``: such images are
            left out with a warning and counted in ``skipped_images``.
        split: which images train, validate and test (:class:`~transferkit.data.settings.SplitSettings`).
        pipeline: image size, normalisation, augmentation, JPEG draft decoding
            (:class:`~transferkit.data.settings.PipelineSettings`).
        loader: batch size, workers, sampler (:class:`~transferkit.data.settings.LoaderSettings`).
        cache: the cache folder and the decoded-image cache (:class:`~transferkit.data.settings.CacheSettings`).
        target: the kind of target and, for a CSV, where it is (:class:`~transferkit.data.targets.TargetSettings`):
            one class per image (the default), several labels, or numbers. The model must be of the same kind
            (``TransferClassifier(target=...)``; the CLI hands it over).

    Image size, mean and std left ``None`` are the backbone's: :class:`transferkit.Trainer` fills them in
    from the model before any data is read (``use_data_config``). While part of the backbone is frozen,
    :class:`~transferkit.training.feeding.FreezeAndCache` may have the data module serve stored backbone
    outputs instead of images (``feed``); the data module itself never asks the model anything.

    Example:
        >>> dm = ImageDataModule(source="digits", pipeline={"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))[0].shape
        torch.Size([32, 3, 32, 32])
    """

    def __init__(
        self,
        source: SourceName = "folder",
        root: str | None = None,
        csv_path: str | None = None,
        task: Literal[
            "binary", "4class", "cell_type", "defective_polycrystalline", "defect_probability"
        ] = "binary",
        seed: int = 0,
        class_groups: dict[str, list[str | int]] | None = None,
        soft_labels: bool = False,
        skip_bad_images: bool = False,
        split: SplitSettings = SplitSettings(),
        pipeline: PipelineSettings = PipelineSettings(),
        loader: LoaderSettings = LoaderSettings(),
        cache: CacheSettings = CacheSettings(),
        target: TargetSettings = TargetSettings(),
    ) -> None:
        super().__init__()
        self.settings = DataSettings.build(
            source=source, root=root, csv_path=csv_path, task=task, seed=seed, class_groups=class_groups,
            soft_labels=soft_labels, skip_bad_images=skip_bad_images, split=split, pipeline=pipeline,
            loader=loader, cache=cache, target=target,
        )  # fmt: skip
        # class_groups: the model's hyperparameters hold them as resolved here (the source's own filled in);
        # target: the model's is its kind alone. Lightning merges the two modules' hyperparameters for the
        # logger and refuses a key they differ on, so the data's target settings are kept as data_target
        given = self.settings.to_dict()
        given["data_target"] = given.pop("target")
        self.save_hyperparameters({k: v for k, v in given.items() if k != "class_groups"})
        # as given, before use_data_config fills the unset size, mean and std: what makes two runs the same
        self.given_settings = self.settings
        self.decoded: DecodedImages | None = None
        # what serves a split instead of its images this epoch (stored backbone outputs), set by the
        # FreezeAndCache callback of a fit; None: images
        self.feed: FeatureFeed | None = None
        # listing is cheap and finds missing paths and empty classes before any training starts
        self.data: DataSource = load_source(
            source, root=root, csv_path=csv_path, task=task, target=self.settings.target
        )
        if soft_labels and self.data.soft is None:
            raise DatasetError(
                f"soft_labels is on, but the '{source}' data gives no class probabilities: a CSV needs "
                "'p_<class>' columns, ELPV needs task: binary. Turn soft_labels off to train on the labels."
            )
        max_samples = self.settings.split.max_samples
        if max_samples is not None and max_samples < len(self.data):
            self.data = subset(self.data, max_samples, seed)
        groups = self.data.groups if class_groups is None else class_groups
        resolve_class_groups(groups, self.data.class_names)  # a bad group fails here, before training
        self._class_groups = (
            None if groups is None else {str(g): [str(c) for c in m] for g, m in groups.items()}
        )
        self.skipped_images: list[ImageReadError] = []
        self.split_indices: dict[str, np.ndarray] | None = None
        self.exclusions: dict[str, int] | None = None  # what data.split.exclude did, once set up
        self.datasets: dict[str, ImageDataset] = {}
        self._train_transform = self._eval_transform = None

    # --- what the model needs to know --------------------------------------------------------------

    @property
    def target_kind(self) -> str:
        """The kind of target: ``single_label``, ``multi_label`` or ``regression`` (``target.kind``)."""
        return self.data.kind

    @property
    def num_classes(self) -> int:
        """Classes, labels (multi-label) or targets (regression): the model's head width."""
        return len(self.data.class_names)

    @property
    def class_names(self) -> list[str]:
        """The classes, labels or targets, in output order."""
        return list(self.data.class_names)

    def split_targets(self, split: str = "train") -> np.ndarray:
        """The targets of ``split`` (after :meth:`setup`), as the source holds them: class indices ``(N,)``,
        0/1 labels ``(N, L)`` or numbers ``(N, T)``."""
        if self.split_indices is None:
            self.setup("fit")
        if split not in self.split_indices:
            raise ConfigError(f"the data has no {split} split (it has {', '.join(self.split_indices)}).")
        return np.asarray(self.data.labels)[self.split_indices[split]]

    def class_counts(self, split: str = "train") -> np.ndarray:
        """Images per class in ``split`` (after :meth:`setup`), in the order of :attr:`class_names`; for
        multi-label data, each label's positives; regression data has no classes to count."""
        targets = self.split_targets(split)
        if self.target_kind == "regression":
            raise ConfigError("regression targets are numbers: there are no classes to count.")
        if self.target_kind == "multi_label":
            return (targets >= 0.5).sum(axis=0).astype(np.int64)
        return np.bincount(targets, minlength=self.num_classes)

    @property
    def class_groups(self) -> dict[str, list[str]] | None:
        """Coarser classes the labels refine, ``{group: [class names]}``: ``data.class_groups``, else the
        source's own (ELPV's 4-class task: its binary classes), else ``None``."""
        return self._class_groups

    @property
    def has_validation(self) -> bool:
        """Whether the data holds out a validation split: ``val_fraction > 0``, a cross-validation fold, or
        one the source defines."""
        split = self.settings.split
        return (
            split.cv_folds is not None
            or split.val_fraction > 0
            or (self.data.splits is not None and "val" in self.data.splits)
        )

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def batch_size(self) -> int:
        return self.settings.loader.batch_size

    @property
    def image_size(self) -> int | None:
        """The network input's side (``None`` until the backbone's is filled in, see :meth:`use_data_config`)."""
        return self.settings.pipeline.image_size

    @property
    def mean(self) -> tuple[float, float, float] | None:
        return self.settings.pipeline.mean

    @property
    def std(self) -> tuple[float, float, float] | None:
        return self.settings.pipeline.std

    @property
    def test_fraction(self) -> float:
        """The share of all images held out for the test: ``split.test_fraction``, else the source's own."""
        given = self.settings.split.test_fraction
        return self.data.test_fraction if given is None else given

    @property
    def train_transform(self) -> A.Compose:
        self._resolve_transforms()
        return self._train_transform

    @property
    def eval_transform(self) -> A.Compose:
        self._resolve_transforms()
        return self._eval_transform

    # --- setup -------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.split_indices is None:
            files = bool(self.data.items) and isinstance(self.data.items[0], str) and not self.data.verified
            if files:
                self.data, self.skipped_images = drop_unreadable(self.data, self.settings.skip_bad_images)
            self.split_indices = make_splits(self.data, self.settings.split, self.seed)
            if self.settings.split.exclude is not None:  # after the splits: val and test stay as they are
                self.data, self.split_indices, self.exclusions = apply_exclusions(
                    self.data, self.split_indices, self.settings.split.exclude
                )
            single = self.target_kind == "single_label"
            if single and self.settings.loader.sampler is None:  # a sampler named was chosen knowing them
                warn_imbalance(self.data.labels[self.split_indices["train"]], self.class_names)
            if files:
                warn_duplicates_across_splits(self.data, self.split_indices)
        self._resolve_transforms()
        for split, indices in self.split_indices.items():
            transform = self._train_transform if split == "train" else self._eval_transform
            if self.data.name == "stream":
                self.datasets[split] = self._stream_dataset(split, transform, self.data.labels[indices])
                continue
            items = [self.data.items[i] for i in indices]
            self.datasets[split] = self.image_dataset(items, self.data.labels[indices], transform)
            if split == "train" and self.settings.soft_labels:
                self.datasets[split].targets = self.data.soft[indices]  # validation and test: hard labels
        if self.settings.cache.decoded_images and self.decoded is None:
            self.decoded = self._build_decoded_cache()
            for dataset in self.datasets.values():
                dataset.decoded = self.decoded

    def check_near_duplicates(self) -> int:
        """Warn when a test image looks like a training or validation one in other bytes (re-encoded,
        resized), as set-up does for identical files; return the number of test images concerned. It decodes
        every image at a reduced scale, so set-up, which reads headers only, leaves it to
        :meth:`Trainer.finetune <transferkit.Trainer.finetune>`, before it scores the test split.
        ``data.split.near_duplicates: off``, in-memory arrays and packaged datasets skip it."""
        if self.split_indices is None:
            self.setup("fit")
        files = bool(self.data.items) and isinstance(self.data.items[0], str) and not self.data.verified
        if not files or self.settings.split.near_duplicates != "warn":
            return 0
        return warn_near_duplicates_across_splits(self.data, self.split_indices)

    def image_dataset(
        self, items: list, labels: np.ndarray, transform: A.Compose, epoch: int = 0
    ) -> ImageDataset:
        """``items`` through ``transform``, read as this data module reads images (reduced-scale JPEG
        decoding, the decoded-image cache, ``skip_bad_images``)."""
        side = decode_side(transform) if self.settings.pipeline.jpeg_draft else None
        return ImageDataset(
            items,
            labels,
            transform,
            seed=self.seed,
            epoch=epoch,
            skip_bad=self.settings.skip_bad_images,
            decode_side=side,
            decoded=self.decoded,
        )

    def _stream_dataset(self, split: str, transform: A.Compose, labels: np.ndarray) -> Any:
        from transferkit.data.stream import StreamingImages

        if len(labels) == 0:
            return ImageDataset([], labels, transform)  # a split the pack does not hold
        cache_dir = self.settings.cache.dir
        return StreamingImages(
            str(self.settings.root),
            split,
            transform,
            labels,
            seed=self.seed,
            shuffle=split == "train",
            decode_side=decode_side(transform) if self.settings.pipeline.jpeg_draft else None,
            cache_dir=os.path.join(cache_dir, "stream") if cache_dir else None,
            # training: LitData evens out the ranks' shares under DDP; evaluation: every sample, once
            drop_last=None if split == "train" else False,
        )

    def decoding_for(self, transform: A.Compose) -> str | None:
        """How images reach ``transform``, for cache keys: ``None`` (decoded in full, no cache),
        ``"draft-<side>"`` and/or ``"decoded-<side>"``."""
        parts = []
        if self.settings.pipeline.jpeg_draft and (side := decode_side(transform)) is not None:
            parts.append(f"draft-{side}")
        if self.decoded is not None:
            parts.append(f"decoded-{self.decoded.side}")
        return "+".join(parts) or None

    def _build_decoded_cache(self) -> DecodedImages | None:
        files = [item for item in self.data.items if isinstance(item, str)]
        root = self.cache_root()
        if not files:
            return None  # in-memory arrays: nothing to decode
        if root is None:
            warn(
                "data.cache.decoded_images is on but there is no folder for it: the data module runs "
                "outside a Trainer and data.cache.dir is not set. Images are decoded as they are read; set "
                "data.cache.dir to keep them decoded."
            )
            return None
        needed = [decode_side(t) for t in (self._train_transform, self._eval_transform)]
        side = working_side(max([n for n in needed if n is not None] or [self.image_size]))
        cache = DecodedImages(root, side)
        stale = cache.stale(files)
        if stale:
            from tqdm.auto import tqdm

            with tqdm(total=len(stale), desc=f"decoding images (shorter side {side} px)", unit="img") as bar:
                cache.build(stale, progress=bar.update)
        return cache

    def cache_root(self) -> str | None:
        """The run's cache folder (or data.cache.dir); ``None`` outside a Trainer without one."""
        if self.settings.cache.dir:
            return self.settings.cache.dir
        return os.path.join(self.trainer.default_root_dir, "feature_cache") if self.trainer else None

    # --- pipelines ---------------------------------------------------------------------------------

    def _resolve_transforms(self) -> None:
        if self._train_transform is not None:
            return
        pipeline = self.settings.pipeline
        if not pipeline.complete:
            raise ConfigError(
                "image_size, mean and std are the backbone's when transferkit.Trainer runs the data module "
                "with a TransferClassifier (it fills them in from the model); to use the data module on its "
                "own or with another Trainer, pass them (e.g. ImageDataModule(..., pipeline={'image_size': "
                "224, 'mean': (0.5,)*3, 'std': (0.5,)*3})) or call data.use_data_config(model.data_config) first."
            )
        size, mean, std = pipeline.image_size, pipeline.mean, pipeline.std
        self._train_transform = build_train_transform(pipeline.preset, size, mean, std)
        self._eval_transform = build_eval_transform(size, mean, std)

    def use_data_config(self, config: dict[str, Any]) -> None:
        """Fill image size, mean and std that were left ``None`` from a backbone's data config
        (what :class:`transferkit.Trainer` does before a run; tools that run without one call it themselves)."""
        pipeline = self.settings.pipeline
        filled = pipeline.replace(
            image_size=pipeline.image_size or int(config["input_size"][-1]),
            mean=pipeline.mean or tuple(config["mean"]),
            std=pipeline.std or tuple(config["std"]),
        )
        self.settings = dataclasses.replace(self.settings, pipeline=filled)

    def preprocessing(self) -> dict[str, Any]:
        """How the model's inputs are prepared at evaluation: ``image_size``, ``mean``, ``std`` and the
        ``eval_transform`` (an ``A.Compose``); what a checkpoint stores to describe itself."""
        transform = self.eval_transform
        return {
            "image_size": self.image_size,
            "mean": self.mean,
            "std": self.std,
            "eval_transform": transform,
        }

    # --- loaders -----------------------------------------------------------------------------------

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        dataset = self.datasets[split]
        if self.data.name == "stream" and len(dataset.labels):
            return stream_loader(dataset, self.settings.loader, shuffle, self.trainer)
        return make_loader(dataset, dataset.labels, self.settings.loader, self.seed, shuffle, self.trainer)

    def train_dataloader(self) -> DataLoader:
        return self._served_loader("train", shuffle=True) or self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._served_loader("val", shuffle=False) or self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if self.split_indices is not None and len(self.split_indices.get("test", [])) == 0:
            raise DatasetError("there is no test split (test_fraction=0 and no test/ folder or CSV rows).")
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def _served_loader(self, split: str, shuffle: bool) -> DataLoader | None:
        """A loader of what ``feed`` serves for ``split`` (stored backbone outputs), or ``None``."""
        if self.feed is None:
            return None
        if split not in self.datasets:
            self.setup()
        dataset = self.feed.dataset(split)
        if dataset is None:
            return None
        settings = self.settings.loader
        return make_loader(dataset, dataset.labels, settings, self.seed, shuffle, self.trainer, workers=False)

    def summary(self) -> dict[str, dict[str, int]]:
        """Images per class in each split: ``{split: {class name: count}}``; for multi-label data the images
        holding each label, for regression data the images (``{split: {"images": count}}``)."""
        if self.split_indices is None:
            self.setup()
        out = {}
        for split, indices in self.split_indices.items():
            if self.target_kind == "regression":
                out[split] = {"images": len(indices)}
                continue
            counts = self.class_counts(split)
            out[split] = {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}
        return out

    def split_sizes(self) -> dict[str, int]:
        """Images in each split."""
        if self.split_indices is None:
            self.setup()
        return {split: len(indices) for split, indices in self.split_indices.items()}
