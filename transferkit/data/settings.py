"""What can be set on an :class:`~transferkit.ImageDataModule`, in typed groups validated at construction.

A recipe's ``data`` section names where the images come from, then one group per concern::

    data:
      source: folder
      root: photos/
      split: {val_fraction: 0.15, test_fraction: 0.2}
      pipeline: {image_size: 224, augment: light}
      loader: {batch_size: 32, num_workers: 2}
      cache: {decoded_images: true}

Every field is one flag on the command line (``--data.loader.batch_size 64``; the most used have short
forms: ``--batch_size``, ``--image_size``, ``--augment``, ``--root``). :class:`DataSettings` holds them
all; :data:`FLAT_DATA_KEYS` names the new place of each flat key of recipes from before the groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from transferkit.data.augment import Augment, augmentations
from transferkit.data.sources import SourceName
from transferkit.data.targets import TargetSettings
from transferkit.errors import ConfigError
from transferkit.settings import GroupedSettings, SettingsGroup

__all__ = [
    "FLAT_DATA_KEYS",
    "CacheSettings",
    "DataSettings",
    "LoaderSettings",
    "PipelineSettings",
    "SplitSettings",
    "TargetSettings",
    "check_folds",
]


def _whole(value: Any) -> bool:
    """A whole number (``224``, NumPy's, or ``224.0`` as a YAML file may give it), not a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int | np.integer) or (
        isinstance(value, float | np.floating) and float(value).is_integer()
    )


@dataclass(frozen=True)
class SplitSettings(SettingsGroup):
    """Which images train, validate and test (``data.split``), drawn stratified with ``data.seed``.

    Args:
        val_fraction: share of the non-test images held out for validation (early stopping, best
            checkpoint). ``0``: no validation split; every non-test image trains, for a final fit whose
            epoch count was chosen on a validated run. :meth:`Trainer.fit <transferkit.Trainer.fit>` then
            skips validation and early stopping, and the checkpoint of the last epoch is the one tested.
        test_fraction: share of all images held out for the test; ``None`` = the source's own (0.25 for
            ELPV, its protocol; 0.2 otherwise).
        train_fraction: share of the training split that trains, a stratified subset (at least one
            image); the validation and test splits stay as they are. For learning curves: validation
            scores at ``0.5``, ``0.75`` and ``1`` say whether more labelled images would help.
        max_samples: keep at most this many images (a stratified subset), for quick runs.
        cv_folds, cv_fold: k-fold cross-validation: the non-test images are split into ``cv_folds``
            stratified parts, and part ``cv_fold`` (0-based) validates while the others train, in place of
            the ``val_fraction`` split (see :func:`~transferkit.data.splits.cv_split_indices`). The test split
            is the one the data holds out without them. Set both or neither;
            :func:`~transferkit.tuning.cross_validation.cross_validate` runs every fold.
        exclude: a CSV of images to take out of the training split (a ``file`` column; ``doctor``'s
            ``label_issues.csv`` is one): each listed training image is dropped, or, where the row's
            ``action`` is ``relabel``, given the row's ``suggested`` class (``keep``: left as it is). The splits
            are drawn before, so validation and test hold the same images with or without it; listed images
            of those splits are never changed.
        near_duplicates: ``warn`` (default): ``finetune`` warns, before it scores the test split, when a test
            image looks like a training or validation one (the same picture re-encoded or resized; a perceptual
            hash of a 32 px thumbnail, see :meth:`~transferkit.ImageDataModule.check_near_duplicates`), as set-up
            does for copies with the same bytes; ``off`` skips the reduced-scale decode of every image it costs.
    """

    where = "data.split"

    val_fraction: float = 0.15
    test_fraction: float | None = None
    train_fraction: float = 1.0
    max_samples: int | None = None
    cv_folds: int | None = None
    cv_fold: int | None = None
    exclude: str | None = None
    near_duplicates: Literal["warn", "off"] = "warn"

    def __post_init__(self) -> None:
        self.require(0 <= self.val_fraction < 1, "val_fraction", "in [0, 1) (0: no validation split)")
        self.require(
            self.test_fraction is None or 0 <= self.test_fraction < 1,
            "test_fraction",
            "in [0, 1), or null for the source's own",
        )
        self.require(
            0 < self.train_fraction <= 1,
            "train_fraction",
            "the share of the training split that trains, in (0, 1] (1: the whole split)",
        )
        self.require(
            self.max_samples is None or (_whole(self.max_samples) and self.max_samples >= 1),
            "max_samples",
            "a whole number >= 1, or null for every image",
        )
        check_folds(self.cv_folds, self.cv_fold, where="data.split.")
        self.require(self.near_duplicates in ("warn", "off"), "near_duplicates", "'warn' or 'off'")


