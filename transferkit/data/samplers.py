"""Training order: samplers whose order is a pure function of ``(seed, epoch)``, and the train loader.

Lightning calls ``set_epoch`` before every epoch, so a run resumed at epoch ``e`` draws the same order as
an uninterrupted one (a sampler driven by one long-lived generator would not).
:func:`transferkit.training.resume.align_train_loader` moves a resumed run's first epoch to the batch it
stopped at.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from transferkit.lightning_internals import wrapped_sampler

__all__ = ["BalancedSampler", "EpochShuffleSampler", "TrainLoader", "epoch_sampler"]


class EpochShuffleSampler(Sampler[int]):
    """A new random order each epoch that depends only on ``(seed, epoch)``.

    With ``tag_epoch=True`` it yields ``(epoch, index)`` pairs, which carry the epoch into DataLoader
    workers (persistent ones too) so that :class:`~transferkit.data.datasets.ImageDataset` draws that
    epoch's augmentations. ``drawn_epoch`` is the epoch of the last order handed out (``None`` before the
    first); ``start`` makes the next order only begin at that position and wrap around (a run resumed
    in the middle of an epoch).

    Example:
        >>> sampler = EpochShuffleSampler(5, seed=0)
        >>> first = list(sampler); sampler.set_epoch(1)
        >>> sorted(first) == list(range(5)) and list(sampler) != first
        True
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


class TrainLoader(DataLoader):
    """The training loader, which Lightning may resume in the middle of an epoch.

    Lightning takes a loader with ``state_dict``/``load_state_dict`` as one that can go on from where a
    checkpoint left it, and warns about any other. This one holds no state of its own: where an
    interrupted epoch goes on is the loop's count of its trained batches, which
    :func:`transferkit.training.resume.align_train_loader` hands to the sampler. Its checkpoints hold an
    empty loader state, so Lightning refuses to resume one in the middle of an epoch with train loaders
    of another kind.

    Under DDP, Lightning rebuilds the loader around a ``DistributedSamplerWrapper`` that would shuffle
    the sampler's order once more before dealing it out to the processes; the order of an
    :class:`EpochShuffleSampler` is already this epoch's random one, so the wrapper deals it out as it is
    (which is what lets a mid-epoch resume find each process's next batch).
    """

    def __init__(self, dataset: Dataset, **kwargs: Any) -> None:  # named, so Lightning can rebuild it
        super().__init__(dataset, **kwargs)
        if isinstance(self.sampler, DistributedSampler) and isinstance(
            wrapped_sampler(self.sampler), EpochShuffleSampler
        ):
            self.sampler.shuffle = False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def epoch_sampler(sampler: Any) -> EpochShuffleSampler | None:
    """The :class:`EpochShuffleSampler` behind a loader's sampler: itself, or the one Lightning's
    ``DistributedSamplerWrapper`` deals out under DDP."""
    return next((s for s in (sampler, wrapped_sampler(sampler)) if isinstance(s, EpochShuffleSampler)), None)
