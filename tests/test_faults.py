"""Faults and repeatability: seeded augmentation, interruptions, killed runs, failed checkpoint writes."""

from __future__ import annotations

import pytest
import torch
from conftest import NORM

from transferkit import ImageDataModule


def _augmented_dm(root, seed: int, num_workers: int) -> ImageDataModule:
    return ImageDataModule(
        source="folder",
        root=str(root),
        seed=seed,
        num_workers=num_workers,
        batch_size=8,
        augment="heavy",
        **NORM,
    )


def _epoch_batches(dm: ImageDataModule, epoch: int) -> list[torch.Tensor]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning does before every epoch
    return [images for images, _ in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_augmented_batches_repeat_with_the_seed_and_differ_across_seeds(stripes_folder, num_workers):
    first, second = _augmented_dm(stripes_folder, 3, num_workers), _augmented_dm(stripes_folder, 3, 0)
    other = _augmented_dm(stripes_folder, 4, num_workers)
    for dm in (first, second, other):
        dm.setup("fit")
    epochs = {e: _epoch_batches(first, e) for e in (0, 1)}
    for epoch, batches in epochs.items():
        # the same seed: the same augmented pixels, with any number of workers
        again = _epoch_batches(second, epoch)
        assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    # a new epoch draws new augmentations (not just a new order) ...
    first_images = {round(float(x.sum()), 3) for b in epochs[0] for x in b}
    second_images = {round(float(x.sum()), 3) for b in epochs[1] for x in b}
    assert first_images != second_images
    # ... and another seed other ones
    assert not torch.equal(epochs[0][0], _epoch_batches(other, 0)[0])


def test_a_resumed_epoch_draws_what_the_uninterrupted_run_drew(stripes_folder):
    dm = _augmented_dm(stripes_folder, 0, 0)
    dm.setup("fit")
    uninterrupted = [_epoch_batches(dm, e) for e in range(3)][2]
    fresh = _augmented_dm(stripes_folder, 0, 0)  # a new process resuming at epoch 2
    fresh.setup("fit")
    resumed = _epoch_batches(fresh, 2)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed, strict=True))