def check_folds(folds: int | None, fold: int | None, where: str = "") -> None:
    """Refuse cross-validation settings that cannot work, naming the value and the fix (``where``: the
    prefix of the names in the message, ``data.split.`` for a recipe's)."""
    if folds is None and fold is None:
        return
    if folds is None or fold is None:
        raise ConfigError(
            f"{where}cv_folds and cv_fold go together, got cv_folds={folds}, cv_fold={fold}: set both "
            "(e.g. cv_folds: 5, cv_fold: 0 for the first of five folds), or neither for the val_fraction split."
        )
    for name, value in (("cv_folds", folds), ("cv_fold", fold)):
        if not _whole(value):
            raise ConfigError(f"{where}{name} must be a whole number, got {value!r}.")
    if folds < 2:
        raise ConfigError(
            f"{where}cv_folds must be >= 2 (one part validates, the others train), got {folds}; "
            "5 or 10 are the usual choices."
        )
    if not 0 <= fold < folds:
        raise ConfigError(
            f"{where}cv_fold is 0-based and must be in 0..{folds - 1} for cv_folds={folds}, got {fold}."
        )


@dataclass(frozen=True)
class PipelineSettings(SettingsGroup):
    """How an image becomes the model's input (``data.pipeline``): Albumentations pipelines.

    Args:
        image_size: side of the square network input; ``None`` = the backbone's own.
        mean, std: normalisation; ``None`` = the backbone's own (filled in by :class:`transferkit.Trainer`).
        augment: train-time augmentation: ``none``, ``light``, ``medium``, ``heavy``, or Albumentations
            transforms inline (``[{HorizontalFlip: {p: 0.5}}, ...]`` or an ``A.to_dict`` dict); ``None``
            (default): ``light``. One that is named and that no training epoch would see (every epoch fed
            clean stored features, see :class:`~transferkit.training.feeding.FreezeAndCache`) is refused
            when the fit starts.
        jpeg_draft: decode JPEGs at the smallest DCT scale (1/8, 1/4, 1/2) that still gives the pipeline
            the pixels it uses (:func:`~transferkit.data.augment.decode_side`): a camera photo decodes
            several times faster for a 224 px model. ``False`` decodes every file in full.
    """

    where = "data.pipeline"

    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    augment: Augment | None = None
    jpeg_draft: bool = True

    def __post_init__(self) -> None:
        self.require(
            self.image_size is None or (_whole(self.image_size) and self.image_size >= 1),
            "image_size",
            "a side in pixels >= 1, or null for the backbone's",
        )
        if self.image_size is not None:
            object.__setattr__(self, "image_size", int(self.image_size))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                self.require(len(value) == 3, name, "three numbers (one per RGB channel), or null")
                object.__setattr__(self, name, tuple(float(v) for v in value))
        augmentations(self.preset)  # a bad preset name or transform fails here, before any data is read

    @property
    def preset(self) -> Augment:
        """The augmentation to build: ``augment``, ``light`` when it is not set."""
        return "light" if self.augment is None else self.augment

    @property
    def augment_chosen(self) -> bool:
        """Whether an augmentation was named (not left unset, not ``none``): one no epoch sees is refused."""
        return self.augment is not None and self.augment != "none"

    @property
    def complete(self) -> bool:
        """Whether image size, mean and std are all known (else the backbone's fill them in)."""
        return self.image_size is not None and self.mean is not None and self.std is not None


@dataclass(frozen=True)
class LoaderSettings(SettingsGroup):
    """How batches are drawn (``data.loader``).

    Args:
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        sampler: order of the training samples: ``shuffle`` (each image once per epoch) or ``balanced``
            (classes drawn equally often, see :class:`~transferkit.data.samplers.BalancedSampler`).
            ``None`` (default): ``shuffle``, and set-up warns, with the counts per class, when the training
            split is severely imbalanced; naming ``shuffle`` keeps the order without that warning (for
            accuracy on data with the same proportions, as the ELPV recipes are scored).
    """

    where = "data.loader"

    batch_size: int = 32
    num_workers: int = 2
    sampler: Literal["shuffle", "balanced"] | None = None

    def __post_init__(self) -> None:
        self.require(_whole(self.batch_size) and self.batch_size >= 1, "batch_size", "a whole number >= 1")
        self.require(_whole(self.num_workers) and self.num_workers >= 0, "num_workers", "a whole number >= 0")
        self.require(self.sampler in (None, "shuffle", "balanced"), "sampler", "'shuffle' or 'balanced'")


