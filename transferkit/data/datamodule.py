"""The LightningDataModule: source -> seeded stratified splits -> Albumentations pipelines -> loaders."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import albumentations as A
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from transferkit.data.augment import Augment, build_eval_transform, build_train_transform
from transferkit.data.images import ImageReadError, find_unreadable, load_image
from transferkit.data.sources import DatasetError, DataSource, SourceName, load_source, split_indices
from transferkit.features import CachedFeatures, FeatureCache, extract_features
from transferkit.finetuning import Trunk

__all__ = ["BalancedSampler", "EpochShuffleSampler", "ImageDataModule", "ImageDataset"]

# the largest / smallest class count in train above which setup warns and suggests sampler: balanced
IMBALANCE_WARNING_RATIO = 10.0


class ImageDataset(Dataset):
    """Items (file paths or ``(H, W)``/``(H, W, C)`` uint8 arrays) through an Albumentations pipeline.

    ``dataset[i]`` is ``(image (3, S, S) float32, label int64)``. The pipeline's random draws for a
    sample depend only on ``(seed, epoch, i)`` (Albumentations keeps its own RNG, which
    ``seed_everything`` does not reach), so two runs with the same seed see the same augmented images
    whatever the number of DataLoader workers, and a resumed run continues with the same draws.
    ``dataset[(epoch, i)]`` (what :class:`EpochShuffleSampler` yields with ``tag_epoch=True``) draws
    for that epoch; ``dataset[i]`` for :attr:`epoch`.

    An image that cannot be read raises :class:`ImageReadError` naming it (also from a DataLoader
    worker); with ``skip_bad=True`` (a file that broke after the data module checked it) the next
    readable sample stands in for it, with a warning.
    """

    def __init__(
        self,
        items: Sequence[str | np.ndarray],
        labels: np.ndarray,
        transform: A.Compose,
        seed: int = 0,
        epoch: int = 0,
        skip_bad: bool = False,
    ) -> None:
        self.items = items
        self.labels = labels
        self.transform = transform
        self.seed = seed
        self.epoch = epoch
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int) -> np.ndarray:
        """The raw image ``(H, W, 3) uint8`` of sample ``index``, before any transform."""
        item = self.items[index]
        if isinstance(item, np.ndarray):
            return _to_three_channels(item)
        return load_image(item)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        image, index = self._read_or_stand_in(index)
        self.transform.set_random_seed(_sample_seed(self.seed, epoch, index))
        image = self.transform(image=image)["image"]
        return image, torch.as_tensor(self.labels[index], dtype=torch.long)

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
                warnings.warn(
                    f"{err}; skipped (skip_bad_images=true), sample {stand_in} used instead", stacklevel=3
                )
                return image, stand_in
            raise


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample's augmentation, well mixed from ``(seed, epoch, index)``."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1)[0])


def _to_three_channels(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        array = array[..., :3]
    return np.ascontiguousarray(array.astype(np.uint8, copy=False))


class EpochShuffleSampler(Sampler[int]):
    """A new random order each epoch that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every epoch, so a run resumed at epoch ``e`` sees the
    same order as an uninterrupted one (a sampler driven by one long-lived generator would not).
    With ``tag_epoch=True`` it yields ``(epoch, index)`` pairs, which carry the epoch into DataLoader
    workers (persistent ones too) so that :class:`ImageDataset` draws that epoch's augmentations.
    ``drawn_epoch`` is the epoch of the last order handed out (``None`` before the first); ``start``
    makes the next order only begin at that position and wrap around (a run resumed in the middle of an
    epoch); see :func:`align_train_loader`.
    """

    def __init__(self, num_samples: int, seed: int, tag_epoch: bool = False) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.tag_epoch = tag_epoch
        self.epoch = 0
        self.drawn_epoch: int | None = None
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def _draw(self, generator: torch.Generator) -> list[int]:
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self):
        self.drawn_epoch = self.epoch
        order = self._draw(torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        order, self.start = order[self.start :] + order[: self.start], 0
        if self.tag_epoch:
            return iter([(self.epoch, i) for i in order])
        return iter(order)


class BalancedSampler(EpochShuffleSampler):
    """Class-balanced sampling: each epoch draws ``len(labels)`` samples with replacement, every class
    equally likely (sample weight ``1 / count of its class``), in an order that depends only on
    ``(seed, epoch)``.

    For severely imbalanced training sets, where the loss would otherwise be dominated by the large
    classes. Rare images are seen several times an epoch, frequent ones not every epoch.

    Example:
        >>> sampler = BalancedSampler(np.array([0] * 95 + [1] * 5), seed=0)
        >>> counts = np.bincount(np.array(list(sampler)), minlength=100)
        >>> int(counts[95:].sum()) > 30  # the 5 rare samples: about half of the 100 draws
        True
    """

    def __init__(self, labels: np.ndarray, seed: int, tag_epoch: bool = False) -> None:
        super().__init__(len(labels), seed, tag_epoch)
        counts = np.bincount(labels)
        self.weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)

    def _draw(self, generator: torch.Generator) -> list[int]:
        return torch.multinomial(
            self.weights, self.num_samples, replacement=True, generator=generator
        ).tolist()


def align_train_loader(trainer: L.Trainer) -> bool:
    """Restart the training loader's iteration if it drew another epoch's order than the one the run
    is at; returns whether it did.

    Lightning iterates the train loader once when it first sets it up (``FitLoop.setup_data``, reached
    from ``estimated_stepping_batches`` in ``configure_optimizers``), which is before a resumed run's
    loop state is restored and before ``set_epoch``, and it does not iterate again for the first
    resumed epoch. A loader with workers draws its first indices right at that iteration, so without
    this the first epoch after a resume would replay epoch 0's order and augmentations.

    A run resumed in the middle of an epoch (a checkpoint written on SIGTERM, or by a callback after a
    batch) goes on with that epoch's next batch: the epoch's order starts after the images of the
    batches the loop counts as trained (in every process, under DDP: :class:`TrainLoader` has DDP deal
    the order out as it is), so the run sees what an uninterrupted one would have; Lightning ends the
    epoch after its remaining batches. A Ctrl+C can land inside a training step, whose batch is then
    trained again. Not covered: a SIGTERM inside a window of ``accumulate_grad_batches`` (the window's
    gradients so far are not in the checkpoint).
    :meth:`TransferClassifier.on_train_start` calls this, once per ``fit``, after the loop state is
    restored.
    """
    loop = trainer.fit_loop
    loader = getattr(loop, "_combined_loader", None)
    fetcher = getattr(loop, "_data_fetcher", None)
    if loader is None or fetcher is None:
        return False
    epoch = loop.epoch_progress.current.processed  # what Lightning's set_epoch is about to get
    done = 0  # batches of that epoch trained before the run stopped
    if loop.restarted_mid_epoch:
        batches = loop.epoch_loop.batch_progress.current.completed
        # a checkpoint written in on_train_batch_end counts its batch as trained only on restart
        done = batches + int(loop.epoch_loop.restarted_on_train_batch_end)
        if done >= trainer.num_training_batches:
            done = 0
    realign = False
    for dataloader in loader.flattened:
        outer = getattr(dataloader, "sampler", None)
        # under DDP, Lightning's DistributedSamplerWrapper holds the sampler as ``dataset._sampler``
        inner = getattr(getattr(outer, "dataset", None), "_sampler", None)
        sampler = next((s for s in (outer, inner) if isinstance(s, EpochShuffleSampler)), None)
        if sampler is None:
            continue
        # DDP's sampler deals the order out in turn (TrainLoader turns its shuffling off): each process's
        # next batch starts num_replicas batches further on per batch trained
        start = done * (dataloader.batch_size or 0) * getattr(outer, "num_replicas", 1)
        if start or sampler.drawn_epoch not in (None, epoch):
            for s in (outer, inner):
                if hasattr(s, "set_epoch"):
                    s.set_epoch(epoch)
            sampler.start = start
            realign = True
    if realign:
        iter(fetcher)  # a new iteration of the loader (persistent workers are reused)
    return realign


class TrainLoader(DataLoader):
    """The training loader, which Lightning may resume in the middle of an epoch.

    Lightning takes a loader with ``state_dict``/``load_state_dict`` as one that can go on from where a
    checkpoint left it, and warns about any other. This one holds no state of its own: where an
    interrupted epoch goes on is the loop's count of its trained batches, which
    :func:`align_train_loader` hands to the sampler. Its checkpoints hold an empty loader state, so
    Lightning refuses to resume one in the middle of an epoch with train loaders of another kind.

    Under DDP, Lightning rebuilds the loader around a ``DistributedSamplerWrapper`` that would shuffle
    the sampler's order once more before dealing it out to the processes; the order of an
    :class:`EpochShuffleSampler` is already this epoch's random one, so the wrapper deals it out as it is
    (which is what lets a mid-epoch resume find each process's next batch).
    """

    def __init__(self, dataset: Dataset, **kwargs: Any) -> None:  # named, so Lightning can rebuild it
        super().__init__(dataset, **kwargs)
        if isinstance(self.sampler, DistributedSampler) and isinstance(
            getattr(self.sampler.dataset, "_sampler", None), EpochShuffleSampler
        ):
            self.sampler.shuffle = False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class ImageDataModule(L.LightningDataModule):
    """Labelled images for fine-tuning, split and augmented.

    Args:
        source: ``folder`` (``root/<class>/<images>``, or ``root/{train,val,test}/<class>/...``),
            ``csv`` (``path,label[,split]`` columns), ``elpv`` (the ELPV solar-cell benchmark) or
            ``digits`` (scikit-learn's 8x8 digits).
        root: the image folder (``folder``), or the folder CSV paths are relative to (``csv``).
        csv_path: the CSV file (``csv``).
        task: ELPV only: ``binary`` (defective = defect probability >= 0.5) or ``4class``.
        val_fraction: share of the non-test images held out for validation (early stopping, best checkpoint).
            ``0``: no validation split; every non-test image trains, for a final fit whose epoch count
            was chosen on a validated run. :meth:`Trainer.fit <transferkit.Trainer.fit>` then skips
            validation and early stopping, and the checkpoint of the last epoch is the one tested.
        test_fraction: share of all images held out for the test; ``None`` = 0.25 for ELPV (its protocol),
            0.2 otherwise.
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
            Validation uses clean features in both cases. See :mod:`transferkit.features`.
        trunk_cache: while only the top backbone groups train (the bottom ones frozen, their BatchNorm
            in eval mode), feed the model the stored output of the frozen bottom (the trunk) instead of
            images, so each step runs only the trainable top: ``off``; ``clean``; ``augmented``
            (``cache_views`` train-pipeline views per image, one drawn per epoch). Stored in float16.
            Timm EfficientNet-family backbones; see :class:`transferkit.finetuning.Trunk`.
        cache_views: augmented views per training image for ``feature_cache``/``trunk_cache: augmented``.
        cache_dir: where cached features are stored; ``None`` = ``<trainer.default_root_dir>/feature_cache``.
        sampler: order of the training samples: ``shuffle`` (each image once per epoch) or ``balanced``
            (classes drawn equally often, see :class:`BalancedSampler`; for severely imbalanced data, which
            setup warns about with the counts per class).

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
        sampler: Literal["shuffle", "balanced"] = "shuffle",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.source = source
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.skip_bad_images = skip_bad_images
        self.val_fraction = val_fraction
        self.test_fraction = (0.25 if source == "elpv" else 0.2) if test_fraction is None else test_fraction
        self.seed = seed
        if feature_cache not in ("off", "clean", "augmented"):
            raise ValueError(f"feature_cache must be 'off', 'clean' or 'augmented', got {feature_cache!r}.")
        if trunk_cache not in ("off", "clean", "augmented"):
            raise ValueError(f"trunk_cache must be 'off', 'clean' or 'augmented', got {trunk_cache!r}.")
        if cache_views < 1:
            raise ValueError(f"cache_views must be >= 1, got {cache_views}.")
        self.feature_cache = feature_cache
        self.trunk_cache = trunk_cache
        self.cache_views = cache_views
        self.cache_dir = cache_dir
        if sampler not in ("shuffle", "balanced"):
            raise ValueError(f"sampler must be 'shuffle' or 'balanced', got {sampler!r}.")
        self.sampler = sampler
        self._features: dict[tuple[str, str], torch.Tensor] = {}
        # listing is cheap and finds missing paths and empty classes before any training starts
        self.data: DataSource = load_source(source, root=root, csv_path=csv_path, task=task)
        if max_samples is not None and max_samples < len(self.data):
            self.data = _subset(self.data, max_samples, seed)
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
    def has_validation(self) -> bool:
        """Whether the data holds out a validation split: ``val_fraction > 0`` or one the source defines."""
        return self.val_fraction > 0 or (self.data.splits is not None and "val" in self.data.splits)

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
            if self.data.items and isinstance(self.data.items[0], str) and self.data.name != "elpv":
                self._drop_unreadable()
            self.split_indices = split_indices(self.data, self.val_fraction, self.test_fraction, self.seed)
            for split in ("train", "val") if self.has_validation else ("train",):
                if len(self.split_indices.get(split, [])) == 0:
                    raise DatasetError(
                        f"the {split} split is empty ({len(self.data)} images, val_fraction={self.val_fraction}, "
                        f"test_fraction={self.test_fraction}); add images or change the fractions."
                    )
            self._warn_imbalance()
            if self.data.items and isinstance(self.data.items[0], str) and self.data.name != "elpv":
                self._warn_duplicates_across_splits()
        self._resolve_transforms()
        if (self.feature_cache != "off" or self.trunk_cache != "off") and self.trainer is not None:
            # the loaders change when the backbone unfreezes: ask for them again every epoch
            self.trainer.reload_dataloaders_every_n_epochs = 1
        for split, indices in self.split_indices.items():
            transform = self._train_transform if split == "train" else self._eval_transform
            items = [self.data.items[i] for i in indices]
            self.datasets[split] = ImageDataset(
                items, self.data.labels[indices], transform, seed=self.seed, skip_bad=self.skip_bad_images
            )

    def _warn_imbalance(self) -> None:
        counts = np.bincount(self.data.labels[self.split_indices["train"]], minlength=self.num_classes)
        if self.sampler == "balanced" or counts.min() * IMBALANCE_WARNING_RATIO > counts.max():
            return
        listing = ", ".join(f"{name}: {int(c)}" for name, c in zip(self.class_names, counts, strict=True))
        warnings.warn(
            f"the training split is severely imbalanced ({listing}; largest/smallest = "
            f"{counts.max() / max(counts.min(), 1):.0f}x). The loss will favour the large classes; "
            "set data.sampler=balanced to draw every class equally often, and watch val_f1 (macro) "
            "rather than accuracy.",
            stacklevel=3,
        )

    def _warn_duplicates_across_splits(self) -> None:
        """Files with the same bytes in two splits make the test (or validation) score optimistic."""
        digests: dict[str, tuple[str, str]] = {}
        found: list[str] = []
        count = 0
        for split in ("train", "val", "test"):
            for i in self.split_indices.get(split, []):
                path = str(self.data.items[i])
                digest = _file_digest(path)
                first = digests.setdefault(digest, (split, path))
                if first[0] != split:
                    count += 1
                    if len(found) < 3:
                        found.append(f"{first[1]} ({first[0]}) = {path} ({split})")
        if count:
            warnings.warn(
                f"{count} images appear in more than one split with identical bytes, e.g. "
                + "; ".join(found)
                + ". Scores on val/test overstate accuracy on new images; remove the copies.",
                stacklevel=3,
            )

    def _drop_unreadable(self) -> None:
        bad = find_unreadable([str(p) for p in self.data.items])
        if not bad:
            return
        if not self.skip_bad_images:
            listing = "\n".join(f"  {err.path}: {err.reason}" for err in bad[:10])
            more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise DatasetError(
                f"{len(bad)} of {len(self.data)} images cannot be read:\n{listing}{more}\n"
                "Fix or remove them, or set data.skip_bad_images=true to leave them out."
            )
        self.skipped_images = bad
        bad_paths = {err.path for err in bad}
        keep = np.asarray([str(p) not in bad_paths for p in self.data.items])
        self.data = _select(self.data, np.flatnonzero(keep))
        warnings.warn(
            f"skipped {len(bad)} unreadable images (skip_bad_images=true), e.g. "
            + "; ".join(f"{e.path}: {e.reason}" for e in bad[:3]),
            stacklevel=2,
        )

    def _resolve_transforms(self) -> None:
        if self._train_transform is not None:
            return
        size, mean, std = self.image_size, self.mean, self.std
        if size is None or mean is None or std is None:
            config = self._model_data_config()
            size = size or int(config["input_size"][-1])
            mean = mean or tuple(config["mean"])
            std = std or tuple(config["std"])
        self.image_size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1 pixel, got {self.image_size}.")
        self._check_input_size()
        self._train_transform = build_train_transform(self.augment, self.image_size, self.mean, self.std)
        self._eval_transform = build_eval_transform(self.image_size, self.mean, self.std)

    def _check_input_size(self) -> None:
        """Refuse, before training, an image size the model's backbone cannot take."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        backbone = getattr(model, "backbone", None)
        if backbone is None or not hasattr(backbone, "model"):
            return
        size, name = self.image_size, getattr(backbone, "name", type(backbone.model).__name__)
        info = getattr(backbone.model, "feature_info", None)
        reduction = int(info[-1]["reduction"]) if info else 1
        pretrained_size = int(backbone.data_config["input_size"][-1])
        if size < reduction:
            raise ValueError(
                f"data.image_size={size} is too small for '{name}': it downsamples {reduction}x, so its last "
                f"feature map would be under one pixel. Use data.image_size >= {reduction} (its pretrained "
                f"input size is {pretrained_size})."
            )
        if size == pretrained_size:
            return  # the size the backbone was built and trained for: no probe pass needed
        parameter = next(backbone.parameters(), None)
        probe = torch.zeros(1, 3, size, size, device=parameter.device if parameter is not None else "cpu")
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                backbone(probe)
        except Exception as err:
            raise ValueError(
                f"'{name}' cannot take {size}x{size} inputs (data.image_size={size}): {type(err).__name__}: "
                f"{err}. Use its pretrained input size, data.image_size={pretrained_size} (or leave it unset)."
            ) from err
        finally:
            backbone.train(was_training)

    def use_data_config(self, config: dict[str, Any]) -> None:
        """Fill image size, mean and std that were left ``None`` from a backbone's data config
        (what a Trainer does at setup; tools that run without one call it themselves)."""
        self.image_size = self.image_size or int(config["input_size"][-1])
        self.mean = self.mean or tuple(config["mean"])
        self.std = self.std or tuple(config["std"])

    def _model_data_config(self) -> dict[str, Any]:
        model = self.trainer.lightning_module if self.trainer is not None else None
        config = getattr(model, "data_config", None)
        if config is None:
            raise DatasetError(
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

    def _train_sampler(self, labels: np.ndarray, tag_epoch: bool = False) -> EpochShuffleSampler:
        if self.sampler == "balanced":
            sampler = BalancedSampler(np.asarray(labels), self.seed, tag_epoch)
        else:
            sampler = EpochShuffleSampler(len(labels), self.seed, tag_epoch)
        if self.trainer is not None and self.trainer.state.fn == "fit":
            # a loader built mid-run (the caches reload loaders every epoch) is iterated before Lightning's
            # set_epoch, by loader workers at once: it must start at the epoch about to run, not at 0
            sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed)
        return sampler

    def train_dataloader(self) -> DataLoader:
        return self._cached_loader("train", shuffle=True) or self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._cached_loader("val", shuffle=False) or self._loader("val", shuffle=False)

    # --- frozen-feature cache ----------------------------------------------------------------------

    def _frozen_backbone(self) -> Any | None:
        """What this epoch of a fit can cache: the model's backbone if it runs fully frozen (its pooled
        features are fixed), its :class:`~transferkit.finetuning.Trunk` if only its bottom is frozen and
        ``trunk_cache`` is on, else ``None``."""
        if self.trainer is None or self.trainer.state.fn != "fit":
            return None
        if self.feature_cache == "off" and self.trunk_cache == "off":
            return None
        model = self.trainer.lightning_module
        schedule = getattr(model, "freeze_schedule", None)
        if schedule is None or not schedule.active:
            return None
        trainable = schedule.trainable_groups(self.trainer.current_epoch, len(model.groups))
        if trainable == len(model.groups):
            return None
        if (self.feature_cache if trainable == 0 else self.trunk_cache) == "off":
            return None
        if schedule.bn_policy == "train":
            warnings.warn(
                "feature_cache and trunk_cache are ignored with bn_policy='train': BatchNorm statistics keep "
                "changing, so the frozen backbone's features are not fixed.",
                stacklevel=2,
            )
            return None
        return model.backbone if trainable == 0 else model.trunk(len(model.groups) - trainable)

    def features(self, split: str, backbone: Any) -> torch.Tensor:
        """Features of ``split`` from the cache or computed once: the backbone's ``(views, N, F)``, or a
        trunk's ``(views, N, C, H, W)`` (float16)."""
        trunk = isinstance(backbone, Trunk)
        mode = self.trunk_cache if trunk else self.feature_cache
        augmented = split == "train" and mode == "augmented"
        views = self.cache_views if augmented else 1
        transform = self._train_transform if augmented else self._eval_transform
        dataset = self.datasets[split]
        key = FeatureCache.key(backbone, transform, dataset.items, split, views, self.seed)
        if (split, key) in self._features:
            return self._features[(split, key)]
        root = self.cache_dir or os.path.join(
            self.trainer.default_root_dir if self.trainer else ".", "feature_cache"
        )
        cache = FeatureCache(root)
        stored = cache.load(split, key)
        if stored is None:

            def view_loader(view: int) -> DataLoader:
                # each view its own augmentation draws (epoch = view number), the same in every run
                return DataLoader(
                    ImageDataset(dataset.items, dataset.labels, transform, seed=self.seed, epoch=view),
                    batch_size=max(self.batch_size, 64),
                    num_workers=self.num_workers,
                    generator=torch.Generator().manual_seed(self.seed),
                )

            dtype = torch.float16 if trunk else torch.float32
            stored = None
            for view in range(views):  # filled in place: a trunk's views are GBs, never held twice
                features = extract_features(backbone, view_loader(view), dtype)
                if stored is None:
                    stored = torch.empty((views, *features.shape), dtype=dtype)
                stored[view] = features
                del features
            cache.save(split, key, stored)
        self._features = {k: v for k, v in self._features.items() if k[0] != split}  # one key per split
        self._features[(split, key)] = stored
        return stored

    def _cached_loader(self, split: str, shuffle: bool) -> DataLoader | None:
        backbone = self._frozen_backbone()
        if backbone is None:
            return None
        if split not in self.datasets:
            self.setup()
        epoch = self.trainer.current_epoch
        dataset = CachedFeatures(
            self.features(split, backbone), self.datasets[split].labels, epoch, self.seed
        )
        return (TrainLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler(dataset.labels) if shuffle else None,
            drop_last=shuffle and len(dataset) > self.batch_size,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def test_dataloader(self) -> DataLoader:
        if self.split_indices is not None and len(self.split_indices.get("test", [])) == 0:
            raise DatasetError("there is no test split (test_fraction=0 and no test/ folder or CSV rows).")
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def summary(self) -> dict[str, dict[str, int]]:
        """Images per class in each split: ``{split: {class name: count}}``."""
        if self.split_indices is None:
            self.setup()
        out = {}
        for split, indices in self.split_indices.items():
            counts = np.bincount(self.data.labels[indices], minlength=self.num_classes)
            out[split] = {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}
        return out


def _file_digest(path: str) -> str:
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "blake2b").hexdigest()


def _select(data: DataSource, keep: np.ndarray) -> DataSource:
    remap = None
    if data.splits is not None:
        position = {int(old): new for new, old in enumerate(keep)}
        remap = {
            s: np.asarray([position[i] for i in idx if int(i) in position]) for s, idx in data.splits.items()
        }
    return DataSource(
        data.name,
        [data.items[i] for i in keep],
        data.labels[keep],
        data.class_names,
        data.stratify[keep],
        {k: v[keep] for k, v in data.meta.items()},
        remap,
    )


def _subset(data: DataSource, max_samples: int, seed: int) -> DataSource:
    from sklearn.model_selection import train_test_split

    try:
        keep, _ = train_test_split(
            np.arange(len(data)), train_size=max_samples, stratify=data.stratify, random_state=seed
        )
    except ValueError:  # strata too small for a stratified subset of this size
        keep = np.random.default_rng(seed).choice(len(data), size=max_samples, replace=False)
    return _select(data, np.sort(keep))
