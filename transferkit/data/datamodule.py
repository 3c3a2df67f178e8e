"""The LightningDataModule: source -> seeded stratified splits -> Albumentations pipelines -> loaders."""

from __future__ import annotations

import os
from typing import Any, Literal, Protocol

import albumentations as A
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from transferkit.data.augment import (
    Augment,
    augmentations,
    build_eval_transform,
    build_train_transform,
    decode_side,
)
from transferkit.data.checks import (
    drop_unreadable,
    stratified_sample,
    subset,
    warn_duplicates_across_splits,
    warn_imbalance,
)
from transferkit.data.class_groups import resolve_class_groups
from transferkit.data.datasets import ImageDataset
from transferkit.data.decoded import DecodedImages, working_side
from transferkit.data.samplers import BalancedSampler, EpochShuffleSampler, TrainLoader
from transferkit.data.sources import DataSource, SourceName, load_source, split_indices
from transferkit.errors import ConfigError, DatasetError, ImageReadError, warn
from transferkit.lightning_internals import epoch_about_to_run

__all__ = ["FeatureFeed", "ImageDataModule", "cv_split_indices"]


class FeatureFeed(Protocol):
    """What serves a split instead of its images (:class:`~transferkit.training.feeding.FreezeAndCache`)."""

    def dataset(self, split: str) -> Dataset | None:
        """``(input, target)`` pairs to serve for ``split`` now, or ``None`` for the images."""