@dataclass(frozen=True)
class CacheSettings(SettingsGroup):
    """Where the data module keeps what it stores between epochs and runs (``data.cache``).

    Args:
        dir: where the caches are stored (the decoded images, and the stored backbone outputs that
            :class:`~transferkit.training.feeding.FreezeAndCache` feeds the model); ``None`` =
            ``<trainer.default_root_dir>/feature_cache`` (keyed by weights, pipeline and images, so runs of
            one recipe share them), or memory only when the data module is used outside a Trainer.
        decoded_images: decode each image file once, at the pipeline's working resolution, into files
            every loader worker maps into memory, reused by later epochs and runs (see
            :mod:`transferkit.data.decoded`). For folders of camera photos, where decoding otherwise limits
            training.
    """

    where = "data.cache"

    dir: str | None = None
    decoded_images: bool = False


@dataclass(frozen=True)
class DataSettings(GroupedSettings):
    """Everything an :class:`~transferkit.ImageDataModule` is built from, its groups validated."""

    groups = {
        "split": SplitSettings,
        "pipeline": PipelineSettings,
        "loader": LoaderSettings,
        "cache": CacheSettings,
        "target": TargetSettings,
    }

    source: SourceName = "folder"
    root: str | None = None
    csv_path: str | None = None
    task: Literal["binary", "4class", "cell_type", "defective_polycrystalline", "defect_probability"] = (
        "binary"
    )
    seed: int = 0
    class_groups: dict[str, list[str | int]] | None = None
    soft_labels: bool = False
    skip_bad_images: bool = False
    split: SplitSettings = field(default_factory=SplitSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    loader: LoaderSettings = field(default_factory=LoaderSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    target: TargetSettings = field(default_factory=TargetSettings)

    def check(self) -> None:
        kind = self.target.kind
        if kind != "single_label":
            refused = {
                "data.loader.sampler: balanced": (
                    self.loader.sampler == "balanced",
                    "it draws classes equally often, and an image of several labels (or of a number) has no one class",
                ),
                "data.soft_labels": (
                    self.soft_labels,
                    "soft labels are distributions over classes that exclude each other",
                ),
                "data.class_groups": (
                    bool(self.class_groups),
                    "a group's probability is the sum of its classes', which holds for classes that exclude each other",
                ),
            }
            for name, (on, why) in refused.items():
                if on:
                    raise ConfigError(f"{name} does not apply to data.target.kind: {kind}: {why}.")
        if self.source == "stream":  # settings that need every file at hand: a pack is read chunk by chunk
            refused = {
                "cache.decoded_images": self.cache.decoded_images,
                "loader.sampler: balanced": self.loader.sampler == "balanced",
                "split.max_samples": self.split.max_samples is not None,
                "split.train_fraction": self.split.train_fraction != 1,
                "split.cv_folds": self.split.cv_folds is not None,
            }
            named = [name for name, on in refused.items() if on]
            if named:
                raise ConfigError(
                    f"source 'stream' cannot be used with {', '.join(f'data.{n}' for n in named)}: a pack's "
                    "splits are fixed when it is packed, and it is read chunk by chunk in LitData's shuffled "
                    "order, not by file. Turn them off, or use the folder or CSV it was packed from."
                )


# the flat data settings of recipes from before the groups: old name -> (group, field)
FLAT_DATA_KEYS: dict[str, tuple[str, str]] = {
    **{
        k: ("split", k)
        for k in ("val_fraction", "test_fraction", "train_fraction", "max_samples", "cv_folds", "cv_fold")
    },
    **{k: ("pipeline", k) for k in ("image_size", "mean", "std", "augment", "jpeg_draft")},
    **{k: ("loader", k) for k in ("batch_size", "num_workers", "sampler")},
    "cache_dir": ("cache", "dir"),
    "decoded_cache": ("cache", "decoded_images"),
}
