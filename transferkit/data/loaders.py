"""Loaders: batches of a split's dataset, in a seeded order that a resumed run repeats."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from transferkit.data.samplers import BalancedSampler, EpochShuffleSampler, TrainLoader
from transferkit.data.settings import LoaderSettings
from transferkit.lightning_internals import epoch_about_to_run

__all__ = ["make_loader", "stream_loader", "train_sampler"]


def train_sampler(
    labels: np.ndarray, settings: LoaderSettings, seed: int, trainer: Any = None, tag_epoch: bool = False
) -> EpochShuffleSampler:
    """The training order: each image once per epoch (``shuffle``) or classes drawn equally often
    (``balanced``), seeded by ``(seed, epoch)``. Built during a fit of ``trainer``, it starts at the epoch
    about to run."""
    if settings.sampler == "balanced":
        sampler = BalancedSampler(np.asarray(labels), seed, tag_epoch)
    else:
        sampler = EpochShuffleSampler(len(labels), seed, tag_epoch)
    if trainer is not None and trainer.state.fn == "fit":
        # a loader built mid-run (the caches reload loaders every epoch) is iterated before Lightning's
        # set_epoch, by loader workers at once: it must start at the epoch about to run, not at 0
        sampler.set_epoch(epoch_about_to_run(trainer))
    return sampler


def make_loader(
    dataset: Dataset,
    labels: np.ndarray,
    settings: LoaderSettings,
    seed: int,
    shuffle: bool,
    trainer: Any = None,
    workers: bool = True,
) -> DataLoader:
    """Batches of ``dataset`` (whose targets are ``labels``): for training (``shuffle``) in the seeded
    order of :func:`train_sampler`, never a last batch of one (it breaks BatchNorm); with ``settings``'
    worker processes unless ``workers`` is off (tensors already in memory)."""
    num_workers = settings.num_workers if workers else 0
    return (TrainLoader if shuffle else DataLoader)(
        dataset,
        batch_size=settings.batch_size,
        sampler=train_sampler(labels, settings, seed, trainer, tag_epoch=workers) if shuffle else None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=shuffle and len(labels) > settings.batch_size,  # a batch of 1 breaks BatchNorm
        # an own generator: loaders never draw from the global RNG that dropout uses
        generator=torch.Generator().manual_seed(seed),
    )


def stream_loader(dataset: Any, settings: LoaderSettings, shuffle: bool, trainer: Any = None) -> DataLoader:
    """Batches of a LitData pack's split, in LitData's seeded order, resumable by epoch during a fit."""
    from transferkit.data.stream import StreamLoader

    in_fit = shuffle and trainer is not None and trainer.state.fn == "fit"
    return StreamLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        drop_last=shuffle and len(dataset.labels) > settings.batch_size,  # a batch of 1 breaks BatchNorm
        epoch_of_run=(lambda: epoch_about_to_run(trainer)) if in_fit else None,
    )
