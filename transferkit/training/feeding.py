"""What is frozen in each epoch and what the model is fed, owned by one callback.

A frozen part of a backbone computes the same output for an image in every epoch (its BatchNorm runs in
eval mode), so while it is frozen the model can be fed that output, stored once, instead of images:
head-only epochs then train on pooled features (``feature_cache``), and epochs in which only the top groups
train run just those groups on the stored feature maps of the frozen bottom, its trunk (``trunk_cache``).
Which groups are frozen, what the data module serves and what the model takes all follow from the epoch,
so :class:`FreezeAndCache` decides the three together; the model and the data module never ask each other.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from transferkit.data.datamodule import ImageDataModule
from transferkit.data.datasets import CachedFeatures
from transferkit.data.features import FeatureCache, extract_features
from transferkit.errors import ConfigError
from transferkit.lightning_internals import restarted_mid_epoch

__all__ = ["CACHE_MODES", "FreezeAndCache"]

CACHE_MODES = ("off", "clean", "augmented")
CacheMode = Literal["off", "clean", "augmented"]


class FreezeAndCache(Callback):
    """Freezes and unfreezes a :class:`~transferkit.TransferClassifier`'s backbone groups epoch by epoch (its
    ``freeze_schedule``), and while part of the backbone is frozen feeds the model that part's stored output
    instead of images. :class:`transferkit.Trainer` adds one with the caches off to every run.

    Each epoch it applies the schedule (``model.freezing``: a pure function of the epoch, so a resumed run
    is in the state an uninterrupted one would be), logs ``trainable_groups``, and, with a cache on, makes
    the :class:`~transferkit.ImageDataModule` serve the training and validation splits as stored outputs
    (``datamodule.feed``) and tells the model what it is fed (``model.feed``). Test and predict always see
    images. It keeps no state of its own: what it does in an epoch follows from the epoch. One callback
    serves one run at a time (a Trainer after another may reuse it; :meth:`fresh` makes another).

    Args:
        feature_cache: while the whole backbone is frozen (BatchNorm too), feed the head stored pooled
            features: ``off``; ``clean`` (one vector per image, eval pipeline); ``augmented``
            (``cache_views`` train-pipeline views per image, one drawn per epoch). Validation uses clean
            features in both cases. See :mod:`transferkit.data.features`.
        trunk_cache: while only the top backbone groups train, feed the model the stored output of the
            frozen bottom (the trunk), so each step runs only the trainable top: ``off``, ``clean`` or
            ``augmented``, as above; stored in float16. Timm EfficientNet-family backbones (see
            :class:`~transferkit.finetuning.trunk.Trunk`).
        cache_views: augmented views per training image for ``augmented`` caches.

    The caches are stored under the data module's ``cache_dir`` (or ``<default_root_dir>/feature_cache``),
    keyed by weights, pipeline and images, so runs of one recipe share them.

    Example:
        >>> import transferkit as tk
        >>> model = tk.TransferClassifier(num_classes=2, backbone="test_efficientnet", pretrained=False,
        ...                               freeze_schedule=tk.FreezeSchedule(milestones={0: 0, 1: 2, 2: -1}))
        >>> feeding = FreezeAndCache(feature_cache="clean", trunk_cache="clean")
        >>> [feeding.fed_at(model, epoch) for epoch in range(3)]
        ['features', 'trunk', 'images']
    """

    def __init__(
        self, feature_cache: CacheMode = "off", trunk_cache: CacheMode = "off", cache_views: int = 4
    ) -> None:
        for name, mode in (("feature_cache", feature_cache), ("trunk_cache", trunk_cache)):
            if mode not in CACHE_MODES:
                raise ConfigError(f"caches.{name} must be 'off', 'clean' or 'augmented', got {mode!r}.")
        if isinstance(cache_views, bool) or not isinstance(cache_views, int) or cache_views < 1:
            raise ConfigError(f"caches.cache_views must be a whole number >= 1, got {cache_views!r}.")
        self.feature_cache = feature_cache
        self.trunk_cache = trunk_cache
        self.cache_views = cache_views
        self._fit_trainer: L.Trainer | None = None
        self._model: Any = None
        self._datamodule: ImageDataModule | None = None
        self._features: dict[tuple[str, str], torch.Tensor] = {}

    def fresh(self) -> FreezeAndCache:
        """A callback with the same settings, for another Trainer (one callback serves one run)."""
        return FreezeAndCache(self.feature_cache, self.trunk_cache, self.cache_views)

    @property
    def caching(self) -> bool:
        return self.feature_cache != "off" or self.trunk_cache != "off"

    def augmented_epochs(self, model: Any, max_epochs: int) -> list[int] | None:
        """The epochs of a ``max_epochs`` run in which training images pass through the train pipeline:
        every epoch fed images, and those fed a cache of ``augmented`` views; ``None`` when no epoch is
        fed a clean cache (every epoch sees augmented images)."""
        clean = [
            epoch
            for epoch in range(max_epochs)
            if (kind := self.fed_at(model, epoch)) != "images"
            and (self.feature_cache if kind == "features" else self.trunk_cache) == "clean"
        ]
        return None if not clean else [e for e in range(max_epochs) if e not in clean]

    def fed_at(self, model: Any, epoch: int) -> str:
        """What ``model`` is fed in ``epoch``: ``images``, pooled ``features`` or a ``trunk``'s maps."""
        stage = self._stage(model, epoch)
        return "images" if stage is None else stage[0]

    def _stage(self, model: Any, epoch: int) -> tuple[str, Any] | None:
        freezing = getattr(model, "freezing", None)
        if freezing is None or not self.caching:
            return None
        return freezing.frozen_stage(
            epoch, features=self.feature_cache != "off", trunk=self.trunk_cache != "off"
        )

    # --- set-up --------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or getattr(pl_module, "freezing", None) is None:
            return  # a LightningModule without a freeze schedule: nothing to freeze, nothing to cache
        self._fit_trainer, self._model = trainer, pl_module
        if not self.caching:
            return
        datamodule = trainer.datamodule
        if not isinstance(datamodule, ImageDataModule):
            raise ConfigError(
                f"caches.feature_cache / caches.trunk_cache store the frozen backbone's output for the images "
                f"of an ImageDataModule; this run's data is {type(datamodule).__name__}. Set both to 'off'."
            )
        if datamodule.data.name == "stream":
            raise ConfigError(
                "source 'stream' cannot be used with caches.feature_cache or caches.trunk_cache: a pack is read "
                "chunk by chunk in LitData's shuffled order, not by file. Set them off, or train from the "
                "folder or CSV it was packed from."
            )
        if pl_module.mixing.active:
            raise ConfigError(
                "mixup/CutMix mix training images, but caches.feature_cache / caches.trunk_cache feed the model "
                "stored features instead of images while the backbone is frozen (mixing pooled features is not "
                "mixing images, and CutMix has no box to cut in them). Turn the caches off, or mixing off."
            )
        self._check_augmentation_is_seen(trainer, pl_module, datamodule)
        self._datamodule = datamodule
        datamodule.feed = self  # the data module asks this callback for each split's loader
        # what the first epoch is fed, already now: Lightning's learning-rate finder fits with its own
        # callbacks in place of this one (each epoch start says it again)
        pl_module.feed(self._stage(pl_module, trainer.current_epoch))
        # the loaders change when the backbone unfreezes: Lightning asks for them again every epoch
        trainer.reload_dataloaders_every_n_epochs = 1

    def _check_augmentation_is_seen(
        self, trainer: L.Trainer, model: Any, datamodule: ImageDataModule
    ) -> None:
        """A chosen ``data.pipeline.augment`` that no training epoch sees is refused, naming the fix; one that only
        some epochs see is said in one line."""
        if not datamodule.settings.pipeline.augment_chosen:
            return
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1000
        seen = self.augmented_epochs(model, epochs)
        if seen is None:
            return
        clean = [e for e in range(epochs) if e not in seen]
        fed = sorted({f"caches.{self._cache_of(model, e)}: clean" for e in clean})
        if not seen:
            raise ConfigError(
                f"data.pipeline.augment is set, but no training epoch sees augmented images: every epoch trains on "
                f"outputs stored from the eval pipeline ({' and '.join(fed)}). Set caches.feature_cache / "
                "caches.trunk_cache: augmented (stored augmented views, caches.cache_views of them) to train "
                "on augmented images, or data.pipeline.augment: none to say that none is used."
            )
        if trainer.is_global_zero:
            print(
                f"data.pipeline.augment reaches epochs {_ranges(seen)} only: epochs {_ranges(clean)} train on outputs "
                f"stored from the eval pipeline ({' and '.join(fed)}).",
                file=sys.stderr,
            )

    def _cache_of(self, model: Any, epoch: int) -> str:
        return "feature_cache" if self.fed_at(model, epoch) == "features" else "trunk_cache"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._model is not None and self.caching:
            self._model.feed(None)  # after fit (or a failed one) the model takes images again
        if self._datamodule is not None and self._datamodule.feed is self:
            self._datamodule.feed = None
        self._fit_trainer = self._model = self._datamodule = None

    # --- epochs --------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._model is not None and restarted_mid_epoch(trainer):
            self._start_epoch(trainer, pl_module)  # Lightning calls no on_train_epoch_start for it

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._model is not None:
            self._start_epoch(trainer, pl_module)

    def _start_epoch(self, trainer: L.Trainer, pl_module: Any) -> None:
        epoch = trainer.current_epoch
        trainable = pl_module.freezing.start_epoch(epoch)
        if trainable is not None:
            pl_module.log("trainable_groups", float(trainable), on_step=False, on_epoch=True)
        if self.caching:  # with the caches off, what the model is fed is its owner's business
            pl_module.feed(self._stage(pl_module, epoch))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._model is None or trainer.state.fn != "fit":
            return
        epoch = trainer.current_epoch
        if trainer.sanity_checking:
            # before any epoch starts (a resumed run's included), on the loaders built for this epoch
            pl_module.freezing.start_epoch(epoch)
        if self.caching:
            pl_module.feed(self._stage(pl_module, epoch))

    # --- what the data module serves -----------------------------------------------------------------

    def dataset(self, split: str) -> Dataset | None:
        """The stored outputs the data module serves for ``split`` this epoch of a fit (``train`` or
        ``val``), or ``None``: images."""
        trainer, datamodule = self._fit_trainer, self._datamodule
        if (
            trainer is None
            or datamodule is None
            or trainer.state.fn != "fit"
            or split not in ("train", "val")
        ):
            return None
        stage = self._stage(self._model, trainer.current_epoch)
        if stage is None:
            return None
        kind, extractor = stage
        features = self.features(split, extractor, kind)
        source = datamodule.datasets[split]
        targets = getattr(source, "targets", None)
        return CachedFeatures(features, source.labels, trainer.current_epoch, datamodule.seed, targets)

    def features(self, split: str, extractor: Any, kind: str) -> torch.Tensor:
        """Outputs of ``extractor`` for ``split`` from the cache or computed once: a frozen backbone's
        ``(views, N, F)`` (``kind="features"``), or a frozen trunk's ``(views, N, C, H, W)`` in float16."""
        dm = self._datamodule
        mode = self.trunk_cache if kind == "trunk" else self.feature_cache
        augmented = split == "train" and mode == "augmented"
        views = self.cache_views if augmented else 1
        transform = dm.train_transform if augmented else dm.eval_transform
        dataset = dm.datasets[split]
        decoding = dm.decoding_for(transform)
        key = FeatureCache.key(extractor, transform, dataset.items, split, views, dm.seed, decoding)
        if (split, key) in self._features:
            return self._features[(split, key)]
        # the run's folder (or data.cache.dir); outside a Trainer without one, the cache stays in memory
        root = dm.cache_root()
        cache = FeatureCache(root) if root is not None else None
        stored = cache.load(split, key) if cache is not None else None
        if stored is None:
            dtype = torch.float16 if kind == "trunk" else torch.float32
            for view in range(views):  # filled in place: a trunk's views are GBs, never held twice
                # each view its own augmentation draws (epoch = view number), the same in every run
                loader = DataLoader(
                    dm.image_dataset(dataset.items, dataset.labels, transform, epoch=view),
                    batch_size=max(dm.batch_size, 64),
                    num_workers=dm.settings.loader.num_workers,
                    generator=torch.Generator().manual_seed(dm.seed),
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


def _ranges(epochs: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for epoch in epochs:
        if runs and epoch == runs[-1][-1] + 1:
            runs[-1].append(epoch)
        else:
            runs.append([epoch])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
