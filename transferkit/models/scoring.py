"""What a classifier scores and logs on each split: accuracy and macro F1, of the classes and of their groups,
and the test split's predictions kept for the run report."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from transferkit.data.class_groups import group_labels, group_probabilities

__all__ = ["Scoring"]


def _metrics(num_classes: int, prefix: str) -> MetricCollection:
    # validate_args=False: the argument checks read values back from the device (a sync on every
    # step); labels are already checked by the data module and the loss.
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
            "f1": MulticlassF1Score(num_classes, average="macro", validate_args=False),
        },
        prefix=prefix,
    )


class Scoring(nn.Module):
    """Validation and test metrics of ``num_classes`` classes and, with ``class_groups`` (``{group: [class
    index]}``), of the groups (a group's probability is the sum of its classes'); the test loop's true and
    predicted labels (:attr:`test_predictions`) and raw logits per test-time view (:attr:`test_view_logits`,
    ``(V, N, C)``), so the run report needs no second pass over the test split.

    Training accuracy is not here: it is a batch-weighted mean the module logs on the device, where
    torchmetrics' confusion counts (bincount) would read the device back on every step.

    Example:
        >>> scoring = Scoring(3, {"low": [0], "high": [1, 2]})
        >>> logits, labels = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]]), torch.tensor([0, 2, 2])
        >>> logged = scoring.update("test", logits, labels, logits.argmax(-1), logits[None])
        >>> [sorted(metrics.compute()) for metrics, _ in logged]
        [['test_acc', 'test_f1'], ['test_group_acc', 'test_group_f1']]
        >>> scoring.end_test(); scoring.test_predictions
        (array([0, 2, 2]), array([0, 1, 2]))
    """

    def __init__(self, num_classes: int, class_groups: dict[str, list[int]] | None = None) -> None:
        super().__init__()
        self.class_groups = class_groups
        self.val = _metrics(num_classes, "val_")
        self.test = _metrics(num_classes, "test_")
        if class_groups is not None:
            self.val_group = _metrics(len(class_groups), "val_group_")
            self.test_group = _metrics(len(class_groups), "test_group_")
        self.test_predictions: tuple[np.ndarray, np.ndarray] | None = None
        self.test_view_logits: torch.Tensor | None = None
        self._test_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(
        self, split: str, logits: torch.Tensor, labels: torch.Tensor, scored: torch.Tensor, views: Any = None
    ) -> list[tuple[MetricCollection, bool]]:
        """Add a ``val`` or ``test`` batch: ``scored`` (logits, or predicted labels) against the hard
        ``labels``, the groups from the probabilities of ``logits``; for ``test``, keep the batch's raw
        ``views`` (``(V, B, C)``). The metric collections to log, each with whether the progress bar shows it."""
        metrics: MetricCollection = getattr(self, split)
        metrics.update(scored.detach(), labels)
        logged = [(metrics, True)]
        if self.class_groups is not None:
            grouped: MetricCollection = getattr(self, f"{split}_group")
            probs = logits.detach().softmax(dim=-1)
            grouped.update(
                group_probabilities(probs, self.class_groups), group_labels(labels, self.class_groups)
            )
            logged.append((grouped, False))
        if split == "test":
            self._test_batches.append((labels.detach(), scored.detach(), views.detach()))
        return logged

    def start_test(self) -> None:
        self._test_batches = []

    def end_test(self) -> None:
        """Gather the test loop's batches into :attr:`test_predictions` and :attr:`test_view_logits`."""
        if self._test_batches:
            truth, predicted, views = zip(*self._test_batches, strict=True)
            self.test_predictions = (torch.cat(truth).cpu().numpy(), torch.cat(predicted).cpu().numpy())
            self.test_view_logits = torch.cat(views, dim=1).float().cpu()
        self._test_batches = []
