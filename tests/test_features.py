"""The frozen-feature cache: same training, far less work, never stale."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from conftest import NORM, TINY_BACKBONE, merged, quiet_trainer
from PIL import Image

import transferkit.training.feeding as feeding_module
from transferkit import FreezeAndCache, FreezeSchedule, ImageDataModule, Trainer, TransferClassifier


def _dm(root, tmp_path, **kwargs) -> ImageDataModule:
    defaults = {
        "pipeline": {"augment": "none", **NORM},
        "cache": {"dir": str(tmp_path / "cache")},
        "loader": {"num_workers": 0, "batch_size": 8},
    }
    return ImageDataModule(source="folder", root=str(root), **merged(defaults, kwargs))


def _fit(
    dm: ImageDataModule, tmp_path, caches: FreezeAndCache, epochs: int = 2, frozen_epochs: int = 2
) -> TransferClassifier:
    L.seed_everything(0)
    model = TransferClassifier(
        num_classes=2,
        backbone=TINY_BACKBONE,
        pretrained=False,
        head={"dropout": 0.3},
        freeze_schedule=FreezeSchedule(frozen_epochs=frozen_epochs),
    )
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, enable_checkpointing=False, callbacks=[caches])
    trainer.fit(model, datamodule=dm)
    return model


def _stored(caches: FreezeAndCache, split: str) -> torch.Tensor:
    """What the callback stored for ``split`` in its last fit."""
    (features,) = [v for (name, _), v in caches._features.items() if name == split]
    return features


class _CountExtractions:
    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        original = feeding_module.extract_features

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(feeding_module, "extract_features", counting)


@pytest.mark.slow
def test_clean_cache_trains_the_head_exactly_as_without_it(stripes_folder, tmp_path):
    plain = _fit(_dm(stripes_folder, tmp_path), tmp_path, FreezeAndCache(feature_cache="off"))
    cached = _fit(_dm(stripes_folder, tmp_path), tmp_path, FreezeAndCache(feature_cache="clean"))
    for (name, a), b in zip(plain.head.state_dict().items(), cached.head.state_dict().values(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=1e-4, msg=name)
    assert list((tmp_path / "cache").glob("*.pt"))


@pytest.mark.slow
def test_the_cache_is_reused_and_never_stale(stripes_folder, tmp_path, monkeypatch):
    counter = _CountExtractions(monkeypatch)
    dm = _dm(stripes_folder, tmp_path)
    _fit(dm, tmp_path, FreezeAndCache(feature_cache="clean"))
    assert counter.calls == 2  # train and val, once each for two frozen epochs
    _fit(_dm(stripes_folder, tmp_path), tmp_path, FreezeAndCache(feature_cache="clean"))
    assert counter.calls == 2  # read back from disk
    # change one training image: the training features are recomputed
    path = dm.datasets["train"].items[0]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    _fit(_dm(stripes_folder, tmp_path), tmp_path, FreezeAndCache(feature_cache="clean"))
    assert counter.calls == 3
    # another input size changes the pipeline, so every feature is recomputed
    _fit(
        _dm(stripes_folder, tmp_path, pipeline={"image_size": 40}),
        tmp_path,
        FreezeAndCache(feature_cache="clean"),
    )
    assert counter.calls == 5


@pytest.mark.slow
def test_augmented_cache_holds_several_views_and_unfrozen_epochs_see_images(stripes_folder, tmp_path):
    dm = _dm(stripes_folder, tmp_path, pipeline={"augment": "heavy"})
    caches = FreezeAndCache(feature_cache="augmented", cache_views=3)
    model = _fit(dm, tmp_path, caches, epochs=2, frozen_epochs=1)
    train_features = _stored(caches, "train")
    assert train_features.shape == (3, len(dm.datasets["train"]), model.backbone.num_features)
    assert not torch.allclose(train_features[0], train_features[1])  # augmented views differ
    # epoch 1 trained the whole backbone from images
    loader = dm.train_dataloader()
    images, _ = next(iter(loader))
    assert images.ndim == 4


def test_the_cache_is_skipped_when_batchnorm_trains(stripes_folder, tmp_path):
    dm = _dm(stripes_folder, tmp_path)
    L.seed_everything(0)
    model = TransferClassifier(
        num_classes=2,
        backbone=TINY_BACKBONE,
        pretrained=False,
        freeze_schedule=FreezeSchedule(frozen_epochs=1, bn_policy="train"),
    )
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[FreezeAndCache(feature_cache="clean")],
    )
    with pytest.warns(UserWarning, match="feature_cache and trunk_cache are ignored with bn_policy=.train."):
        trainer.fit(model, datamodule=dm)


# --- trunk cache: the frozen bottom of a partly frozen backbone ---------------------------------------


def _fit_top(
    dm: ImageDataModule, tmp_path, caches: FreezeAndCache | None = None, **kwargs
) -> TransferClassifier:
    """Head only for an epoch, then the top 2 backbone groups with the bottom frozen (ImageNet-style BN)."""
    L.seed_everything(0)
    model = TransferClassifier(
        num_classes=2,
        backbone=TINY_BACKBONE,
        pretrained=False,
        freeze_schedule=FreezeSchedule(milestones={0: 0, 1: 2}, bn_policy="eval"),
        **kwargs,
    )
    callbacks = [caches] if caches is not None else []
    trainer = quiet_trainer(tmp_path, max_epochs=3, enable_checkpointing=False, callbacks=callbacks)
    trainer.fit(model, datamodule=dm)
    return model


@pytest.mark.slow
def test_trunk_cache_trains_the_top_exactly_as_without_it(stripes_folder, tmp_path, monkeypatch):
    counter = _CountExtractions(monkeypatch)
    plain = _fit_top(_dm(stripes_folder, tmp_path), tmp_path)
    dm = _dm(stripes_folder, tmp_path)
    caches = FreezeAndCache(trunk_cache="clean")
    cached = _fit_top(dm, tmp_path, caches)
    assert counter.calls == 2  # the trunk of train and val, once for both partly frozen epochs
    trunk_features = _stored(caches, "train")
    trunk = cached.trunk(len(cached.groups) - 2)
    assert trunk_features.dtype == torch.float16 and trunk_features.shape[2] != 3  # feature maps, not images
    # the top groups and the head train to the same weights as from images (float16 storage aside)
    for (name, a), b in zip(plain.state_dict().items(), cached.state_dict().values(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=2e-3, msg=name)
    changed = [n for n, p in cached.backbone.model.named_parameters() if p.requires_grad]
    assert changed and all(not n.startswith(("conv_stem", "bn1")) for n in changed)
    # the trunk's output really stands in for the images: the rest of the forward pass gives the same features
    images = torch.randn(2, 3, 32, 32)
    cached.eval()
    with torch.no_grad():
        torch.testing.assert_close(trunk.rest(trunk(images)), cached.backbone(images))
    # a test after fit runs on images as usual, and scores as the model trained from images
    (result,) = quiet_trainer(tmp_path).test(cached, datamodule=dm, verbose=False)
    (plain_result,) = quiet_trainer(tmp_path).test(
        plain, datamodule=_dm(stripes_folder, tmp_path), verbose=False
    )
    assert result["test_acc"] == plain_result["test_acc"]
    assert result["test_loss"] == pytest.approx(plain_result["test_loss"], abs=1e-3)


@pytest.mark.slow
def test_augmented_trunk_cache_draws_one_view_per_image_each_epoch(stripes_folder, tmp_path):
    dm = _dm(stripes_folder, tmp_path, pipeline={"augment": "heavy"})
    caches = FreezeAndCache(trunk_cache="augmented", cache_views=3)
    _fit_top(dm, tmp_path, caches)
    train_features = _stored(caches, "train")
    assert train_features.shape[:2] == (3, len(dm.datasets["train"]))
    assert not torch.equal(train_features[0], train_features[1])  # augmented views differ


def test_trunk_cache_refuses_a_backbone_it_cannot_split(stripes_folder, tmp_path):
    dm = _dm(stripes_folder, tmp_path)
    L.seed_everything(0)
    model = TransferClassifier(
        num_classes=2,
        backbone="resnet10t",
        pretrained=False,
        freeze_schedule=FreezeSchedule(milestones={0: 0, 1: 2}, bn_policy="eval"),
    )
    with pytest.raises(ValueError, match="splits timm EfficientNet-family backbones"):
        trainer = quiet_trainer(
            tmp_path,
            max_epochs=2,
            enable_checkpointing=False,
            callbacks=[FreezeAndCache(trunk_cache="clean")],
        )
        trainer.fit(model, datamodule=dm)
