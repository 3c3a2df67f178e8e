"""Batch augmentation: mixup and CutMix on training batches, through timm's ``Mixup``, and the soft-target
loss they need.

Mixup blends each image with another of the batch (``lam * x_i + (1 - lam) * x_j``, ``lam ~ Beta(a, a)``);
CutMix pastes a box of the other image into it, ``lam`` the share of the image kept. The targets are
blended in the same proportions, so the loss is a cross-entropy against a distribution over classes. Both
act on training batches only: validation, test and predict see the images as they are.

timm's ``Mixup`` draws ``lam`` and the box and mixes the images; its dense-target mode (``multi_label``)
mixes class distributions, which is what lets hard labels and soft labels (a probability per class) go
through the same path. Label smoothing is applied after mixing, towards the uniform distribution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import Mixup

from transferkit.errors import ConfigError

__all__ = ["BatchMixing", "hard_labels", "soft_cross_entropy", "to_distribution"]


def to_distribution(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Targets as ``(B, num_classes)`` class distributions: hard labels ``(B,)`` one-hot, soft ones as they are.

    Example:
        >>> to_distribution(torch.tensor([1, 0]), 2)
        tensor([[0., 1.],
                [1., 0.]])
    """
    if labels.ndim == 1:
        return F.one_hot(labels.long(), num_classes).float()
    return labels.float()


def hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """The class of each target: hard labels as they are, a distribution's most probable class."""
    return labels if labels.ndim == 1 else labels.argmax(dim=-1)


def soft_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` against class distributions ``targets`` ``(B, C)``, the mean over the batch;
    with ``label_smoothing`` ``e`` the targets become ``(1 - e) * targets + e / C`` (as ``F.cross_entropy``
    does for hard labels, to which it is equal for one-hot targets). With class weights ``weight`` ``(C,)``
    each class's term is weighted and the sum divided by the batch's total weight under the targets as given:
    for one-hot targets, with or without smoothing, ``F.cross_entropy(weight=..., label_smoothing=...)``."""
    given = targets
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]
    terms = -(targets * F.log_softmax(logits, dim=-1))
    if weight is None:
        return terms.sum(dim=-1).mean()
    # divided by the batch's weight under the unsmoothed targets, as torch divides by its labels' weights
    return (terms * weight).sum() / (given * weight).sum()


class BatchMixing:
    """Mixup and/or CutMix of training batches (timm's ``Mixup``, one ``lam`` per batch).

    Args:
        mixup_alpha: Beta(a, a) of mixup's ``lam``; ``0`` = no mixup.
        cutmix_alpha: Beta(a, a) of CutMix's ``lam``; ``0`` = no CutMix.
        prob: probability that a batch is mixed at all.
        switch_prob: with both on, probability that a mixed batch uses CutMix rather than mixup.
        num_classes: classes of the targets.

    ``mix(images, labels)`` returns the mixed images and ``(B, C)`` targets; labels may be hard ``(B,)`` or
    soft ``(B, C)``. An odd batch mixes all but its last image (mixing pairs the batch with its reverse).
    Its random draws come from NumPy's global generator, which ``seed_everything`` seeds.

    Example:
        >>> mixing = BatchMixing(mixup_alpha=0.4, cutmix_alpha=1.0, num_classes=3)
        >>> images, targets = mixing.mix(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
        >>> images.shape, targets.shape, bool(torch.allclose(targets.sum(1), torch.ones(4)))
        (torch.Size([4, 3, 8, 8]), torch.Size([4, 3]), True)
    """

    def __init__(
        self,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        num_classes: int = 2,
    ) -> None:
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not value >= 0:
                raise ConfigError(f"{name} must be >= 0 (0 = off; 0.2-1.0 is usual), got {value}.")
        for name, value in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {value}.")
        self.num_classes = num_classes
        self.active = (mixup_alpha > 0 or cutmix_alpha > 0) and prob > 0
        self.mixer = (
            Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=prob,
                switch_prob=switch_prob,
                mode="batch",
                label_smoothing=0.0,  # smoothing towards uniform is the loss's, after mixing
                num_classes=num_classes,
                multi_label=True,  # dense targets: mixes class distributions as they are
            )
            if self.active
            else None
        )

    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = to_distribution(labels, self.num_classes)
        if self.mixer is None or len(images) < 2:
            return images, targets
        even = len(images) - len(images) % 2
        images = images.clone()  # timm mixes in place
        mixed, mixed_targets = self.mixer(images[:even], targets[:even])
        images[:even] = mixed
        targets = torch.cat([mixed_targets, targets[even:]])
        return images, targets
