"""What a model scores and logs on each split: its task's metrics (accuracy and macro F1 of the classes and
of their groups; mAP, F1 and AUROC of labels; MAE, RMSE and R^2 of numbers), and the test split's
predictions kept for the run report."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics import MetricCollection

from transferkit.data.class_groups import group_labels, group_probabilities
from transferkit.models.tasks import SingleLabel, Task

__all__ = ["Scoring"]


class Scoring(nn.Module):
    """Validation and test metrics of a ``task`` (:mod:`~transferkit.models.tasks`) and, for single-label
    classes with ``class_groups`` (``{group: [class index]}``), of the groups (a group's probability is the
    sum of its classes'); the test loop's true and predicted targets (:attr:`test_predictions`), the scores
    a user reads (:attr:`test_scores`: probabilities or values) and raw outputs per test-time view
    (:attr:`test_view_logits`, ``(V, N, K)``), so the run report needs no second pass over the test split.

    Training scores are not here: they are batch-weighted means the module logs on the device, where
    torchmetrics' confusion counts (bincount) would read the device back on every step.

    Example:
        >>> scoring = Scoring(SingleLabel(["a", "b", "c"]), {"low": [0], "high": [1, 2]})
        >>> logits, labels = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]]), torch.tensor([0, 2, 2])
        >>> logged = scoring.update("test", logits, labels, logits.argmax(-1), logits[None])
        >>> [sorted(metrics.compute()) for metrics, _ in logged]
        [['test_acc', 'test_f1'], ['test_group_acc', 'test_group_f1']]
        >>> scoring.end_test(); scoring.test_predictions
        (array([0, 2, 2]), array([0, 1, 2]))
    """

    def __init__(self, task: Task, class_groups: dict[str, list[int]] | None = None) -> None:
        super().__init__()
        self.task_kind = task.kind
        self.class_groups = class_groups
        self.val = task.metrics("val_")
        self.test = task.metrics("test_")
        if class_groups is not None:
            groups = SingleLabel(list(class_groups))
            self.val_group = groups.metrics("val_group_")
            self.test_group = groups.metrics("test_group_")
        self.test_predictions: tuple[np.ndarray, np.ndarray] | None = None
        self.test_scores: np.ndarray | None = None
        self.test_view_logits: torch.Tensor | None = None
        self._test_batches: list[tuple[torch.Tensor, ...]] = []

    def update(
        self,
        split: str,
        logits: torch.Tensor,
        labels: torch.Tensor,
        decided: torch.Tensor | None = None,
        views: Any = None,
        scores: torch.Tensor | None = None,
        task: Task | None = None,
    ) -> list[tuple[MetricCollection, bool]]:
        """Add a ``val`` or ``test`` batch: the raw outputs ``logits`` ``(B, K)`` against ``labels`` (as the data
        gives them), with, at test, the prediction as the model makes it (``decided``), the ``scores`` a user
        reads and the batch's raw ``views`` (``(V, B, K)``). The metric collections to log, each with whether
        the progress bar shows it. ``task``: the model's (a single-label task of the logits' width if not given)."""
        task = task or SingleLabel([str(i) for i in range(logits.shape[-1])])
        metrics: MetricCollection = getattr(self, split)
        task.update(metrics, logits if scores is None else scores, labels, decided)
        logged = [(metrics, True)]
        truth = task.truth(labels).detach()
        if self.class_groups is not None:
            grouped: MetricCollection = getattr(self, f"{split}_group")
            probs = logits.detach().softmax(dim=-1)
            grouped.update(
                group_probabilities(probs, self.class_groups), group_labels(truth, self.class_groups)
            )
            logged.append((grouped, False))
        if split == "test":
            predicted = decided if decided is not None else task.decide(task.scores(logits.detach()[None]))
            shown = scores if scores is not None else task.scores(logits.detach()[None])
            views = views if views is not None else logits[None]
            self._test_batches.append((truth, predicted.detach(), views.detach(), shown.detach()))
        return logged

    def start_test(self) -> None:
        self._test_batches = []

    def end_test(self) -> None:
        """Gather the test loop's batches into :attr:`test_predictions`, :attr:`test_scores` and
        :attr:`test_view_logits`."""
        if self._test_batches:
            truth, predicted, views, scores = zip(*self._test_batches, strict=True)
            self.test_predictions = (torch.cat(truth).cpu().numpy(), torch.cat(predicted).cpu().numpy())
            self.test_view_logits = torch.cat(views, dim=1).float().cpu()
            self.test_scores = torch.cat(scores).float().cpu().numpy()
        self._test_batches = []
