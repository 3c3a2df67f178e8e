"""Batch augmentation: mixup and CutMix through timm's Mixup, on training batches only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import NORM, TINY_BACKBONE, quiet_trainer

import transferkit as tk
from transferkit.models.mixing import BatchMixing, soft_cross_entropy


def test_cutmix_pastes_a_box_of_the_partner_and_the_target_is_the_share_kept():
    np.random.seed(0)
    images = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16), torch.full((3, 16, 16), 2.0)])
    labels = torch.tensor([0, 1, 2])
    mixed, targets = BatchMixing(cutmix_alpha=1.0, num_classes=3).mix(images, labels)
    # image 0 is paired with image 1 (the batch's reverse over its even part); the odd last one is kept
    kept = (mixed[0] == 0).float().mean().item()
    assert 0 < kept < 1 and set(mixed[0].unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(targets[0], torch.tensor([kept, 1 - kept, 0.0]), atol=1e-6)
    assert torch.equal(mixed[2], images[2]) and torch.equal(targets[2], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(images[0], torch.zeros(3, 16, 16))  # the caller's batch is left as it was


def test_mixup_blends_soft_labels_as_it_blends_images():
    np.random.seed(1)
    images = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    soft = torch.tensor([[0.75, 0.25], [0.0, 1.0]])
    mixed, targets = BatchMixing(mixup_alpha=0.4, num_classes=2).mix(images, soft)
    lam = 1 - mixed[0, 0, 0, 0].item()  # image 0 = lam * zeros + (1 - lam) * ones
    assert torch.allclose(mixed[0], torch.full((3, 4, 4), 1 - lam))
    assert torch.allclose(targets[0], lam * soft[0] + (1 - lam) * soft[1], atol=1e-6)


def test_soft_cross_entropy_is_cross_entropy_for_one_hot_targets_and_settings_are_checked():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    one_hot = F.one_hot(labels, 3).float()
    for eps in (0.0, 0.1):
        expected = F.cross_entropy(logits, labels, label_smoothing=eps)
        assert torch.allclose(soft_cross_entropy(logits, one_hot, eps), expected)
    with pytest.raises(tk.ConfigError, match="mixup_alpha must be >= 0"):
        tk.TransferClassifier(
            num_classes=2, backbone=TINY_BACKBONE, pretrained=False, mixing={"mixup_alpha": -1}
        )
    with pytest.raises(tk.ConfigError, match="model.mixing.prob must be a probability"):
        tk.TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False, mixing={"prob": 2})


def test_a_mixed_run_with_a_freeze_schedule_learns_and_evaluates_unmixed_images(stripes_folder, tmp_path):
    import lightning as L

    L.seed_everything(0)
    dm = tk.ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={**NORM},
        loader={"batch_size": 8, "num_workers": 0},
    )
    model = tk.TransferClassifier(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False, head={"hidden_dims": []}, optimizer={"lr": 0.02}, mixing={"mixup_alpha": 0.4, "cutmix_alpha": 1.0}, freeze_schedule={"frozen_epochs": 1},
    )  # fmt: skip
    calls = {"train": 0}
    mix = model.mixing.mix

    def counted(images, labels):
        calls["train"] += 1
        return mix(images, labels)

    model.mixing.mix = counted
    trainer = quiet_trainer(tmp_path, max_epochs=8)
    trainer.fit(model, dm)
    assert calls["train"] == 8 * trainer.num_training_batches  # training batches only, never validation
    assert trainer.callback_metrics["val_acc"] >= 0.7  # mixed targets still teach the orientation
    assert model.trainable_groups > 0  # unfroze on schedule

    data = tk.ImageDataModule(
        source="folder",
        root=str(stripes_folder),
        pipeline={**NORM},
        loader={"batch_size": 8, "num_workers": 0},
    )
    cached = tk.FreezeAndCache(feature_cache="clean")
    with pytest.raises(tk.ConfigError, match="mixup/CutMix mix training images, but caches.feature_cache"):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[cached]).fit(model, data)


def _soft_csv(folder, path, columns):
    """A CSV over the stripes folder: each image's row of ``columns(label)``."""
    import csv

    files = sorted(folder.rglob("*.png"))
    with open(path, "w", newline="") as handle:
        writer = None
        for file in files:
            row = {"path": str(file), **columns(file.parent.name)}
            if writer is None:
                writer = csv.DictWriter(handle, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
    return path


def test_a_csv_gives_class_probabilities_and_bad_ones_are_named(stripes_folder, tmp_path):
    sure = {"horizontal": 0.9, "vertical": 0.2}  # the probability of "horizontal"
    one = _soft_csv(stripes_folder, tmp_path / "one.csv", lambda c: {"label": c, "p_horizontal": sure[c]})
    data = tk.ImageDataModule(source="csv", csv_path=str(one), pipeline={**NORM}).data
    horizontal = data.labels == data.class_names.index("horizontal")
    assert np.allclose(data.soft[horizontal], [0.9, 0.1]) and np.allclose(data.soft[~horizontal], [0.2, 0.8])
    # one column per class, no label column: each image's class is its most probable one
    both = _soft_csv(
        stripes_folder, tmp_path / "both.csv", lambda c: {"p_horizontal": sure[c], "p_vertical": 1 - sure[c]}
    )
    assert np.array_equal(
        tk.ImageDataModule(source="csv", csv_path=str(both), pipeline={**NORM}).data.labels, data.labels
    )
    bad = _soft_csv(stripes_folder, tmp_path / "bad.csv", lambda c: {"p_horizontal": 0.7, "p_vertical": 0.7})
    with pytest.raises(tk.DatasetError, match="not a distribution .* e.g. row 2: \\[0.7, 0.7\\]"):
        tk.ImageDataModule(source="csv", csv_path=str(bad), pipeline={**NORM})
    with pytest.raises(tk.DatasetError, match="gives no class probabilities"):
        tk.ImageDataModule(source="digits", soft_labels=True, pipeline={**NORM})


def test_soft_labels_train_on_distributions_and_are_scored_on_hard_labels(stripes_folder, tmp_path):
    import lightning as L

    L.seed_everything(0)
    sure = {"horizontal": 0.8, "vertical": 0.2}
    path = _soft_csv(stripes_folder, tmp_path / "soft.csv", lambda c: {"label": c, "p_horizontal": sure[c]})
    dm = tk.ImageDataModule(
        source="csv", csv_path=str(path), soft_labels=True, pipeline={**NORM}, loader={"batch_size": 8, "num_workers": 0},
    )  # fmt: skip
    dm.setup("fit")
    _, targets = next(iter(dm.train_dataloader()))
    assert targets.dtype == torch.float32 and targets.shape == (8, 2)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert all(min(abs(p - 0.8), abs(p - 0.2)) < 1e-6 for p in targets[:, 0].tolist())
    _, labels = next(iter(dm.val_dataloader()))
    assert labels.dtype == torch.long  # validation scores the classes
    model = tk.TransferClassifier(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False, head={"hidden_dims": []}, optimizer={"lr": 0.02}, freeze_schedule={"frozen_epochs": 2},
    )  # fmt: skip
    trainer = quiet_trainer(tmp_path, max_epochs=6, callbacks=[tk.FreezeAndCache(feature_cache="clean")])
    trainer.fit(model, dm)  # the frozen epochs train on cached features with the same soft targets
    assert trainer.callback_metrics["val_acc"] >= 0.7


def test_elpv_trains_on_its_annotated_defect_probability():
    dm = tk.ImageDataModule(source="elpv", soft_labels=True, pipeline={**NORM}, loader={"num_workers": 0})
    dm.setup("fit")
    train = dm.datasets["train"]
    probability = dm.data.meta["defect_probability"][dm.split_indices["train"]]
    assert np.allclose(train.targets[:, 1], probability) and np.allclose(train.targets.sum(1), 1)
    assert np.array_equal(train.labels, (probability >= 0.5).astype(int))  # scored as before
    assert dm.datasets["test"].targets is None
    with pytest.raises(tk.DatasetError, match="ELPV needs task: binary"):
        tk.ImageDataModule(source="elpv", task="4class", soft_labels=True, pipeline={**NORM})
