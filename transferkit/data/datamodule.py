"""The LightningDataModule: source -> seeded stratified splits -> Albumentations pipelines -> loaders."""

from __future__ import annotations

import os
from typing import Any, Literal

import albumentations as A
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

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
from transferkit.data.datasets import CachedFeatures, ImageDataset
from transferkit.data.decoded import DecodedImages, working_side
from transferkit.data.features import FeatureCache, extract_features
from transferkit.data.samplers import BalancedSampler, EpochShuffleSampler, TrainLoader
from transferkit.data.sources import DataSource, SourceName, load_source, split_indices
from transferkit.errors import ConfigError, DatasetError, ImageReadError, warn
from transferkit.lightning_internals import epoch_about_to_run

__all__ = ["CACHE_MODES", "ImageDataModule", "cv_split_indices"]

CACHE_MODES = ("off", "clean", "augmented")


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
            transforms inline (``[{HorizontalFlip: {p: 0.5}}, ...]`` or an ``A.to_dict`` dict).
        image_size: side of the square network input; ``None`` = the backbone's own.
        mean, std: normalisation; ``None`` = the backbone's own (read from the model at setup).
        skip_bad_images: ``False``: an unreadable image is an error naming it. ``True``: such images are
            left out with a warning and counted in ``skipped_images``.
        max_samples: keep at most this many images (a stratified subset), for quick runs.
        feature_cache: while the model's whole backbone is frozen (and its BatchNorm too), feed the head
            stored backbone features instead of images: ``off``; ``clean`` (one vector per image, eval
            pipeline); ``augmented`` (``cache_views`` train-pipeline views per image, one drawn per epoch).
            Validation uses clean features in both cases. See :mod:`transferkit.data.features`.
        trunk_cache: while only the top backbone groups train (the bottom ones frozen, their BatchNorm
            in eval mode), feed the model the stored output of the frozen bottom (the trunk) instead of
            images, so each step runs only the trainable top: ``off``; ``clean``; ``augmented``
            (``cache_views`` train-pipeline views per image, one drawn per epoch). Stored in float16.
            Timm EfficientNet-family backbones; see :class:`transferkit.finetuning.trunk.Trunk`.
        cache_views: augmented views per training image for ``feature_cache``/``trunk_cache: augmented``.
        cache_dir: where cached features are stored; ``None`` = ``<trainer.default_root_dir>/feature_cache``
            (the caches are keyed by weights, pipeline and images, so runs of one recipe share them), or
            memory only when the data module is used outside a Trainer.
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

    The model it trains with describes itself to it: ``model.data_config`` (input size, mean, std) fills
    what is left ``None``, ``model.check_input_size(side)`` refuses a size the backbone cannot take, and
    ``model.frozen_stage(epoch)`` says what the caches may store (see
    :meth:`transferkit.TransferClassifier.frozen_stage`). Any LightningModule without them works too.

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
        augment: Augment = "light",
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        skip_bad_images: bool = False,
        max_samples: int | None = None,
        feature_cache: Literal["off", "clean", "augmented"] = "off",
        trunk_cache: Literal["off", "clean", "augmented"] = "off",
        cache_views: int = 4,
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
        for name, mode in (("feature_cache", feature_cache), ("trunk_cache", trunk_cache)):
            if mode not in CACHE_MODES:
                raise ConfigError(f"{name} must be 'off', 'clean' or 'augmented', got {mode!r}.")
        if cache_views < 1:
            raise ConfigError(f"cache_views must be >= 1, got {cache_views}.")
        if sampler not in (None, "shuffle", "balanced"):
            raise ConfigError(f"sampler must be 'shuffle' or 'balanced', got {sampler!r}.")
        augmentations(augment)  # a bad preset name or transform fails here, before any data is read
        if source == "stream":
            _check_stream_settings(
                feature_cache, trunk_cache, decoded_cache, sampler, max_samples, train_fraction
            )
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
        self.feature_cache = feature_cache
        self.trunk_cache = trunk_cache
        self.cache_views = cache_views
        self.cache_dir = cache_dir
        self.sampler = sampler
        self.jpeg_draft = jpeg_draft
        self.decoded_cache = decoded_cache
        self.soft_labels = soft_labels
        self.cv_folds = cv_folds
        self.cv_fold = cv_fold
        self.decoded: DecodedImages | None = None
        self._features: dict[tuple[str, str], torch.Tensor] = {}
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
        if (self.feature_cache != "off" or self.trunk_cache != "off") and self.trainer is not None:
            # the loaders change when the backbone unfreezes: ask for them again every epoch
            self.trainer.reload_dataloaders_every_n_epochs = 1
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
        root = self._cache_root()
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

    def _cache_root(self) -> str | None:
        """The run's cache folder (or data.cache_dir); ``None`` outside a Trainer without one."""
        if self.cache_dir:
            return self.cache_dir
        return os.path.join(self.trainer.default_root_dir, "feature_cache") if self.trainer else None

    def _resolve_transforms(self) -> None:
        if self._train_transform is not None:
            return
        if self.image_size is None or self.mean is None or self.std is None:
            self.use_data_config(self._model_data_config())
        self.image_size, self.mean, self.std = int(self.image_size), tuple(self.mean), tuple(self.std)
        if self.image_size < 1:
            raise ConfigError(f"image_size must be >= 1 pixel, got {self.image_size}.")
        check = getattr(self._model(), "check_input_size", None)
        if check is not None:
            check(self.image_size)  # refuse, before training, a size the backbone cannot take
        self._train_transform = build_train_transform(self.augment, self.image_size, self.mean, self.std)
        self._eval_transform = build_eval_transform(self.image_size, self.mean, self.std)

    def use_data_config(self, config: dict[str, Any]) -> None:
        """Fill image size, mean and std that were left ``None`` from a backbone's data config
        (what a Trainer does at setup; tools that run without one call it themselves)."""
        self.image_size = self.image_size or int(config["input_size"][-1])
        self.mean = self.mean or tuple(config["mean"])
        self.std = self.std or tuple(config["std"])

    def _model(self) -> Any | None:
        return self.trainer.lightning_module if self.trainer is not None else None

    def _model_data_config(self) -> dict[str, Any]:
        config = getattr(self._model(), "data_config", None)
        if config is None:
            raise ConfigError(
                "image_size, mean and std are taken from the backbone when the data module runs in a "
                "Trainer with a TransferClassifier; pass them explicitly to use it on its own "
                "(e.g. ImageDataModule(..., image_size=224, mean=(0.5,)*3, std=(0.5,)*3))."
            )
        return config

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
        return self._cached_loader("train", shuffle=True) or self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._cached_loader("val", shuffle=False) or self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if self.split_indices is not None and len(self.split_indices.get("test", [])) == 0:
            raise DatasetError("there is no test split (test_fraction=0 and no test/ folder or CSV rows).")
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # --- feature caches ----------------------------------------------------------------------------

    def _frozen_stage(self) -> tuple[str, Any] | None:
        """What this epoch of a fit can cache, as ``(kind, module)``: ``("features", backbone)`` while the
        whole backbone is frozen, ``("trunk", trunk)`` while only its bottom is, if that cache is on."""
        if self.trainer is None or self.trainer.state.fn != "fit":
            return None
        if self.feature_cache == "off" and self.trunk_cache == "off":
            return None
        frozen_stage = getattr(self._model(), "frozen_stage", None)
        if frozen_stage is None:
            return None
        return frozen_stage(
            self.trainer.current_epoch, features=self.feature_cache != "off", trunk=self.trunk_cache != "off"
        )

    def features(self, split: str, extractor: Any, kind: str | None = None) -> torch.Tensor:
        """Features of ``split`` from the cache or computed once: a frozen backbone's ``(views, N, F)``
        (``kind="features"``), or a frozen trunk's ``(views, N, C, H, W)`` in float16 (``"trunk"``; the
        default for a :class:`~transferkit.finetuning.trunk.Trunk`, which has a ``rest``)."""
        kind = kind or ("trunk" if hasattr(extractor, "rest") else "features")
        mode = self.trunk_cache if kind == "trunk" else self.feature_cache
        augmented = split == "train" and mode == "augmented"
        views = self.cache_views if augmented else 1
        transform = self._train_transform if augmented else self._eval_transform
        dataset = self.datasets[split]
        decoding = self.decoding_for(transform)
        key = FeatureCache.key(extractor, transform, dataset.items, split, views, self.seed, decoding)
        if (split, key) in self._features:
            return self._features[(split, key)]
        # the run's folder (or data.cache_dir); used outside a Trainer without one, the cache stays in memory
        root = self._cache_root()
        cache = FeatureCache(root) if root is not None else None
        stored = cache.load(split, key) if cache is not None else None
        if stored is None:
            dtype = torch.float16 if kind == "trunk" else torch.float32
            for view in range(views):  # filled in place: a trunk's views are GBs, never held twice
                # each view its own augmentation draws (epoch = view number), the same in every run
                loader = DataLoader(
                    self.image_dataset(dataset.items, dataset.labels, transform, epoch=view),
                    batch_size=max(self.batch_size, 64),
                    num_workers=self.num_workers,
                    generator=torch.Generator().manual_seed(self.seed),
                )
                features = extract_features(extractor, loader, dtype)
                if stored is None:
                    stored = torch.empty((views, *features.shape), dtype=dtype)
                stored[view] = features
                del features
            if cache is not None:
                cache.save(split, key, stored)
        self._features = {k: v for k, v in self._features.items() if k[0] != split}  # one key per split
        self._features[(split, key)] = stored
        return stored

    def _cached_loader(self, split: str, shuffle: bool) -> DataLoader | None:
        stage = self._frozen_stage()
        if stage is None:
            return None
        if split not in self.datasets:
            self.setup()
        kind, extractor = stage
        features = self.features(split, extractor, kind)
        source = self.datasets[split]
        targets = getattr(source, "targets", None)
        dataset = CachedFeatures(features, source.labels, self.trainer.current_epoch, self.seed, targets)
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
    feature_cache: str,
    trunk_cache: str,
    decoded_cache: bool,
    sampler: str,
    max_samples: int | None,
    train_fraction: float = 1.0,
) -> None:
    """Settings that need every file at hand, refused for a pack (read chunk by chunk, in LitData's order)."""
    refused = {
        "feature_cache": feature_cache != "off",
        "trunk_cache": trunk_cache != "off",
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