class ImageDataModule(L.LightningDataModule):
    """Labelled images for fine-tuning, split and augmented.

    Args:
        source: ``folder`` (``root/<class>/<images>``, or ``root/{train,val,test}/<class>/...``),
            ``csv`` (``path,label[,split]`` columns), ``stream`` (a pack written by
            :func:`~transferkit.data.stream.pack_stream`, read by LitData from a folder or an object-store
            URL; its splits are the ones it was packed with), ``elpv`` (the ELPV solar-cell benchmark) or
            ``digits`` (scikit-learn's 8x8 digits).
        root: the image folder (``folder``), the folder CSV paths are relative to (``csv``), or the pack's
            folder or URL (``stream``, e.g. ``s3://bucket/packed``).
        csv_path: the CSV file (``csv``).
        task: ELPV only: ``binary`` (defective = defect probability >= 0.5) or ``4class``.
        val_fraction: share of the non-test images held out for validation (early stopping, best checkpoint).
            ``0``: no validation split; every non-test image trains, for a final fit whose epoch count
            was chosen on a validated run. :meth:`Trainer.fit <transferkit.Trainer.fit>` then skips
            validation and early stopping, and the checkpoint of the last epoch is the one tested.
        test_fraction: share of all images held out for the test; ``None`` = the source's own (0.25 for
            ELPV, its protocol; 0.2 otherwise).
        train_fraction: share of the training split that trains, a stratified subset drawn with ``seed``
            (at least one image); the validation and test splits stay as they are. For learning curves:
            validation scores at ``0.5``, ``0.75`` and ``1`` say whether more labelled images would help.
        seed: seed of the stratified splits.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        augment: train-time augmentation: ``none``, ``light``, ``medium``, ``heavy``, or Albumentations
            transforms inline (``[{HorizontalFlip: {p: 0.5}}, ...]`` or an ``A.to_dict`` dict); ``None``
            (default): ``light``. One that is named and that no training epoch would see (every epoch fed
            clean stored features, see :class:`~transferkit.training.feeding.FreezeAndCache`) is refused
            when the fit starts.
        image_size: side of the square network input; ``None`` = the backbone's own.
        mean, std: normalisation; ``None`` = the backbone's own (filled in by :class:`transferkit.Trainer`).
        skip_bad_images: ``False``: an unreadable image is an error naming it. ``True``: such images are
            left out with a warning and counted in ``skipped_images``.
        max_samples: keep at most this many images (a stratified subset), for quick runs.
        cache_dir: where the caches are stored (the decoded images, and the stored backbone outputs that
            :class:`~transferkit.training.feeding.FreezeAndCache` feeds the model); ``None`` =
            ``<trainer.default_root_dir>/feature_cache`` (keyed by weights, pipeline and images, so runs of
            one recipe share them), or memory only when the data module is used outside a Trainer.
        sampler: order of the training samples: ``shuffle`` (each image once per epoch) or ``balanced``
            (classes drawn equally often, see :class:`~transferkit.data.samplers.BalancedSampler`).
            ``None`` (default): ``shuffle``, and set-up warns, with the counts per class, when the training
            split is severely imbalanced; naming ``shuffle`` keeps the order without that warning (for
            accuracy on data with the same proportions, as the ELPV recipes are scored).
        jpeg_draft: decode JPEGs at the smallest DCT scale (1/8, 1/4, 1/2) that still gives the pipeline
            the pixels it uses (:func:`~transferkit.data.augment.decode_side`): a camera photo decodes
            several times faster for a 224 px model. ``False`` decodes every file in full.
        decoded_cache: decode each image file once, at the pipeline's working resolution, into files every
            loader worker maps into memory, reused by later epochs and runs (see
            :mod:`transferkit.data.decoded`); under ``cache_dir`` (or the run's folder). For folders of
            camera photos, where decoding otherwise limits training.
        soft_labels: train on class distributions instead of hard labels, where the source gives them:
            a CSV's ``p_<class>`` columns, or ELPV's annotated defect probability (``task: binary``: a cell
            rated 1/3 defective trains as (2/3, 1/3)). Validation and test are scored on the hard labels
            (the most probable class; ELPV's ``>= 0.5`` rule), so scores compare with hard-label runs.
        cv_folds, cv_fold: k-fold cross-validation: the non-test images are split into ``cv_folds``
            stratified parts, and part ``cv_fold`` (0-based) validates while the others train, in place of
            the ``val_fraction`` split (see :func:`cv_split_indices`). The test split is the one the data
            holds out without them. Set both or neither;
            :func:`~transferkit.tuning.cross_validation.cross_validate` runs every fold.
        class_groups: coarser classes the labels refine, ``{group: [class names]}``, every class in one
            group; the model then also scores the groups (``val_group_acc``, ``test_group_acc``: a group's
            probability is the sum of its classes'). ``None``: the source's own, where it has them (ELPV's
            4-class task: ``{functional: [0, 1/3], defective: [2/3, 1]}``). See
            :mod:`transferkit.data.class_groups`.

    Image size, mean and std left ``None`` are the backbone's: :class:`transferkit.Trainer` fills them in
    from the model before any data is read (``use_data_config``). While part of the backbone is frozen,
    :class:`~transferkit.training.feeding.FreezeAndCache` may have the data module serve stored backbone
    outputs instead of images (``feed``); the data module itself never asks the model anything.

    Example:
        >>> dm = ImageDataModule(source="digits", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))[0].shape
        torch.Size([32, 3, 32, 32])
    """

    def __init__(
        self,
        source: SourceName = "folder",
        root: str | None = None,
        csv_path: str | None = None,
        task: Literal["binary", "4class"] = "binary",
        val_fraction: float = 0.15,
        test_fraction: float | None = None,
        train_fraction: float = 1.0,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 2,
        augment: Augment | None = None,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        skip_bad_images: bool = False,
        max_samples: int | None = None,
        cache_dir: str | None = None,
        sampler: Literal["shuffle", "balanced"] | None = None,
        jpeg_draft: bool = True,
        decoded_cache: bool = False,
        soft_labels: bool = False,
        cv_folds: int | None = None,
        cv_fold: int | None = None,
        class_groups: dict[str, list[str | int]] | None = None,
    ) -> None:
        super().__init__()
        # class_groups: the model's hyperparameters hold them as resolved here (the source's own filled in);
        # Lightning merges the two modules' hyperparameters for the logger and refuses a key they differ on
        self.save_hyperparameters(ignore=["class_groups"])
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        if sampler not in (None, "shuffle", "balanced"):
            raise ConfigError(f"sampler must be 'shuffle' or 'balanced', got {sampler!r}.")
        # None: the light preset, not chosen; a chosen one that no epoch would see is refused at fit
        self.augment_chosen = augment is not None and augment != "none"
        augment = "light" if augment is None else augment
        augmentations(augment)  # a bad preset name or transform fails here, before any data is read
        if source == "stream":
            _check_stream_settings(decoded_cache, sampler, max_samples, train_fraction)
        _check_cv_settings(cv_folds, cv_fold, source)
        if not 0 < train_fraction <= 1:
            raise ConfigError(
                f"data.train_fraction is the share of the training split that trains, in (0, 1]; got "
                f"{train_fraction}. Use 1 to train on the whole split."
            )
        self.train_fraction = train_fraction
        self.source = source
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.skip_bad_images = skip_bad_images
        self.val_fraction = val_fraction
        self.seed = seed
        self.cache_dir = cache_dir
        self.sampler = sampler
        self.jpeg_draft = jpeg_draft
        self.decoded_cache = decoded_cache
        self.soft_labels = soft_labels
        self.cv_folds = cv_folds
        self.cv_fold = cv_fold
        self.decoded: DecodedImages | None = None
        # what serves a split instead of its images this epoch (stored backbone outputs), set by the
        # FreezeAndCache callback of a fit; None: images
        self.feed: FeatureFeed | None = None
        # listing is cheap and finds missing paths and empty classes before any training starts
        self.data: DataSource = load_source(source, root=root, csv_path=csv_path, task=task)
        self.test_fraction = self.data.test_fraction if test_fraction is None else test_fraction
        if soft_labels and self.data.soft is None:
            raise DatasetError(
                f"soft_labels is on, but the '{source}' data gives no class probabilities: a CSV needs "
                "'p_<class>' columns, ELPV needs task: binary. Turn soft_labels off to train on the labels."
            )
        if max_samples is not None and max_samples < len(self.data):
            self.data = subset(self.data, max_samples, seed)
        groups = self.data.groups if class_groups is None else class_groups
        resolve_class_groups(groups, self.data.class_names)  # a bad group fails here, before training
        self._class_groups = (
            None if groups is None else {str(g): [str(c) for c in m] for g, m in groups.items()}
        )
        self.skipped_images: list[ImageReadError] = []
        self.split_indices: dict[str, np.ndarray] | None = None
        self.datasets: dict[str, ImageDataset] = {}
        self._train_transform = self._eval_transform = None

    # --- what the model needs to know --------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.data.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.data.class_names)

    @property
    def class_groups(self) -> dict[str, list[str]] | None:
        """Coarser classes the labels refine, ``{group: [class names]}``: ``data.class_groups``, else the
        source's own (ELPV's 4-class task: its binary classes), else ``None``."""
        return self._class_groups

    @property
    def has_validation(self) -> bool:
        """Whether the data holds out a validation split: ``val_fraction > 0``, a cross-validation fold, or
        one the source defines."""
        return (
            self.cv_folds is not None
            or self.val_fraction > 0
            or (self.data.splits is not None and "val" in self.data.splits)
        )

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
                self.data, self.skipped_images = drop_unreadable(self.data, self.skip_bad_images)
            if self.cv_folds is None:
                self.split_indices = split_indices(
                    self.data, self.val_fraction, self.test_fraction, self.seed
                )
            else:
                self.split_indices = cv_split_indices(
                    self.data, self.cv_folds, self.cv_fold, self.test_fraction, self.seed
                )
            if self.train_fraction < 1:
                train = self.split_indices["train"]
                size = max(1, round(len(train) * self.train_fraction))
                self.split_indices["train"] = stratified_sample(train, size, self.data.stratify, self.seed)
            for split in ("train", "val") if self.has_validation else ("train",):
                if len(self.split_indices.get(split, [])) == 0:
                    raise DatasetError(
                        f"the {split} split is empty ({len(self.data)} images, val_fraction={self.val_fraction}, "
                        f"test_fraction={self.test_fraction}); add images or change the fractions."
                    )
            train_labels = self.data.labels[self.split_indices["train"]]
            if self.sampler is None:  # a sampler named in the recipe was chosen knowing the proportions
                warn_imbalance(train_labels, self.class_names)
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
            if split == "train" and self.soft_labels:
                self.datasets[split].targets = self.data.soft[indices]  # validation and test: hard labels
        if self.decoded_cache and self.decoded is None:
            self.decoded = self._build_decoded_cache()
            for dataset in self.datasets.values():
                dataset.decoded = self.decoded

    def image_dataset(
        self, items: list, labels: np.ndarray, transform: A.Compose, epoch: int = 0
    ) -> ImageDataset:
        """``items`` through ``transform``, read as this data module reads images (reduced-scale JPEG
        decoding, the decoded-image cache, ``skip_bad_images``)."""
        side = decode_side(transform) if self.jpeg_draft else None
        return ImageDataset(
            items,
            labels,
            transform,
            seed=self.seed,
            epoch=epoch,
            skip_bad=self.skip_bad_images,
            decode_side=side,
            decoded=self.decoded,
        )

    def _stream_dataset(self, split: str, transform: A.Compose, labels: np.ndarray) -> Any:
        from transferkit.data.stream import StreamingImages

        if len(labels) == 0:
            return ImageDataset([], labels, transform)  # a split the pack does not hold
        return StreamingImages(
            str(self.hparams.root),
            split,
            transform,
            labels,
            seed=self.seed,
            shuffle=split == "train",
            decode_side=decode_side(transform) if self.jpeg_draft else None,
            cache_dir=os.path.join(self.cache_dir, "stream") if self.cache_dir else None,
            # training: LitData evens out the ranks' shares under DDP; evaluation: every sample, once
            drop_last=None if split == "train" else False,
        )

    def decoding_for(self, transform: A.Compose) -> str | None:
        """How images reach ``transform``, for cache keys: ``None`` (decoded in full, no cache),
        ``"draft-<side>"`` and/or ``"decoded-<side>"``."""
        parts = []
        if self.jpeg_draft and (side := decode_side(transform)) is not None:
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
                "data.decoded_cache is on but there is no folder for it: the data module runs outside a "
                "Trainer and data.cache_dir is not set. Images are decoded as they are read; set "
                "data.cache_dir to keep them decoded."
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
        """The run's cache folder (or data.cache_dir); ``None`` outside a Trainer without one."""
        if self.cache_dir:
            return self.cache_dir
        return os.path.join(self.trainer.default_root_dir, "feature_cache") if self.trainer else None

    def _resolve_transforms(self) -> None:
        if self._train_transform is not None:
            return
        if self.image_size is None or self.mean is None or self.std is None:
            raise ConfigError(
                "image_size, mean and std are the backbone's when transferkit.Trainer runs the data module "
                "with a TransferClassifier (it fills them in from the model); to use the data module on its "
                "own or with another Trainer, pass them (e.g. ImageDataModule(..., image_size=224, "
                "mean=(0.5,)*3, std=(0.5,)*3)) or call data.use_data_config(model.data_config) first."
            )
        self.image_size, self.mean, self.std = int(self.image_size), tuple(self.mean), tuple(self.std)
        if self.image_size < 1:
            raise ConfigError(f"image_size must be >= 1 pixel, got {self.image_size}.")
        self._train_transform = build_train_transform(self.augment, self.image_size, self.mean, self.std)
        self._eval_transform = build_eval_transform(self.image_size, self.mean, self.std)

    def use_data_config(self, config: dict[str, Any]) -> None:
        """Fill image size, mean and std that were left ``None`` from a backbone's data config
        (what :class:`transferkit.Trainer` does before a run; tools that run without one call it themselves)."""
        self.image_size = self.image_size or int(config["input_size"][-1])
        self.mean = self.mean or tuple(config["mean"])
        self.std = self.std or tuple(config["std"])

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
            return self._stream_loader(dataset, shuffle)
        return (TrainLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler(dataset.labels, tag_epoch=True) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and len(dataset) > self.batch_size,  # a batch of 1 breaks BatchNorm
            # an own generator: loaders never draw from the global RNG that dropout uses
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _stream_loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        from transferkit.data.stream import StreamLoader

        trainer = self.trainer
        in_fit = shuffle and trainer is not None and trainer.state.fn == "fit"
        return StreamLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            drop_last=shuffle and len(dataset.labels) > self.batch_size,  # a batch of 1 breaks BatchNorm
            epoch_of_run=(lambda: epoch_about_to_run(trainer)) if in_fit else None,
        )

    def _train_sampler(self, labels: np.ndarray, tag_epoch: bool = False) -> EpochShuffleSampler:
        if self.sampler == "balanced":
            sampler = BalancedSampler(np.asarray(labels), self.seed, tag_epoch)
        else:
            sampler = EpochShuffleSampler(len(labels), self.seed, tag_epoch)
        if self.trainer is not None and self.trainer.state.fn == "fit":
            # a loader built mid-run (the caches reload loaders every epoch) is iterated before Lightning's
            # set_epoch, by loader workers at once: it must start at the epoch about to run, not at 0
            sampler.set_epoch(epoch_about_to_run(self.trainer))
        return sampler

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

    # --- what a fit's feeding callback serves instead of images -------------------------------------

    def _served_loader(self, split: str, shuffle: bool) -> DataLoader | None:
        """A loader of what ``feed`` serves for ``split`` (stored backbone outputs), or ``None``."""
        if self.feed is None:
            return None
        if split not in self.datasets:
            self.setup()
        dataset = self.feed.dataset(split)
        if dataset is None:
            return None
        return (TrainLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler(dataset.labels) if shuffle else None,
            drop_last=shuffle and len(dataset) > self.batch_size,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def summary(self) -> dict[str, dict[str, int]]:
        """Images per class in each split: ``{split: {class name: count}}``."""
        if self.split_indices is None:
            self.setup()
        out = {}
        for split, indices in self.split_indices.items():
            counts = np.bincount(self.data.labels[indices], minlength=self.num_classes)
            out[split] = {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}
        return out


def cv_split_indices(
    data: DataSource, folds: int, fold: int, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Train/val/test indices of fold ``fold`` (0-based) of a stratified ``folds``-fold cross-validation.

    The test split is exactly the one :func:`~transferkit.data.sources.split_indices` holds out (the same
    ``test_fraction`` and ``seed``, or the source's own test split); the other images (train and any
    validation split the source defines) are split by scikit-learn's ``StratifiedKFold(folds, shuffle=True,
    random_state=seed)`` on ``data.stratify`` (the hard labels, or the finer strata the data is split on),
    and part ``fold`` validates while the rest train. Across the folds every non-test image validates
    exactly once.

    Raises:
        ConfigError: ``folds < 2``, or ``fold`` outside ``0 .. folds - 1``.
        DatasetError: a class has fewer non-test images than ``folds``.

    Example:
        >>> from transferkit.data.sources import load_source
        >>> data = load_source("digits")
        >>> splits = [cv_split_indices(data, 5, fold, 0.2, seed=0) for fold in range(5)]
        >>> sum(len(s["val"]) for s in splits) == len(splits[0]["train"]) + len(splits[0]["val"])
        True
    """
    from sklearn.model_selection import StratifiedKFold

    _check_cv_settings(folds, fold, data.name)
    held = split_indices(data, 0.0, test_fraction, seed)  # validation 0: the test split alone is carved
    empty = np.asarray([], dtype=np.int64)
    rest = np.sort(np.concatenate([held["train"], held.get("val", empty)]))
    present = np.unique(data.labels)
    counts = np.bincount(data.labels[rest], minlength=len(data.class_names))
    rare = {data.class_names[c]: int(counts[c]) for c in present if counts[c] < folds}
    if rare:
        found = ", ".join(f"'{name}' ({n})" for name, n in rare.items())
        smallest = min(rare.values())
        fix = (
            f"use at most cv_folds={smallest}"
            if smallest >= 2
            else "a class needs 2 non-test images at least"
        )
        raise DatasetError(
            f"cv_folds={folds} needs at least {folds} non-test images of every class, so that each part "
            f"holds some of it and every fold trains on it; too few: {found}. Add images or merge rare "
            f"classes ({fix})."
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    try:
        train, val = list(splitter.split(rest, data.stratify[rest]))[fold]
    except ValueError as err:
        raise DatasetError(
            f"cannot split {len(rest)} non-test images into {folds} stratified folds: {err}. "
            "Use fewer folds or add images."
        ) from err
    return {"train": np.sort(rest[train]), "val": np.sort(rest[val]), "test": held["test"]}


def _check_cv_settings(cv_folds: int | None, cv_fold: int | None, source: str) -> None:
    """Refuse cross-validation settings that cannot work, naming the value and the fix."""
    if cv_folds is None and cv_fold is None:
        return
    if cv_folds is None or cv_fold is None:
        raise ConfigError(
            f"cv_folds and cv_fold go together, got cv_folds={cv_folds}, cv_fold={cv_fold}: set both (e.g. "
            "cv_folds: 5, cv_fold: 0 for the first of five folds), or neither for the val_fraction split."
        )
    for name, value in (("cv_folds", cv_folds), ("cv_fold", cv_fold)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ConfigError(f"{name} must be a whole number, got {value!r}.")
    if cv_folds < 2:
        raise ConfigError(
            f"cv_folds must be >= 2 (one part validates, the others train), got {cv_folds}; "
            "5 or 10 are the usual choices."
        )
    if not 0 <= cv_fold < cv_folds:
        raise ConfigError(
            f"cv_fold is 0-based and must be in 0..{cv_folds - 1} for cv_folds={cv_folds}, got {cv_fold}."
        )
    if source == "stream":
        raise ConfigError(
            "source 'stream' cannot be cross-validated: a pack's splits are fixed when it is packed. "
            "Cross-validate the folder or CSV it was packed from."
        )


def _check_stream_settings(
    decoded_cache: bool,
    sampler: str | None,
    max_samples: int | None,
    train_fraction: float = 1.0,
) -> None:
    """Settings that need every file at hand, refused for a pack (read chunk by chunk, in LitData's order)."""
    refused = {
        "decoded_cache": decoded_cache,
        "sampler: balanced": sampler == "balanced",
        "max_samples": max_samples is not None,
        "train_fraction": train_fraction != 1,
    }
    named = [name for name, on in refused.items() if on]
    if named:
        raise ConfigError(
            f"source 'stream' cannot be used with {', '.join(named)}: a pack is read chunk by chunk in "
            "LitData's shuffled order, not by file. Turn them off, or train from the folder or CSV it was "
            "packed from."
        )
